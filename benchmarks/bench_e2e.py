"""End-to-end vLLM throughput on the GPU: the same Llama-3-8B-shaped model (random weights) as
FP16 and as QQQ (per-channel, g128) checkpoints made by our own quantizer, with vLLM's defaults
(torch.compile + CUDA graphs), side by side in one run.

    python benchmarks/bench_e2e.py --workdir /tmp/e2e [--layers 8] [--formats fp16,qqq_channel,qqq_g128]

(a) offline throughput, input 1024 / output 128 tokens, batches 1, 16, 64, 256;
(b) decode latency per token at batch 1 and 16: (time for 128 new tokens - time for 1) / 127.
Each format runs in its own process (a fresh engine, all GPU memory back between them).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 16, 64, 256)


def make_models(workdir: Path, layers: int) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from offline.quantize import quantize_model

    fp16 = workdir / "llama3-8b-shaped-fp16"
    if not (fp16 / "config.json").exists():
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=layers, num_attention_heads=32,
                             num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).half()
        model.save_pretrained(fp16)
        del model
        torch.cuda.empty_cache()
    out = {"fp16": fp16}
    for name, g in (("qqq_channel", -1), ("qqq_g128", 128)):
        path = workdir / f"llama3-8b-shaped-{name}"
        if not path.exists():
            quantize_model(fp16, path, g, calib=None)
        out[name] = path
    return out


def run_format(model: str, quantization: str | None, batches, eager: bool) -> dict:
    """In a child process: throughput and decode latency for one checkpoint."""
    from vllm import LLM, SamplingParams

    llm = LLM(model, quantization=quantization, skip_tokenizer_init=True, max_model_len=2048,
              max_num_seqs=256, gpu_memory_utilization=0.85, attention_backend="TRITON_ATTN",
              seed=0, enforce_eager=eager)
    cc = llm.llm_engine.vllm_config.compilation_config
    print(f"compilation mode {cc.mode}, cudagraph mode {cc.cudagraph_mode}", flush=True)
    import random
    rng = random.Random(0)

    def prompts(n):
        return [{"prompt_token_ids": [rng.randrange(100, 128000) for _ in range(1024)]}
                for _ in range(n)]

    def timed(batch, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=False)
        p = prompts(batch)
        start = time.perf_counter()
        outs = llm.generate(p, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return elapsed

    timed(4, 8)  # warm up
    rows = []
    for batch in batches:
        t = timed(batch, 128)
        row = {"batch": batch, "input_len": 1024, "output_len": 128,
               "tokens_per_s": batch * 128 / t}
        if batch in (1, 16):
            row["decode_ms_per_token"] = (t - timed(batch, 1)) / 127 * 1000
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "weights_gib": _weight_bytes(model) / 2**30}


def _weight_bytes(model_dir):
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/e2e"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--formats", default="fp16,qqq_channel,qqq_g128")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no compile/graphs)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_format(args.child[0], None if args.child[1] == "none" else args.child[1],
                            [int(b) for b in args.batches.split(",")], args.eager)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch
    device = torch.cuda.get_device_name()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = make_models(args.workdir, args.layers)
    report = {"device": device, "model": f"Llama-3-8B-shaped, {args.layers} layers, random "
              "weights, RTN quantization by qqq-quantize", "rows": [], "weights_gib": {}}
    for fmt in args.formats.split(","):
        quant = "qqq" if fmt.startswith("qqq") else "none"
        env = dict(os.environ)
        cmd = [sys.executable, __file__, "--child", str(models[fmt]), quant,
               "--batches", args.batches] + (["--eager"] if args.eager else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        for line in (proc.stdout + proc.stderr).splitlines():
            if "compilation mode" in line or "CUDA graph" in line or "cudagraph" in line.lower():
                print(f"  [{fmt}] {line[-200:]}")
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{fmt}: FAILED\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
            continue
        result = json.loads(lines[-1][7:])
        report["weights_gib"][fmt] = result["weights_gib"]
        for row in result["rows"]:
            report["rows"].append({"format": fmt, **row})
        print(f"{fmt}: " + " ".join(f"b{r['batch']}={r['tokens_per_s']:.0f} tok/s"
                                    for r in result["rows"]), flush=True)
    base = {r["batch"]: r for r in report["rows"] if r["format"] == "fp16"}
    print("\n| format | batch | tokens/s | vs fp16 | decode ms/token |")
    for r in report["rows"]:
        ratio = r["tokens_per_s"] / base[r["batch"]]["tokens_per_s"] if r["batch"] in base else 0
        print(f"| {r['format']} | {r['batch']} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | "
              f"{r.get('decode_ms_per_token', float('nan')):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
