"""Pure-PyTorch reference of every QQQ kernel: the tests' oracle and the CPU execution path.

The arithmetic is the one docs/FORMAT.md specifies, step by step, so the CUDA kernels can match it:
bit-identical int8 activations and scales, exact int32 accumulation, and one fp32 epilogue
`(float(acc) * token_scale) * channel_scale (+ bias)` rounded once to the output dtype.
"""

import torch


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-row quantization of x [M, K] (fp16/bf16/fp32).

    scale = absmax / 127 in fp32; q = round_half_even(x / scale) clamped to [-128, 127];
    an all-zero row gets scale 0 and q 0. Returns (q int8 [M, K], scale float32 [M, 1]).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token expects a 2-D [M, K] input, got {list(x.shape)}")
    xf = x.float()
    absmax = xf.abs().amax(dim=1, keepdim=True)
    # A tensor divisor: PyTorch on CUDA turns division by a Python scalar into multiplication by
    # its reciprocal, which rounds differently from the IEEE division the kernels do.
    scale = absmax / torch.full_like(absmax, 127.0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe).clamp(-128, 127)
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul: silu(x[..., :d]) * x[..., d:] for x [..., 2d], in x's dtype."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def silu_mul_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token int8 quantization of silu_mul(x), x [M, 2d]: the down projection's input."""
    return quantize_per_token(silu_mul(x))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused add + RMSNorm in PyTorch (vllm/ir/ops/layernorm.py), weight in x's dtype:
    (rms_norm(x + residual) * weight, x + residual), both in x's dtype."""
    s = x.float() + residual.float()
    y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight, s.to(x.dtype)


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale) of the per-token quantization of the normed x + residual, and the new
    residual: the input of the next QKV or gate-up projection."""
    y, new_residual = add_rms_norm(x, residual, weight, eps)
    return (*quantize_per_token(y), new_residual)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 a [M, K] and int8 w [K, N]."""
    # float64 holds every partial sum exactly (|sum| < 128 * 128 * K << 2**53) and is fast on CPUs.
    return (a.double() @ w.double()).to(torch.int32)


def scale_output(acc: torch.Tensor, token_scale: torch.Tensor, channel_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    y = (acc.float() * token_scale.reshape(-1, 1)) * channel_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(out_dtype)


def w4a8_linear(x: torch.Tensor, w_int8: torch.Tensor, channel_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
                ) -> torch.Tensor:
    """y = x @ W for x [..., K] and the int8 weight [K, N] of a QQQ layer (QQQWeight.int8_weight)
    with its fp32 channel scale [N]: per-token int8 x, int32 accumulation, fp32 epilogue."""
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    a, token_scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
    acc = int8_matmul(a, w_int8)
    return scale_output(acc, token_scale, channel_scale, bias, out_dtype).reshape(*lead, -1)
