"""The PyTorch reference W4A8 linear against a float64 computation of the same quantized math."""

import pytest
import torch

from offline.grid import rtn
from vllm_qqq.reference import int8_matmul, quantize_per_token, w4a8_linear

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# One rounding of the fp32 epilogue to the output dtype: half an ulp, relative.
REL_ROUNDING = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-23}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 128), (7, 256), (33, 512)])
def test_quantize_per_token(m, k, dtype):
    gen = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    x[0, 3] = 0  # exact zeros stay zero
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m, 1)
    absmax = x.float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(s, absmax / 127)
    exact = x.double() / s.double()
    # x / s is rounded to fp32 before rounding to int: within half a step plus one fp32 ulp.
    assert (q.double() - exact).abs().max() <= 0.5 + 128 * 2**-23
    assert torch.equal(q.abs().amax(dim=1), torch.full((m,), 127, dtype=torch.int8))
    assert q[0, 3] == 0


def test_quantize_zero_row_and_bad_input():
    q, s = quantize_per_token(torch.zeros(2, 64, dtype=torch.float16))
    assert s.eq(0).all() and q.eq(0).all()
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_token(torch.zeros(2, 3, 64))


def test_int8_matmul_exact_at_extremes():
    k = 14336  # Llama-3 down_proj: sums up to 128 * 128 * K, far beyond float32's 2**24
    a = torch.full((2, k), -128, dtype=torch.int8)
    w = torch.full((k, 3), -128, dtype=torch.int8)
    w[::2, 1] = 127
    acc = int8_matmul(a, w)
    expect = a.long() @ w.long()
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), expect)


@pytest.mark.parametrize("g", [-1, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 256, 64), (5, 512, 192), (64, 1024, 128)])
def test_w4a8_linear_matches_float64(m, k, n, g, dtype):
    gen = torch.Generator().manual_seed(m + k + n + g)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    qw = rtn(weight, g)
    w8, channel = qw.int8_weight(), qw.channel
    x = (torch.randn(2, m, k, generator=gen) * 3).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = w4a8_linear(x, w8, channel, bias)
    assert y.shape == (2, m, n) and y.dtype == dtype

    # The same quantized math in float64: int8 activations and weights, exact products.
    q, s = quantize_per_token(x.reshape(-1, k))
    prod = ((q.double() @ w8.double()) * s.double() * channel.double()).reshape(2, m, n)
    y64 = prod + bias.double()
    err = (y.double() - y64).abs()
    # Rounding of the result to dtype, plus four fp32 roundings in the epilogue (acc to float,
    # two products, the bias sum), each relative to the terms it rounds.
    bound = y64.abs() * REL_ROUNDING[dtype] + (prod.abs() + bias.double().abs()) * 4 * 2**-24
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"

    # And it is a W4A8 approximation of the float layer (activation + weight quantization error).
    y_fp = x.double() @ qw.dequantize().double() + bias.double()
    rel = (y.double() - y_fp).norm() / y_fp.norm()
    assert rel < 0.03, rel
