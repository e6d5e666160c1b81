"""The torch ops on the CPU: kernel weight layout, agreement with the reference, fake
implementations under torch.compile(fullgraph=True), and clear errors for bad arguments."""

import pytest
import torch

from offline.grid import rtn
from vllm_qqq import ops
from vllm_qqq.reference import w4a8_linear


def layer(k, n, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw = rtn(torch.randn(n, k, generator=gen), g)
    return qw, ops.prepare_weight(qw)


@pytest.mark.parametrize("g", [-1, 128])
def test_kernel_layout_round_trip(g):
    qw, t = layer(256, 192, g)
    assert t["qqq_b"].shape == (256 // 32, 192 // 8, 32) and t["qqq_b"].dtype == torch.int32
    assert torch.equal(ops.kernel_codes_to_logical(t["qqq_b"], signed=g == -1), qw.codes)
    # The kernel's int8 weight times its scale is the layer's weight, exactly.
    w = ops.kernel_int8_weight(t["qqq_b"], t["qqq_group"]).double() * t["qqq_scale"].double()
    assert torch.equal(w, qw.int8_weight().double() * qw.channel.double())


def test_kernel_word_bit_layout():
    """Lane L of tile (s, t): column 8t + L//4; byte j = row 4(L%4)+j (high nibble) and row
    16 + 4(L%4)+j (low nibble), rows counted from 32s."""
    codes = torch.randint(-7, 8, (64, 64), dtype=torch.int8)
    words = ops.kernel_codes(codes)
    s, t, lane, j = 1, 5, 13, 2
    word = int(words[s, t, lane]) & 0xFFFFFFFF
    byte = (word >> (8 * j)) & 0xFF
    row = 32 * s + 4 * (lane % 4) + j
    col = 8 * t + lane // 4
    assert (byte >> 4) == int(codes[row, col]) & 0xF
    assert (byte & 0xF) == int(codes[row + 16, col]) & 0xF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [-1, 128])
def test_ops_match_reference(g, dtype):
    qw, t = layer(256, 128, g, seed=3)
    x = torch.randn(3, 5, 256).to(dtype)
    bias = torch.randn(128).to(dtype)
    ws = ops.workspace("cpu", 128)
    y = ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, bias)
    ref = w4a8_linear(x, qw.int8_weight(), qw.channel, bias)
    assert y.dtype == dtype and y.shape == (3, 5, 128)
    # Same arithmetic up to the epilogue's fp32 rounding (per-channel folds 16 into the scale).
    torch.testing.assert_close(y, ref, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10,
                               atol=1e-5)


def test_ops_trace_with_fullgraph():
    _, t = layer(256, 128, 128)
    ws = ops.workspace("cpu", 128)

    def f(x):
        return ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None) * 2

    x = torch.randn(7, 256, dtype=torch.float16)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    assert torch.equal(compiled(x), f(x))
    torch.library.opcheck(torch.ops.qqq.quant_per_token.default, (x,))
    torch.library.opcheck(torch.ops.qqq.linear.default,
                          (x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None))


def test_bad_arguments_are_clear_errors():
    _, t = layer(256, 128, -1)
    ws = ops.workspace("cpu", 128)
    a, s = torch.ops.qqq.quant_per_token(torch.randn(4, 256, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp16/bf16"):
        torch.ops.qqq.quant_per_token(torch.randn(4, 256, dtype=torch.float64))
    with pytest.raises(ValueError, match="a has K=128 but b holds K=256"):
        torch.ops.qqq.gemm(a[:, :128].contiguous(), s, t["qqq_b"], t["qqq_scale"],
                           t["qqq_group"], ws, None, torch.float16)
    with pytest.raises(ValueError, match="scale must be float32"):
        torch.ops.qqq.gemm(a, s, t["qqq_b"], t["qqq_scale"].half(), t["qqq_group"], ws, None,
                           torch.float16)
    with pytest.raises(ValueError, match="out_dtype"):
        torch.ops.qqq.gemm(a, s, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None,
                           torch.float32)
    with pytest.raises(ValueError, match="a must be contiguous int8"):
        torch.ops.qqq.gemm(a.float(), s, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None,
                           torch.float16)


def test_workspace_size_agrees_with_the_kernels():
    """ops.workspace sizes the shared buffer from the same layout csrc/kernels.h defines; a
    smaller one would be refused by the GEMM, a drift would go unseen until a GPU run."""
    _C = pytest.importorskip("vllm_qqq._C", reason="extension not built (no nvcc)")
    for n in (64, 192, 4096, 6144, 8192, 8256, 17920, 28672):
        assert _C.workspace_entries(n) == (ops.workspace_zeroed(n), ops.workspace_partial(n))
