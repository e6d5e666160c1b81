"""A few back-to-back calls of one GEMM implementation of bench_gemm.py, for a profiler
(Nsight Compute) to pick a launch of: see `scripts/gpu_run.sh ncu`.

    ncu --kernel-name regex:w4a8 --launch-skip 2 --launch-count 1 \
        python benchmarks/profile_gemm.py --impl qqq_channel --shape gate_up --m 4096
"""

import argparse

import torch

from bench_gemm import IMPLS, SHAPES, shape_kn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", default="qqq_channel", choices=IMPLS)
    parser.add_argument("--shape", default="gate_up", help=f"{', '.join(SHAPES)} or KxN")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    k, n = shape_kn(args.shape)
    f, _ = IMPLS[args.impl](k, n)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    for _ in range(args.calls):
        f(x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
