"""vllm-qqq: serve QQQ W4A8 checkpoints with an unmodified vLLM."""

import os

# The plugin's environment variables and their defaults (read through setting()):
# VLLM_QQQ_COMPILED_QUANT=0: traced linears quantize with the kernel, not PyTorch ops (ops.py);
# VLLM_QQQ_QUANT_PDL=0: the quantization kernel launched plainly, not early (ops.py);
# VLLM_QQQ_INDUCTOR_PDL=0: Inductor's kernels left as they are (config.py);
# VLLM_QQQ_PERSISTENT_ROWS=0: Inductor's own reduction heuristic (config.py);
# VLLM_QQQ_FUSED_QUANT="silu": SiLU-and-mul with the down projection's quantization in a kernel of
# ours instead of Inductor's (fusion.py); "1" or "silu,norm" also add + RMSNorm with the next
# linear's quantization (slower than Inductor's at every batch measured, so not by default), "0"
# neither; "auto" (the default): "silu" where our kernels run on sm_90 or newer, else "0"
# (config.py).
ENVIRONMENT = {"VLLM_QQQ_COMPILED_QUANT": "1", "VLLM_QQQ_QUANT_PDL": "1",
               "VLLM_QQQ_INDUCTOR_PDL": "1", "VLLM_QQQ_PERSISTENT_ROWS": "1",
               "VLLM_QQQ_FUSED_QUANT": "auto"}


def setting(name: str) -> str:
    return os.getenv(name, ENVIRONMENT[name])


_registered = False


def register() -> None:
    """The `vllm.general_plugins` entry point. vLLM calls it in every process it starts (API
    server, engine core, workers), so it must be idempotent and cheap."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_qqq.config import QQQConfig

    register_quantization_config("qqq")(QQQConfig)
    _register_environment_variables()
    _registered = True


def _register_environment_variables() -> None:
    """Declares the VLLM_QQQ_* variables to vLLM: it then takes them into its torch.compile cache
    key (VLLM_QQQ_COMPILED_QUANT changes the traced graph; a cached graph of the other setting
    would be reused silently) and does not warn about them as unknown."""
    import vllm.envs as envs

    for name in ENVIRONMENT:
        envs.environment_variables.setdefault(name, lambda n=name: setting(n))
