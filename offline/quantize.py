"""qqq-quantize: turn a Hugging Face FP16/BF16 causal LM into a QQQ checkpoint.

    qqq-quantize MODEL_DIR OUT_DIR [--group-size -1|128] [--calib TEXT] [--[no-]rotate]
                 [--rotation orthogonal|hadamard] [--[no-]smooth] [--no-gptq]

With calibration text (a file or a directory of *.txt) the pipeline is the better one of our
accuracy study (benchmarks/results/NOTES.md) for the group size, one layer at a time:
per-channel, a Hadamard rotation of the residual stream (offline/rotate.py), adaptive smoothing
(offline/smooth.py), then GPTQ onto the QQQ grid (offline/gptq.py); g128, rotation then GPTQ, what
the QQQ authors' code defaults to (--smooth alone picks smoothing then GPTQ). --no-rotate and
--no-smooth drop a step; --rotate-heads also rotates each attention head's values. Without
calibration text, or with --no-gptq and no smoothing, weights are rounded to the nearest grid
point (RTN).
"""

import argparse
import logging
import resource
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from offline.calibration import CalibrationError, calibration_samples, load_tokenizer, read_text
from offline.checkpoint import (LINEAR_NAMES, CheckpointError, check_out_dir, check_source_dtype,
                                qqq_tensors, read_config, write_checkpoint)
from offline.grid import rtn
from offline.pipeline import quantize_layers, quantize_lm_head
from offline.rotate import ROTATIONS, rotate_ends, rotate_layer, rotations, untie_lm_head
from vllm_qqq.format import FormatError, check_shape, pack

log = logging.getLogger("qqq-quantize")


def _check_linears(model, group_size: int, lm_head: bool) -> None:
    linears = [(f"model.layers.{i}.{name}", layer.get_submodule(name))
               for i, layer in enumerate(model.model.layers) for name in LINEAR_NAMES]
    for prefix, lin in linears + ([("lm_head", model.lm_head)] if lm_head else []):
        try:
            check_shape(lin.in_features, lin.out_features, group_size)
        except FormatError as e:
            raise CheckpointError(f"{prefix} ({lin.in_features} -> {lin.out_features}): "
                                  f"{e}") from None


def default_pipeline(group_size: int, calibrated: bool, rotate: bool | None = None,
                     smooth: bool | None = None,
                     rotation: str | None = None) -> tuple[bool, bool, str]:
    """(rotate, smooth, rotation kind) where the flags (None: not given) leave them open: with
    calibration text, the better pipeline of our accuracy study for the group size
    (benchmarks/results/NOTES.md, "Accuracy"; 16k held-out tokens, perplexity over FP16's).
    Per-channel: a Hadamard rotation and smoothing (+10.3%; with a random orthogonal rotation
    +11.8%, smoothing alone +31.4%, rotation alone +46.9%). g128: a random orthogonal rotation
    without smoothing (at 32 x 512 calibration tokens +5.7% against +6.1% with smoothing, which
    gained nothing from more calibration; the Hadamard rotation measured worse at g128);
    --smooth alone picks smoothing without it."""
    if rotate is None:
        rotate = calibrated and (group_size == -1 or not smooth)
    if smooth is None:
        smooth = group_size == -1 or not rotate
    if rotation is None:
        rotation = "hadamard" if group_size == -1 else "orthogonal"
    return rotate, smooth, rotation


