"""qqq-quantize: turn a Hugging Face FP16/BF16 causal LM into a QQQ checkpoint.

    qqq-quantize MODEL_DIR OUT_DIR [--group-size -1|128] [--method rtn]

Methods: `rtn` rounds each weight to the nearest point of the QQQ grid (offline/grid.py). The
calibrated pipeline (smoothing + GPTQ) plugs in here as further methods.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from offline.checkpoint import (LINEAR_NAMES, CheckpointError, check_source_dtype, qqq_tensors,
                                read_config, write_checkpoint)
from offline.grid import rtn
from vllm_qqq.format import FormatError

log = logging.getLogger("qqq-quantize")
METHODS = ("rtn",)


def quantize_model(model_dir: Path, out_dir: Path, group_size: int = -1,
                   method: str = "rtn") -> Path:
    from transformers import AutoModelForCausalLM

    if method not in METHODS:
        raise CheckpointError(f"unknown method {method!r}; choose from {METHODS}")
    config = read_config(model_dir)
    if Path(out_dir).exists():
        raise CheckpointError(f"{out_dir} already exists; refusing to overwrite it")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    check_source_dtype(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    layers = model.model.layers
    start = time.time()
    for i, layer in enumerate(tqdm(layers, desc=f"quantize ({method}, group {group_size})",
                                   unit="layer")):
        for name in LINEAR_NAMES:
            linear = layer.get_submodule(name)
            prefix = f"model.layers.{i}.{name}"
            try:
                qweight = rtn(linear.weight.data, group_size)
            except FormatError as e:
                raise CheckpointError(f"{prefix} ({linear.in_features} -> {linear.out_features}): "
                                      f"{e}") from None
            del state[f"{prefix}.weight"]
            state.pop(f"{prefix}.bias", None)
            state.update(qqq_tensors(prefix, qweight, linear.bias))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out = write_checkpoint(out_dir, state, config, group_size, model_dir)
    log.info("quantized %d layers x %d linears in %.1f s -> %s", len(layers), len(LINEAR_NAMES),
             time.time() - start, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qqq-quantize", description=__doc__.split("\n")[1])
    parser.add_argument("model_dir", type=Path, help="Hugging Face model directory (FP16/BF16)")
    parser.add_argument("out_dir", type=Path, help="where to write the QQQ checkpoint (new)")
    parser.add_argument("--group-size", type=int, default=-1, choices=(-1, 128),
                        help="-1: per-channel int4; 128: two-level per-group (default -1)")
    parser.add_argument("--method", default="rtn", choices=METHODS,
                        help="weight quantization method (default rtn)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        quantize_model(args.model_dir, args.out_dir, args.group_size, args.method)
    except (CheckpointError, FormatError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
