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
        def run(tokens):
            # New prompts each time: a repeated one would be served from vLLM's prefix cache.
            prompts = [{"prompt_token_ids": [rng.randrange(100, 32000) for _ in range(1024)]}
                       for _ in range(batch)]
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
        totals, host = [], {}
        for tokens in (1, 1 + args.steps):
            activities = [torch.profiler.ProfilerActivity.CUDA]
            if tokens == 1:  # and where the prefill's host time goes
                activities.append(torch.profiler.ProfilerActivity.CPU)
            with torch.profiler.profile(activities=activities) as prof:
                run(tokens)
            kernels = {}
            for e in prof.key_averages():
                if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
                    kernels[e.key] = kernels.get(e.key, 0.0) + e.self_device_time_total
                elif e.device_type == torch.autograd.DeviceType.CPU and tokens == 1:
                    host[e.key] = (e.count, e.cpu_time_total, e.self_cpu_time_total)
            totals.append(kernels)
        # The prefill (run(1): `batch` x 1024 prompt tokens and one new token) runs outside CUDA
        # graphs beyond 256 tokens, so its host side may cost more than its kernels.
        prefill_us = sum(totals[0].values())
        print(f"prefill + first token, batch {batch}: {prefill_us:.0f} us of GPU kernels, "
              f"{walls[0] * 1e6:.0f} us wall clock", flush=True)
        for name, us in sorted(totals[0].items(), key=lambda kv: -kv[1])[:8]:
            print(f"{us:9.1f} us {100 * us / prefill_us:5.1f}%  {name[:110]}", flush=True)
        print("host ops of the prefill (profiled), by total time: calls, total us, self us")
        for name, (count, total, own) in sorted(host.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"{count:7d} {total:10.0f} {own:10.0f}  {name[:100]}", flush=True)
        decode = {k: (totals[1].get(k, 0.0) - totals[0].get(k, 0.0)) / args.steps
                  for k in totals[1]}
        decode = {k: v for k, v in sorted(decode.items(), key=lambda kv: -kv[1]) if v > 0}
        step_us = sum(decode.values())
        print(f"decode step, batch {batch}: {step_us:.0f} us of GPU kernels per step, "
              f"{wall_us:.0f} us wall clock per step", flush=True)
        for name, us in list(decode.items())[:20]:
            print(f"{us:9.1f} us {100 * us / step_us:5.1f}%  {name[:110]}", flush=True)
        report["batches"][batch] = {"wall_us_per_step": wall_us, "kernel_us_per_step": decode,
                                    "prefill_wall_us": walls[0] * 1e6,
                                    "prefill_kernel_us": totals[0],
                                    "prefill_host_ops": host}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
