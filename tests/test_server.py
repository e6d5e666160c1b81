"""`vllm serve` with the plugin, as a user starts it: the OpenAI API answers on a QQQ model."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
STARTUP_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(qqq_checkpoints, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    vllm_cli = Path(sys.executable).parent / "vllm"  # the console script users run
    cmd = [str(vllm_cli), "serve", str(qqq_checkpoints[128]), "--quantization", "qqq",
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny-qqq",
           "--max-model-len", "256", "--max-num-batched-tokens", "256", "--max-num-seqs", "8"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.time() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n"
                            f"{log_path.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT} s:\n"
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


def client(base_url):
    from openai import OpenAI
    return OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)


def test_completions(server):
    c = client(server)
    r = c.completions.create(model="tiny-qqq", prompt="The capital of France is", max_tokens=8,
                             temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8
    again = c.completions.create(model="tiny-qqq", prompt="The capital of France is",
                                 max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-qqq", prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True))
    assert streamed == r.choices[0].text


def test_chat_completions(server):
    c = client(server)
    messages = [{"role": "user", "content": "the small model reads"}]
    r = c.chat.completions.create(model="tiny-qqq", messages=messages, max_tokens=8,
                                  temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(model="tiny-qqq", messages=messages, max_tokens=8,
                                            temperature=0, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == r.choices[0].message.content


def test_bounded_concurrent_load(server):
    """16 concurrent streaming clients for 15 s (the full 64 x 60 s run is benchmarks/load_test.py):
    no request fails and the server stays healthy."""
    import asyncio
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from load_test import run_load
    result = asyncio.run(run_load(server, "tiny-qqq", concurrency=16, duration=15, max_tokens=16))
    assert result["failed"] == 0, result["failures"]
    assert result["requests"] >= 16 and result["healthy_after"]
