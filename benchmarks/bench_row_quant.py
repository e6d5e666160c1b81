"""The kernels Inductor makes of the per-token quantization fused into vLLM's norm and SiLU-and-mul
(what a compiled QQQ model runs before each GEMM), timed under Inductor's reduction heuristics
and under the plugin's (vllm_qqq/inductor_choices.py: persistent rows up to 16384 entries).

    python benchmarks/bench_row_quant.py --ms 1,16,64,256,2048,8192

Each pattern is compiled once with the batch dimension dynamic, as vLLM compiles a model, and
timed as CUDA-graph replays of back-to-back calls over rotating inputs (more bytes than L2 where
the batch allows), with Inductor's programmatic launches on as the plugin sets them. Prints us
per call and the ratio, and checks that both settings give the same int8 codes. SiLU-and-mul +
quantization is also timed as our kernel (qqq.silu_mul_quant, what vllm_qqq.fusion puts in the
graph with VLLM_QQQ_FUSED_QUANT), likewise add + RMSNorm + quantization
(qqq.add_rms_norm_quant).
"""

import argparse

import torch
import torch._inductor.config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from bench_gemm import replay_us
from vllm_qqq import ops, reference
from vllm_qqq.inductor_choices import PersistentRows

HIDDEN, INTERMEDIATE, EPS = 4096, 14336, 1e-5


def add_rms_norm_quant(x, residual, weight):
    # vLLM's fused add + RMSNorm (its PyTorch form), then the quantization.
    return reference.add_rms_norm_quant(x, residual, weight, EPS)


PATTERNS = {
    "silu_mul_quant": (reference.silu_mul_quant, lambda m: [(m, 2 * INTERMEDIATE)]),
    "add_rms_norm_quant": (add_rms_norm_quant, lambda m: [(m, HIDDEN), (m, HIDDEN), (HIDDEN,)]),
    "quant": (reference.quantize_per_token, lambda m: [(m, HIDDEN)]),
}


# Our kernels for a pattern, as vllm_qqq.fusion calls them, and their cluster setting.
KERNELS = {
    "silu_mul_quant": (ops.silu_mul_quant, "set_silu_cluster_rows"),
    "add_rms_norm_quant": (lambda x, residual, weight: ops.add_rms_norm_quant(
        x, residual, weight, EPS), "set_norm_cluster_rows"),
}


def inputs(shapes, sets):
    """Sets of fresh random inputs, at least `sets` and up to 64: enough for one round of them
    to be 3x the 50 MB L2 where 64 sets reach it (from ~45 rows for SiLU-mul, ~290 for the
    quantization alone)."""
    per_set = sum(2 * torch.Size(s).numel() for s in shapes)
    n = min(max(sets, -(-3 * 50 * 2**20 // per_set)), 64)
    return [[torch.randn(s, device="cuda", dtype=torch.float16) for s in shapes] for _ in range(n)]


def compiled(fn, choices, example):
    torch._dynamo.reset()
    # As vLLM compiles: one graph for every batch size (no guards, so M = 1 is not specialized),
    # its kernels tuned at the first call's size.
    compiled_fn = torch.compile(fn, fullgraph=True,
                                options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    for t in example:
        if t.dim() == 2:
            torch._dynamo.mark_dynamic(t, 0)
    with V.set_choices_handler(choices()):
        compiled_fn(*example)
    return compiled_fn


def time_us(fn, sets, calls=32):
    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    return replay_us(graph, calls)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,16,64,256,2048,8192")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    args = parser.parse_args()
    inductor_config.force_disable_caches = True  # the two settings must not share compiled code
    inductor_config.triton.enable_pdl = True
    print(f"device: {torch.cuda.get_device_name()}")
    settings = {"inductor": InductorChoices, "persistent": PersistentRows}
    for name in args.patterns.split(","):
        fn, shapes = PATTERNS[name]
        sets = {m: inputs(shapes(m), 3) for m in map(int, args.ms.split(","))}
        example = [t.clone() for t in sets[max(sets)][0]]
        times = {}
        outputs = {}
        for label, choices in settings.items():
            f = compiled(fn, choices, example)
            times[label] = {m: time_us(f, s) for m, s in sets.items()}
            outputs[label] = {m: f(*s[0]) for m, s in sets.items()}
        for m in sets:
            a, b = outputs["inductor"][m], outputs["persistent"][m]
            codes = (a[0].int() - b[0].int()).abs().max().item()
            scales = ((a[1] - b[1]).abs() / a[1].abs().clamp_min(1e-30)).max().item()
            base, new = times["inductor"][m], times["persistent"][m]
            print(f"  {name:20s} M={m:5d}: inductor {base:8.2f} us, persistent {new:8.2f} us, "
                  f"ratio {new / base:5.3f}; max code difference {codes}, scale rel {scales:.1e}")
        if name in KERNELS:  # against the persistent rows (Inductor may keep fp32: one code)
            kernel, setter = KERNELS[name]
            for m, s in sets.items():
                q, scale = kernel(*s[0])[:2]
                b = outputs["persistent"][m]
                codes = (q.int() - b[0].int()).abs().max().item()
                scales = ((scale - b[1]).abs() / b[1].abs().clamp_min(1e-30)).max().item()
                # The kernel's rule (SiLU: clusters of 8 CTAs a row up to 64 rows; the norm: one
                # CTA a row), clusters at every M, one CTA a row at every M.
                us = {}
                for label, rows in (("rule", -1), ("clusters", 1 << 30), ("rows", 0)):
                    getattr(ops._C, setter)(rows)
                    us[label] = time_us(kernel, s)
                getattr(ops._C, setter)(-1)
                print(f"  {name:20s} M={m:5d}: our kernel {us['rule']:8.2f} us (clusters "
                      f"{us['clusters']:.2f}, a CTA a row {us['rows']:.2f}), against persistent "
                      f"{us['rule'] / times['persistent'][m]:5.3f}; max code difference {codes}, "
                      f"scale rel {scales:.1e}")


if __name__ == "__main__":
    main()
