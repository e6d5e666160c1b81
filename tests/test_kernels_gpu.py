"""The CUDA kernels against the reference on fresh random data (run on the GPU machine).

Bound asserted: none. The kernels do the reference's arithmetic step by step (IEEE division and
round-half-even for the activations, exact int32 accumulation, the same three fp32 roundings in
the epilogue, no contraction), so outputs must be bit-identical."""

import contextlib

import pytest
import torch

from offline.grid import rtn
from vllm_qqq import ops
from vllm_qqq.reference import int8_matmul, quantize_per_token, scale_output

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]
# 4/5 and 16/17: the small-M / wgmma boundaries (g128 on large weights / the rest); 17, 33, 64,
# 65, 128, 200, 257: the wgmma kernel's token tiles (16, 32, 64, 128, 256) full and partial.
M_ALL = [1, 2, 4, 5, 7, 10, 16, 17, 33, 64, 65, 128, 200, 257, 1024, 4096]
# The Hopper kernel's tiles (tokens, slots, loads by a producer), w4a8_gemm_sm90.cu: every one.
# (tokens, stages, producer warp, warpgroups of 64 channels)
WGMMA_TILES = [(64, 6, True, 2), (64, 8, True, 2), (128, 4, False, 2), (128, 6, True, 2),
               (256, 4, True, 2), (64, 8, True, 3), (128, 5, True, 3), (64, 7, True, 4),
               (16, 12, True, 2), (32, 10, True, 2), (16, 7, True, 4), (32, 6, True, 4)]
# (K, N): Llama-2-7B / Llama-3-8B / Qwen2.5-1.5B linears, and small ones with a partial N tile.
SHAPES = {
    "llama3_qkv": (4096, 6144), "llama3_o": (4096, 4096), "llama3_gate_up": (4096, 28672),
    "llama3_down": (14336, 4096), "llama2_gate_up": (4096, 22016), "llama2_down": (11008, 4096),
    "qwen_qkv": (1536, 2048), "qwen_gate_up": (1536, 17920), "qwen_down": (8960, 1536),
    "small_partial_n": (256, 192),
    "wide_partial_n": (1024, 8256),  # N > 8192: the small split-K partial region, a half tile
}
# Full M sweep on a few shapes, a cheaper sweep on the rest.
CASES = [(s, m) for s in ("llama3_qkv", "llama3_down", "qwen_down", "small_partial_n")
         for m in M_ALL] + [(s, m) for s in SHAPES if s not in
                            ("llama3_qkv", "llama3_down", "qwen_down", "small_partial_n")
                            for m in (1, 16, 64, 257, 1024)]


# Group modes of the tests: per-channel, g128 with fp16 group scales, g128 with integer ones
# (qqq-quantize --int-group-scales; the kernels' integer decode).
GROUPS = [-1, 128, "int"]


