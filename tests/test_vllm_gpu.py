"""vLLM on the GPU with the QQQ CUDA kernels, its defaults on (torch.compile, CUDA graphs): greedy
tokens agree with the PyTorch reference path of the same checkpoints (run on the GPU machine)."""

import pytest

from test_vllm_offline import PROMPTS, check_greedy, generate, lora_adapter

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]


@pytest.mark.parametrize("kind", ["rtn_channel", "qqq_g128", "lm_head"])
def test_kernels_generate_like_the_reference(qqq_checkpoints, qqq_calibrated, qqq_lm_head, kind):
    """lm_head: the checkpoint whose lm_head is quantized too, its logits from our kernels."""
    ckpt = {"rtn_channel": qqq_checkpoints[-1], "qqq_g128": qqq_calibrated,
            "lm_head": qqq_lm_head}[kind]
    result = generate(ckpt, "qqq", dtype="float16")
    assert "linear layers run the QQQ CUDA kernels" in result["log"]
    assert "run the PyTorch reference" not in result["log"]
    # fp16 activations on the GPU against the fp32 reference model: per-token int8 rounding
    # flips a little more often than between two fp32 runs, hence a looser tie allowance.
    ties = check_greedy(ckpt, result["tokens"], near_tie=1.0)
    assert ties <= 8, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"


def test_lora_adapter_with_the_kernels(qqq_calibrated, tmp_path):
    """vLLM's LoRA layers around our op, under torch.compile and CUDA graphs: the offline test's
    adapter and oracle, with the fp16 tie allowance above."""
    lora, oracle = lora_adapter(qqq_calibrated, tmp_path / "adapter")
    result = generate(qqq_calibrated, "qqq", dtype="float16", lora=lora)
    assert "linear layers run the QQQ CUDA kernels" in result["log"]
    ties = check_greedy(qqq_calibrated, result["tokens"], near_tie=1.0, model=oracle)
    assert ties <= 8, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"


def test_fused_quant_generates_like_the_reference(qqq_checkpoints):
    """VLLM_QQQ_FUSED_QUANT=1 on the GPU: vLLM's pass manager runs the plugin's pass on its
    piecewise graphs, which fuses each layer's SiLU-and-mul and its add + RMSNorms (all but the
    first layer's input norm, which has no residual) with their quantization, and the tokens
    stay on the reference's greedy path, with the allowance above."""
    import json
    ckpt = qqq_checkpoints[-1]
    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    env = {"VLLM_QQQ_FUSED_QUANT": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_DISABLE_COMPILE_CACHE": "1", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    result = generate(ckpt, "qqq", dtype="float16", env=env)
    assert "linear layers run the QQQ CUDA kernels" in result["log"]
    assert result["fused"]["silu"] >= layers
    assert result["fused"]["norm"] >= 2 * layers - 1
    ties = check_greedy(ckpt, result["tokens"], near_tie=1.0)
    assert ties <= 8, f"{ties} near-tie steps out of {20 * len(PROMPTS)}"

