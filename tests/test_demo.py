"""The README's main job as a user runs it: `python scripts/demo.py WORKDIR` in a fresh interpreter
makes the bundled tiny Llama, quantizes it (g128, the demo's default) and generates with vLLM
through the plugin. The other vLLM tests drive vLLM through their own job script; this one
guards the command the README names."""

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.vllm
PROMPTS = ["The capital of France is", "the small model reads", "one token after another"]


def test_demo_quantizes_the_tiny_llama_and_generates(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    log = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, log

    # One line per prompt, in order, each with generated text.
    answers = [line.split(" -> ", 1) for line in proc.stdout.splitlines() if " -> " in line]
    assert [prompt for prompt, _ in answers] == [repr(p) for p in PROMPTS], log
    assert all(ast.literal_eval(text) for _, text in answers), log  # each a str's repr

    # The checkpoint it served is a g128 QQQ checkpoint, and the QQQ method ran its layers.
    config = json.loads((tmp_path / "tiny-llama-qqq-g128" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qqq"
    assert config["quantization_config"]["group_size"] == 128
    assert "QQQ (group_size 128) linear layers run" in proc.stdout + proc.stderr, log
