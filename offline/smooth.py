"""Adaptive smoothing: per-channel scales that move activation outliers into the weights, chosen
to minimise the W4A8 output error on calibration activations, folded into the preceding layer
(zero runtime cost).

For a producer P (an RMSNorm, or a linear whose output feeds the consumers linearly) and its
consumer linears C, a scale s > 0 per channel j gives X' = X / s and W' = W * s, leaving X W^T
unchanged in exact arithmetic. Candidates are SmoothQuant's s = max|X_j|^a / max|W_j|^(1-a) for a
grid of a, plus s = 1 (no smoothing); the candidate with the least error of the quantized
consumers, sum over C of ||Q8(X') Q4(W')^T - X W^T||^2 (per-token int8 activations, the QQQ weight
grid), wins, so smoothing never raises the calibration error.
"""

import torch

from offline.grid import Grid

ALPHAS = tuple(i / 10 for i in range(1, 10))


def _fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / scale).clamp(-128, 127) * scale


def _quantized_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor,
                     group_size: int, ref: list[torch.Tensor]) -> float:
    xq = _fake_quant_tokens(x / s)
    err = 0.0
    for w, y in zip(weights, ref):
        ws = w * s
        wq = Grid(ws, group_size).quantize(ws)
        err += float(((xq @ wq.t()) - y).pow(2).sum())
    return err


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Best per-channel scale [K] for activations x [T, K] feeding the linears `weights` [N, K]."""
    x = x.float()
    weights = [w.float() for w in weights]
    ref = [x @ w.t() for w in weights]
    a_max = x.abs().amax(dim=0).clamp_min(1e-5)
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(1e-5)
    best_s = torch.ones_like(a_max)
    best = _quantized_error(x, weights, best_s, group_size, ref)
    for alpha in ALPHAS:
        s = (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(1e-4, 1e4)
        s = s / s.max().sqrt() / s.min().sqrt()  # centre the scales around 1 (conditioning only)
        err = _quantized_error(x, weights, s, group_size, ref)
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, consumers: list[torch.nn.Linear], s: torch.Tensor):
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in consumers:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


@torch.no_grad()
def fold_into_linear(producer: torch.nn.Linear, consumer: torch.nn.Linear, s: torch.Tensor):
    """producer's output channel j feeds consumer's input j linearly (up -> down, v -> o)."""
    producer.weight.div_(s[:, None].to(producer.weight.dtype))
    if producer.bias is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    consumer.weight.mul_(s[None, :].to(consumer.weight.dtype))


@torch.no_grad()
def smooth_layer(layer: torch.nn.Module, acts: dict[str, torch.Tensor], group_size: int,
                 heads_match: bool) -> dict[str, float]:
    """Smooth one decoder layer in place from its captured linear inputs (name -> [T, K]).
    Returns the mean |log s| of each pair, for the log."""
    attn, mlp = layer.self_attn, layer.mlp
    done = {}
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    s = search_scales(acts["self_attn.q_proj"], [m.weight for m in qkv], group_size)
    fold_into_norm(layer.input_layernorm, qkv, s)
    done["norm->qkv"] = float(s.log().abs().mean())
    gate_up = [mlp.gate_proj, mlp.up_proj]
    s = search_scales(acts["mlp.gate_proj"], [m.weight for m in gate_up], group_size)
    fold_into_norm(layer.post_attention_layernorm, gate_up, s)
    done["norm->gate_up"] = float(s.log().abs().mean())
    s = search_scales(acts["mlp.down_proj"], [mlp.down_proj.weight], group_size)
    fold_into_linear(mlp.up_proj, mlp.down_proj, s)
    done["up->down"] = float(s.log().abs().mean())
    if heads_match:  # v's output channels are o's input channels only without grouped KV heads
        s = search_scales(acts["self_attn.o_proj"], [attn.o_proj.weight], group_size)
        fold_into_linear(attn.v_proj, attn.o_proj, s)
        done["v->o"] = float(s.log().abs().mean())
    return done
