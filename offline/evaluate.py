"""qqq-eval: perplexity of an FP16/BF16 model or a QQQ checkpoint (fake-quantized in PyTorch).

    qqq-eval MODEL_DIR --text FILE [--seqlen 2048] [--max-windows N] [--json OUT]

The WikiText-2 protocol: the whole text tokenized once, cut into non-overlapping windows of
seqlen tokens, perplexity = exp(mean next-token negative log-likelihood over all windows).
"""

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from offline.calibration import CalibrationError, eval_windows, load_tokenizer, read_text
from offline.checkpoint import CheckpointError, model_config
from vllm_qqq.format import FormatError

log = logging.getLogger("qqq-eval")


def load_model(model_dir: Path, dtype=torch.float32):
    """transformers model for a plain or a QQQ checkpoint directory."""
    from transformers import AutoModelForCausalLM

    config = model_config(model_dir)
    if config.get("quantization_config", {}).get("quant_method") == "qqq":
        from offline.fake_quant import load_fake_quant_model
        return load_fake_quant_model(model_dir, dtype, exact=False)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = model(w[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += w.numel() - 1
    return math.exp(nll / count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qqq-eval", description=__doc__.split("\n")[1])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="evaluation text file")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--json", type=Path, help="append a result line (JSON) to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    try:
        model_config(args.model_dir)  # before the tokenizer: say what is wrong first
        windows = eval_windows(load_tokenizer(args.model_dir), read_text(args.text), args.seqlen,
                               args.max_windows)
        model = load_model(args.model_dir)  # the slow part last
    except (CalibrationError, CheckpointError, FormatError) as e:
        log.error("%s", e)
        return 2
    if args.json:  # found unwritable now, not after the evaluation
        try:
            open(args.json, "a").close()
        except OSError as e:
            log.error("cannot append to --json %s: %s", args.json, e)
            return 2
    start = time.time()
    ppl = perplexity(model, windows)
    result = {"model_dir": str(args.model_dir), "ppl": ppl,
              "eval_tokens": int(windows.numel()), "seqlen": args.seqlen,
              "seconds": round(time.time() - start, 1)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
