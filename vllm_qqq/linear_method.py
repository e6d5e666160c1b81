"""QQQLinearMethod: loads a layer's QQQ tensors (docs/FORMAT.md) and runs the W4A8 linear.

The checkpoint tensors are declared with vLLM's parameter classes so that fused QKV / gate-up
loading and tensor-parallel sharding work unchanged. After loading they are checked, unpacked and
re-laid out once for the path that runs: the CUDA kernels (vllm_qqq.ops) or, elsewhere, the
PyTorch reference on an int8 copy of the weight.
"""

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (LinearMethodBase,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter,
                                           GroupQuantScaleParameter, PackedvLLMParameter)

from vllm_qqq import ops
from vllm_qqq.format import N_BLOCK, PACK, TILE, FormatError, check_shape, unpack
from vllm_qqq.reference import w4a8_linear

logger = init_logger("vllm.qqq")
_announced = set()

# Largest |s_group| that cannot push (code - 8) * s_group out of int8 for codes of one sign.
_MAX_GROUP_SCALE = 127.5 / 7


def _checked_loader(layer, name: str, dtype: torch.dtype, loader):
    """Wraps vLLM's loader: a wrong dtype or shape becomes an error naming the tensor, and each
    load is recorded so that missing shards are caught after loading."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        where = f"'{layer.prefix}.{name}'"
        if loaded_weight.dtype != dtype:
            raise FormatError(f"QQQ tensor {where} must be {dtype}, the checkpoint has "
                              f"{loaded_weight.dtype} {list(loaded_weight.shape)}")
        try:
            loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError) as e:
            raise FormatError(f"QQQ tensor {where} has shape {list(loaded_weight.shape)}, which "
                              f"does not fit this layer's {list(param.shape)} "
                              f"(shard {args[0] if args else None}): {e}") from None
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        param.qqq_loaded.add(shard if not isinstance(shard, (list, tuple)) else tuple(shard))

    return load


@register_weight_loader_v2_supported_method
class QQQLinearMethod(LinearMethodBase):

    def __init__(self, quant_config):
        self.quant_config = quant_config

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        group_size = self.quant_config.group_size
        k, n = input_size_per_partition, sum(output_partition_sizes)
        try:
            check_shape(k, n, group_size)
            for part in output_partition_sizes:
                if part % N_BLOCK:
                    raise FormatError(f"every fused output part must be a multiple of {N_BLOCK}, "
                                      f"got parts {output_partition_sizes}")
        except FormatError as e:
            raise FormatError(f"layer '{layer.prefix}' ({input_size}x{output_size}, this rank "
                              f"{k}x{n}) cannot use QQQ: {e}") from None
        loader = extra_weight_attrs["weight_loader"]

        def declare(name, cls, data, **kw):
            param = cls(data=data, weight_loader=_checked_loader(layer, name, data.dtype, loader),
                        **kw)
            param.qqq_loaded = set()
            layer.register_parameter(name, param)

        declare("B", PackedvLLMParameter, torch.empty(k // TILE, n * TILE // PACK, dtype=torch.int32),
                input_dim=0, output_dim=1, packed_dim=1, packed_factor=PACK, marlin_tile_size=TILE)
        declare("s_channel", ChannelQuantScaleParameter, torch.empty(1, n, dtype=torch.float32),
                output_dim=1)
        if group_size == -1:
            declare("s_group", BasevLLMParameter, torch.empty(0, dtype=torch.float16))
        else:
            declare("s_group", GroupQuantScaleParameter,
                    torch.empty(k // group_size, n, dtype=torch.float16), output_dim=1, input_dim=0)
        layer.qqq_parts = len(output_partition_sizes)
        layer.qqq_in, layer.qqq_out, layer.qqq_dtype = k, n, params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        group_size = self.quant_config.group_size
        for name in ("B", "s_channel", "s_group"):
            seen = getattr(layer, name).qqq_loaded
            if None not in seen and len(seen) < layer.qqq_parts:
                parts = (["q", "k", "v"] if any(isinstance(s, str) for s in seen)
                         else list(range(layer.qqq_parts)))
                missing = [p for p in parts if p not in seen]
                raise FormatError(f"QQQ checkpoint is missing '{name}' of part(s) {missing} of "
                                  f"layer '{layer.prefix}'")
        w = unpack(layer.B.data, layer.s_channel.data, layer.s_group.data, group_size)
        if not torch.isfinite(w.channel).all() or (w.channel <= 0).any():
            raise FormatError(f"layer '{layer.prefix}': s_channel must be finite and positive "
                              f"(corrupt checkpoint?)")
        if w.group is not None:
            g = w.group.float()
            if not torch.isfinite(g).all() or (g <= 0).any() or (g > _MAX_GROUP_SCALE).any():
                raise FormatError(f"layer '{layer.prefix}': s_group must be finite, positive and "
                                  f"at most {_MAX_GROUP_SCALE:.3f} (corrupt checkpoint?)")
            # (code - 8) * s_group must round into int8 (docs/FORMAT.md, 'Weight value').
            w8 = w.group_products()
            if w8.min() < -128 or w8.max() > 127:
                raise FormatError(f"layer '{layer.prefix}': (code - 8) * s_group leaves the int8 "
                                  f"range (corrupt checkpoint?)")
        for name in ("B", "s_channel", "s_group"):
            delattr(layer, name)

        def keep(name, t):
            layer.register_parameter(name, Parameter(t, requires_grad=False))

        # The weight (kernel layout, or int8 for the reference) is named `qweight`: vLLM's LoRA
        # layers find a quantized layer's device by that name (vllm/lora/layers/utils.py).
        if ops.use_cuda_kernels(layer.qqq_in, layer.qqq_out, layer.qqq_dtype, w.codes.device):
            packed = ops.prepare_weight(w)
            keep("qweight", packed.pop("qqq_b"))
            for name, t in packed.items():
                keep(name, t)
            layer.qqq_workspace = ops.workspace(w.codes.device, layer.qqq_out)
            layer.qqq_cuda = True
        else:
            keep("qweight", w.int8_weight())
            keep("qqq_scale", w.channel.float().contiguous())
            layer.qqq_cuda = False
        path = "the QQQ CUDA kernels" if layer.qqq_cuda else "the PyTorch reference"
        if path not in _announced:
            _announced.add(path)
            logger.info("QQQ (group_size %d) linear layers run %s", group_size, path)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.qqq_cuda:
            return ops.w4a8_linear(x, layer.qweight, layer.qqq_scale, layer.qqq_group,
                                   layer.qqq_workspace, bias)
        return w4a8_linear(x, layer.qweight, layer.qqq_scale, bias, x.dtype)