def make_layer(k, n, g, seed):
    """A random layer of group mode g (GROUPS), in the kernels' tensors on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.5)
    if g != -1:  # make group scales differ a lot inside a row
        w *= torch.rand(1, k // 128, generator=gen).repeat_interleave(128, 1) * 4 + 0.1
    t = ops.prepare_weight(rtn(w, -1 if g == -1 else 128, int_scales=g == "int"))
    if g != -1:  # which decode the kernels take: the integer one for integer scales only
        assert t["qqq_group"].dtype == (torch.int16 if g == "int" else torch.float16)
    return {name: v.cuda() for name, v in t.items()}


def reference(x, t, bias):
    a, s = quantize_per_token(x)
    w8 = ops.kernel_int8_weight(t["qqq_b"], t["qqq_group"])  # on the GPU, exact
    return scale_output(int8_matmul(a, w8), s, t["qqq_scale"], bias, x.dtype), a, s


@pytest.mark.parametrize("dtype", DTYPES)
# K: each register variant of the kernel (up to 1, 2, 4, 8 vectors per thread, full and partial)
# and the two-pass loop above 16384.
@pytest.mark.parametrize("m,k", [(1, 128), (3, 4096), (64, 14336), (4096, 1536), (257, 8),
                                 (2, 16384), (5, 2056), (3, 20480)])
@pytest.mark.parametrize("product", [1, 0, -1])
def test_quant_kernel_bit_identical(m, k, dtype, product):
    """Both ways of rounding x / scale: x times the reciprocal with the division only near a
    half-integer (1), the division for every entry (0), and the default choice by M (-1)."""
    x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 20).to(dtype)
    x[0, : min(k, 5)] = 0
    if m > 2:
        x[2] = 0  # an all-zero row
    check_quant_kernel(x, product)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("product", [1, 0])
def test_quant_kernel_rounds_exact_halves_to_even(dtype, product):
    """fp16 rows whose quotients x / scale are exactly k + 1/2 at scales that are not powers of
    two, where x * (1 / scale) lands a hair off the half and alone would round the wrong way (the
    reference rounds to even); bf16 cannot hold such rows, so there the same rows rounded to bf16,
    and a row of tiny values whose scale is subnormal (no reciprocal)."""
    rows = []
    for step in (3 / 64, 5 / 256, 7 / 32):  # scale = step: x and 127 * step exact in fp16
        halves = (torch.arange(-127, 127, dtype=torch.float64) + 0.5) * step
        rows.append(torch.cat([halves, torch.tensor([127 * step, -127 * step]), torch.zeros(8)]))
    tiny = torch.linspace(-1, 1, 264, dtype=torch.float64)
    tiny *= 1e-37 if dtype == torch.bfloat16 else 1
    x = torch.stack(rows + [tiny]).to(dtype).cuda()
    q_ref, s_ref = quantize_per_token(x.cpu())
    if dtype == torch.float16:
        assert torch.equal(x[:3].double().cpu(), torch.stack(rows)), "exact halves"
        assert (q_ref[:3, :254] % 2 == 0).all(), "rounded to even codes"
    else:
        assert 0 < s_ref[3].item() < torch.finfo(torch.float32).tiny, "a subnormal scale"
    check_quant_kernel(x, product)


def check_quant_kernel(x, product):
    m, k = x.shape
    q = torch.full((m, k), 0x55, dtype=torch.int8, device="cuda")  # poison
    s = torch.full((m, 1), float("nan"), device="cuda")
    from vllm_qqq import _C
    _C.set_quant_product(product)
    try:
        _C.quant_per_token(x.data_ptr(), ops._DTYPE_CODE[x.dtype], m, k, q.data_ptr(),
                           s.data_ptr(), True, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        q2, s2 = torch.ops.qqq.quant_per_token(x)
    finally:
        _C.set_quant_product(-1)
    q_ref, s_ref = quantize_per_token(x.cpu())
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(q2, q) and torch.equal(s2, s)


@pytest.mark.parametrize("dtype", DTYPES)
# D: Llama-3-8B's 14336, Llama-2-7B's 11008, Qwen2.5-7B's 18944, the largest (32768), and one
# 8-wide vector (7 of a cluster's 8 CTAs get nothing). M: clusters up to 64 rows, one CTA per row
# above, rounding by the reciprocal's product from 1024 rows.
@pytest.mark.parametrize("m,d", [(1, 14336), (2, 11008), (7, 18944), (16, 14336), (3, 32768),
                                 (5, 8), (65, 14336), (64, 8), (300, 4096), (1024, 14336)])
# The rule (clusters of 8 CTAs a row up to 64 rows), one CTA a row at every M, clusters at every M.
@pytest.mark.parametrize("cluster_rows", [-1, 0, 1 << 30], ids=["rule", "rows", "clusters"])
def test_silu_mul_quant_kernel_bit_identical(m, d, dtype, cluster_rows):
    """qqq.silu_mul_quant against PyTorch's SiLU-and-mul on the GPU (vLLM's SiluAndMul in eager
    mode) quantized by the reference: the same codes and scales, every output written."""
    import torch.nn.functional as F
    x = (torch.randn(m, 2 * d, device="cuda") * torch.rand(m, 1, device="cuda") * 8).to(dtype)
    if m > 2:
        x[2, :d] = 0  # silu(0) = 0: an all-zero row of h, scale 0
    from vllm_qqq import _C
    q = torch.full((m, d), 0x55, dtype=torch.int8, device="cuda")  # poison
    s = torch.full((m, 1), float("nan"), device="cuda")
    _C.set_silu_cluster_rows(cluster_rows)
    try:
        _C.silu_mul_quant(x.data_ptr(), ops._DTYPE_CODE[dtype], m, d, q.data_ptr(),
                          s.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
    finally:
        _C.set_silu_cluster_rows(-1)
    q_ref, s_ref = quantize_per_token((F.silu(x[:, :d]) * x[:, d:]).cpu())
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)
    q2, s2 = torch.ops.qqq.silu_mul_quant(x)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_silu_mul_quant_in_a_graph_and_compiled():
    """The op replayed in a CUDA graph, and the fusion pass's graph (Inductor, the batch dynamic)
    feeding qqq.gemm: the same output as eager op + GEMM."""
    from vllm_qqq.fusion import QuantFusion
    from vllm_qqq.reference import silu_mul
    d, n = 14336, 4096
    t = make_layer(d, n, -1, seed=2)
    ws = ops.workspace("cuda", n)

    def eager(x):
        a, a_scale = torch.ops.qqq.silu_mul_quant(x)
        return ops.gemm(a, a_scale, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None,
                        x.dtype, True)

    def traced(x):
        a, a_scale = quantize_per_token(silu_mul(x))  # what vLLM's graph holds before the pass
        return torch.ops.qqq.gemm(a, a_scale, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws,
                                  None, x.dtype, True)

    for m in (1, 16, 40):
        static_x = torch.randn(m, 2 * d, device="cuda", dtype=torch.float16)
        eager(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = eager(static_x)
        for _ in range(2):
            static_x.copy_(torch.randn(m, 2 * d, device="cuda", dtype=torch.float16))
            graph.replay()
            assert torch.equal(static_y, eager(static_x))
    torch._dynamo.reset()
    fusion = QuantFusion(["silu"])
    # As vLLM compiles: one graph for every batch size (the batch dynamic, no guards).
    compiled = torch.compile(traced, fullgraph=True,
                             options={"post_grad_custom_post_pass": fusion,
                                      "guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    with torch.compiler.config.patch(force_disable_caches=True):  # so that the pass runs
        for m in (40, 16, 1):
            x = torch.randn(m, 2 * d, device="cuda", dtype=torch.float16)
            torch._dynamo.mark_dynamic(x, 0)
            assert torch.equal(compiled(x), eager(x))
    assert fusion.fused == {"silu": 1}


@pytest.mark.parametrize("dtype", DTYPES)
# H: Llama-3-8B's 4096, Qwen2.5-7B's 3584, Llama-2-13B's 5120, the largest (16384), one 8-wide
# vector; M the same kinds of sizes (the rule: a CTA a row at every M).
@pytest.mark.parametrize("m,h", [(1, 4096), (2, 3584), (7, 5120), (16, 4096), (3, 16384), (5, 8),
                                 (17, 4096), (64, 8), (300, 2048), (1024, 4096)])
@pytest.mark.parametrize("cluster_rows", [-1, 0, 1 << 30], ids=["rule", "rows", "clusters"])
def test_add_rms_norm_quant_kernel_matches_vllms_norm(m, h, dtype, cluster_rows):
    """qqq.add_rms_norm_quant against vLLM's fused add + RMSNorm in PyTorch on the GPU, quantized
    by the reference. The new residual is exact. The sum of squares adds up in another order, so
    a normed value may land one place of the dtype off now and then (~1e-4 of them in fp16), and
    where that value is a row's largest, the row's scale moves by that place and some of its
    codes by one: scales within one place of the dtype, codes within one, in under 1% of the
    entries; every output written."""
    from vllm_qqq import _C
    from vllm_qqq.reference import add_rms_norm
    torch.manual_seed(m * h)
    x = (torch.randn(m, h, device="cuda") * torch.rand(m, 1, device="cuda") * 8).to(dtype)
    r = (torch.randn(m, h, device="cuda") * 4).to(dtype)
    w = (torch.rand(h, device="cuda") + 0.5).to(dtype)
    if m > 2:
        r[2] = -x[2]  # a zero row: scale 0
    q = torch.full((m, h), 0x55, dtype=torch.int8, device="cuda")  # poison
    s = torch.full((m, 1), float("nan"), device="cuda")
    res = torch.full((m, h), float("nan"), device="cuda", dtype=dtype)
    _C.set_norm_cluster_rows(cluster_rows)
    try:
        _C.add_rms_norm_quant(x.data_ptr(), r.data_ptr(), w.data_ptr(), 1e-5,
                              ops._DTYPE_CODE[dtype], m, h, q.data_ptr(), s.data_ptr(),
                              res.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        # The op under the same setting: clusters and a CTA a row add the squares up in other
        # orders, so only the same path gives the same bits.
        q2, s2, res2 = torch.ops.qqq.add_rms_norm_quant(x, r, w, 1e-5)
    finally:
        _C.set_norm_cluster_rows(-1)
    y, res_ref = add_rms_norm(x, r, w, 1e-5)
    q_ref, s_ref = quantize_per_token(y.cpu())
    assert torch.equal(res, res_ref)
    place = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=place, atol=0)
    diff = (q.cpu().int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(res2, res)


def norm_then_gemm(h, n):
    """qqq.add_rms_norm_quant feeding qqq.gemm (its GEMM launched early): the norm weight, the
    GEMM alone and the two ops together."""
    t = make_layer(h, n, -1, seed=3)
    ws = ops.workspace("cuda", n)
    w = (torch.rand(h, device="cuda") + 0.5).half()

    def gemm(a, a_scale):
        return torch.ops.qqq.gemm(a, a_scale, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws,
                                  None, torch.float16, True)

    def eager(x, r):
        a, a_scale, new_residual = torch.ops.qqq.add_rms_norm_quant(x, r, w, 1e-5)
        return gemm(a, a_scale), new_residual

    return w, gemm, eager


def check_in_a_graph_as_eager(f, m, h):
    """f(x, r) replayed in a CUDA graph on fresh inputs gives f's eager outputs bit for bit."""
    static = [torch.randn(m, h, device="cuda", dtype=torch.float16) for _ in range(2)]
    f(*static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = f(*static)
    for _ in range(2):
        for tensor in static:
            tensor.copy_(torch.randn(m, h, device="cuda", dtype=torch.float16))
        graph.replay()
        for a, b in zip(static_out, f(*static), strict=True):
            assert torch.equal(a, b)


def test_add_rms_norm_quant_in_a_graph_and_compiled():
    """The op replayed in a CUDA graph, and the fusion pass's graph (vLLM's IR norm op as it
    reaches the pass on the GPU, the batch dynamic) feeding qqq.gemm: eager op + GEMM's output
    and residual."""
    import vllm.ir
    import vllm.ir.ops

    from vllm_qqq.fusion import QuantFusion
    h, n = 4096, 6144
    w, gemm, eager = norm_then_gemm(h, n)

    def traced(x, r):
        y, new_residual = vllm.ir.ops.fused_add_rms_norm(x, r, w, 1e-5)
        return gemm(*quantize_per_token(y)), new_residual

    for m in (1, 16, 40):
        check_in_a_graph_as_eager(eager, m, h)
    torch._dynamo.reset()
    with vllm.ir.enable_torch_wrap(True), torch.compiler.config.patch(force_disable_caches=True):
        fusion = QuantFusion(["norm"])  # its pattern traced with the IR op, as the graph holds it
        compiled = torch.compile(traced, fullgraph=True,
                                 options={"post_grad_custom_post_pass": fusion,
                                          "guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
        for m in (40, 16, 1):
            x, r = (torch.randn(m, h, device="cuda", dtype=torch.float16) for _ in range(2))
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(r, 0)
            for a, b in zip(compiled(x, r), eager(x, r), strict=True):
                assert torch.equal(a, b)
    assert fusion.fused == {"norm": 1}


# Integer group scales: the full M sweep where their small-M rule differs from fp16 scales'
# (llama3_down, a large weight) and on a partial N tile; M = 1 / 16 / 257 elsewhere. (Each such
# layer's quantization searches two scales per group on the CPU: the whole of CASES took
# ~2 s a case on the H100 machine.)
INT_CASES = [(s, m) for s in ("llama3_down", "small_partial_n") for m in M_ALL] + [
    (s, m) for s in SHAPES if s not in ("llama3_down", "small_partial_n") for m in (1, 16, 257)]


@pytest.mark.parametrize("g", [-1, 128])
@pytest.mark.parametrize("shape,m", CASES)
def test_gemm_matches_reference(shape, m, g):
    check_gemm(shape, m, g)


@pytest.mark.parametrize("shape,m", INT_CASES)
def test_gemm_with_integer_group_scales_matches_reference(shape, m):
    check_gemm(shape, m, "int")


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("shape,m", [("llama3_qkv", 17), ("qwen_down", 64),
                                     ("small_partial_n", 65), ("llama3_down", 257),
                                     ("qwen_qkv", 1024), ("wide_partial_n", 40)])
def test_mma_kernel_above_16_matches_reference(shape, m, g):
    """With wgmma switched off (as on sm_80), M >= 17 runs the mma.sync kernel: still exact."""
    from vllm_qqq import _C
    _C.set_wgmma(False)
    try:
        check_gemm(shape, m, g)
    finally:
        _C.set_wgmma(True)


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("bm,stages,producer_warp,warpgroups", WGMMA_TILES)
def test_every_wgmma_tile_matches_reference(bm, stages, producer_warp, warpgroups, g):
    """Each Hopper tile forced at M it would not get by default (partial and several token tiles,
    split-K and not, a partial N tile: of 192-channel tiles, llama3_o's last holds 64 channels
    and qwen_qkv's 128; of 256-channel ones, small_partial_n's holds 192 and wide_partial_n's
    64), not only where the dispatch picks it."""
    from vllm_qqq import _C
    if not _C.wgmma_available():
        pytest.skip("no sm_90a wgmma kernel on this GPU")
    _C.set_wgmma_tile(bm, stages, producer_warp, warpgroups)
    _C.set_wgmma_min_m(1)
    try:
        for shape, m in (("llama3_qkv", 1), ("llama3_down", 50), ("small_partial_n", 130),
                         ("qwen_down", 257), ("llama3_o", 600), ("qwen_qkv", 600),
                         ("wide_partial_n", 40)):
            check_gemm(shape, m, g)
    finally:
        _C.set_wgmma_tile(0, 0)
        _C.set_wgmma_min_m(0)


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("mode", [1, 0])
def test_small_m_kernels_either_way_match_reference(mode, g):
    """M <= 16 forced onto each small-M kernel, whichever the rule picks for the shape: the narrow
    one (set_narrow(1): K split over the warps of a CTA) with full and partial last stages (K of
    2, 12, 32, 70, 112 k blocks), and split-K (set_narrow(0)); a partial N tile of the split-K
    kernel's (N = 192, 8256), with and without bias."""
    from vllm_qqq import _C
    _C.set_narrow(mode)
    _C.set_wgmma_min_m(17)  # the large shapes at M = 5-16 too
    try:
        for shape, m in (("llama3_qkv", 1), ("llama3_o", 9), ("llama3_down", 16), ("qwen_down", 7),
                         ("qwen_qkv", 3), ("small_partial_n", 16), ("wide_partial_n", 5),
                         ("llama3_gate_up", 2), ("llama3_gate_up", 12)):
            check_gemm(shape, m, g)
    finally:
        _C.set_narrow(-1)
        _C.set_wgmma_min_m(0)


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("channels", [32, 16])
def test_narrow_ring_depths_match_reference(channels, stages, g):
    """Each ring depth of the narrow kernel forced (the rule picks 3, 4 or 6 by shape; 2 is a
    tuning option), with 32 channels per CTA (the default) and 16: K shorter and longer than the
    ring, partial last stages."""
    with forced_narrow_kernel(channels, stages):
        for shape, m in (("llama3_o", 16), ("qwen_down", 5), ("small_partial_n", 1),
                         ("wide_partial_n", 9)):
            check_gemm(shape, m, g)


@pytest.mark.parametrize("sums", [True, False])
@pytest.mark.parametrize("channels", [32, 16])
def test_narrow_group_sums_match_reference(channels, sums):
    """The narrow kernel with integer group scales applied to its per-group sums (the default) or
    decoded into the weights (set_narrow_group_sums(False)) at every ring depth: K shorter and
    longer than the ring, partial last stages, Llama-3 down's K; an int8-edge layer; and the
    sums' bound: K = 64512 (63 k blocks a warp, the most it takes) and K = 64640 (above it: the
    integer decode instead) with every product at +127 * 128, the largest |a * w8|
    (a = -127, w8 = -128)."""
    from vllm_qqq import _C
    from vllm_qqq.format import QQQWeight
    _C.set_narrow_group_sums(sums)
    try:
        for stages in (2, 3, 4, 6):
            with forced_narrow_kernel(channels, stages):
                for shape, m in (("llama3_o", 16), ("qwen_down", 5), ("small_partial_n", 1),
                                 ("wide_partial_n", 9), ("llama3_down", 2)):
                    check_gemm(shape, m, "int")
        with forced_narrow_kernel(channels, 0):
            for m in (1, 16):
                check_layer(edge_int_group_layer(1024, 256, seed=m), m, 1024, 256, "int")
            n = 64
            for k in (64512, 64640):
                w = QQQWeight(torch.zeros(k, n, dtype=torch.int8), torch.full((n,), 1e-4),
                              torch.full((k // 128, n), 16.0).half(), 128)
                t = {name: v.cuda() for name, v in ops.prepare_weight(w).items()}
                x = -torch.ones(3, k, device="cuda", dtype=torch.float16)
                ref, a, _ = reference(x, t, None)
                assert a.min() == a.max() == -127
                ws = ops.workspace("cuda", n)
                y = ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None)
                assert torch.equal(y, ref), (k, y[0, :4], ref[0, :4])
    finally:
        _C.set_narrow_group_sums(True)  # the default


@contextlib.contextmanager
def forced_narrow_kernel(channels, stages):
    """M <= 16 on the narrow kernel with `channels` per CTA and a ring of `stages`, then the
    rule's choices again."""
    from vllm_qqq import _C
    _C.set_narrow(1)
    _C.set_narrow_stages(stages)
    _C.set_narrow_channels(channels)
    try:
        yield
    finally:
        _C.set_narrow(-1)
        _C.set_narrow_stages(0)
        _C.set_narrow_channels(0)


@pytest.mark.parametrize("g", [-1, 128])
@pytest.mark.parametrize("early", [True, False])
def test_quant_launch_either_way_matches_reference(early, g):
    """The quantization kernel launched early after the previous kernel (the default; it waits
    for that kernel before reading x) or plainly: back-to-back quant + GEMM calls stay exact."""
    from vllm_qqq import _C
    _C.set_quant_pdl(early)
    try:
        for shape, m in (("llama3_qkv", 1), ("llama3_down", 16), ("small_partial_n", 130)):
            check_gemm(shape, m, g)
    finally:
        _C.set_quant_pdl(True)


def check_gemm(shape, m, g):
    k, n = SHAPES[shape]
    check_layer(make_layer(k, n, g, seed=m * 7 + k + n), m, k, n, g)


def check_layer(t, m, k, n, g):
    ws = ops.workspace("cuda", n)
    for dtype in DTYPES:
        x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
        ref, a, s = reference(x, t, bias)
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poison
        from vllm_qqq import _C
        _C.gemm(a.data_ptr(), s.data_ptr(), t["qqq_b"].data_ptr(), t["qqq_scale"].data_ptr(),
                t["qqq_group"].data_ptr() if g != -1 else 0,
                bias.data_ptr() if bias is not None else 0, out.data_ptr(), ops._DTYPE_CODE[dtype],
                m, n, k, ws.data_ptr(), ws.numel(), torch.cuda.current_stream().cuda_stream,
                group_int=t["qqq_group"].dtype == torch.int16)
        torch.cuda.synchronize()
        assert not out.isnan().any(), "output not fully written"
        diff = (out.float() - ref.float()).abs()
        assert torch.equal(out, ref), (f"{dtype}: {int((diff > 0).sum())} of {out.numel()} differ, "
                                       f"max {diff.max().item()}")
        # The shared buffer's whole zeroed head (every earlier layer's region) must be zero again.
        head = ops._workspaces[torch.device("cuda", torch.cuda.current_device())][1]
        assert ws[:head].eq(0).all(), "split-K sums and counters not restored to zero"
        y = ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, bias)
        assert torch.equal(y, ref)


@pytest.mark.parametrize("g", [-1, 128])
def test_lm_head_shape(g):
    """A Llama-3 lm_head as a QQQ linear (qqq-quantize --quantize-lm-head): K = 4096 and N =
    128256, the largest N the kernels get (its workspace, 64 partial rows x N), at decode and
    prefill sizes, against the reference."""
    k, n = 4096, 128256
    t = make_layer(k, n, g, seed=n + g)
    for m in (1, 16, 64, 257, 1024):
        check_layer(t, m, k, n, g)


def edge_group_layer(k, n, seed):
    """A g128 layer whose products (code - 8) * s_group reach the ends of int8: group scales up
    to the loader's limit (127.5 / 7), code 0 (-8 * s) only where s <= 16.0625 (-8 * 16.0625 =
    -128.5 rounds to -128, half to even), and the scales just above 16 where -8 * s lies in
    [-128.5, -128)."""
    from vllm_qqq.format import QQQWeight
    from vllm_qqq.linear_method import _MAX_GROUP_SCALE
    gen = torch.Generator().manual_seed(seed)
    groups = k // 128
    near_16 = torch.tensor([16.0, 16.015625, 16.03125, 16.046875, 16.0625])
    low = near_16[torch.randint(0, 5, (groups, n), generator=gen)]
    high = 16.0625 + torch.rand(groups, n, generator=gen) * (_MAX_GROUP_SCALE - 16.0625)
    use_high = torch.rand(groups, n, generator=gen) < 0.5
    group = torch.where(use_high, high, low).to(torch.float16)
    top = torch.tensor(18.203125).half()  # the largest fp16 within the loader's limit
    assert float(top) <= _MAX_GROUP_SCALE < float(top) + 2**-6  # fp16 steps by 1/64 in [16, 32)
    group = torch.where(group.float() > _MAX_GROUP_SCALE, top, group)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int8)
    no_zero = use_high.repeat_interleave(128, 0)  # -8 * s would leave int8 there
    codes = torch.where(no_zero & (codes == 0), torch.ones_like(codes), codes)
    w = QQQWeight(codes, torch.rand(n, generator=gen) * 1e-3 + 1e-4, group, 128)
    w8 = w.group_products()
    assert w8.min() == -128 and w8.max() <= 127  # the edge is reached, and nothing leaves int8
    t = ops.prepare_weight(w)
    return {name: v.cuda() for name, v in t.items()}


def edge_int_group_layer(k, n, seed):
    """A g128 layer of integer group scales 1-18 whose products reach -128 (code 0 at s = 16)
    and 126 (code 15 at s = 18): the integer decode's bytes run from 0 to 254 with no carry
    into the next byte. Code 0 only where s <= 16, as the loader requires."""
    from vllm_qqq.format import QQQWeight
    gen = torch.Generator().manual_seed(seed)
    groups = k // 128
    group = torch.randint(1, 19, (groups, n), generator=gen)
    group[:, ::3] = 16  # many groups at 16 and 18, the ends
    group[:, 1::3] = 18
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int8)
    no_zero = (group > 16).repeat_interleave(128, 0)
    codes = torch.where(no_zero & (codes == 0), torch.ones_like(codes), codes)
    w = QQQWeight(codes, torch.rand(n, generator=gen) * 1e-3 + 1e-4, group.half(), 128)
    w8 = w.group_products()
    assert w8.min() == -128 and w8.max() == 126
    t = ops.prepare_weight(w)
    assert t["qqq_group"].dtype == torch.int16
    return {name: v.cuda() for name, v in t.items()}


@pytest.mark.parametrize("integer", [False, True], ids=["fp16", "int"])
@pytest.mark.parametrize("m", [1, 5, 16, 64, 200, 1024])
def test_group_scales_at_the_int8_edge_match_reference(m, integer):
    """Every g128 kernel (narrow and split-K at M <= 16, the Hopper kernel and the mma.sync one
    above) on products at the ends of int8: the decode must not wrap -128 to 127."""
    from vllm_qqq import _C
    k, n = 1024, 256
    t = (edge_int_group_layer if integer else edge_group_layer)(k, n, seed=m)
    for narrow, wgmma in ((-1, True), (0 if m <= 16 else -1, False)):
        _C.set_narrow(narrow)
        _C.set_wgmma(wgmma)
        try:
            check_layer(t, m, k, n, "int" if integer else 128)
        finally:
            _C.set_narrow(-1)
            _C.set_wgmma(True)


def test_cuda_graph_and_compile(monkeypatch):
    k, n = 4096, 6144
    t = make_layer(k, n, 128, seed=1)
    ws = ops.workspace("cuda", n)

    def f(x):
        return ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None)

    for m in (1, 20, 48, 100, 300):  # narrow; wgmma split-K (32, 64, 128 tiles); wgmma
        static_x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        f(static_x)  # warm up outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = f(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn(m, k, device="cuda", dtype=torch.float16))
            graph.replay()
            assert torch.equal(static_y, f(static_x))
    # Compiled: with VLLM_QQQ_COMPILED_QUANT=0 the qqq.linear op, bit-identical to eager; by
    # default the quantization as PyTorch ops (Triton's division may round differently, moving a
    # code by one), then qqq.gemm launched early: within the worst-case quantization error of the
    # exact product, and on average far closer to the eager result.
    w = ops.kernel_int8_weight(t["qqq_b"], t["qqq_group"]).double() * t["qqq_scale"].double()
    for setting in ("0", "1"):
        monkeypatch.setenv("VLLM_QQQ_COMPILED_QUANT", setting)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, dynamic=True)
        for m in (1, 17, 200):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y, ref = compiled(x), f(x)
            if setting == "0":
                assert torch.equal(y, ref)
                continue
            exact = x.double() @ w
            s_x = x.double().abs().amax(-1, keepdim=True) / 127
            bound = (s_x / 2) @ w.abs().sum(0, keepdim=True) + exact.abs() * 2**-8
            assert ((y.double() - exact).abs() <= bound).all()
            assert (y.double() - ref.double()).abs().mean() <= 0.01 * ref.double().abs().mean()


