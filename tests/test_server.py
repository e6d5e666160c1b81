"""`vllm serve` with the plugin, as a user starts it: the OpenAI API answers on a QQQ model."""

import asyncio
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from load_test import run_load  # noqa: E402
from serve_load import engine_quantization, serving  # noqa: E402

pytestmark = pytest.mark.vllm
STARTUP_TIMEOUT = 300


@pytest.fixture(scope="module")
def server(qqq_checkpoints, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--quantization", "qqq", "--served-model-name", "tiny-qqq", "--max-model-len", "256",
            "--max-num-batched-tokens", "256", "--max-num-seqs", "8"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with serving(qqq_checkpoints[128], args, log_path, env, STARTUP_TIMEOUT) as url:
        assert engine_quantization(log_path.read_text()) == "qqq"
        yield url


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
    result = asyncio.run(run_load(server, "tiny-qqq", concurrency=16, duration=15, max_tokens=16))
    assert result["failed"] == 0, result["failures"]
    assert result["requests"] >= 16 and result["healthy_after"]