def quantize_model(model_dir: Path, out_dir: Path, group_size: int = -1,
                   calib: Path | None = None, smooth: bool | None = None, gptq: bool = True,
                   nsamples: int = 128, seqlen: int = 2048, device: str = "cpu",
                   seed: int = 0, rotate: bool | None = None, rotate_heads: bool = False,
                   clip: bool = False, rotation: str | None = None,
                   lm_head: bool = False, int_group_scales: bool | None = None) -> Path:
    """Quantize the model in model_dir to a QQQ checkpoint in out_dir. smooth, rotate and
    rotation left as None take default_pipeline's choice for the group size, as qqq-quantize
    does. lm_head: quantize the lm_head too (untied from the embedding). int_group_scales:
    integer group scales (g128 only; offline/grid.py); None: on with group size 128."""
    from transformers import AutoModelForCausalLM

    rotate, smooth, rotation = default_pipeline(group_size, calib is not None, rotate, smooth,
                                                rotation)
    if int_group_scales and group_size == -1:
        raise FormatError("integer group scales need --group-size 128")
    if int_group_scales is None:
        int_group_scales = group_size != -1
    config = read_config(model_dir)
    check_out_dir(out_dir)
    calibrated = calib is not None and (smooth or gptq)
    if (smooth or gptq) and calib is None:
        log.warning("no calibration text (--calib): rounding to nearest, without smoothing or "
                    "GPTQ; expect lower accuracy")
    samples = None
    if calibrated:
        tokenizer = load_tokenizer(model_dir)
        samples = calibration_samples(tokenizer, read_text(calib), nsamples, seqlen, seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    src_dtype = check_source_dtype(model)
    _check_linears(model, group_size, lm_head)
    if lm_head:
        untie_lm_head(model)
    start = time.time()
    # The model stays in src_dtype: each decoder layer is rotated and quantized in fp32 in turn
    # (host memory ~2 bytes a parameter, not 4 + 2).
    prepare = None
    if rotate:
        q, r = rotations(model.config, seed, heads=rotate_heads, kind=rotation)
        rotate_ends(model, q)
        prepare = partial(rotate_layer, q=q, r=r)
    if rotate or lm_head:  # both untie the lm_head (rotate_ends, untie_lm_head)
        config = dict(config, tie_word_embeddings=False)
    if calibrated:
        method = "+".join(m for m, on in (("rotate", rotate), ("smooth", smooth), ("gptq", gptq))
                          if on)
        log.info("QQQ %s, group %d, %d x %d calibration tokens on %s", method, group_size,
                 nsamples, seqlen, device)
        weights = quantize_layers(model, samples, group_size, smooth, gptq, device, clip, prepare,
                                  lm_head, int_scales=int_group_scales)
    else:
        weights = {}
        # Rounding to nearest, one layer at a time on `device` (the CPU took ~70 s for a
        # Llama-3-8B-sized model on the GPU machine's 16 cores).
        for i, layer in enumerate(tqdm(model.model.layers, desc="QQQ layers (RTN)", unit="layer")):
            layer.to(device)
            if prepare is not None:
                layer.float()
                prepare(layer)
            for name in LINEAR_NAMES:
                weights[f"model.layers.{i}.{name}"] = pack(rtn(
                    layer.get_submodule(name).weight.data, group_size, clip, int_group_scales))
            layer.to("cpu", src_dtype)
        if lm_head:
            weights["lm_head"] = quantize_lm_head(model, [], group_size, False, device, clip,
                                                  int_scales=int_group_scales)
    state = {k: v.detach().to(src_dtype) for k, v in model.state_dict().items()}
    for prefix, packed in weights.items():
        del state[f"{prefix}.weight"]
        bias = state.pop(f"{prefix}.bias", None)
        state.update(qqq_tensors(prefix, packed, bias))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out = write_checkpoint(out_dir, state, config, group_size, model_dir,
                           extra={"smooth": bool(calibrated and smooth),
                                  "gptq": bool(calibrated and gptq), "rotate": rotate,
                                  "rotation": rotation if rotate else None,
                                  "rotate_heads": bool(rotate and rotate_heads),
                                  "calibration": f"{nsamples} x {seqlen}" if calibrated else None,
                                  **({"lm_head": True} if lm_head else {}),
                                  **({"int_group_scales": True} if int_group_scales else {})})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.info("quantized %d linears in %.1f s, peak host memory %.1f GiB -> %s", len(weights),
             time.time() - start, peak, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qqq-quantize", description=__doc__.split("\n")[1])
    parser.add_argument("model_dir", type=Path, help="Hugging Face model directory (FP16/BF16)")
    parser.add_argument("out_dir", type=Path, help="where to write the QQQ checkpoint (new)")
    parser.add_argument("--group-size", type=int, default=-1, choices=(-1, 128),
                        help="-1: per-channel int4; 128: two-level per-group (default -1)")
    parser.add_argument("--calib", type=Path,
                        help="calibration text: a file or a directory of *.txt (local only)")
    parser.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                        help="rotate the residual stream (weights only; default: on with --calib, "
                             "with --group-size 128 unless --smooth is given)")
    parser.add_argument("--rotation", choices=ROTATIONS,
                        help="the residual stream's rotation: a random orthogonal matrix or a "
                             "Hadamard matrix with random signs (default: hadamard per-channel, "
                             "orthogonal with --group-size 128)")
    parser.add_argument("--rotate-heads", action="store_true",
                        help="with rotation, also rotate each attention head's values (V/O)")
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                        help="adaptive smoothing before quantization (default: on per-channel; "
                             "with --group-size 128 on unless rotating)")
    parser.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True,
                        help="GPTQ error compensation; --no-gptq rounds to nearest (default on)")
    parser.add_argument("--clip", action="store_true",
                        help="search each row's (per-channel) or group's (g128) weight range for "
                             "the least rounding error instead of its absmax (off by default)")
    parser.add_argument("--int-group-scales", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="with --group-size 128, integer group scales (the QQQ paper's "
                             "format), each the floor or ceiling of the fp16 one: the GPU "
                             "kernels decode them with about half the instructions; "
                             "--no-int-group-scales keeps fp16 ones (default on with "
                             "--group-size 128)")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="also quantize the lm_head (GPTQ on the final norm's outputs, no "
                             "smoothing; untied from the embedding): faster decoding, some "
                             "accuracy lost (off by default)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (128)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window (2048)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where layers are calibrated (cpu or cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available here (--device cpu runs "
                     f"on the CPU)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        quantize_model(args.model_dir, args.out_dir, args.group_size, args.calib, args.smooth,
                       args.gptq, args.nsamples, args.seqlen, args.device, args.seed,
                       args.rotate, args.rotate_heads, args.clip, args.rotation,
                       args.quantize_lm_head, args.int_group_scales)
    except (CheckpointError, FormatError, CalibrationError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