def chain_layers(k, count):
    """Square layers alternating per-channel and g128, their outputs scaled to the input's size
    (the channel scales / sqrt(K)) so that a chain of them stays finite in fp16."""
    layers = [make_layer(k, k, g, seed=i) for i, g in zip(range(count), (-1, 128) * count)]
    for t in layers:
        t["qqq_scale"] /= k**0.5
    return layers


# the narrow kernel, its ring full; the Hopper kernel (32- and 128-token tiles)
@pytest.mark.parametrize("m", [1, 16, 24, 200])
def test_chained_linears_in_a_graph_wait_for_each_other(m):
    """Linears fed by the one before, back to back in a CUDA graph, every kernel a programmatic
    launch (each GEMM starts while its quantization runs): each layer bit-identical to the
    reference on its input, every output poisoned before each replay."""
    check_chain_in_a_graph(m)


@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("channels", [32, 16])
def test_narrow_ring_depths_in_a_graph_wait_for_the_quantization(channels, stages):
    """Each narrow kernel (ring depth, channels per CTA) started early in a CUDA graph, after
    the quantization and after the fused add + RMSNorm + quantization. Where ptxas had moved the
    token-scale load above the PDL wait, an 8-row branch kernel read 0 in the second case; main's
    16-channel kernels with the same hoist passed the first case on the H100 (the race is
    timing-dependent: tests/test_pdl_loads.py is the check that always sees it)."""
    with forced_narrow_kernel(channels, stages):
        _, _, eager = norm_then_gemm(4096, 6144)
        for m in (1, 16):
            check_chain_in_a_graph(m)
            check_in_a_graph_as_eager(eager, m, 4096)


