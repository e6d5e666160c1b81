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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_integer_group_scales_take_the_integer_decode(dtype):
    """prepare_weight hands the kernels int16 group scales where every scale of the layer is an
    integer (their integer decode) and float16 otherwise; either way the op computes the same
    product as with the float16 scales (here on the CPU, the reference path)."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(128, 256, generator=gen)
    qw = rtn(w, 128, int_scales=True)
    t = ops.prepare_weight(qw)
    assert t["qqq_group"].dtype == torch.int16
    assert torch.equal(t["qqq_group"].half(), qw.group.half())
    assert ops.prepare_weight(rtn(w, 128))["qqq_group"].dtype == torch.float16
    one_fraction = qw.group.clone()
    one_fraction[0, 0] += 0.5
    assert ops.kernel_group_scales(one_fraction).dtype == torch.float16
    x = torch.randn(5, 256).to(dtype)
    ws = ops.workspace("cpu", 128)
    y_int = ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws)
    y_half = ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"].half(), ws)
    assert torch.equal(y_int, y_half)
    with pytest.raises(ValueError, match="float16 / int16"):
        ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"].int(), ws)


def test_an_empty_batch_gives_an_empty_output():
    _, t = layer(256, 128, 128, seed=4)
    ws = ops.workspace("cpu", 128)
    for shape in ((0, 256), (2, 0, 256)):
        y = ops.w4a8_linear(torch.randn(shape).half(), t["qqq_b"], t["qqq_scale"], t["qqq_group"],
                            ws)
        assert y.dtype == torch.float16 and y.shape == shape[:-1] + (128,)


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
    a, s = torch.ops.qqq.quant_per_token(x)
    for prefetch in (False, True):
        torch.library.opcheck(torch.ops.qqq.gemm.default, (a, s, t["qqq_b"], t["qqq_scale"],
                                                           t["qqq_group"], ws, None,
                                                           torch.float16, prefetch))


@pytest.mark.parametrize("compiled_quant", ["1", "0"])
def test_traced_linear_quantizes_with_pytorch_ops(monkeypatch, compiled_quant):
    """Traced, the quantization is PyTorch ops (ops.compiled_quant) that Inductor can fuse with
    the norm before it, then qqq.gemm; with VLLM_QQQ_COMPILED_QUANT=0, the qqq.linear op. Either
    way Inductor's result is the eager one's, but where an activation lands one int8 code away
    (Inductor may keep the normed x in fp32 where eager code rounds it to fp16 first)."""
    monkeypatch.setenv("VLLM_QQQ_COMPILED_QUANT", compiled_quant)
    qw, t = layer(256, 128, -1, seed=5)
    ws = ops.workspace("cpu", 128)
    weight = torch.rand(256, dtype=torch.float16) + 0.5

    def f(x):
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight
        return ops.w4a8_linear(normed, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None)

    called = set()

    def record(gm, example_inputs):
        called.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, dynamic=True, backend=record)(torch.randn(3, 256).half())
    assert any("qqq.gemm" in c for c in called) == (compiled_quant == "1"), called
    assert any("qqq.linear" in c for c in called) == (compiled_quant == "0"), called

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    w = qw.int8_weight().double() * qw.channel.double()  # [K, N]
    for m in (1, 5, 33):
        x = torch.randn(m, 256, dtype=torch.float16) * 3
        y, ref = compiled(x).double(), f(x).double()
        xf = x.double()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
        exact = normed @ w
        # Each activation is off by at most half its code (s / 2) plus its fp16 rounding, the
        # output by its own fp16 rounding: a worst case both paths must keep.
        s_x = normed.abs().amax(-1, keepdim=True) / 127
        bound = (s_x / 2 + normed.abs() * 2**-11) @ w.abs() + exact.abs() * 2**-10
        assert ((y - exact).abs() <= bound).all() and ((ref - exact).abs() <= bound).all()
        # And the two agree far closer than that: only a few codes differ.
        assert (y - ref).abs().mean() <= 0.01 * ref.abs().mean()


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
    # The other checks: their messages are formatted only when they fail, so each one's is run.
    good = dict(a=a, a_scale=s, b=t["qqq_b"], scale=t["qqq_scale"], group=t["qqq_group"],
                workspace=ws, bias=None, out_dtype=torch.float16)
    misaligned_scale = torch.empty(129)[1:]  # 4 bytes past a 16-byte boundary
    misaligned_scale.copy_(t["qqq_scale"])
    for bad, message in [
            (dict(a=a.reshape(2, 2, 256)), r"a must be contiguous int8 \[M, K\]"),
            (dict(b=t["qqq_b"].float()), r"b must be int32 \[K/32, N/8, 32\]"),
            (dict(b=t["qqq_b"].reshape(-1)), r"b must be int32 \[K/32, N/8, 32\]"),
            (dict(a=torch.zeros(4, 160, dtype=torch.int8),
                  b=torch.zeros(5, 16, 32, dtype=torch.int32)), "K % 128 == 0"),
            (dict(a_scale=s[:2]), r"a_scale must be float32 \[M, 1\]"),
            (dict(group=torch.ones(3, 128, dtype=torch.float16)),
             r"group must be empty or float16 / int16 \[2, 128\], got torch.float16 \[3, 128\]"),
            (dict(group=torch.ones(2, 128, dtype=torch.int32)),
             r"group must be empty or float16 / int16 \[2, 128\], got torch.int32 \[2, 128\]"),
            (dict(bias=torch.zeros(128, dtype=torch.bfloat16)), r"bias must be torch.float16"),
            (dict(workspace=ws[:16]), "workspace must be int32 with >= "),
            (dict(scale=misaligned_scale), "16-byte aligned")]:
        with pytest.raises(ValueError, match=message):
            torch.ops.qqq.gemm(**{**good, **bad})


def test_workspace_size_agrees_with_the_kernels():
    """ops.workspace sizes the shared buffer from the same layout csrc/kernels.h defines; a
    smaller one would be refused by the GEMM, a drift would go unseen until a GPU run."""
    _C = pytest.importorskip("vllm_qqq._C", reason="extension not built (no nvcc)")
    for n in (64, 192, 4096, 6144, 8192, 8256, 17920, 28672):
        assert _C.workspace_entries(n) == (ops.workspace_zeroed(n), ops.workspace_partial(n))


def test_compiled_quant_setting_keys_vllms_compile_cache(monkeypatch):
    """vLLM reuses compiled graphs from its cache by a key of its known environment variables:
    the plugin declares VLLM_QQQ_COMPILED_QUANT there, so graphs traced under the other setting
    are not reused, and vLLM's check for unknown VLLM_* variables accepts it."""
    import vllm.envs as envs
    from vllm.config.utils import hash_factors

    import vllm_qqq

    vllm_qqq.register()
    monkeypatch.setenv("VLLM_QQQ_COMPILED_QUANT", "1")
    on = hash_factors(envs.compile_factors())
    monkeypatch.setenv("VLLM_QQQ_COMPILED_QUANT", "0")
    assert hash_factors(envs.compile_factors()) != on
    envs.validate_environ(hard_fail=True)


