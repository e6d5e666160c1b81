"""A graph pass for vLLM's torch.compile: the kernel in front of a QQQ linear and the linear's
per-token quantization become one op of ours.

- "silu": SiLU-and-mul and the down projection's quantization -> qqq.silu_mul_quant;
- "norm": vLLM's fused add + RMSNorm and the QKV / gate-up projection's quantization ->
  qqq.add_rms_norm_quant.

Without it Inductor fuses each pair into one kernel of its own, which gives each row one CTA: at
decode sizes a Llama-3-8B row then streams through a single SM. The SiLU kernel splits the rows
of batches up to 64 over a cluster of SMs (csrc/silu_mul_quant.cu): 2.6 against 4.7 us at M = 1
on the H100, and 339 against 326 tok/s end to end at batch 1, so it is on by default from sm_90
(config.fused_quant_kinds). The norm kernel (csrc/add_rms_norm_quant.cu) was slower than
Inductor's at every batch measured (2.9 against 2.1 us at M = 1); it is there for
VLLM_QQQ_FUSED_QUANT=1 or "silu,norm".

The pass runs where vLLM runs a user's post-grad pass (Inductor's `post_grad_custom_post_pass`,
which vLLM's pass manager calls after its own passes, before it lowers its IR ops); the plugin
installs it when it builds a QQQ linear, for the pairs VLLM_QQQ_FUSED_QUANT names
(config.enable_quant_fusion). The patterns are the traced forms of what the graphs hold: vLLM's
SiluAndMul in PyTorch (reference.silu_mul), its IR op fused_add_rms_norm (as vLLM's own fusion
passes match it), and reference.quantize_per_token (what ops.w4a8_linear traces).
"""

import logging

import torch
import vllm.ir.ops
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement
from vllm.compilation.passes.inductor_pass import InductorPass

from vllm_qqq.reference import quantize_per_token, silu_mul

log = logging.getLogger(__name__)

KINDS = ("silu", "norm")
MAX_SILU_D = 32768  # csrc/silu_mul_quant.cu
MAX_NORM_H = 16384  # csrc/add_rms_norm_quant.cu


def _silu_pattern(x):
    return quantize_per_token(silu_mul(x))


def _silu_pattern_reshaped(x):
    # ops.w4a8_linear flattens its input to [tokens, K]: a reshape that may stay in the graph.
    h = silu_mul(x)
    return quantize_per_token(h.reshape(-1, h.shape[-1]))


def _silu_fused(x):
    return torch.ops.qqq.silu_mul_quant.default(x)


def _silu_fits(match) -> bool:
    """ops.silu_mul_quant's conditions: a contiguous [M, 2D] fp16/bf16 input, D % 8 == 0,
    D <= MAX_SILU_D."""
    x = match.kwargs["x"].meta["val"]
    width = x.shape[-1]
    return (x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16) and x.is_contiguous()
            and isinstance(width, int) and width % 16 == 0 and width // 2 <= MAX_SILU_D)


def _norm_pattern(x, residual, weight, eps):
    y, new_residual = vllm.ir.ops.fused_add_rms_norm(x, residual, weight, eps)
    return (*quantize_per_token(y), new_residual)


def _norm_fused(x, residual, weight, eps):
    return torch.ops.qqq.add_rms_norm_quant.default(x, residual, weight, eps)


def _norm_fits(match) -> bool:
    """ops.add_rms_norm_quant's conditions: contiguous x, residual [M, H] and weight [H] of one
    fp16/bf16 dtype, H % 8 == 0, H <= MAX_NORM_H."""
    x, residual, weight = (match.kwargs[name].meta["val"] for name in ("x", "residual", "weight"))
    h = x.shape[-1]
    return (x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16)
            and residual.dtype == x.dtype and weight.dtype == x.dtype
            and residual.shape == x.shape and weight.dim() == 1
            and all(t.is_contiguous() for t in (x, residual, weight))
            and isinstance(h, int) and h % 8 == 0 and h <= MAX_NORM_H)


class QuantFusion(InductorPass):
    """Replaces the pairs of `kinds` (a subset of KINDS) by our ops in a post-grad graph."""

    def __init__(self, kinds=KINDS) -> None:
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.patterns = {kind: PatternMatcherPass(pass_name=f"qqq_{kind}_quant")
                         for kind in self.kinds}
        # Traced at each dtype; where the two traces give one pattern it is kept once (a match
        # is checked again against the graph's own dtypes and shapes).
        for dtype in (torch.float16, torch.bfloat16):
            if "silu" in self.kinds:
                x = torch.empty(4, 32, dtype=dtype)
                for pattern in (_silu_pattern, _silu_pattern_reshaped):
                    register_replacement(pattern, _silu_fused, [x], fwd_only,
                                         self.patterns["silu"], extra_check=_silu_fits,
                                         skip_duplicates=True)
            if "norm" in self.kinds:
                x, residual = torch.empty(4, 16, dtype=dtype), torch.empty(4, 16, dtype=dtype)
                weight = torch.empty(16, dtype=dtype)
                # eps, a constant of the graph, becomes an argument of the pattern (any value).
                register_replacement(_norm_pattern, _norm_fused, [x, residual, weight], fwd_only,
                                     self.patterns["norm"], extra_check=_norm_fits,
                                     scalar_workaround={"eps": 1e-5}, skip_duplicates=True)
        self.fused = dict.fromkeys(self.kinds, 0)  # replacements made, over all graphs seen

    def __call__(self, graph: torch.fx.Graph) -> None:
        for kind, patterns in self.patterns.items():
            count = patterns.apply(graph)
            self.fused[kind] += count
            log.debug("qqq: %d %s + quantization pairs fused", count, kind)

    def uuid(self) -> str:
        # The graphs it makes depend on this file, the traced reference functions and the kinds.
        import vllm_qqq.reference as reference
        return InductorPass.hash_dict({
            "source": InductorPass.hash_source(self, reference.silu_mul,
                                               reference.quantize_per_token),
            "kinds": self.kinds})
