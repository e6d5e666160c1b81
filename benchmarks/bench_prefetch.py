"""Decode-sized linear layers of a Llama-3-8B-shaped block, with the kernels between them stood
in for by idle gaps: what prefetching the next layer's weights into L2 (csrc/kernels.h,
NextWeights; VLLM_QQQ_PREFETCH_NEXT in vLLM) gains or costs.

    python benchmarks/bench_prefetch.py [--ms 1,16] [--blocks 4] [--gaps "4,9,4,4;0,0,0,0"]

Per block: gap, qkv, gap (attention), o, gap, gate_up, gap, down. A gap is a spin kernel
(torch.cuda._sleep) of the given microseconds: like the norms, quantization and decode attention
it leaves DRAM nearly idle. Every block has its own weights (4-bit: ~109 MB a block, > L2). Each
setting is one CUDA graph of all blocks; the graphs are replayed in turns and each time is the
median, reported per block after subtracting the gaps alone (the same graph without linears).
Settings: off (no prefetch), on (each linear prefetches the next, the last the first block's
qkv), small (only the prefetches of qkv and o, the weights that fit L2 whole).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_gemm import SHAPES  # noqa: E402
from vllm_qqq import ops  # noqa: E402

DEV = "cuda"
ORDER = ("qkv", "o", "gate_up", "down")


def make_blocks(blocks, group):
    from offline.grid import rtn
    layers = []
    for _ in range(blocks):
        for name in ORDER:
            k, n = SHAPES[name]
            t = ops.prepare_weight(rtn(torch.randn(n, k, device=DEV) / k**0.5, group))
            layers.append((name, t, ops.workspace(DEV, n)))
    return layers


def sleep_cycles_per_us():
    """Calibrates torch.cuda._sleep: its cycles per microsecond on this GPU."""
    cycles = 200_000
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles * 10 / (start.elapsed_time(end) * 1000)


def capture(layers, xs, gaps_cycles, setting):
    def step():
        for i, (name, t, ws) in enumerate(layers):
            if gaps_cycles[i % 4]:
                torch.cuda._sleep(gaps_cycles[i % 4])
            if setting == "gaps":
                continue
            nxt_name, nxt, _ = layers[(i + 1) % len(layers)]
            use = setting == "on" or (setting == "small" and nxt_name in ("qkv", "o"))
            ops.w4a8_linear(xs[name], t["qqq_b"], t["qqq_scale"], t["qqq_group"], ws, None,
                            nxt["qqq_b"] if use else None, nxt["qqq_group"] if use else None)
    step()  # warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,16")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--group", type=int, default=-1)
    parser.add_argument("--gaps", default="4,9,4,4;0,0,0,0",
                        help="microseconds before qkv, o, gate_up, down; ';' between gap sets")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    per_us = sleep_cycles_per_us()
    print(f"torch.cuda._sleep: {per_us:.0f} cycles per us")
    layers = make_blocks(args.blocks, args.group)
    settings = ("gaps", "off", "on", "small")
    for m in (int(v) for v in args.ms.split(",")):
        xs = {name: torch.randn(m, SHAPES[name][0], device=DEV, dtype=torch.float16)
              for name in ORDER}
        for gap_set in args.gaps.split(";"):
            gaps_us = [float(v) for v in gap_set.split(",")]
            gaps_cycles = [int(g * per_us) for g in gaps_us]
            graphs = {s: capture(layers, xs, gaps_cycles, s) for s in settings}
            for g in graphs.values():  # ~30 ms of replays to settle clocks
                for _ in range(20):
                    g.replay()
            torch.cuda.synchronize()
            times = {s: [] for s in settings}
            for _ in range(args.rounds):
                for s, g in graphs.items():
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    g.replay()
                    end.record()
                    end.synchronize()
                    times[s].append(start.elapsed_time(end) * 1000 / args.blocks)
            med = {s: statistics.median(v) for s, v in times.items()}
            linears = {s: med[s] - med["gaps"] for s in settings if s != "gaps"}
            print(f"M={m} gaps {gap_set} us (group {args.group}): gaps alone {med['gaps']:.1f} "
                  f"us per block; the four linears per block: " + ", ".join(
                      f"{s} {v:.1f}" for s, v in linears.items())
                  + f"; on/off {linears['on'] / linears['off']:.3f}, small/off "
                  f"{linears['small'] / linears['off']:.3f}", flush=True)
            del graphs


if __name__ == "__main__":
    main()
