"""qqq-eval: perplexity by the WikiText-2 protocol, of an FP16 model and of a QQQ checkpoint, and
its refusals of bad input."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from offline.calibration import read_text
from offline.evaluate import main


def test_perplexity_of_the_first_windows(tiny_fp16, qqq_checkpoints, calib_text, tmp_path,
                                         capsys):
    out = tmp_path / "ppl.jsonl"
    models = [tiny_fp16, qqq_checkpoints[128]]
    for model in models:
        assert main([str(model), "--text", str(calib_text), "--seqlen", "32", "--max-windows",
                     "3", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # appended, one a run
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    assert printed == rows
    assert [r["model_dir"] for r in rows] == [str(m) for m in models]
    assert all(r["eval_tokens"] == 3 * 32 and r["seqlen"] == 32 for r in rows)

    # FP16: the whole text tokenized once, its first three windows of 32 tokens, and their mean
    # next-token loss as transformers computes it.
    ids = AutoTokenizer.from_pretrained(tiny_fp16)(read_text(calib_text),
                                                   return_tensors="pt").input_ids[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = sum(float(model(w[None], labels=w[None]).loss)
                   for w in ids[:96].reshape(3, 32)) / 3
    assert rows[0]["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    # The QQQ checkpoint runs its fake-quantized model: finite, and not the FP16 model's.
    assert math.isfinite(rows[1]["ppl"])
    assert rows[1]["ppl"] != pytest.approx(rows[0]["ppl"], rel=1e-3)


def test_refusals_name_the_problem(tiny_fp16, tiny_without_tokenizer, qqq_checkpoints, calib_text,
                                   tmp_path, caplog):
    text = ["--text", str(calib_text), "--seqlen", "32"]
    assert main([str(tiny_fp16), "--text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt does not exist" in caplog.text
    assert main([str(tmp_path / "nowhere"), *text]) == 2
    assert "nowhere has no config.json" in caplog.text
    assert main([str(tiny_fp16), "--text", str(calib_text), "--seqlen", "1000000"]) == 2
    assert "fewer than 1000000" in caplog.text
    for bad in (["--seqlen", "1"], ["--max-windows", "0"]):
        assert main([str(tiny_fp16), *text, *bad]) == 2
    assert caplog.text.count("evaluation needs windows of at least 2 tokens") == 2
    assert main([str(tiny_fp16), *text, "--json", str(tmp_path)]) == 2  # a directory
    assert "cannot append to --json" in caplog.text
    assert main([str(tiny_without_tokenizer), *text]) == 2
    assert "bare has no tokenizer that loads" in caplog.text

    def corrupt(name, change):
        bad = tmp_path / name
        shutil.copytree(qqq_checkpoints[-1], bad)
        tensors = load_file(bad / "model.safetensors")
        change(tensors)
        save_file(tensors, bad / "model.safetensors")
        return str(bad)

    missing = "model.layers.1.mlp.down_proj.s_channel"
    assert main([corrupt("missing", lambda t: t.pop(missing)), *text]) == 2
    assert f"has no tensor {missing}" in caplog.text
    b = "model.layers.0.self_attn.q_proj.B"
    assert main([corrupt("cut", lambda t: t.update({b: t[b][:, :-1].contiguous()})), *text]) == 2
    assert "B must be int32 [K/16, N*2]" in caplog.text
