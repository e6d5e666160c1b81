"""Which GPU kernels a vLLM decode step spends its time in (run on the GPU machine, in-process:
VLLM_ENABLE_V1_MULTIPROCESSING=0, as the GPU kit's setup.sh sets it).

    python benchmarks/profile_decode.py MODEL_DIR [--quantization qqq] [--batches 1,16] [--json OUT]

For each batch size, on one engine: prefills `batch` prompts of 1024 tokens, then profiles
`--steps` decode steps with torch.profiler (CUDA kernels, including those replayed from CUDA
graphs) and prints the kernels by total time per decode step, beside the step's wall clock
measured without the profiler. Kernel time well below the wall clock means the step waits on the
host (scheduling, input preparation, launches), not on the GPU.
"""

import argparse
import json
import random
import time
from pathlib import Path

from bench_e2e import CAPTURE_SIZES  # the same CUDA graphs as the throughput bench


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--quantization")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(str(args.model), quantization=args.quantization, skip_tokenizer_init=True,
              max_model_len=2048, max_num_seqs=256, gpu_memory_utilization=0.85,
              attention_backend="TRITON_ATTN", seed=0,
              compilation_config={"cudagraph_capture_sizes": list(CAPTURE_SIZES)})
    rng = random.Random(0)
    report = {"model": str(args.model), "quantization": args.quantization, "batches": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [{"prompt_token_ids": [rng.randrange(100, 32000) for _ in range(1024)]}
                   for _ in range(batch)]

        def run(tokens):
            params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                    detokenize=False)
            llm.generate(prompts, params, use_tqdm=False)

        run(4)  # warm up
        walls = []
        for tokens in (1, 1 + args.steps):
            start = time.perf_counter()
            run(tokens)
            walls.append(time.perf_counter() - start)
        wall_us = (walls[1] - walls[0]) / args.steps * 1e6
        # Profile prefill + 1 token, then prefill + 1 + steps tokens: the difference is the decode.
        totals = []
        for tokens in (1, 1 + args.steps):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run(tokens)
            kernels = {}
            for e in prof.key_averages():
                if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
                    kernels[e.key] = kernels.get(e.key, 0.0) + e.self_device_time_total
            totals.append(kernels)
        decode = {k: (totals[1].get(k, 0.0) - totals[0].get(k, 0.0)) / args.steps
                  for k in totals[1]}
        decode = {k: v for k, v in sorted(decode.items(), key=lambda kv: -kv[1]) if v > 0}
        step_us = sum(decode.values())
        print(f"decode step, batch {batch}: {step_us:.0f} us of GPU kernels per step, "
              f"{wall_us:.0f} us wall clock per step", flush=True)
        for name, us in list(decode.items())[:20]:
            print(f"{us:9.1f} us {100 * us / step_us:5.1f}%  {name[:110]}", flush=True)
        report["batches"][batch] = {"wall_us_per_step": wall_us, "kernel_us_per_step": decode}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
