"""vllm-qqq: serve QQQ W4A8 checkpoints with an unmodified vLLM."""

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
    _registered = True
