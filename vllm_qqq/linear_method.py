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
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter,
                                           GroupQuantScaleParameter, PackedvLLMParameter)

from vllm_qqq import ops
from vllm_qqq.format import N_BLOCK, PACK, TILE, FormatError, check_shape, unpack
from vllm_qqq.reference import w4a8_linear

logger = init_logger("vllm.qqq")
_announced = set()

# Largest |s_group| that cannot push (code - 8) * s_group out of int8 for codes of one sign.
_MAX_GROUP_SCALE = 127.5 / 7


def _vocab_shard_loader(layer):
    """The lm_head's loader (vLLM's embedding loader copies along dim 0; ours are sharded along
    N, dim 1): this rank's vocabulary columns, B at 2 words per column; padding columns past the
    vocabulary get zero codes and unit scales (vLLM drops their logits)."""

    def load(param, loaded_weight: torch.Tensor):
        if param.dim() == 1:  # per-channel s_group: empty
            param.data.copy_(loaded_weight)
            return
        per_column = param.shape[1] // layer.num_embeddings_per_partition
        start = layer.shard_indices.org_vocab_start_index
        end = layer.shard_indices.org_vocab_end_index
        if (loaded_weight.dim() != 2 or loaded_weight.shape[0] != param.shape[0]
                or loaded_weight.shape[1] != layer.org_vocab_size * per_column):
            raise RuntimeError(f"expected [{param.shape[0]}, {layer.org_vocab_size * per_column}]"
                               f" for a vocabulary of {layer.org_vocab_size}")
        part = loaded_weight[:, start * per_column:end * per_column]
        param.data[:, :part.shape[1]].copy_(part)
        param.data[:, part.shape[1]:].fill_(0 if param.dtype == torch.int32 else 1)

    return load


def _checked_loader(layer, name: str, dtype: torch.dtype, loader):
    """Wraps vLLM's loader: a wrong dtype or shape becomes an error naming the tensor, and each
    load is recorded so that missing shards are caught after loading."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        where = f"'{layer.qqq_prefix}.{name}'"
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
        lm_head = isinstance(layer, ParallelLMHead)
        layer.qqq_prefix = getattr(layer, "prefix", None) or ("lm_head" if lm_head else "?")
        try:
            check_shape(k, n, group_size)
            for part in output_partition_sizes:
                if part % N_BLOCK:
                    raise FormatError(f"every fused output part must be a multiple of {N_BLOCK}, "
                                      f"got parts {output_partition_sizes}")
        except FormatError as e:
            raise FormatError(f"layer '{layer.qqq_prefix}' ({input_size}x{output_size}, this rank "
                              f"{k}x{n}) cannot use QQQ: {e}") from None
        loader = _vocab_shard_loader(layer) if lm_head else extra_weight_attrs["weight_loader"]

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
                                  f"layer '{layer.qqq_prefix}'")
        w = unpack(layer.B.data, layer.s_channel.data, layer.s_group.data, group_size)
        if not torch.isfinite(w.channel).all() or (w.channel <= 0).any():
            raise FormatError(f"layer '{layer.qqq_prefix}': s_channel must be finite and "
                              f"positive (corrupt checkpoint?)")
        if w.group is not None:
            g = w.group.float()
            if not torch.isfinite(g).all() or (g <= 0).any() or (g > _MAX_GROUP_SCALE).any():
                raise FormatError(f"layer '{layer.qqq_prefix}': s_group must be finite, positive "
                                  f"and at most {_MAX_GROUP_SCALE:.3f} (corrupt checkpoint?)")
            # (code - 8) * s_group must round into int8 (docs/FORMAT.md, 'Weight value').
            w8 = w.group_products()
            if w8.min() < -128 or w8.max() > 127:
                raise FormatError(f"layer '{layer.qqq_prefix}': (code - 8) * s_group leaves the "
                                  f"int8 range (corrupt checkpoint?)")
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

    def tie_weights(self, lm_head: torch.nn.Module, embed_tokens: torch.nn.Module):
        # vLLM ties the lm_head to the embedding where config.json says tie_word_embeddings.
        raise FormatError("this QQQ checkpoint quantizes the lm_head, which then cannot share "
                          "the embedding's weights: its config.json must say "
                          "\"tie_word_embeddings\": false")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.qqq_cuda:
            return ops.w4a8_linear(x, layer.qweight, layer.qqq_scale, layer.qqq_group,
                                   layer.qqq_workspace, bias)
        return w4a8_linear(x, layer.qweight, layer.qqq_scale, bias, x.dtype)
