"""The calibrated QQQ pipeline, one decoder layer at a time (bounded memory): capture the layer's
inputs, smooth, collect each linear's Hessian, GPTQ (or round) onto the QQQ grid, then run the
layer with its quantized weights to produce the next layer's inputs."""

import logging
import time

import torch
from tqdm import tqdm

from offline.checkpoint import LINEAR_NAMES
from offline.gptq import Hessian, gptq
from offline.grid import Grid
from offline.smooth import smooth_layer
from vllm_qqq.format import pack

log = logging.getLogger("qqq-quantize")
SMOOTH_ROWS = 2048  # calibration tokens the smoothing search uses per pair
LM_HEAD_ROWS = 16384  # lm_head rows quantized at a time (a multiple of 64): bounds host memory


class _Stop(Exception):
    pass


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_first_layer_inputs(model, samples: torch.Tensor, device):
    """Hidden states entering layer 0 for each sample, and the keyword arguments (position
    embeddings, mask, ...) the layers are called with."""
    layer0 = model.model.layers[0]
    inputs, kwargs = [], {}

    def grab(module, args, kw):
        inputs.append((args[0] if args else kw["hidden_states"]).detach())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in samples:
            try:
                model(row[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


@torch.no_grad()
def _collect(layer, inputs, kwargs, names, hessians=None, keep_rows=0):
    """Run layer on inputs; accumulate Hessians of the named linears' inputs and/or keep up to
    keep_rows rows of each. Returns the layer outputs and the kept rows."""
    kept = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            if hessians is not None:
                hessians[name].add(x)
            if keep_rows and sum(r.shape[0] for r in kept[name]) < keep_rows:
                kept[name].append(x.float().cpu())
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        outputs = [_layer_output(layer(x, **kwargs)) for x in inputs]
    finally:
        for h in handles:
            h.remove()
    rows = {n: torch.cat(v)[:keep_rows] for n, v in kept.items() if v}
    return outputs, rows


@torch.no_grad()
def quantize_layers(model, samples: torch.Tensor, group_size: int, smooth: bool, use_gptq: bool,
                    device="cpu", clip: bool = False, prepare=None,
                    lm_head: bool = False, int_scales: bool = False) -> dict[str, dict]:
    """Quantize every decoder linear of `model` (smoothing is folded into norms and producers)
    and return each one's packed QQQ tensors (vllm_qqq.format.pack). clip: search each row's /
    group's range (offline/grid.py) before GPTQ. lm_head: also the lm_head (key "lm_head"), with
    GPTQ on the final norm's outputs, without smoothing. int_scales: integer group scales
    (offline/grid.py; g128 only).
    Bounded memory: the model stays in its dtype on the host; each layer works in fp32 on
    `device` while it is quantized, after prepare(layer) if given (the layer's rotation), and its
    linears' weights are released once the next layer's inputs are computed from their
    fake-quantized values (only the packed tensors, 0.5 bytes a weight, are kept)."""
    config = model.config
    heads_match = config.num_attention_heads == getattr(config, "num_key_value_heads",
                                                        config.num_attention_heads)
    embed = model.model.embed_tokens
    embed_dtype = embed.weight.dtype
    embed.to(device, torch.float32)  # the layers' inputs (and rotary tables) in fp32
    model.model.rotary_emb.to(device)
    inputs, kwargs = capture_first_layer_inputs(model, samples, device)
    embed.to("cpu", embed_dtype)
    result = {}
    for i, layer in enumerate(tqdm(model.model.layers, desc="QQQ layers", unit="layer")):
        start = time.time()
        layer_dtype = next(layer.parameters()).dtype
        layer.to(device, torch.float32)
        if prepare is not None:
            prepare(layer)
        if smooth:
            _, rows = _collect(layer, inputs, kwargs, LINEAR_NAMES, keep_rows=SMOOTH_ROWS)
            pairs = smooth_layer(layer, {n: r.to(device) for n, r in rows.items()}, group_size,
                                 heads_match)
            log.debug("layer %d smoothing: %s", i, pairs)
        hessians = {n: Hessian(layer.get_submodule(n).in_features, device) for n in LINEAR_NAMES}
        if use_gptq:
            _collect(layer, inputs, kwargs, LINEAR_NAMES, hessians=hessians)
        for name in LINEAR_NAMES:
            linear = layer.get_submodule(name)
            w = linear.weight.data.float()
            grid = Grid(w, group_size, clip, int_scales)
            codes = gptq(w, hessians[name].h, grid) if use_gptq else grid.codes(w, 0)
            result[f"model.layers.{i}.{name}"] = pack(grid.to_weight(codes))
            linear.weight.data = grid.dequant(codes, 0).to(linear.weight.dtype)
        del hessians
        inputs, _ = _collect(layer, inputs, kwargs, [])
        for name in LINEAR_NAMES:  # the packed weights replace them: free the memory
            layer.get_submodule(name).weight.data = torch.empty(0, dtype=layer_dtype)
        layer.to("cpu", layer_dtype)
        log.info("layer %d/%d done in %.1f s", i + 1, len(model.model.layers), time.time() - start)
    if lm_head:
        result["lm_head"] = quantize_lm_head(model, inputs, group_size, use_gptq, device, clip,
                                             int_scales=int_scales)
    return result


@torch.no_grad()
def quantize_lm_head(model, inputs, group_size: int, use_gptq: bool, device, clip: bool,
                      rows: int = LM_HEAD_ROWS, int_scales: bool = False) -> dict:
    """The lm_head's packed QQQ tensors; its inputs are the final norm of the last layer's
    outputs (the quantized model's own), its weight is released once packed. A vocabulary is
    several times the largest decoder linear, so the rows are quantized `rows` at a time: each
    row's scales and GPTQ's updates depend on that row and the Hessian only, and the packed
    layout splits along N at multiples of 64 (as tensor parallelism does), so the result is
    the whole matrix's."""
    start = time.time()
    norm, head = model.model.norm, model.lm_head
    norm_dtype, head_dtype = norm.weight.dtype, head.weight.dtype
    hessian = None
    if use_gptq:
        norm.to(device, torch.float32)
        hessian = Hessian(head.in_features, device)
        for x in inputs:
            hessian.add(norm(x))
        norm.to("cpu", norm_dtype)
    parts = []
    for first in range(0, head.out_features, rows):
        w = head.weight.data[first:first + rows].to(device, torch.float32)
        grid = Grid(w, group_size, clip, int_scales)
        codes = gptq(w, hessian.h, grid) if use_gptq else grid.codes(w, 0)
        parts.append(pack(grid.to_weight(codes)))
        del w, grid, codes
    packed = {name: torch.cat([p[name] for p in parts], dim=-1) for name in parts[0]}
    head.weight.data = torch.empty(0, dtype=head_dtype)
    log.info("lm_head done in %.1f s", time.time() - start)
    return packed
