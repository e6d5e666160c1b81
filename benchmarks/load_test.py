"""A bounded load on a running OpenAI-compatible server (loopback only): CONCURRENCY clients, each
sending streaming /v1/completions and /v1/chat/completions requests back to back until DURATION
seconds have passed; then the server's /health must still answer.

    python benchmarks/load_test.py http://127.0.0.1:8000/v1 MODEL [--concurrency 64] [--duration 60]
"""

import argparse
import asyncio
import json
import statistics
import time
import urllib.request

PROMPTS = ["The capital of France is", "the small model reads one token",
           "a quantized layer keeps its weights in four bits and", "red green blue"]


async def _one(client, model, i, max_tokens):
    prompt = PROMPTS[i % len(PROMPTS)]
    start = time.perf_counter()
    first = None
    pieces = 0
    if i % 2:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.7, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces += 1
    else:
        stream = await client.completions.create(model=model, prompt=prompt,
                                                  max_tokens=max_tokens, temperature=0.7,
                                                  stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
                pieces += 1
    if pieces == 0:
        raise RuntimeError("empty stream")
    return time.perf_counter() - start, (first or time.perf_counter()) - start


async def run_load(base_url, model, concurrency=64, duration=60.0, max_tokens=32,
                   request_timeout=120.0):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", timeout=request_timeout,
                         max_retries=0)
    deadline = time.monotonic() + duration
    latencies, ttfts, failures = [], [], []

    async def worker(w):
        i = w
        while time.monotonic() < deadline:
            try:
                lat, ttft = await _one(client, model, i, max_tokens)
                latencies.append(lat)
                ttfts.append(ttft)
            except Exception as e:  # counted, reported; the load goes on
                failures.append(f"{type(e).__name__}: {str(e)[:120]}")
            i += concurrency

    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.monotonic() - start
    await client.close()
    health = base_url.rsplit("/v1", 1)[0] + "/health"
    with urllib.request.urlopen(health, timeout=10) as r:
        healthy = r.status == 200
    q = statistics.quantiles
    return {"concurrency": concurrency, "duration_s": round(elapsed, 1),
            "requests": len(latencies) + len(failures), "failed": len(failures),
            "failures": failures[:10], "healthy_after": healthy,
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_p99_s": q(latencies, n=100)[98] if len(latencies) > 1 else None,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("model")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if not args.base_url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("load tests target loopback servers only")
    result = asyncio.run(run_load(args.base_url, args.model, args.concurrency, args.duration,
                                  args.max_tokens))
    print(json.dumps(result, indent=1))
    raise SystemExit(0 if result["failed"] == 0 and result["healthy_after"] else 1)


if __name__ == "__main__":
    main()