def check_chain_in_a_graph(m):
    k = 4096
    layers = chain_layers(k, 4)
    ws = ops.workspace("cuda", k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)

    def chain():
        ys = [x]
        for t in layers:
            ys.append(torch.ops.qqq.linear(ys[-1], t["qqq_b"], t["qqq_scale"], t["qqq_group"],
                                           ws, None))
        return ys

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = chain()
    for _ in range(3):
        x.copy_(torch.randn(m, k, device="cuda", dtype=torch.float16))
        for y in ys[1:]:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, t in enumerate(layers):
            assert torch.isfinite(ys[i + 1]).all()
            assert torch.equal(ys[i + 1], reference(ys[i], t, None)[0]), f"layer {i}"


@pytest.mark.parametrize("m", [1, 16, 200])
def test_inductor_pdl_kernels_around_the_linears(m, monkeypatch):
    """torch.compile with Inductor's programmatic launches on (its kernels start early and wait
    only for the kernel just before them): add + RMSNorm kernels around two linears, in a CUDA
    graph. The norm after a GEMM reads the GEMM's output and the sum from two kernels before;
    both must be complete when it reads them."""
    monkeypatch.setenv("VLLM_QQQ_COMPILED_QUANT", "0")  # the linears bit-identical to eager
    k = 4096
    layers = chain_layers(k, 2)
    ws = ops.workspace("cuda", k)
    norm_w = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5

    def rms_norm(v):
        v32 = v.float()
        return (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + 1e-6)).half() * norm_w

    def f(x, r):
        s1 = x + r
        h1 = rms_norm(s1)
        y1 = ops.w4a8_linear(h1, layers[0]["qqq_b"], layers[0]["qqq_scale"],
                             layers[0]["qqq_group"], ws)
        s2 = y1 + s1
        h2 = rms_norm(s2)
        y2 = ops.w4a8_linear(h2, layers[1]["qqq_b"], layers[1]["qqq_scale"],
                             layers[1]["qqq_group"], ws)
        return s1, h1, y1, s2, h2, y2

    torch._dynamo.reset()
    import torch._inductor.config as inductor_config
    with inductor_config.patch({"triton.enable_pdl": True}):
        compiled = torch.compile(f, fullgraph=True)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        r = torch.randn(m, k, device="cuda", dtype=torch.float16)
        compiled(x, r)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = compiled(x, r)
    for _ in range(3):
        x.copy_(torch.randn(m, k, device="cuda", dtype=torch.float16))
        r.copy_(torch.randn(m, k, device="cuda", dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        s1, h1, y1, s2, h2, y2 = outs
        assert torch.equal(s1, x + r)
        assert torch.equal(y1, reference(h1, layers[0], None)[0])
        assert torch.equal(s2, y1 + s1)  # y1 of this replay, s1 of this replay
        # Inductor's norm keeps fp32 where eager rounds: within a few fp16 ulps of eager's.
        torch.testing.assert_close(h2, rms_norm(s2), rtol=2e-3, atol=2e-3)
        assert torch.equal(y2, reference(h2, layers[1], None)[0])
    torch._dynamo.reset()


def test_wgmma_kernel_is_used_on_hopper():
    """On an H100/H200 build with sm_90a, M >= 17 must reach the wgmma kernel (a wrong check would
    silently fall back to the slower mma.sync kernel)."""
    from vllm_qqq import _C
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("not compute capability 9.0")
    assert _C.wgmma_available()


# Qwen2.5-7B's qkv and o, Llama-3-70B's qkv, Llama-2-7B's gate_up: the tile rule's waves cases.
DISPATCH_SHAPES = {**SHAPES, "qwen7_qkv": (3584, 4608), "qwen7_o": (3584, 3584),
                   "llama70_qkv": (8192, 10240), "llama2_gate_up": (4096, 22016)}


@pytest.mark.parametrize("shape,m,g,tile", [
    ("llama3_qkv", 256, -1, (64, 8, 3)), ("llama3_qkv", 1024, -1, (128, 5, 3)),
    ("llama3_qkv", 2048, -1, (256, 4, 2)), ("llama3_qkv", 1024, 128, (256, 4, 2)),
    ("llama3_o", 1024, -1, (256, 4, 2)), ("llama3_qkv", 384, -1, (128, 5, 3)),
    ("llama3_o", 640, -1, (128, 5, 3)), ("llama3_o", 640, 128, (256, 4, 2)),
    ("llama3_o", 384, -1, (64, 8, 3)), ("qwen7_qkv", 512, 128, (256, 4, 2)),
    ("llama3_o", 512, -1, (128, 6, 2)), ("llama3_gate_up", 768, -1, (256, 4, 2)),
    ("qwen7_o", 1152, -1, (128, 4, 2)), ("qwen7_o", 1152, 128, (128, 4, 2)),
    ("llama3_o", 384, 128, (64, 8, 3)), ("llama3_qkv", 256, 128, (64, 8, 3)),
    ("qwen7_o", 384, 128, (64, 8, 3)), ("llama70_qkv", 128, -1, (64, 8, 3)),
    ("llama70_qkv", 128, 128, (64, 8, 3)), ("llama2_gate_up", 32, -1, (64, 8, 3)),
    ("llama2_gate_up", 16, 128, (64, 8, 3)), ("llama3_gate_up", 64, -1, (64, 7, 4)),
    ("llama3_gate_up", 128, -1, (128, 4, 2)), ("llama3_gate_up", 1, -1, (16, 7, 4)),
    ("llama3_gate_up", 16, 128, (16, 7, 4)), ("llama3_gate_up", 32, -1, (32, 6, 4)),
    ("llama3_down", 16, 128, (16, 7, 4)), ("llama3_down", 5, 128, (16, 7, 4)),
    ("llama3_down", 17, 128, (32, 6, 4)), ("llama3_down", 32, 128, (32, 6, 4)),
    ("llama3_down", 17, -1, (32, 10, 2)), ("llama3_qkv", 32, -1, (32, 10, 2)),
    ("llama3_o", 17, 128, (32, 10, 2)), ("llama3_qkv", 33, -1, (64, 8, 2)),
    ("llama3_qkv", 1024, "int", (128, 5, 3)), ("llama3_o", 640, "int", (128, 5, 3)),
    ("llama3_down", 32, "int", (32, 10, 2))])
def test_dispatch_picks_the_tiles_that_fill_the_waves(shape, m, g, tile):
    """Per-channel qkv (N = 6144 = 32 x 192) at M = 256, 384 and 1024 takes the 3-warpgroup
    tiles (1.17x / 1.15x faster at 256 / 1024 on the H100, benchmarks/results/NOTES.md), and so
    does o (N = 4096, a last tile of 64 channels) at M = 384 and 640; M = 2048, g128 qkv at
    M = 1024, o at M = 512 (one wave of 128 x 128 already) and gate_up at M = 768 (six waves of
    256 x 128 against seven of 128 x 192) keep the 128-channel tile. g128 o at M = 640 and Qwen
    qkv at M = 512 take one wave of 256-token tiles, not two 128-token CTAs per SM; Qwen o at
    M = 1152 the other way round (252 128-token tiles two per SM, not 140 of 256 tokens in two
    waves).
    g128 takes the 64 x 192 tile in one wave (o / Qwen o at M = 384, qkv at 256). Up to 128
    tokens, both take the 64 x 192 tile where it fills one wave and 64 x 128 tiles do not
    (Llama-2-7B gate_up at M = 16 / 32, Llama-3-70B qkv at M = 128); where those overflow it
    too, the 64 x 256 tile where it fills one (Llama-3-8B gate_up at M = 64: 112 such tiles,
    150 of 64 x 192); at M = 128 (224 such tiles) one wave of 128 x 128 tiles. Up to 32 tokens,
    16- or 32-token tiles where they need no second wave: 256 channels on Llama-3-8B gate_up
    (from M = 1, either mode), 128 on qkv, o and down (g128 down from M = 5, there with 4
    warpgroups); not on Llama-2-7B gate_up, which keeps the 64 x 192 tile. Integer group
    scales follow the per-channel rules (qkv M = 1024 and o M = 640 on 128 x 192 tiles, down
    M = 32 on 2 warpgroups). Read from the kernel's name in a profile: (tokens, slots,
    warpgroups)."""
    import re
    from vllm_qqq import _C
    if not _C.wgmma_available():
        pytest.skip("no sm_90a wgmma kernel on this GPU")
    names = kernels_of_one_call(*DISPATCH_SHAPES[shape], g, m)
    found = [re.search(r"w4a8_gemm_wgmma_kernel<[^,]+, (\d+), (\d+), \w+, \w+, (\d+)>", name)
             for name in names]
    tiles = {tuple(int(v) for v in f.groups()) for f in found if f}
    assert tiles == {tile}, names


def kernels_of_one_call(k, n, g, m):
    """The names of the GPU kernels one w4a8_linear call of a random layer [K, N] of group mode
    g runs at M = m (after a first call), from a profile."""
    t = make_layer(k, n, g, seed=m)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ws = ops.workspace("cuda", n)
    ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws)
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("g,m,kernel", [
    ("int", 1, "w4a8_narrow_kernel"), ("int", 16, "w4a8_narrow_kernel"),
    ("int", 17, "w4a8_gemm_wgmma_kernel"), (128, 1, "w4a8_gemm_kernel"),
    (128, 5, "w4a8_gemm_wgmma_kernel")])
def test_integer_group_scales_take_the_per_channel_small_m_rules(g, m, kernel):
    """Llama-3-8B down (a large weight) with integer group scales runs M <= 16 on the narrow
    kernel, as per-channel does (kernels.h, narrow_default); with fp16 group scales split-K up to
    M = 4 and the Hopper kernel from 5."""
    from vllm_qqq import _C
    if not _C.wgmma_available():
        pytest.skip("no sm_90a wgmma kernel on this GPU")
    names = kernels_of_one_call(*SHAPES["llama3_down"], g, m)
    gemms = {name.split("<")[0].split("::")[-1] for name in names if "w4a8" in name}
    assert gemms == {kernel}, names


def test_layers_of_different_n_share_the_workspace():
    """Like a model's layers: one buffer, N = 4096, 6144 and 28672, alternating the Hopper
    kernel's split-K (its 32-, 64- and 128-token tiles at M = 24, 40, 128 on N = 4096 / 6144),
    the narrow kernel (M = 1, 16) and the 16-token Hopper tile (N = 28672), which share the
    counters and the partial region."""
    layers = [make_layer(4096, n, -1, seed=n) for n in (6144, 4096, 28672)]
    for n in (6144, 4096, 28672):
        ws = ops.workspace("cuda", n)
    for _ in range(2):
        for t in layers:
            for m in (128, 1, 200, 16, 40, 24):
                x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
                ref = reference(x, t, None)[0]
                y = ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws)
                assert torch.equal(y, ref)


