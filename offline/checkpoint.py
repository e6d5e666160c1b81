"""Reading a Hugging Face causal LM and writing a QQQ checkpoint, all or nothing."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")
# The linear layers of one decoder block that QQQ quantizes (the same names in all of the above).
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")


class CheckpointError(ValueError):
    """A source model the quantizer cannot take."""


def model_config(model_dir: Path) -> dict:
    """config.json of a model directory, plain or QQQ."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    return json.loads(path.read_text())


def read_config(model_dir: Path) -> dict:
    """config.json of a source model the quantizer takes."""
    config = model_config(model_dir)
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise CheckpointError(f"architecture {archs} is not supported; QQQ quantizes "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if "quantization_config" in config:
        raise CheckpointError(f"{model_dir} is already quantized "
                              f"({config['quantization_config'].get('quant_method')})")
    return config


def check_source_dtype(model: torch.nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters()}
    if not dtypes <= {torch.float16, torch.bfloat16}:
        raise CheckpointError(f"the source model must be FP16 or BF16, it holds "
                              f"{sorted(str(d) for d in dtypes)}")
    return dtypes.pop() if len(dtypes) == 1 else torch.float16


def qqq_tensors(prefix: str, packed: dict[str, torch.Tensor], bias: torch.Tensor | None) -> dict:
    """One layer's checkpoint tensors from its packed weight (vllm_qqq.format.pack) and bias."""
    tensors = {f"{prefix}.{k}": v for k, v in packed.items()}
    if bias is not None:
        tensors[f"{prefix}.bias"] = bias.detach().contiguous()
    return tensors


def check_out_dir(out_dir: Path) -> None:
    """Refuse an existing out_dir, or one that cannot be written (found before quantizing, not
    after): its parent directories are made and a temporary directory tried in them."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; refusing to overwrite it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=out_dir.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write {out_dir}: {e}") from None


def write_checkpoint(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict,
                     group_size: int, source_dir: Path, extra: dict | None = None) -> Path:
    """Write safetensors shards, config.json (with quantization_config) and the tokenizer files
    into a temporary sibling directory, then rename it into place: an interrupted run leaves no
    directory at out_dir that looks like a finished checkpoint."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[name] = t.contiguous()
            size += nbytes
        shards.append(current)
        index = {}
        for i, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1
                     else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            index.update({name: fname for name in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
        config = dict(config)
        config["quantization_config"] = {"quant_method": "qqq", "wbits": 4,
                                         "group_size": group_size, **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname in TOKENIZER_FILES:
            if (Path(source_dir) / fname).is_file():
                shutil.copy2(Path(source_dir) / fname, tmp / fname)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
