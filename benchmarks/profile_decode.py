"""Which GPU kernels a vLLM decode step spends its time in (run on the GPU machine, in-process:
VLLM_ENABLE_V1_MULTIPROCESSING=0, as the GPU kit's setup.sh sets it).

    python benchmarks/profile_decode.py MODEL_DIR [--quantization qqq] [--batches 1,16] [--json OUT]

For each batch size, on one engine: prefills `batch` prompts of 1024 tokens, then profiles
`--steps` decode steps with torch.profiler (CUDA kernels, including those replayed from CUDA
graphs) and prints the kernels by total time per decode step, beside the step's wall clock
measured without the profiler. Kernel time well below the wall clock means the step waits on the
host (scheduling, input preparation, launches), not on the GPU. Beside each kernel's time, what it
adds to the GPU's timeline (`timeline`): kernels launched early run beside the one before them,
so their summed times count the overlap twice.
"""

import argparse
import json
import random
import time
from pathlib import Path

from bench_e2e import CAPTURE_SIZES  # the same CUDA graphs as the throughput bench


def timeline(kernels):
    """What each kernel adds to the GPU's timeline, from (name, start_us, end_us) records.

    A kernel launched early (programmatic dependent launch) runs beside the one before it, so
    summed durations count that time twice. Here, in start order, each kernel gets `exposed`: the
    part of it that runs after every earlier kernel has ended, and `gap`: the idle time between
    those earlier kernels' end and its start (launch latency). Returns ({name: [exposed, gap]},
    busy, idle): busy is the union of the kernels' intervals, busy + idle their span."""
    per_name, busy, idle = {}, 0.0, 0.0
    latest_end = None
    for name, start, end in sorted(kernels, key=lambda k: (k[1], k[2])):
        if latest_end is None:
            gap, exposed = 0.0, end - start
        else:
            gap = max(0.0, start - latest_end)
            exposed = max(0.0, end - max(start, latest_end))
        entry = per_name.setdefault(name, [0.0, 0.0])
        entry[0] += exposed
        entry[1] += gap
        busy += exposed
        idle += gap
        latest_end = end if latest_end is None else max(latest_end, end)
    return per_name, busy, idle


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
        totals, timelines, host = [], [], {}
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
            timelines.append(timeline(
                (e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA
                and e.time_range.end > e.time_range.start))
        # The prefill (run(1): `batch` x 1024 prompt tokens and one new token) runs outside CUDA
        # graphs beyond 256 tokens, so its host side may cost more than its kernels.
        prefill_us = sum(totals[0].values())
        # Idle time between the prefill's kernels is time the GPU waited on the host.
        print(f"prefill + first token, batch {batch}: {prefill_us:.0f} us of GPU kernels, "
              f"{walls[0] * 1e6:.0f} us wall clock; on the timeline {timelines[0][1]:.0f} us "
              f"busy, {timelines[0][2]:.0f} us idle between kernels", flush=True)
        for name, us in sorted(totals[0].items(), key=lambda kv: -kv[1])[:8]:
            print(f"{us:9.1f} us {100 * us / prefill_us:5.1f}%  {name[:110]}", flush=True)
        print("host ops of the prefill (profiled), by total time: calls, total us, self us")
        for name, (count, total, own) in sorted(host.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"{count:7d} {total:10.0f} {own:10.0f}  {name[:100]}", flush=True)
        decode = {k: (totals[1].get(k, 0.0) - totals[0].get(k, 0.0)) / args.steps
                  for k in totals[1]}
        decode = {k: v for k, v in sorted(decode.items(), key=lambda kv: -kv[1]) if v > 0}
        step_us = sum(decode.values())
        # The same difference on the timeline: per step, the union of the kernels' intervals
        # (busy), the idle time between them, and what each kernel adds (exposed, gap before).
        (names0, busy0, idle0), (names1, busy1, idle1) = timelines
        exposed = {k: [(v[i] - names0.get(k, [0.0, 0.0])[i]) / args.steps for i in (0, 1)]
                   for k, v in names1.items()}
        busy, idle = (busy1 - busy0) / args.steps, (idle1 - idle0) / args.steps
        print(f"decode step, batch {batch}: {step_us:.0f} us of GPU kernels per step, "
              f"{wall_us:.0f} us wall clock per step; on the timeline {busy:.0f} us busy, "
              f"{idle:.0f} us idle between kernels (launch gaps, host turnaround)", flush=True)
        print("      us      %   exposed  gap before  kernel")
        for name, us in list(decode.items())[:20]:
            own, gap = exposed.get(name, [0.0, 0.0])
            print(f"{us:9.1f} us {100 * us / step_us:5.1f}%  {own:8.1f} {gap:10.1f}  {name[:100]}",
                  flush=True)
        report["batches"][batch] = {"wall_us_per_step": wall_us, "kernel_us_per_step": decode,
                                    "timeline_us_per_step": {"busy": busy, "idle": idle,
                                                             "exposed_and_gap": exposed},
                                    "prefill_wall_us": walls[0] * 1e6,
                                    "prefill_kernel_us": totals[0],
                                    "prefill_timeline_us": {"busy": timelines[0][1],
                                                            "idle": timelines[0][2]},
                                    "prefill_host_ops": host}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