def test_an_empty_batch_gives_an_empty_output():
    """M = 0 (a batch with no tokens): no launch, an empty output of the right shape; the
    workspace's zeroed head stays zero for the next call."""
    for g in (-1, 128):
        t = make_layer(256, 128, g, seed=1)
        ws = ops.workspace("cuda", 128)
        for dtype in DTYPES:
            y = ops.w4a8_linear(torch.empty(0, 256, device="cuda", dtype=dtype), t["qqq_b"],
                                t["qqq_scale"], t["qqq_group"], ws)
            assert y.dtype == dtype and y.shape == (0, 128)
            a, s = torch.ops.qqq.quant_per_token(torch.empty(0, 256, device="cuda", dtype=dtype))
            assert a.shape == (0, 256) and s.numel() == 0
        check_layer(t, 1, 256, 128, g)  # and a call after it is still right


def test_bad_inputs_are_errors():
    t = make_layer(256, 128, -1, seed=0)
    ws = ops.workspace("cuda", 128)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="fp16/bf16"):
        torch.ops.qqq.quant_per_token(x.float())
    a, s = torch.ops.qqq.quant_per_token(x)
    with pytest.raises(ValueError, match="K=128"):
        torch.ops.qqq.gemm(a[:, :128].contiguous(), s, t["qqq_b"], t["qqq_scale"],
                           t["qqq_group"], ws, None, torch.float16)
    with pytest.raises(ValueError, match="workspace"):
        torch.ops.qqq.gemm(a, s, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws[:10], None,
                           torch.float16)
    odd = torch.zeros(ops.workspace_size(128) + 5, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="multiple of 4"):  # its partial tiles would be misaligned
        torch.ops.qqq.gemm(a, s, t["qqq_b"], t["qqq_scale"], t["qqq_group"], odd, None,
                           torch.float16)
    misaligned = torch.zeros(4 * 256 + 1, device="cuda", dtype=torch.float16)[1:].view(4, 256)
    with pytest.raises(ValueError, match="16-byte aligned"):
        torch.ops.qqq.linear(misaligned, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None)
    bias = torch.zeros(129, device="cuda", dtype=torch.float16)[1:]  # contiguous, misaligned
    with pytest.raises(ValueError, match="16-byte aligned"):
        torch.ops.qqq.gemm(a, s, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, bias,
                           torch.float16)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.qqq.gemm(a, s, t["qqq_b"], t["qqq_scale"].cpu(), t["qqq_group"], ws, None,
                           torch.float16)


