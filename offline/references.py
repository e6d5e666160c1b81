"""Reference methods the accuracy study compares QQQ with (not part of the QQQ product):

- W4A16 GPTQ: a GPTQ checkpoint made by our quantizer (no smoothing), with the activations left
  unquantized, so the row isolates what 4-bit weights cost (on the QQQ g128 grid: int4 codes x
  int8 group scale x fp32 channel scale, a little coarser than GPTQ's usual fp16 group scales).
- W8A8 SmoothQuant: migration strength alpha = 0.5 folded into the input norms of q/k/v and
  gate/up (as the SmoothQuant paper does for Llama-style blocks), int8 per-channel weights by
  round to nearest, int8 per-token dynamic activations (the same quantizer as QQQ's).
"""

from pathlib import Path

import torch

from offline.checkpoint import LINEAR_NAMES
from offline.fake_quant import W4A8Linear, load_fake_quant_model
from offline.smooth import fold_into_norm


def load_weight_only(qqq_dir: Path) -> torch.nn.Module:
    """A QQQ checkpoint evaluated with fp activations (W4A16)."""
    model = load_fake_quant_model(qqq_dir, torch.float32, exact=False)
    for module in model.modules():
        if isinstance(module, W4A8Linear):
            module.quant_acts = False
    return model


class W8A8Linear(W4A8Linear):
    """int8 per-channel weights (round to nearest) x int8 per-token activations: W4A8Linear's
    fast fake-quant path with 8-bit instead of 4-bit weight codes."""

    def __init__(self, linear: torch.nn.Linear):
        w = linear.weight.data.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.data.float()
        super().__init__(codes.t().contiguous(), scale, bias, exact=False)


@torch.no_grad()
def smoothquant_w8a8(model: torch.nn.Module, samples: torch.Tensor, alpha: float = 0.5):
    """Smooth (from per-channel input maxima over `samples` [N, L]) and quantize `model` in place."""
    layers = model.model.layers
    a_max, hooks = {}, []
    for i, layer in enumerate(layers):
        for name in ("self_attn.q_proj", "mlp.gate_proj"):
            def hook(module, args, key=(i, name)):
                m = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
                a_max[key] = torch.maximum(a_max[key], m) if key in a_max else m
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    for sample in samples:
        model(sample[None])
    for h in hooks:
        h.remove()
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for norm, consumers, key in (
                (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj"),
                (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj")):
            w_max = torch.stack([c.weight.abs().amax(dim=0) for c in consumers]).amax(dim=0)
            s = (a_max[(i, key)].clamp_min(1e-5).pow(alpha) /
                 w_max.float().clamp_min(1e-5).pow(1 - alpha)).clamp(1e-4, 1e4)
            fold_into_norm(norm, consumers, s)
        for name in LINEAR_NAMES:
            parent, child = name.split(".")
            setattr(layer.get_submodule(parent), child, W8A8Linear(layer.get_submodule(name)))
    return model
