"""QQQConfig: vLLM's view of a QQQ checkpoint's `quantization_config`."""

import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_qqq import setting
from vllm_qqq.format import GROUP_SIZES, FormatError

logger = init_logger("vllm.qqq")


def enable_inductor_pdl() -> None:
    """Inductor's kernels as programmatic dependent launches (on sm_90+; Inductor checks): the
    GEMM after vLLM's norm or SiLU-and-mul kernel, into which Inductor fuses the quantization,
    then starts while that kernel runs and prefetches its weights. On the H100, batch-1 decode 4-8%
    faster per token; FP16 unchanged by it (benchmarks/results/NOTES.md, "End to end"). It is
    Inductor's process-wide setting, read when vLLM compiles the model (and part of vLLM's compile
    cache key). Left alone with VLLM_QQQ_INDUCTOR_PDL=0 or where TORCHINDUCTOR_ENABLE_PDL is set."""
    if setting("VLLM_QQQ_INDUCTOR_PDL") == "0" or "TORCHINDUCTOR_ENABLE_PDL" in os.environ:
        return
    import torch._inductor.config as inductor_config

    inductor_config.triton.enable_pdl = True


def enable_persistent_rows() -> None:
    """Inductor keeps rows of up to 16384 entries in registers for the quantization's absmax,
    one pass over the row instead of two or three (vllm_qqq/inductor_choices.py). Process-wide,
    like the PDL setting, and part of vLLM's compile-cache key. Left alone with
    VLLM_QQQ_PERSISTENT_ROWS=0 or where the user set Inductor's inductor_choices_class."""
    import torch._inductor.config as inductor_config

    if setting("VLLM_QQQ_PERSISTENT_ROWS") == "0" or inductor_config.inductor_choices_class:
        return
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    from vllm_qqq.inductor_choices import PersistentRows

    inductor_config.inductor_choices_class = PersistentRows
    # Inductor makes each thread's choices once, from the setting: this thread's may predate it.
    if type(V.choices) is InductorChoices:
        V.set_choices_handler(PersistentRows())


def fused_quant_kinds() -> tuple[str, ...]:
    """The pairs VLLM_QQQ_FUSED_QUANT asks to fuse: "1" all of fusion.KINDS, "0" or "" none,
    else a comma-separated subset of them. "auto": the SiLU pair where our CUDA kernels run on
    sm_90 or newer, else none: before sm_90 silu_mul_quant has no clusters and gives a decode
    row one CTA, as Inductor's kernel does, only slower (8.0 against 4.7 us at M = 1 on the
    H100, row_quant_h100.log); without the kernels (the CPU) the op is eager PyTorch, where
    Inductor compiles the pair."""
    from vllm_qqq import ops
    from vllm_qqq.fusion import KINDS

    value = setting("VLLM_QQQ_FUSED_QUANT").strip()
    if value == "auto":
        # sm_90+: where the kernel runs rows in clusters (rows_in_clusters, csrc/cluster.cuh).
        clusters = ops.kernels_available() and torch.cuda.get_device_capability() >= (9, 0)
        return ("silu",) if clusters else ()
    if value in ("", "0"):
        return ()
    if value == "1":
        return KINDS
    kinds = tuple(k.strip() for k in value.split(","))
    if not set(kinds) <= set(KINDS):
        raise ValueError(f"VLLM_QQQ_FUSED_QUANT={value!r}: expected auto, 0, 1 or a "
                         f"comma-separated subset of {', '.join(KINDS)}")
    return kinds


def enable_quant_fusion() -> None:
    """Where VLLM_QQQ_FUSED_QUANT names pairs (by default the SiLU pair), vLLM's compiled graphs
    get vllm_qqq.fusion's pass as Inductor's post-grad custom pass, which vLLM runs after its own
    passes and keys its compile cache on (the pass's uuid). Left alone where the user set a
    post-grad pass of their own (Inductor takes one), and where no vLLM config is current (a
    layer built outside vLLM's model loading: no compiled graph to put it in)."""
    kinds = fused_quant_kinds()
    if not kinds:
        return
    from vllm.config import get_current_vllm_config_or_none

    from vllm_qqq.fusion import QuantFusion

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return
    passes = vllm_config.compilation_config.inductor_compile_config
    current = passes.get("post_grad_custom_post_pass")
    if current is None:
        passes["post_grad_custom_post_pass"] = QuantFusion(kinds)
    elif not isinstance(current, QuantFusion):
        # A warning where the user asked for the fusion; the default's is only news.
        log = logger.warning if "VLLM_QQQ_FUSED_QUANT" in os.environ else logger.info
        log("VLLM_QQQ_FUSED_QUANT is ignored: a post_grad_custom_post_pass of your own is set "
            "(%s)", type(current).__name__)


class QQQConfig(QuantizationConfig):
    """config.json: {"quant_method": "qqq", "wbits": 4, "group_size": -1 | 128[, "lm_head": true]}.
    lm_head: the checkpoint's lm_head is a QQQ linear too (qqq-quantize --quantize-lm-head)."""

    def __init__(self, weight_bits: int = 4, group_size: int = -1,
                 lm_head_quantized: bool = False) -> None:
        super().__init__()
        self.lm_head_quantized = lm_head_quantized
        if weight_bits != 4:
            raise FormatError(f"QQQ supports wbits=4 only, the checkpoint says wbits={weight_bits}")
        if group_size not in GROUP_SIZES:
            raise FormatError(f"QQQ supports group_size -1 (per-channel) or 128, the checkpoint "
                              f"says group_size={group_size}")
        self.weight_bits = weight_bits
        self.group_size = group_size

    def __repr__(self) -> str:
        return (f"QQQConfig(weight_bits={self.weight_bits}, group_size={self.group_size}, "
                f"lm_head_quantized={self.lm_head_quantized})")

    def get_name(self) -> str:
        return "qqq"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        # float32 runs on the reference path only (CPU, or GPU without the kernels).
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # int8 mma.sync

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quant_config.json", "quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QQQConfig":
        bits = cls.get_from_keys_or(config, ["wbits", "bits"], None)
        if bits is None:
            raise FormatError("QQQ quantization_config has no 'wbits'")
        group_size = cls.get_from_keys_or(config, ["group_size"], None)
        if group_size is None:
            raise FormatError("QQQ quantization_config has no 'group_size'")
        lm_head = cls.get_from_keys_or(config, ["lm_head"], False)
        if not isinstance(lm_head, bool):
            raise FormatError(f"QQQ quantization_config's 'lm_head' must be true or false, "
                              f"got {lm_head!r}")
        return cls(int(bits), int(group_size), lm_head)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        # The linear layers are quantized, the lm_head where the checkpoint says so; the
        # embedding stays in the model dtype.
        if isinstance(layer, LinearBase) or (self.lm_head_quantized
                                             and isinstance(layer, ParallelLMHead)):
            from vllm_qqq.linear_method import QQQLinearMethod
            # Here: in the process that builds and compiles the model.
            enable_inductor_pdl()
            enable_persistent_rows()
            enable_quant_fusion()
            return QQQLinearMethod(self)
        return None
