"""`vllm serve` as a user starts it, under the bounded load of load_test.py: start the server on
loopback, wait until /health answers, run the load, check it is still healthy, stop it. Reports
which quantization the engine says it runs (so a run without --quantization shows auto-detection).

    python benchmarks/serve_load.py MODEL [--quantization qqq] [--concurrency 64] [--duration 60]
        [--json OUT] [--log SERVER_LOG] [--serve-args "--max-model-len 2048 ..."]
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import run_load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """The `vllm` console script users run, or its module where no script is installed."""
    script = Path(sys.executable).parent / "vllm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


@contextlib.contextmanager
def serving(model, args, log_path: Path, env=None, startup_timeout=600):
    """Yields the server's /v1 base URL once /health answers; stops the server afterwards.
    Raises with the log's tail if it exits or is not healthy within startup_timeout seconds."""
    port = free_port()
    cmd = serve_command() + ["serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                             *args]
    env = dict(env or os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine in a process
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.time() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n"
                                   f"{log_path.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vllm serve not healthy after {startup_timeout} s:\n"
                                   f"{log_path.read_text()[-5000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def engine_quantization(log_text: str) -> str | None:
    """The quantization in vLLM's engine config line ('... quantization=qqq, ...')."""
    found = re.findall(r"quantization=(\w+)", log_text)
    return found[-1] if found else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--quantization", help="passed to vllm serve; leave out to auto-detect")
    parser.add_argument("--expect-quantization", default="qqq",
                        help="fail unless the engine reports this quantization")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--serve-args", default="", help="more vllm serve arguments, one string")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log", type=Path, help="server log (default: a temporary file)")
    args = parser.parse_args()

    log_path = args.log or Path(tempfile.mkdtemp()) / "server.log"
    serve_args = ["--served-model-name", "m"] + shlex.split(args.serve_args) + (
        ["--quantization", args.quantization] if args.quantization else [])
    started = time.time()
    with serving(args.model, serve_args, log_path) as url:
        ready_s = time.time() - started
        result = asyncio.run(run_load(url, "m", args.concurrency, args.duration, args.max_tokens))
    result.update({"model": str(args.model), "serve_args": serve_args,
                   "server_ready_s": round(ready_s, 1),
                   "engine_quantization": engine_quantization(log_path.read_text())})
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ok = (result["failed"] == 0 and result["healthy_after"]
          and result["engine_quantization"] == args.expect_quantization)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
