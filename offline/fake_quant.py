"""A QQQ checkpoint run in plain transformers: each quantized linear computes the reference W4A8
linear (vllm_qqq.reference) with the checkpoint's own tensors. The oracle for vLLM's outputs and
the model that perplexity evaluation runs."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from offline.checkpoint import LINEAR_NAMES, CheckpointError
from vllm_qqq.format import unpack
from vllm_qqq.reference import quantize_per_token, w4a8_linear


class W4A8Linear(torch.nn.Module):
    """exact=True: the reference (int32-exact accumulation). exact=False: the same quantized
    values multiplied in fp32 (dequantized activations x dequantized weights), for speed in
    perplexity runs; it differs only by fp32 rounding. quant_acts=False (with exact=False) leaves
    the activations unquantized: the weight-only (W4A16) reference of the accuracy study.
    k_shards > 1 (exact only): the layer as vLLM runs a row-parallel linear over that many
    tensor-parallel ranks: each rank quantizes its slice of K per token with its own scale, and
    the ranks' outputs are summed; the bias is added once."""

    def __init__(self, w_int8: torch.Tensor, channel: torch.Tensor, bias: torch.Tensor | None,
                 exact: bool = True, k_shards: int = 1):
        super().__init__()
        if k_shards > 1 and (not exact or w_int8.shape[0] % k_shards):
            raise ValueError(f"cannot split K = {w_int8.shape[0]} into {k_shards} exact shards")
        self.exact = exact
        self.k_shards = k_shards
        self.quant_acts = True
        self.register_buffer("w_int8", w_int8)
        self.register_buffer("channel", channel)
        self.register_buffer("bias", bias)
        if not exact:
            self.register_buffer("w_dq", w_int8.float() * channel[None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact and self.k_shards > 1:
            xs = x.chunk(self.k_shards, dim=-1)
            ws = self.w_int8.chunk(self.k_shards, dim=0)
            y = sum(w4a8_linear(xi, wi, self.channel, None, x.dtype) for xi, wi in zip(xs, ws))
            return y if self.bias is None else y + self.bias
        if self.exact:
            return w4a8_linear(x, self.w_int8, self.channel, self.bias, x.dtype)
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.quant_acts:
            q, s = quantize_per_token(x2)
            x2 = q.float() * s
        y = x2 @ self.w_dq
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def _tensors(qqq_dir: Path):
    files = sorted(Path(qqq_dir).glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


# The linears vLLM splits along K under tensor parallelism (RowParallelLinear).
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def load_fake_quant_model(qqq_dir: Path, dtype: torch.dtype = torch.float32, exact: bool = True,
                          tensor_parallel: int = 1):
    """transformers model for a QQQ checkpoint directory, its linears replaced by W4A8Linear;
    tensor_parallel > 1: the row-parallel linears as that many vLLM ranks compute them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qqq_dir = Path(qqq_dir)
    quant = json.loads((qqq_dir / "config.json").read_text())["quantization_config"]
    group_size = quant["group_size"]
    config = AutoConfig.from_pretrained(qqq_dir)
    del config.quantization_config
    if quant.get("lm_head") and config.tie_word_embeddings:
        raise CheckpointError(f"QQQ checkpoint {qqq_dir} quantizes the lm_head but ties it to the "
                              f"embedding (tie_word_embeddings)")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _tensors(qqq_dir)

    def quantized(prefix: str, k_shards: int = 1) -> W4A8Linear:
        names = [f"{prefix}.{t}" for t in ("B", "s_channel", "s_group")]
        for n in names:
            if n not in tensors:
                raise CheckpointError(f"QQQ checkpoint {qqq_dir} has no tensor {n}")
        w = unpack(*(tensors.pop(n) for n in names), group_size)
        bias = tensors.pop(f"{prefix}.bias", None)
        return W4A8Linear(w.int8_weight(), w.channel, None if bias is None else bias.to(dtype),
                          exact, k_shards)

    for i, layer in enumerate(model.model.layers):
        for name in LINEAR_NAMES:
            parent, child = name.split(".")
            setattr(layer.get_submodule(parent), child,
                    quantized(f"model.layers.{i}.{name}",
                              tensor_parallel if name in ROW_PARALLEL else 1))
    if quant.get("lm_head"):
        # Column-parallel under tensor parallelism: every rank sees all of K, as here.
        model.lm_head = quantized("lm_head")
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()},
                                                strict=False)
    missing = [k for k in missing if not k.endswith(("w_int8", "channel", "bias", "w_dq"))
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {qqq_dir} does not fit the model: missing {missing}, "
                              f"unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
