"""The W4A8 kernels as torch ops (`torch.ops.qqq.*`), with fake implementations so that vLLM's
torch.compile(fullgraph=True) and CUDA graphs capture them.

CUDA implementations call the pybind11 module vllm_qqq._C (csrc/); the CPU implementations are
the reference, on the same kernel weight layout, so the ops can be traced and checked anywhere.

Kernel weight layout (`prepare_weight`), int32 [K/32, N/8, 32]: one word per lane of a warp for
each (32-deep k step, 8-wide n tile): lane L holds column 8*t + L//4, rows k0 = 32*s + 4*(L%4);
byte j carries row k0 + j in its high nibble and row k0 + 16 + j in its low nibble, which are the
two int8 mma B fragments that lane needs (a high nibble read as int8 is 16x its value).
"""

import logging

import torch

from vllm_qqq import setting
from vllm_qqq.format import QQQWeight
from vllm_qqq.reference import int8_matmul, quantize_per_token, scale_output
from vllm_qqq.reference import add_rms_norm_quant as add_rms_norm_quant_reference
from vllm_qqq.reference import silu_mul_quant as silu_mul_quant_reference

log = logging.getLogger(__name__)

try:
    from vllm_qqq import _C  # noqa: F401
except ImportError:  # built without CUDA: the reference path runs instead
    _C = None

# VLLM_QQQ_QUANT_PDL=0 launches the quantization kernel plainly instead of as a programmatic
# dependent launch (for measuring it inside vLLM's engine, which runs in its own process).
if _C is not None and setting("VLLM_QQQ_QUANT_PDL") == "0":
    _C.set_quant_pdl(False)

KERNEL_BK = 128  # K of one pipeline stage; also the only group size
KERNEL_BN = 64  # N granularity the kernel accepts (partial 128-wide tiles are masked)


def kernels_available() -> bool:
    return _C is not None and torch.cuda.is_available()


