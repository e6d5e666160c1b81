"""End-to-end vLLM throughput on the GPU: the same Llama-3-8B-shaped model (random weights) as
FP16, as QQQ (per-channel, g128) checkpoints made by our own quantizer, and as the checkpoints
vLLM loads natively for its W8A8-INT8 path (compressed-tensors, per-channel weights, dynamic
per-token activations) and its W4A16 path (GPTQ 4-bit g128, run by Marlin), with vLLM's defaults
(torch.compile + CUDA graphs), side by side in one run.

    python benchmarks/bench_e2e.py --workdir /tmp/e2e [--layers 32] [--formats fp16,w8a8,w4a16,qqq_channel,qqq_g128]
    (also qqq_channel_lm_head, qqq_g128_lm_head: the lm_head quantized too)

(a) offline throughput, input 1024 / output 128 tokens, batches 1, 16, 64, 256;
(b) decode latency per token at batch 1 and 16: (time for 128 new tokens - time for 1) / 127,
and the time for 1 (the prefill and first token, first_token_ms);
each time the median of --repeats runs (3), every run's tokens/s kept in the JSON;
(c) the weights: bytes on disk (weights_gib) and the GPU memory vLLM reports for the loaded model
(weights_gpu_gib, its "Model loading took" line).
Each format runs in its own process (a fresh engine, all GPU memory back between them).
CUDA graphs are captured for the batch sizes the bench decodes at and their powers of two
(--capture-sizes) instead of vLLM's ~50 default sizes: the same graphs serve the measured steps,
and engine start-up, which the bench does not time, is shorter. --append adds the formats run
to an existing --json (a run split over device calls on the same machine and checkpoints).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 16, 64, 256)
# CUDA graph batch sizes: the measured batches and the powers of two between (see the doc above).
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# The QQQ checkpoints make_models writes with qqq-quantize, by group size; *_lm_head: the
# lm_head quantized too (qqq-quantize --quantize-lm-head).
QQQ_GROUP_SIZES = {"qqq_channel": -1, "qqq_g128": 128, "qqq_channel_lm_head": -1,
                   "qqq_g128_lm_head": 128}


def make_models(workdir: Path, layers: int, formats: list[str]) -> dict[str, Path]:
    """The FP16 model and the checkpoints of `formats` in workdir (made where missing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from offline.quantize import quantize_model

    fp16 = workdir / "llama3-8b-shaped-fp16"
    if not fp16.exists():  # written to a sibling, then renamed: a cut-short run leaves none
        import shutil
        started = time.perf_counter()
        tmp = fp16.with_name(fp16.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=layers, num_attention_heads=32,
                             num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).half()
        model.save_pretrained(tmp)
        write_word_tokenizer(tmp, config.vocab_size)
        tmp.rename(fp16)
        del model
        torch.cuda.empty_cache()
        print(f"fp16 model written in {time.perf_counter() - started:.0f} s", flush=True)
    out = {"fp16": fp16}
    for name, g in QQQ_GROUP_SIZES.items():
        path = workdir / f"llama3-8b-shaped-{name}"
        if name in formats and not path.exists():
            started = time.perf_counter()
            quantize_model(fp16, path, g, calib=None, device="cuda",
                           lm_head=name.endswith("_lm_head"))
            print(f"{name} quantized in {time.perf_counter() - started:.0f} s", flush=True)
        out[name] = path
    for name, convert in (("w8a8", _w8a8_tensors), ("w4a16", _w4a16_tensors)):
        path = workdir / f"llama3-8b-shaped-{name}"
        if name in formats and not path.exists():
            started = time.perf_counter()
            _convert(fp16, path, convert, QUANT_CONFIGS[name])
            print(f"{name} converted in {time.perf_counter() - started:.0f} s", flush=True)
        out[name] = path
    return out


def write_word_tokenizer(model_dir: Path, vocab_size: int):
    """A word-level tokenizer with one word per model id ("<unk>", "<s>", "</s>", "w3", "w4", ...)
    and a chat template, so that `vllm serve` runs on the random model: every id it samples
    decodes to a word (a small real tokenizer would leave most of its 128256 ids empty text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from offline.tiny_model import CHAT_TEMPLATE
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_CONFIGS = {
    "w8a8": {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                        "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                  "strategy": "token", "dynamic": True}}},
    },
    "w4a16": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
              "sym": True},
}
# Every checkpoint make_models can write (--formats takes these, each with VARIANTS suffixes).
FORMATS = ("fp16", *QQQ_GROUP_SIZES, *QUANT_CONFIGS)


def _w8a8_tensors(prefix, w):
    """int8 weight [N, K] with a float32 scale per output channel (round to nearest)."""
    import torch
    scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
    q = torch_round_clamp(w.float() / scale, -127, 127).to(torch.int8)
    return {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale}


def _w4a16_tensors(prefix, w):
    """GPTQ v1 layout, symmetric 4-bit, groups of 128: qweight int32 [K/8, N] (8 codes along K,
    low nibble first), scales fp16 [K/128, N], qzeros int32 [K/128, N/8] holding 8 - 1, g_idx."""
    import torch
    n, k = w.shape
    wt = w.float().t().reshape(k // 128, 128, n)
    scale = (wt.abs().amax(dim=1, keepdim=True) / 7).clamp(min=1e-8)
    codes = (torch_round_clamp(wt / scale, -8, 7) + 8).to(torch.int32).reshape(k, n)
    shifts = (torch.arange(8, device=w.device, dtype=torch.int32) * 4).view(1, 8, 1)
    qweight = (codes.view(k // 8, 8, n) << shifts).sum(dim=1, dtype=torch.int32)
    qzeros = torch.full((k // 128, n // 8), 0x77777777, dtype=torch.int32, device=w.device)
    g_idx = torch.arange(k, dtype=torch.int32, device=w.device) // 128
    return {f"{prefix}.qweight": qweight, f"{prefix}.scales": scale.squeeze(1).half(),
            f"{prefix}.qzeros": qzeros, f"{prefix}.g_idx": g_idx}


def torch_round_clamp(x, lo, hi):
    return x.round().clamp(lo, hi)


def _convert(fp16: Path, out: Path, convert, quant_config):
    """Rewrite each safetensors shard of the FP16 checkpoint with its linear weights converted."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for shard in sorted(fp16.glob("*.safetensors")):
        tensors = {}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with safe_open(shard, framework="pt", device=device) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                prefix = name[: -len(".weight")]
                if name.endswith(".weight") and prefix.split(".")[-1] in LINEARS:
                    tensors.update({k: v.contiguous().cpu() for k, v in convert(prefix, t).items()})
                else:
                    tensors[name] = t.cpu()
        save_file(tensors, tmp / shard.name, metadata={"format": "pt"})
        weight_map.update({name: shard.name for name in tensors})
    config = json.loads((fp16 / "config.json").read_text())
    config["quantization_config"] = quant_config
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    from offline.checkpoint import TOKENIZER_FILES
    for name in TOKENIZER_FILES:
        if (fp16 / name).exists():
            shutil.copy(fp16 / name, tmp)
    tmp.rename(out)


# A checkpoint's run with settings changed: suffixes of its format, any of them, in any order.
VARIANTS = {
    "_kernel_quant": {"VLLM_QQQ_COMPILED_QUANT": "0"},  # our quantization kernel (vllm_qqq.ops)
    "_pdl": {"TORCHINDUCTOR_ENABLE_PDL": "1"},  # Inductor's kernels as programmatic launches
    "_plain_inductor": {"VLLM_QQQ_INDUCTOR_PDL": "0"},  # the plugin leaves Inductor's default
    "_looped_rows": {"VLLM_QQQ_PERSISTENT_ROWS": "0"},  # Inductor's own reduction heuristic
    "_fused_silu": {"VLLM_QQQ_FUSED_QUANT": "silu"},  # our SiLU-and-mul + quantization kernel
    "_unfused": {"VLLM_QQQ_FUSED_QUANT": "0"},  # Inductor's kernels for both (no fusion pass)
    "_fused": {"VLLM_QQQ_FUSED_QUANT": "1"},  # that and our add + RMSNorm + quantization kernel
    # vLLM's compile_sizes: Inductor also compiles batches 1 and 16 with static shapes. With the
    # batch symbolic, a one-row norm or SiLU-mul reduction (with the quantization fused) runs as
    # one program on one SM; with M = 1 known, Inductor may split it over many.
    "_compile_small": {"BENCH_COMPILE_SIZES": "1,16"},
}


def split_variants(fmt: str) -> tuple[str, dict[str, str]]:
    """"qqq_channel_kernel_quant_pdl" -> ("qqq_channel", the two variants' settings)."""
    env = {}
    while suffix := next((s for s in VARIANTS if fmt.endswith(s)), None):
        fmt = fmt.removesuffix(suffix)
        env.update(VARIANTS[suffix])
    return fmt, env


def run_format(model: str, quantization: str | None, batches, eager: bool,
               capture_sizes: list[int] | None, repeats: int) -> dict:
    """In a child process: throughput and decode latency for one checkpoint."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    compilation = {"cudagraph_capture_sizes": capture_sizes} if capture_sizes else {}
    if os.environ.get("BENCH_COMPILE_SIZES"):
        sizes = os.environ["BENCH_COMPILE_SIZES"].split(",")
        compilation["compile_sizes"] = [int(b) for b in sizes]
    llm = LLM(model, quantization=quantization, skip_tokenizer_init=True, max_model_len=2048,
              max_num_seqs=256, gpu_memory_utilization=0.85, attention_backend="TRITON_ATTN",
              seed=0, enforce_eager=eager, compilation_config=compilation or None)
    cc = llm.llm_engine.vllm_config.compilation_config
    print(f"compilation mode {cc.mode}, cudagraph mode {cc.cudagraph_mode}, "
          f"engine ready in {time.perf_counter() - start:.0f} s", flush=True)
    import random
    rng = random.Random(0)

    def prompts(n):
        return [{"prompt_token_ids": [rng.randrange(100, 128000) for _ in range(1024)]}
                for _ in range(n)]

    def timed(batch, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=False)
        p = prompts(batch)
        start = time.perf_counter()
        outs = llm.generate(p, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return elapsed

    rows = []
    for batch in batches:
        # Warm up at this batch size first: the first prefill and decode at a new batch size
        # cost a one-time ~0.5 s (seen on the H100 as b1 decode at 10.7 ms/token in the bench
        # against 6.5 ms per step in the profiler), which would land in the timed run.
        timed(batch, 8)
        # The median of `repeats` runs: single runs of the same checkpoint on one machine spread
        # 234-270 tok/s at batch 1 (NOTES.md "End to end", seventh session).
        runs = [timed(batch, 128) for _ in range(repeats)]
        t = statistics.median(runs)
        row = {"batch": batch, "input_len": 1024, "output_len": 128,
               "tokens_per_s": batch * 128 / t,
               "tokens_per_s_runs": [batch * 128 / r for r in runs]}
        if batch in (1, 16):
            # Prefill and first token: vLLM's time to the first token for this batch.
            firsts = [timed(batch, 1) for _ in range(repeats)]
            t1 = statistics.median(firsts)
            row["decode_ms_per_token"] = (t - t1) / 127 * 1000
            row["first_token_ms"] = t1 * 1000
            row["first_token_ms_runs"] = [f * 1000 for f in firsts]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "weights_gib": _weight_bytes(model) / 2**30}


def model_memory_gib(log: str) -> float | None:
    """The GPU memory vLLM reports for the loaded model (weights and buffers, before the KV
    cache): its "Model loading took X GiB" line."""
    import re
    found = re.findall(r"Model loading took ([0-9.]+) GiB", log)
    return float(found[-1]) if found else None


def _weight_bytes(model_dir):
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/e2e"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--formats", default="fp16,w8a8,w4a16,qqq_channel,qqq_g128")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no compile/graphs)")
    parser.add_argument("--capture-sizes", default=",".join(map(str, CAPTURE_SIZES)),
                        help="CUDA graph batch sizes; 'default' for vLLM's own list")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per batch size; the median is reported")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of other formats already in --json")
    parser.add_argument("--prepare-only", action="store_true",
                        help="make the checkpoints in --workdir and stop (for profile_decode.py)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sizes = (None if args.capture_sizes == "default"
                 else [int(b) for b in args.capture_sizes.split(",")])
        result = run_format(args.child[0], None if args.child[1] == "none" else args.child[1],
                            [int(b) for b in args.batches.split(",")], args.eager, sizes,
                            args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        return
    unknown = [f for f in args.formats.split(",") if split_variants(f)[0] not in FORMATS]
    if unknown:  # before any model is made
        parser.error(f"unknown --formats {', '.join(unknown)}; known: {', '.join(FORMATS)} "
                     f"(each may end in {', '.join(VARIANTS)})")
    import torch
    device = torch.cuda.get_device_name()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = make_models(args.workdir, args.layers,
                         sorted({split_variants(f)[0] for f in args.formats.split(",")}))
    if args.prepare_only:
        print("\n".join(f"{name}: {path}" for name, path in models.items() if path.exists()))
        return
    report = {"device": device, "model": f"Llama-3-8B-shaped, {args.layers} layers, random "
              "weights; QQQ by qqq-quantize (RTN), W8A8 compressed-tensors int8 (channel weights, "
              "dynamic token activations), W4A16 GPTQ sym g128 (Marlin)", "rows": [],
              "weights_gib": {}, "commands": []}
    formats = args.formats.split(",")
    if args.append and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        if old.get("model") != report["model"] or old.get("device") != device:
            sys.exit(f"--append: {args.json} holds another model or device")
        report["rows"] = [r for r in old["rows"] if r["format"] not in formats]
        report["weights_gib"] = {f: v for f, v in old["weights_gib"].items() if f not in formats}
        report["weights_gpu_gib"] = {f: v for f, v in old.get("weights_gpu_gib", {}).items()
                                     if f not in formats}
        report["commands"] = old.get("commands", [])
    report["commands"].append(" ".join(sys.argv))
    for fmt in formats:
        quant = "qqq" if fmt.startswith("qqq") else "none"  # the others: from config.json
        base, settings = split_variants(fmt)
        env = {**os.environ, **settings}
        cmd = [sys.executable, __file__, "--child", str(models[base]), quant,
               "--batches", args.batches, "--capture-sizes", args.capture_sizes,
               "--repeats", str(args.repeats)] + (
                   ["--eager"] if args.eager else [])
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        for line in (proc.stdout + proc.stderr).splitlines():
            if any(key in line.lower() for key in ("compilation mode", "cuda graph", "cudagraph",
                                                   "asynchronous scheduling", "model loading took")):
                print(f"  [{fmt}] {line[-200:]}")
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{fmt}: FAILED\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
            continue
        result = json.loads(lines[-1][7:])
        report["weights_gib"][fmt] = result["weights_gib"]
        loaded = model_memory_gib(proc.stdout + proc.stderr)
        if loaded is not None:
            report.setdefault("weights_gpu_gib", {})[fmt] = loaded
        for row in result["rows"]:
            report["rows"].append({"format": fmt, **row})
        print(f"{fmt}: " + " ".join(f"b{r['batch']}={r['tokens_per_s']:.0f} tok/s"
                                    for r in result["rows"])
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)
        if args.json:  # after every format, so a cut-short run keeps what it measured
            args.json.write_text(json.dumps(report, indent=1))
    base = {r["batch"]: r for r in report["rows"] if r["format"] == "fp16"}
    print("\n| format | batch | tokens/s | vs fp16 | decode ms/token | first token ms |")
    for r in report["rows"]:
        ratio = r["tokens_per_s"] / base[r["batch"]]["tokens_per_s"] if r["batch"] in base else 0
        print(f"| {r['format']} | {r['batch']} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | "
              f"{r.get('decode_ms_per_token', float('nan')):.2f} | "
              f"{r.get('first_token_ms', float('nan')):.1f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