@pytest.mark.parametrize("pattern", ["silu_mul_quant", "add_rms_norm_quant"])
def test_persistent_rows_give_the_looped_kernels_codes(pattern):
    """Compiled as vLLM compiles (batch symbolic, no guards, tuned at 8192 rows), the SiLU-and-mul
    or add + RMSNorm with the quantization fused becomes one persistent kernel under the plugin's
    choices (a looped one under Inductor's) and gives the same int8 codes and scales at 1 to 300
    rows, random inputs. The norm's sum of squares may add up in another order: its codes may
    differ by one in rare entries, its scales by an fp16 rounding; the SiLU-and-mul's are
    identical (its absmax is exact in any order)."""
    import sys
    from pathlib import Path

    import torch._inductor.config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.utils import run_and_get_code

    from vllm_qqq.inductor_choices import PersistentRows

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_row_quant import PATTERNS, compiled

    fn, shapes = PATTERNS[pattern]
    gen = torch.Generator(device="cuda").manual_seed(5)
    ms = (1, 2, 7, 16, 33, 300)
    inputs = {m: [torch.randn(s, device="cuda", dtype=torch.float16, generator=gen)
                  for s in shapes(m)] for m in (8192, *ms)}
    out = {}
    with inductor_config.patch({"force_disable_caches": True}):
        for label, choices in (("looped", InductorChoices), ("persistent", PersistentRows)):
            f, code = run_and_get_code(compiled, fn, choices, inputs[8192])
            code = "\n".join(code)
            assert ("triton_per_fused" in code) is (label == "persistent"), label
            assert ("triton_red_fused" in code) is (label == "looped"), label
            out[label] = {m: f(*inputs[m]) for m in ms}  # before the next compile resets Dynamo
    for m in ms:
        a, b = out["looped"][m], out["persistent"][m]
        k = inputs[m][0].shape[1] // (2 if pattern == "silu_mul_quant" else 1)
        assert a[0].shape == b[0].shape == (m, k)
        if pattern == "silu_mul_quant":
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        else:
            assert torch.equal(a[2], b[2])  # the residual sum, rounded once
            assert (a[0].int() - b[0].int()).abs().max() <= 1
            assert (a[0] != b[0]).float().mean() < 1e-3
            torch.testing.assert_close(a[1], b[1], rtol=2**-11, atol=0)  # one fp16 ulp
        # Eager rounds the normed or SiLU-mul row to fp16 before its absmax, Inductor may not.
        ref_q, ref_s = fn(*inputs[m])[:2]
        assert (ref_q.int() - b[0].int()).abs().max() <= 1
        torch.testing.assert_close(b[1], ref_s, rtol=2**-10, atol=0)
