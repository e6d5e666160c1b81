"""A graph pass for vLLM's torch.compile: SiLU-and-mul followed by the per-token quantization of
a QQQ linear (the down projection's input) becomes one op, qqq.silu_mul_quant.

Without it Inductor fuses the two into one kernel of its own, which gives each row one CTA: at
decode sizes a Llama-3-8B row (2 x 14336 values) then streams through a single SM. Our kernel
splits such rows over a cluster of SMs (csrc/silu_mul_quant.cu).

The pass runs where vLLM runs the user's post-grad pass (Inductor's `post_grad_custom_post_pass`,
which vLLM's pass manager calls after its own); the plugin installs it when it builds a QQQ
linear and the setting asks for it (config.enable_silu_mul_quant_fusion). The pattern is the
traced form of reference.silu_mul (vLLM's SiluAndMul in PyTorch) and of
reference.quantize_per_token (what ops.w4a8_linear traces), so it matches exactly the graphs our
linears produce.
"""

import logging

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement
from vllm.compilation.passes.inductor_pass import InductorPass

from vllm_qqq.reference import quantize_per_token, silu_mul

log = logging.getLogger(__name__)


def _traced_pattern(x):
    return quantize_per_token(silu_mul(x))


def _traced_pattern_reshaped(x):
    # ops.w4a8_linear flattens its input to [tokens, K]: a reshape that may stay in the graph.
    h = silu_mul(x)
    return quantize_per_token(h.reshape(-1, h.shape[-1]))


def _fused(x):
    return torch.ops.qqq.silu_mul_quant.default(x)


def _fits_the_kernel(match) -> bool:
    """The op's conditions (ops.silu_mul_quant): a contiguous [M, 2D] fp16/bf16 input with
    D % 8 == 0 and D <= 32768 (the kernel's staging)."""
    x = match.kwargs["x"].meta["val"]
    width = x.shape[-1]
    return (x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16) and x.is_contiguous()
            and isinstance(width, int) and width % 16 == 0 and width // 2 <= 32768)


class SiluMulQuantFusion(InductorPass):
    """Replaces quantize_per_token(silu_mul(x)) by qqq.silu_mul_quant(x) in a post-grad graph."""

    def __init__(self) -> None:
        self.patterns = PatternMatcherPass(pass_name="qqq_silu_mul_quant")
        for dtype in (torch.float16, torch.bfloat16):
            example = torch.empty(4, 32, dtype=dtype)
            for pattern in (_traced_pattern, _traced_pattern_reshaped):
                register_replacement(pattern, _fused, [example], fwd_only, self.patterns,
                                     extra_check=_fits_the_kernel)
        self.fused = 0  # replacements made, over all graphs this pass saw

    def __call__(self, graph: torch.fx.Graph) -> None:
        count = self.patterns.apply(graph)
        self.fused += count
        log.debug("qqq: %d SiLU-and-mul + quantization pairs fused", count)

    def uuid(self) -> str:
        # The graphs it makes depend on this file and on the traced reference functions.
        import vllm_qqq.reference as reference
        return InductorPass.hash_source(self, reference.silu_mul, reference.quantize_per_token)
