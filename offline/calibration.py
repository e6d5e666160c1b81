"""Calibration and evaluation text: local files only, tokenized, cut into fixed windows."""

import random
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """Calibration text that cannot give the samples asked for."""


def load_tokenizer(model_dir: Path):
    """The model directory's tokenizer, or a CalibrationError saying it has none usable."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CalibrationError(f"{model_dir} has no tokenizer that loads (tokenizer.json, or "
                               f"the files of a slow tokenizer): {reason}") from None


def read_text(path: Path) -> str:
    """A text file, or every *.txt file of a directory in name order, concatenated."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CalibrationError(f"{path} holds no *.txt files")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        raise CalibrationError(f"calibration text {path} does not exist")
    if not text.strip():
        raise CalibrationError(f"calibration text {path} is empty")
    return text


def calibration_samples(tokenizer, text: str, nsamples: int, seqlen: int,
                        seed: int = 0) -> torch.Tensor:
    """nsamples random windows of seqlen tokens (int64 [nsamples, seqlen]), fixed seed."""
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"calibration needs at least one window of at least one token, "
                               f"got {nsamples} windows of {seqlen}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen + 1:
        raise CalibrationError(f"calibration text has {ids.numel()} tokens; at least "
                               f"{seqlen + 1} are needed for windows of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None
                 ) -> torch.Tensor:
    """The WikiText-2 protocol: the whole text tokenized, non-overlapping windows of seqlen."""
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise CalibrationError(f"evaluation needs windows of at least 2 tokens and at least one "
                               f"window, got seqlen {seqlen}, max_windows {max_windows}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise CalibrationError(f"evaluation text has {ids.numel()} tokens, fewer than {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)