def use_cuda_kernels(k: int, n: int, dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if dtype not in _DTYPE_CODE:
        log.warning("QQQ kernels take fp16/bf16 activations, not %s: the PyTorch reference runs",
                    dtype)
        return False
    if _C is None:
        log.warning("vllm_qqq._C is not built: QQQ layers run the slow PyTorch reference on %s",
                    device)
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise RuntimeError("QQQ CUDA kernels need compute capability 8.0 or newer "
                           f"(int8 mma.sync); {torch.cuda.get_device_name(device)} is older")
    if k % KERNEL_BK or n % KERNEL_BN:
        log.warning("QQQ kernels need K %% %d == 0 and N %% %d == 0 (got K=%d, N=%d): this layer "
                    "runs the PyTorch reference", KERNEL_BK, KERNEL_BN, k, n)
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Weight layout


def kernel_codes(codes: torch.Tensor) -> torch.Tensor:
    """Logical int4 codes [K, N] -> kernel words int32 [K/32, N/8, 32] (see module doc)."""
    k, n = codes.shape
    c = (codes.to(torch.int32) & 0xF).reshape(k // 32, 2, 4, 4, n // 8, 8)  # s, half, r, j, t, q
    c = c.permute(0, 4, 5, 2, 3, 1)  # s, t, q, r, j, half
    shifts = 8 * torch.arange(4, device=codes.device)[:, None] + torch.tensor(
        [4, 0], device=codes.device)[None, :]
    words = (c.to(torch.int64) << shifts).sum(dim=(-1, -2))  # disjoint bits: sum == or
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(k // 32, n // 8, 32).to(torch.int32).contiguous()


def kernel_codes_to_logical(words: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of kernel_codes."""
    ks, nt, _ = words.shape
    w = words.to(torch.int64).reshape(ks, nt, 8, 4, 1, 1)  # s, t, q, r
    shifts = 8 * torch.arange(4, device=words.device)[:, None] + torch.tensor(
        [4, 0], device=words.device)[None, :]
    c = (w >> shifts) & 0xF  # s, t, q, r, j, half
    if signed:
        c = torch.where(c >= 8, c - 16, c)
    c = c.permute(0, 5, 3, 4, 1, 2)  # s, half, r, j, t, q
    return c.reshape(ks * 32, nt * 8).to(torch.int8)


def prepare_weight(w: QQQWeight) -> dict[str, torch.Tensor]:
    """Logical weight -> the tensors the kernel reads: words, fp32 epilogue scale, group scales."""
    per_channel = w.group_size == -1
    # Per-channel codes reach the mma as code * 16 (high nibble), so the epilogue scale is / 16.
    scale = w.channel.float() / (16.0 if per_channel else 1.0)
    group = (torch.empty(0, dtype=torch.float16, device=w.codes.device) if per_channel
             else kernel_group_scales(w.group))
    return {"qqq_b": kernel_codes(w.codes), "qqq_scale": scale.contiguous(), "qqq_group": group}


def kernel_group_scales(group: torch.Tensor) -> torch.Tensor:
    """The group scales [K/128, N] the kernels read: int16 where every one is an integer (the
    kernels then decode with integer arithmetic, csrc/decode.cuh), else float16. The caller has
    checked that every (code - 8) * s_group lands in int8 (the loader does)."""
    g = group.to(torch.float16)
    if bool((g == g.round()).all()):
        return g.to(torch.int16).contiguous()
    return g.contiguous()


def kernel_int8_weight(b: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The int8 [K, N] matrix the kernel multiplies with (per-channel: code * 16)."""
    if group.numel() == 0:
        return kernel_codes_to_logical(b, signed=True) * 16
    w = QQQWeight(kernel_codes_to_logical(b, signed=False), torch.ones(b.shape[1] * 8),
                  group.to(torch.float16), b.shape[0] * 32 // group.shape[0])
    return w.int8_weight()


# device -> (buffer, entries kept zeroed, entries for partial tiles at its end)
_workspaces: dict[torch.device, tuple[torch.Tensor, int, int]] = {}


def workspace_zeroed(n: int) -> int:
    """int32 entries the kernels keep zeroed (csrc/kernels.h): one split-K counter per tile of
    128 channels and up to 4 token tiles."""
    return (n + 127) // 128 * 4


def workspace_partial(n: int) -> int:
    """int32 entries at the end of the workspace for the split-K partial tiles (csrc/kernels.h):
    1024 rows x N for N <= 8192 (kWgmmaPartialRows; 32 MiB at N = 8192), 64 rows x N above
    (kSplitPartialRows: the small-M kernel's tiles)."""
    return (1024 if n <= 8192 else 64) * n


def workspace_size(n: int) -> int:
    return workspace_zeroed(n) + workspace_partial(n)


def workspace(device: torch.device, n: int) -> torch.Tensor:
    """An int32 buffer shared by the layers on `device` (they run one after another on one
    stream): its zeroed head covers every layer's zeroed region and its tail every layer's
    partial tiles, so layers of different N never overlap. The GEMM leaves the head zeroed.
    Allocated at load time, never inside a graph."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws, zeroed, partial = _workspaces.get(device, (None, 0, 0))
    if ws is None or workspace_zeroed(n) > zeroed or workspace_partial(n) > partial:
        zeroed, partial = max(zeroed, workspace_zeroed(n)), max(partial, workspace_partial(n))
        ws = torch.zeros(zeroed + partial, dtype=torch.int32, device=device)
        _workspaces[device] = (ws, zeroed, partial)
    return ws


# ---------------------------------------------------------------------------------------------
# Ops

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}


def _stream(t: torch.Tensor) -> int:
    # The raw handle, as Inductor's generated code gets it: torch.cuda.current_stream builds a
    # Stream object on every call.
    return torch._C._cuda_getCurrentRawStream(t.device.index)


# The ops are defined through torch.library.Library, not torch.library.custom_op: the prefill's
# ops run outside CUDA graphs, where every call's host time counts, and custom_op's Python
# wrappers (autograd, aliasing checks) made a call cost 7.9 us against 3.2 under inference_mode
# on the 2-core CPU machine. On the H100 this (with _stream and the plain checks below) took a
# batch-1 1024-token prefill's first token from 22.7 to 20.1 ms in vLLM
# (benchmarks/results/NOTES.md, "End to end").
_LIBRARY = torch.library.Library("qqq", "DEF")


def _define(schema: str):
    """Defines qqq::<name><schema> with the decorated function as its CPU and CUDA kernel, and
    returns the op; its fake implementation is registered with torch.library.register_fake."""
    def define(fn):
        _LIBRARY.define(fn.__name__ + schema)
        for key in ("CPU", "CUDA"):
            _LIBRARY.impl(fn.__name__, fn, key)
        op = getattr(torch.ops.qqq, fn.__name__)
        op.__doc__ = fn.__doc__
        return op
    return define


def _fake(op):
    return torch.library.register_fake(op.default, lib=_LIBRARY)


@_define("(Tensor x) -> (Tensor, Tensor)")
def quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16/bf16 [M, K] -> (int8 [M, K], float32 [M, 1]), as reference.quantize_per_token."""
    return _quant(x, gemm_follows=False)


def _quant(x, gemm_follows):
    """gemm_follows: the next kernel on the stream is our GEMM, which may then launch early
    (csrc/kernels.h)."""
    if x.dtype not in _DTYPE_CODE or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"qqq.quant_per_token needs a contiguous 2-D fp16/bf16 tensor, got "
                         f"{x.dtype} {list(x.shape)} contiguous={x.is_contiguous()}")
    if x.device.type == "cpu":
        return quantize_per_token(x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _C.quant_per_token(x.data_ptr(), _DTYPE_CODE[x.dtype], m, k, q.data_ptr(), s.data_ptr(),
                           gemm_follows, _stream(x))
    return q, s


@_fake(quant_per_token)
def _(x):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))


@_define("(Tensor x) -> (Tensor, Tensor)")
def silu_mul_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2D] fp16/bf16 (gate, up) -> quant_per_token(silu(gate) * up) as (int8 [M, D],
    float32 [M, 1]), silu(gate) * up rounded as vLLM's SiluAndMul rounds it: one kernel for
    both (csrc/silu_mul_quant.cu), put in vLLM's graphs by vllm_qqq.fusion."""
    if x.dtype not in _DTYPE_CODE or x.dim() != 2 or not x.is_contiguous() or x.shape[1] % 16:
        raise ValueError(f"qqq.silu_mul_quant needs a contiguous 2-D fp16/bf16 tensor of an even "
                         f"width divisible by 16, got {x.dtype} {list(x.shape)} "
                         f"contiguous={x.is_contiguous()}")
    if x.device.type == "cpu" or _C is None:
        return silu_mul_quant_reference(x)
    m, d = x.shape[0], x.shape[1] // 2
    q = torch.empty(m, d, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _C.silu_mul_quant(x.data_ptr(), _DTYPE_CODE[x.dtype], m, d, q.data_ptr(), s.data_ptr(),
                          _stream(x))
    return q, s


@_fake(silu_mul_quant)
def _(x):
    return (x.new_empty((x.shape[0], x.shape[1] // 2), dtype=torch.int8),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))


@_define("(Tensor x, Tensor residual, Tensor weight, float eps) "
         "-> (Tensor, Tensor, Tensor)")
def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [M, H], weight [H], fp16/bf16 alike -> (int8 [M, H], float32 [M, 1], new
    residual [M, H]): vLLM's fused add + RMSNorm and the per-token quantization of its output in
    one kernel (csrc/add_rms_norm_quant.cu), put in vLLM's graphs by vllm_qqq.fusion."""
    h = x.shape[-1]
    if (x.dtype not in _DTYPE_CODE or residual.dtype != x.dtype or weight.dtype != x.dtype
            or x.dim() != 2 or residual.shape != x.shape or tuple(weight.shape) != (h,)
            or not (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous())
            or h % 8):
        raise ValueError(f"qqq.add_rms_norm_quant needs contiguous fp16/bf16 x, residual [M, H] "
                         f"and weight [H] of one dtype, H % 8 == 0; got {x.dtype} "
                         f"{list(x.shape)}, {residual.dtype} {list(residual.shape)}, "
                         f"{weight.dtype} {list(weight.shape)}")
    if x.device.type == "cpu" or _C is None:
        return add_rms_norm_quant_reference(x, residual, weight, eps)
    m = x.shape[0]
    q = torch.empty(m, h, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    new_residual = torch.empty_like(x)
    if m:
        _C.add_rms_norm_quant(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), eps,
                              _DTYPE_CODE[x.dtype], m, h, q.data_ptr(), s.data_ptr(),
                              new_residual.data_ptr(), _stream(x))
    return q, s, new_residual


@_fake(add_rms_norm_quant)
def _(x, residual, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((x.shape[0], 1), dtype=torch.float32), torch.empty_like(x))


@_define("(Tensor a, Tensor a_scale, Tensor b, Tensor scale, Tensor group, Tensor(a!) workspace, "
         "Tensor? bias, ScalarType out_dtype, bool prefetch_weights=False) -> Tensor")
def gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
         group: torch.Tensor, workspace: torch.Tensor, bias: torch.Tensor | None,
         out_dtype: torch.dtype, prefetch_weights: bool = False) -> torch.Tensor:
    """int8 a [M, K] (per-row scale a_scale [M, 1]) x kernel-layout int4 b -> out_dtype [M, N]:
    (float(acc) * a_scale) * scale (+ bias); group scales [K/128, N] (float16, or int16 integers:
    kernel_group_scales) or empty for per-channel.
    prefetch_weights: b and group are not written by the kernel before this call (a model's
    weights), so the GEMM may start early and prefetch them (csrc/kernels.h)."""
    return _gemm(a, a_scale, b, scale, group, workspace, bias, out_dtype, prefetch_weights)


@_fake(gemm)
def _(a, a_scale, b, scale, group, workspace, bias, out_dtype, prefetch_weights=False):
    return a.new_empty((a.shape[0], b.shape[1] * 8), dtype=out_dtype)


@_define("(Tensor x, Tensor b, Tensor scale, Tensor group, Tensor(a!) workspace, Tensor? bias) "
         "-> Tensor")
def linear(x: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, group: torch.Tensor,
           workspace: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp16/bf16 -> x @ W in x's dtype: quant_per_token, then gemm, launched back to back
    in one op so that (on sm_90+) the GEMM may start while the quantization finishes and
    prefetch its weights (programmatic dependent launch; csrc/kernels.h, prefetch_weights)."""
    a, a_scale = _quant(x, gemm_follows=True)
    return _gemm(a, a_scale, b, scale, group, workspace, bias, x.dtype, prefetch_weights=True)


@_fake(linear)
def _(x, b, scale, group, workspace, bias):
    return x.new_empty((x.shape[0], b.shape[1] * 8))


def _gemm(a, a_scale, b, scale, group, workspace, bias, out_dtype, prefetch_weights):
    _check_gemm_args(a, a_scale, b, scale, group, workspace, bias, out_dtype)
    m, k = a.shape
    n = b.shape[1] * 8
    if a.device.type == "cpu":
        acc = int8_matmul(a, kernel_int8_weight(b, group))
        return scale_output(acc, a_scale, scale, bias, out_dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m:
        _C.gemm(a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), scale.data_ptr(),
                group.data_ptr() if group.numel() else 0, bias.data_ptr() if bias is not None else 0,
                out.data_ptr(), _DTYPE_CODE[out_dtype], m, n, k, workspace.data_ptr(),
                workspace.numel(), _stream(a), prefetch_weights, group.dtype == torch.int16)
    return out


def _check_gemm_args(a, a_scale, b, scale, group, workspace, bias, out_dtype):
    error = _gemm_args_error(a, a_scale, b, scale, group, workspace, bias, out_dtype)
    if error is not None:
        raise ValueError(f"qqq.gemm: {error}")


def _gemm_args_error(a, a_scale, b, scale, group, workspace, bias, out_dtype):
    # Every call runs this (the prefill's GEMMs run outside CUDA graphs, where host time counts):
    # plain conditions, each message formatted only where its condition fails.
    if not (a.dtype == torch.int8 and a.dim() == 2 and a.is_contiguous()):
        return f"a must be contiguous int8 [M, K], got {a.dtype} {list(a.shape)}"
    if not (b.dtype == torch.int32 and b.dim() == 3 and b.shape[2] == 32 and b.is_contiguous()):
        return f"b must be int32 [K/32, N/8, 32] (prepare_weight), got {b.dtype} {list(b.shape)}"
    m, k = a.shape
    n = b.shape[1] * 8
    if b.shape[0] * 32 != k:
        return f"a has K={k} but b holds K={b.shape[0] * 32}"
    if k % KERNEL_BK or n % KERNEL_BN:
        return f"the kernel needs K % {KERNEL_BK} == 0 and N % {KERNEL_BN} == 0, got K={k}, N={n}"
    if not (a_scale.dtype == torch.float32 and a_scale.numel() == m and a_scale.is_contiguous()):
        return f"a_scale must be float32 [M, 1], got {a_scale.dtype} {list(a_scale.shape)}"
    if not (scale.dtype == torch.float32 and scale.numel() == n and scale.is_contiguous()):
        return f"scale must be float32 [N={n}], got {scale.dtype} {list(scale.shape)}"
    grouped = group.numel() != 0
    if grouped and not (group.dtype in (torch.float16, torch.int16) and group.is_contiguous()
                        and tuple(group.shape) == (k // KERNEL_BK, n)):
        return (f"group must be empty or float16 / int16 [{k // KERNEL_BK}, {n}], got "
                f"{group.dtype} {list(group.shape)}")
    if bias is not None and not (bias.dtype == out_dtype and bias.numel() == n
                                 and bias.is_contiguous()):
        return f"bias must be {out_dtype} [{n}]"
    if out_dtype not in _DTYPE_CODE:
        return f"out_dtype must be float16 or bfloat16, got {out_dtype}"
    if not (workspace.dtype == torch.int32 and workspace.numel() >= workspace_size(n)):
        return f"workspace must be int32 with >= {workspace_size(n)} entries (ops.workspace)"
    device = a.device
    if not (a_scale.device == device and b.device == device and scale.device == device
            and workspace.device == device and (not grouped or group.device == device)
            and (bias is None or bias.device == device)):
        return "all tensors must be on one device"
    # The kernels move a, b, scale, group, bias and the workspace in 16-byte pieces.
    if (a.data_ptr() % 16 or b.data_ptr() % 16 or scale.data_ptr() % 16
            or workspace.data_ptr() % 16 or (grouped and group.data_ptr() % 16)
            or (bias is not None and bias.data_ptr() % 16)):
        return "a, b, scale, group, bias and workspace must start 16-byte aligned"
    return None


def compiled_quant() -> bool:
    """Whether a traced linear quantizes its activations with PyTorch ops (default) rather than
    the qqq.quant_per_token kernel: VLLM_QQQ_COMPILED_QUANT=0 turns it off."""
    return setting("VLLM_QQQ_COMPILED_QUANT") != "0"


def w4a8_linear(x: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, group: torch.Tensor,
                workspace: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W for x [..., K] in fp16/bf16: per-token int8 quantization, then the W4A8 GEMM."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling() and compiled_quant():
        # Traced (vLLM's torch.compile), the quantization as PyTorch ops lets Inductor fuse it
        # into the kernel that produces x (vLLM's RMSNorm, SiLU-and-mul): one kernel and one
        # round trip of x less per layer. Its arithmetic is the reference's; Inductor may keep
        # x in fp32 where eager code rounds it to fp16 first, which can move a value by one code.
        a, a_scale = quantize_per_token(x)
        out = torch.ops.qqq.gemm(a, a_scale, b, scale, group, workspace, bias, x.dtype, True)
    else:
        out = torch.ops.qqq.linear(x.contiguous(), b, scale, group, workspace, bias)
    return out.reshape(*lead, out.shape[-1])