@pytest.mark.parametrize("env,expected", [({}, True), ({"VLLM_QQQ_INDUCTOR_PDL": "0"}, False),
                                          ({"TORCHINDUCTOR_ENABLE_PDL": "0"}, False)])
def test_quantized_linears_turn_on_inductor_pdl(monkeypatch, env, expected):
    """Building a QQQ linear turns on Inductor's programmatic launches, unless the plugin's
    setting says not to or the user set Inductor's own variable."""
    import torch._inductor.config as inductor_config
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_qqq.config import QQQConfig

    for name in ("VLLM_QQQ_INDUCTOR_PDL", "TORCHINDUCTOR_ENABLE_PDL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with inductor_config.patch({"triton.enable_pdl": False}):
        assert QQQConfig().get_quant_method(LinearBase.__new__(LinearBase), "x") is not None
        assert inductor_config.triton.enable_pdl is expected


@pytest.mark.parametrize("env,user,expected", [({}, None, True),
                                               ({"VLLM_QQQ_PERSISTENT_ROWS": "0"}, None, False),
                                               ({}, "own", False)])
def test_quantized_linears_make_rows_persistent(monkeypatch, env, user, expected):
    """Building a QQQ linear installs the persistent-rows heuristic as Inductor's choices, in
    the setting and in this thread's choices made before it, unless the plugin's setting says
    not to or the user installed choices of their own."""
    import torch._inductor.config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_qqq.config import QQQConfig
    from vllm_qqq.inductor_choices import PersistentRows

    class Own(InductorChoices):
        pass

    monkeypatch.delenv("VLLM_QQQ_PERSISTENT_ROWS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with inductor_config.patch({"inductor_choices_class": Own if user else None}), \
            V.set_choices_handler(InductorChoices()):
        assert QQQConfig().get_quant_method(LinearBase.__new__(LinearBase), "x") is not None
        assert (inductor_config.inductor_choices_class is PersistentRows) is expected
        assert isinstance(V.choices, PersistentRows) is expected


@pytest.mark.parametrize("k,hint,expected", [(4096, "INNER", True), (14336, "INNER", True),
                                             (16384, "INNER", True), (16385, "INNER", False),
                                             (28672, "INNER", False), (512, "INNER", True),
                                             (4096, "OUTER", False), (4096, "DEFAULT", False)])
def test_persistent_rows_up_to_16384_inner_entries(k, hint, expected):
    """Row reductions (reduction over the contiguous dimension) of up to 16384 entries are made
    persistent; Inductor's default stops at 1024. Longer rows and other reductions keep
    Inductor's choice."""
    import sympy
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    from vllm_qqq.inductor_choices import PersistentRows

    class Features:
        reduction_numel = sympy.Integer(k)
        numel = sympy.Integer(1)

        def get_reduction_hint(self):
            return getattr(ReductionHint, hint)

    class Graph:
        sizevars = SizeVarAllocator()

    with V.set_graph_handler(Graph()):
        assert PersistentRows.should_use_persistent_reduction(Features(), False) is expected
        assert PersistentRows.should_use_persistent_reduction(Features(), True) is (
            InductorChoices.should_use_persistent_reduction(Features(), True))
        if k <= 1024 or hint != "INNER":
            assert PersistentRows.should_use_persistent_reduction(Features(), False) is (
                InductorChoices.should_use_persistent_reduction(Features(), False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul_quant_is_the_reference_and_checks_its_input(dtype):
    """qqq.silu_mul_quant on the CPU: the quantization of vLLM's SiLU-and-mul (PyTorch ops)."""
    import torch.nn.functional as F

    from vllm_qqq.reference import quantize_per_token
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 96, generator=gen) * 4).to(dtype)
    q, s = torch.ops.qqq.silu_mul_quant(x)
    rq, rs = quantize_per_token(F.silu(x[:, :48]) * x[:, 48:])
    assert q.shape == (5, 48) and s.shape == (5, 1)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    # Its schema, fake implementation and tracing agree with what it computes.
    torch.library.opcheck(torch.ops.qqq.silu_mul_quant.default, (x,))
    for bad in (x.float(), x[:, :40], x.reshape(5, 2, 48), x.t()):
        with pytest.raises(ValueError, match="silu_mul_quant"):
            torch.ops.qqq.silu_mul_quant(bad)


def test_fusion_pass_replaces_silu_mul_and_its_quantization_only():
    """The pass fuses quantize_per_token(silu_mul(x)) in a compiled graph into the op, with the
    same result, and leaves alone a product of slices that are not x's halves and float32."""
    import torch.nn.functional as F

    from vllm_qqq.fusion import QuantFusion
    from vllm_qqq.reference import quantize_per_token, silu_mul

    def pair(x):
        return quantize_per_token(silu_mul(x))

    def other_slices(x):
        return quantize_per_token(F.silu(x[:, :16]) * x[:, 16:32])

    gen = torch.Generator().manual_seed(4)
    for fn, x, fused in [(pair, torch.randn(7, 64, generator=gen).half(), 1),
                         (other_slices, torch.randn(7, 48, generator=gen).half(), 0),
                         (pair, torch.randn(7, 64, generator=gen), 0)]:
        torch._dynamo.reset()
        fusion = QuantFusion(["silu"])
        compiled = torch.compile(fn, fullgraph=True,
                                 options={"post_grad_custom_post_pass": fusion})
        torch._dynamo.mark_dynamic(x, 0)  # the tokens, as vLLM compiles
        with torch.compiler.config.patch(force_disable_caches=True):  # so that the pass runs
            q, s = compiled(x)
        assert fusion.fused == {"silu": fused}, fn.__name__
        rq, rs = fn(x)
        if fused:  # the op: the reference itself
            assert torch.equal(q, rq) and torch.equal(s, rs)
        else:  # Inductor's own kernel, which may keep silu * up in fp32 (docs/FORMAT.md)
            assert (q.int() - rq.int()).abs().max() <= 1
            torch.testing.assert_close(s, rs, rtol=1e-3, atol=0)


# sm90: our kernels as on an H100 (the default fuses there), else as on this CPU machine.
@pytest.mark.parametrize("value,user,sm90,expected", [
    (None, None, True, ("silu",)), (None, None, False, None), ("0", None, True, None),
    ("silu", None, False, ("silu",)), ("1", None, False, ("silu", "norm")),
    ("norm", None, False, ("norm",)), ("norm, silu", None, False, ("silu", "norm")),
    ("1", "own", False, None)])
def test_quantized_linears_install_the_fusion_pass_when_asked(monkeypatch, value, user, sm90,
                                                              expected):
    """Building a QQQ linear with VLLM_QQQ_FUSED_QUANT set puts the pass for the pairs it names
    into vLLM's compile config (as Inductor's post-grad custom pass), unless the user has a
    post-grad pass of their own; by default the SiLU pair where our kernels run on sm_90+."""
    from vllm.compilation.passes.inductor_pass import CallableInductorPass
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_qqq import ops
    from vllm_qqq.config import QQQConfig
    from vllm_qqq.fusion import QuantFusion

    if sm90:
        monkeypatch.setattr(ops, "kernels_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("VLLM_QQQ_FUSED_QUANT", raising=False)
    if value is not None:
        monkeypatch.setenv("VLLM_QQQ_FUSED_QUANT", value)
    config = VllmConfig()
    passes = config.compilation_config.inductor_compile_config
    own = CallableInductorPass(lambda graph: None, uuid="own") if user else None
    if own:
        passes["post_grad_custom_post_pass"] = own
    with set_current_vllm_config(config):
        assert QQQConfig().get_quant_method(LinearBase.__new__(LinearBase), "x") is not None
    installed = passes.get("post_grad_custom_post_pass")
    if own:
        assert installed is own
    elif expected:
        assert isinstance(installed, QuantFusion) and installed.kinds == expected
    else:
        assert installed is None


def test_auto_fuses_the_silu_pair_where_the_kernels_run_with_clusters(monkeypatch):
    """"auto" (the default) fuses the SiLU pair where our kernels run on sm_90 or newer, and
    nothing before sm_90 (no clusters there) or without the kernels (the CPU: eager PyTorch);
    a pair named explicitly is fused anywhere."""
    from vllm_qqq import ops
    from vllm_qqq.config import fused_quant_kinds

    monkeypatch.delenv("VLLM_QQQ_FUSED_QUANT", raising=False)
    assert fused_quant_kinds() == (("silu",) if ops.kernels_available()
                                   and torch.cuda.get_device_capability() >= (9, 0) else ())
    monkeypatch.setattr(ops, "kernels_available", lambda: True)
    for capability, expected in [((8, 0), ()), ((8, 9), ()), ((9, 0), ("silu",)),
                                 ((10, 0), ("silu",))]:
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: c)
        assert fused_quant_kinds() == expected
    monkeypatch.setattr(ops, "kernels_available", lambda: False)
    assert fused_quant_kinds() == ()
    monkeypatch.setenv("VLLM_QQQ_FUSED_QUANT", "silu")
    assert fused_quant_kinds() == ("silu",)


def test_a_fused_quant_setting_it_does_not_know_is_an_error(monkeypatch):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_qqq.config import QQQConfig

    monkeypatch.setenv("VLLM_QQQ_FUSED_QUANT", "silu,gelu")
    with set_current_vllm_config(VllmConfig()), pytest.raises(ValueError, match="gelu"):
        QQQConfig().get_quant_method(LinearBase.__new__(LinearBase), "x")


def test_lm_head_setting_of_the_checkpoint():
    """quantization_config's lm_head: absent or false leaves vLLM's lm_head unquantized (its
    quant method None), true gives it QQQ's; anything else is refused, not read as true."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from vllm_qqq.config import QQQConfig
    from vllm_qqq.format import FormatError
    from vllm_qqq.linear_method import QQQLinearMethod

    head = ParallelLMHead.__new__(ParallelLMHead)
    base = {"quant_method": "qqq", "wbits": 4, "group_size": 128}
    for extra, quantized in (({}, False), ({"lm_head": False}, False), ({"lm_head": True}, True)):
        method = QQQConfig.from_config({**base, **extra}).get_quant_method(head, "lm_head")
        assert isinstance(method, QQQLinearMethod) if quantized else method is None
    with pytest.raises(FormatError, match="'lm_head' must be true or false"):
        QQQConfig.from_config({**base, "lm_head": "yes"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_rms_norm_quant_is_the_reference_and_checks_its_input(dtype):
    """qqq.add_rms_norm_quant on the CPU: vLLM's fused add + RMSNorm (its IR op's PyTorch
    implementation), the quantization of its output, and the new residual."""
    import vllm.ir.ops

    from vllm_qqq.reference import quantize_per_token
    gen = torch.Generator().manual_seed(5)
    x, r = ((torch.randn(6, 64, generator=gen) * 3).to(dtype) for _ in range(2))
    w = (torch.rand(64, generator=gen) + 0.5).to(dtype)
    q, s, res = torch.ops.qqq.add_rms_norm_quant(x, r, w, 1e-6)
    with vllm.ir.enable_torch_wrap(False):
        y, res_ref = vllm.ir.ops.fused_add_rms_norm(x, r, w, 1e-6)
    rq, rs = quantize_per_token(y)
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(res, res_ref)
    torch.library.opcheck(torch.ops.qqq.add_rms_norm_quant.default, (x, r, w, 1e-6))
    for bad in [(x.float(), r, w), (x, r.float(), w), (x, r[:3], w), (x, r, w[:32]),
                (x[:, :60], r[:, :60], w[:60]), (x.t(), r.t(), w[:6])]:
        with pytest.raises(ValueError, match="add_rms_norm_quant"):
            torch.ops.qqq.add_rms_norm_quant(*bad, 1e-6)


def test_fusion_pass_replaces_vllms_norm_and_its_quantization():
    """As vLLM's graphs hold it on the GPU (its IR op, before vLLM lowers it): the pass fuses
    fused_add_rms_norm + quantize_per_token into the op, at the graph's epsilon, with the same
    results; not where the normed output has another use."""
    import vllm.ir.ops

    from vllm_qqq.fusion import QuantFusion
    from vllm_qqq.reference import quantize_per_token

    def pair(eps, keep_normed=False):
        def fn(x, residual, weight):
            y, new_residual = vllm.ir.ops.fused_add_rms_norm(x, residual, weight, eps)
            return (*quantize_per_token(y), new_residual) + ((y,) if keep_normed else ())
        return fn

    gen = torch.Generator().manual_seed(6)
    with vllm.ir.enable_torch_wrap(True):
        for eps, keep, fused in [(1e-5, False, 1), (1e-6, False, 1), (3e-4, False, 1),
                                 (1e-5, True, 0)]:
            x, r = (torch.randn(7, 128, generator=gen).half() for _ in range(2))
            w = (torch.rand(128, generator=gen) + 0.5).half()
            torch._dynamo.reset()
            fusion = QuantFusion(["norm"])
            compiled = torch.compile(pair(eps, keep), fullgraph=True,
                                     options={"post_grad_custom_post_pass": fusion})
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(r, 0)
            with torch.compiler.config.patch(force_disable_caches=True):
                got = compiled(x, r, w)
            assert fusion.fused == {"norm": fused}, (eps, keep)
            for a, b in zip(got, pair(eps, keep)(x, r, w), strict=True):
                assert torch.equal(a, b)
