"""W4A8 GEMM benchmark on the GPU, side by side with vLLM 0.26's kernels, in one run.

    python benchmarks/bench_gemm.py [--json OUT.json] [--shapes qkv,o,gate_up,down] [--ms 1,16,...]

Every time includes the implementation's activation quantization (ours too). Each number is the
median over CUDA-graph replays of back-to-back calls that rotate over enough weight/input sets to
exceed L2 (>= 3 sets, >= 150 MB), divided by the calls per graph. Baselines that fail to set up
are reported with their error instead of stopping the run.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_qqq import ops  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
MS = [1, 16, 64, 128, 256, 1024, 4096, 8192]
ROTATE_BYTES = 150 * 2**20
DEV = "cuda"


def shape_kn(shape):
    """(K, N) of a named Llama-3-8B shape, or of "KxN" (e.g. 8192x6144, for scaling studies)."""
    if shape in SHAPES:
        return SHAPES[shape]
    try:
        k, n = (int(v) for v in shape.split("x"))
    except ValueError:
        raise SystemExit(f"unknown shape {shape!r}: one of {', '.join(SHAPES)} or KxN") from None
    return k, n


def rand_int32(*shape):
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=DEV)


def device_weight(w):
    """The kernel layout of w on DEV (rtn returns the checkpoint's CPU tensors)."""
    return {name: t.to(DEV) for name, t in ops.prepare_weight(w).items()}


# Each setup(k, n) returns a function of x (fp16 [M, K]) -> output, with its weights bound.
def setup_fp16(k, n):
    w = torch.randn(n, k, device=DEV, dtype=torch.float16) / k**0.5
    return lambda x: torch.nn.functional.linear(x, w), w.numel() * 2


def setup_qqq(g):
    """g: -1 per-channel, 128 g128 with fp16 group scales, "int" g128 with integer ones."""
    def setup(k, n):
        from offline.grid import rtn
        w = torch.randn(n, k, device=DEV) / k**0.5
        t = device_weight(rtn(w, -1 if g == -1 else 128, int_scales=g == "int"))
        ws = ops.workspace(DEV, n)
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        return (lambda x: ops.w4a8_linear(x, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws),
                nbytes)
    return setup


def setup_qqq_switched(switch_on, switch_off, group=-1, base=None):
    """Per-channel (or `group`; or the `base` setup) with a kernel switch of vllm_qqq._C set
    around each call (the kernel is chosen on the host, so the switch holds in the captured
    graphs)."""
    def setup(k, n):
        from vllm_qqq import _C
        f, nbytes = (base or setup_qqq(group))(k, n)

        def g(x):
            switch_on(_C)
            try:
                return f(x)
            finally:
                switch_off(_C)
        return g, nbytes
    return setup


# The mma.sync kernel at every M (the Hopper kernel off); the GEMM launched plainly after the
# quantization (no programmatic dependent launch); the Hopper kernel forced to one tile.
setup_qqq_mma = setup_qqq_switched(lambda c: c.set_wgmma(False), lambda c: c.set_wgmma(True))
setup_qqq_nopdl = setup_qqq_switched(lambda c: c.set_pdl(False), lambda c: c.set_pdl(True))
setup_qqq_quant_plain = setup_qqq_switched(lambda c: c.set_quant_pdl(False),
                                           lambda c: c.set_quant_pdl(True))


def setup_quant_only(k, n):
    """The activations' quantization kernel alone (its share of qqq_channel)."""
    return lambda x: torch.ops.qqq.quant_per_token(x), k * n // 2


# The quantization dividing every entry by its scale (mode 0), or rounding x * (1 / scale) with
# the division only where that could round to another integer (mode 1), at every M.
def setup_quant_product(mode, base=None):
    return setup_qqq_switched(lambda c: c.set_quant_product(mode),
                              lambda c: c.set_quant_product(-1), base=base)


# M <= 16 forced onto one small-M kernel: narrow (K split over the warps of a CTA) or split-K,
# instead of the rule's choice by shape.
def setup_qqq_small_m(mode, group=-1):
    return setup_qqq_switched(lambda c: c.set_narrow(mode), lambda c: c.set_narrow(-1), group)


# The narrow kernel up to M = 16 on every shape, the Hopper kernel only from 17.
def setup_qqq_narrow16(group=-1):
    def force(c):
        c.set_narrow(1)
        c.set_wgmma_min_m(17)

    def restore(c):
        c.set_narrow(-1)
        c.set_wgmma_min_m(0)
    return setup_qqq_switched(force, restore, group)


def setup_qqq_split_cap(splits):
    return setup_qqq_switched(lambda c: c.set_split_cap(splits), lambda c: c.set_split_cap(0))


def setup_qqq_tile(bm, stages, producer_warp=False, group=-1, warpgroups=2):
    def force(c):
        c.set_wgmma_tile(bm, stages, producer_warp, warpgroups)
        c.set_wgmma_min_m(1)

    def restore(c):
        c.set_wgmma_tile(0, 0)
        c.set_wgmma_min_m(0)
    return setup_qqq_switched(force, restore, group)


def setup_qqq_gemm_only(k, n):
    """Our GEMM alone on pre-quantized activations: how much of qqq_channel is quantization."""
    from offline.grid import rtn
    t = device_weight(rtn(torch.randn(n, k, device=DEV) / k**0.5, -1))
    ws = ops.workspace(DEV, n)
    cache = {}

    def g(x):
        if x.shape[0] not in cache:
            cache[x.shape[0]] = torch.ops.qqq.quant_per_token(x)
        a, s = cache[x.shape[0]]
        return torch.ops.qqq.gemm(a, s, t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None,
                                  torch.float16)
    return g, sum(v.numel() * v.element_size() for v in t.values())


def setup_w8a8(k, n):
    from vllm import _custom_ops as vops
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV).t()  # column-major
    sb = torch.rand(n, 1, device=DEV) * 1e-2

    def f(x):
        a, sa, _ = vops.scaled_int8_quant(x)
        return vops.cutlass_scaled_mm(a, b, sa, sb, torch.float16)
    return f, b.numel()


def setup_marlin(group_size, act_int8):
    def setup(k, n):
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (
            apply_gptq_marlin_linear, marlin_act_int8_process_scales, marlin_make_workspace_new)
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import (
            marlin_quantize)
        from vllm.scalar_type import scalar_types
        wtype = scalar_types.uint4b8
        w = torch.randn(k, n, device=DEV, dtype=torch.float16) / k**0.5
        _, q_w, s, g_idx, sort_idx, _ = marlin_quantize(
            w, wtype, group_size, False, input_dtype=torch.int8 if act_int8 else None)
        global_scale = None
        if act_int8:
            s, global_scale = marlin_act_int8_process_scales(s)
            global_scale = global_scale.reshape(1, 1).to(DEV)
        ws = marlin_make_workspace_new(torch.device(DEV))
        zp = torch.empty(0, dtype=torch.int32, device=DEV)

        def f(x):
            return apply_gptq_marlin_linear(
                x, q_w, s, zp, g_idx, sort_idx, ws, wtype, n, k, is_k_full=True,
                input_global_scale=global_scale,
                input_dtype=torch.int8 if act_int8 else None)
        return f, q_w.numel() * 4 + s.numel() * 2
    return setup


def setup_machete(k, n):
    from vllm import _custom_ops as vops
    from vllm.scalar_type import scalar_types
    wtype = scalar_types.uint4b8
    packed = rand_int32(k // 8, n).t().contiguous().t()  # packed along K, column-major
    b = vops.machete_prepack_B(packed, torch.float16, wtype, torch.float16)
    s = (torch.rand(k // 128, n, device=DEV) * 1e-2).half()
    return (lambda x: vops.machete_mm(a=x, b_q=b, b_type=wtype, b_group_scales=s,
                                      b_group_size=128), packed.numel() * 4 + s.numel() * 2)


def setup_cutlass_w4a8_fp8(k, n):
    from vllm import _custom_ops as vops
    packed = rand_int32(k // 8, n).t().contiguous().t()
    b = vops.cutlass_encode_and_reorder_int4b(packed)
    s = vops.cutlass_pack_scale_fp8((torch.rand(k // 128, n, device=DEV) * 0.1 + 0.01)
                                    .to(torch.float8_e4m3fn))
    chan = torch.rand(n, 1, device=DEV) + 0.5

    def f(x):
        a, sa = vops.scaled_fp8_quant(x, use_per_token_if_dynamic=True)
        return vops.cutlass_w4a8_mm(a=a, b_q=b, b_group_scales=s, b_group_size=128,
                                    a_token_scales=sa, b_channel_scales=chan,
                                    out_type=torch.bfloat16)
    return f, packed.numel() * 4 + k // 128 * n


# Name and setup_qqq argument of each weight mode.
GROUP_MODES = (("channel", -1), ("g128", "int"), ("g128_fp16", 128))
# The Hopper kernel's tiles (w4a8_gemm_sm90.cu dispatch): name -> (tokens, ring slots, producer
# warp loads, math warpgroups). 2 warpgroups: 128 channels a CTA; 3: 192, for where 128-channel
# tiles leave the last wave mostly idle (qkv M = 1024 is 192 256-token tiles on 132 SMs, or 256
# 128 x 192 tiles); 4: 256, one wave of 64-token tiles where 192-channel ones overflow it
# (Llama-3-8B gate_up, N = 28672: 112 tiles against 150). 16 or 32 tokens: a quarter or half of
# the 64-token tile's tensor work up to M = 16 / 32.
WGMMA_TILES = {
    "tma_64x6": (64, 6, True, 2), "tma_64x8": (64, 8, True, 2), "128x4": (128, 4, False, 2),
    "tma_128x6": (128, 6, True, 2), "tma_256x4": (256, 4, True, 2),
    "tma_64x8_wg3": (64, 8, True, 3), "tma_128x5_wg3": (128, 5, True, 3),
    "tma_64x7_wg4": (64, 7, True, 4),
    "tma_16x12": (16, 12, True, 2), "tma_32x10": (32, 10, True, 2),
    "tma_16x7_wg4": (16, 7, True, 4), "tma_32x6_wg4": (32, 6, True, 4),
}

IMPLS = {
    "qqq_channel": setup_qqq(-1),
    # g128 as qqq-quantize writes it: integer group scales (the integer decode; at M <= 16 the
    # narrow kernel's group sums). qqq_g128_fp16: fp16 group scales (checkpoints written with
    # --no-int-group-scales or by other tools), the two-level decode. The variants below follow
    # the same naming (qqq_g128_* integer, qqq_g128_fp16_* fp16; results/NOTES.md says which
    # logs predate it, when qqq_g128 named the fp16 scales and qqq_g128_int the integer ones).
    "qqq_g128": setup_qqq("int"),
    "qqq_g128_fp16": setup_qqq(128),
    # The narrow kernel decoding the integer scales into the weights (set_narrow_group_sums(False))
    # instead of applying them to its per-group sums, qqq_g128's default.
    "qqq_g128_no_sums": setup_qqq_switched(lambda c: c.set_narrow_group_sums(False),
                                           lambda c: c.set_narrow_group_sums(True), "int"),
    "qqq_gemm_only": setup_qqq_gemm_only,
    "qqq_channel_mma": setup_qqq_mma,
    "qqq_channel_nopdl": setup_qqq_nopdl,
    "qqq_channel_quant_plain": setup_qqq_quant_plain,
    "qqq_channel_divide_all": setup_quant_product(0),
    "qqq_quant_only": setup_quant_only,
    "qqq_quant_only_divide_all": setup_quant_product(0, base=setup_quant_only),
    "qqq_quant_only_product": setup_quant_product(1, base=setup_quant_only),
    # The small-M kernel's K splits capped at N instead of the rule's 4 above 8 rows (without a
    # cap: 5 on qkv, 8 on o and down; splits8 is that uncapped rule on the Llama shapes).
    **{f"qqq_channel_splits{s}": setup_qqq_split_cap(s) for s in (1, 2, 3, 4, 6, 8)},
    **{f"qqq_{name}_narrow": setup_qqq_small_m(1, group) for name, group in GROUP_MODES},
    **{f"qqq_{name}_splitk": setup_qqq_small_m(0, group) for name, group in GROUP_MODES},
    **{f"qqq_{name}_narrow16": setup_qqq_narrow16(group) for name, group in GROUP_MODES},
    # The narrow kernel's ring forced to 2 stages (3 CTAs per SM), 3 (2 per SM), 4 or 6 (1 per SM).
    **{f"qqq_{name}_narrow_s{st}": setup_qqq_switched(
        lambda c, st=st: c.set_narrow_stages(st), lambda c: c.set_narrow_stages(0), group)
       for st in (2, 3, 4, 6) for name, group in GROUP_MODES},
    # The narrow kernel with 16 channels per CTA (twice the CTAs of the default 32), at M <= 16.
    **{f"qqq_{name}_narrow_c16": setup_qqq_switched(
        lambda c: (c.set_narrow(1), c.set_narrow_channels(16)),
        lambda c: (c.set_narrow(-1), c.set_narrow_channels(0)), group)
       for name, group in GROUP_MODES},
    # Each Hopper tile forced (WGMMA_TILES), the automatic choice's candidates side by side:
    # qqq_tile_tma_64x8, qqq_g128_tile_tma_64x8, qqq_g128_fp16_tile_tma_64x8, ...
    **{f"qqq_{'' if group == -1 else name + '_'}tile_{tile}":
       setup_qqq_tile(bm, st, producer, group, wg)
       for tile, (bm, st, producer, wg) in WGMMA_TILES.items() for name, group in GROUP_MODES},
    "fp16": setup_fp16,
    "w8a8_cutlass": setup_w8a8,
    "marlin_w4a16_g128": setup_marlin(128, False),
    "machete_w4a16_g128": setup_machete,
    "marlin_w4a8_channel": setup_marlin(-1, True),
    "marlin_w4a8_g128": setup_marlin(128, True),
    "cutlass_w4a8_fp8": setup_cutlass_w4a8_fp8,
}


def replay_us(graph, calls, replays=15):
    """Median microseconds per call of a CUDA graph of `calls` back-to-back calls."""
    # Warm up for ~30 ms of replays first: with a few short replays only, the first
    # implementation timed after a pause measured up to 15-30% slower than the same kernel
    # forced under another name (seventh session; the cause, clocks or caches, not measured).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    for _ in range(max(2, math.ceil(30 / max(start.elapsed_time(end), 1e-3)))):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def time_impl(setup, k, n, ms, hot=False):
    """{m: microseconds per call} for one implementation and shape; hot: one weight set called
    back to back (L2-resident where it fits) instead of sets rotating past L2."""
    first, nbytes = setup(k, n)
    sets = 1 if hot else max(3, math.ceil(ROTATE_BYTES / max(nbytes, 1)))
    fns = [first] + [setup(k, n)[0] for _ in range(sets - 1)]
    result = {}
    for m in ms:
        xs = [torch.randn(m, k, device=DEV, dtype=torch.float16) for _ in fns]
        for f, x in zip(fns, xs):
            f(x)  # warm up, JIT and workspace setup outside the graph
        torch.cuda.synchronize()
        calls = max(len(fns), 2 * len(fns) if m <= 256 else len(fns), 16 if hot else 0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)](xs[i % len(fns)])
        result[m] = replay_us(graph, calls)
        del graph
    del fns
    torch.cuda.empty_cache()
    return result


def bytes_floor_us(k, n, m, bandwidth):
    """4-bit weights + fp16 activations in + fp16 out, each moved once."""
    return (k * n / 2 + 2 * m * k + 2 * m * n) / bandwidth * 1e6


def measure_bandwidth():
    x = torch.empty(2 * 2**30 // 4, device=DEV)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    end.synchronize()
    bw = 2 * x.numel() * 4 * 10 / (start.elapsed_time(end) / 1000)
    del x, y
    return bw


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each shape's implementations this many times, taking turns "
                             "(A B A B ...), and report the median: an A/B less exposed to "
                             "drifting clocks")
    parser.add_argument("--hot", action="store_true",
                        help="one weight set, called back to back: L2-resident where it fits "
                             "(how fast the kernels run without DRAM)")
    args = parser.parse_args()
    unknown = [impl for impl in args.impls.split(",") if impl not in IMPLS]
    if unknown:  # before any GPU time is spent
        parser.error(f"unknown --impls {', '.join(unknown)}; known: {', '.join(IMPLS)}")
    for shape in args.shapes.split(","):
        shape_kn(shape)
    ms = [int(m) for m in args.ms.split(",")]
    device = torch.cuda.get_device_name()
    bw = measure_bandwidth()
    print(f"device: {device}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows, errors = [], {}
    for shape in args.shapes.split(","):
        k, n = shape_kn(shape)
        runs = {}
        for _ in range(args.repeat):
            for impl in args.impls.split(","):
                if f"{shape}/{impl}" in errors:
                    continue
                try:
                    timed = time_impl(IMPLS[impl], k, n, ms, args.hot)
                except Exception as e:  # a baseline that cannot run here is reported, not fatal
                    errors[f"{shape}/{impl}"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"  {shape} {impl}: FAILED {errors[f'{shape}/{impl}']}", flush=True)
                    continue
                runs.setdefault(impl, []).append(timed)
        for impl, timed in runs.items():
            times = {m: statistics.median(t[m] for t in timed) for m in ms}
            for m, us in times.items():
                rows.append({"shape": shape, "K": k, "N": n, "M": m, "impl": impl, "us": us})
            print(f"  {shape} {impl}: " + " ".join(f"{m}:{us:.1f}" for m, us in times.items()),
                  flush=True)
    # Table: per shape and M, each impl's time, its ratio to fp16 and to the best baseline.
    print("\n| shape | M | floor us | " + " | ".join(args.impls.split(",")) + " | qqq_ch/fp16 | "
          "qqq_ch/best base | qqq_g128/best base | qqq_g128/qqq_ch |")
    for shape in args.shapes.split(","):
        k, n = shape_kn(shape)
        for m in ms:
            t = {r["impl"]: r["us"] for r in rows if r["shape"] == shape and r["M"] == m}
            base = [v for i, v in t.items() if not i.startswith("qqq")]
            best = min(base) if base else float("nan")
            cells = [f"{t[i]:.1f}" if i in t else "n/a" for i in args.impls.split(",")]
            r_fp16 = f"{t['fp16'] / t['qqq_channel']:.2f}x" if {"fp16", "qqq_channel"} <= t.keys() else "n/a"
            r_ch = f"{best / t['qqq_channel']:.2f}x" if "qqq_channel" in t and base else "n/a"
            r_g = f"{best / t['qqq_g128']:.2f}x" if "qqq_g128" in t and base else "n/a"
            r_gch = (f"{t['qqq_g128'] / t['qqq_channel']:.2f}"
                     if {"qqq_g128", "qqq_channel"} <= t.keys() else "n/a")
            print(f"| {shape} | {m} | {bytes_floor_us(k, n, m, bw):.1f} | " + " | ".join(cells)
                  + f" | {r_fp16} | {r_ch} | {r_g} | {r_gch} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "copy_bandwidth_Bps": bw,
                                         "rows": rows, "errors": errors}, indent=1))


if __name__ == "__main__":
    main()
