"""The QQQ checkpoint format: packing of int4 weights and scales (docs/FORMAT.md is the spec).

Tensors per linear layer, as written by the original QQQ tool:
  B          int32   [K/16, N*2]   int4 codes, Marlin tile order, 8 codes per int32
  s_channel  float32 [1, N]        permuted within blocks of 32 columns
  s_group    float16 [K/G, N]      permuted within blocks of 64 columns; empty when per-channel

"Logical" form, used by the reference and by our kernels' repacking:
  codes      int8    [K, N]        per-channel: signed in [-7, 7]; per-group: unsigned in [0, 15]
  channel    float32 [N]           per-channel: the full weight scale (stored value * 16)
                                   per-group: the int8 per-channel scale (stored value)
  group      float16 [K/G, N]      per-group only, relative to `channel`
"""

from dataclasses import dataclass

import torch

TILE = 16  # K and N extent of one Marlin tile
PACK = 8  # int4 codes per int32
N_BLOCK = 64  # columns covered by one 1024-element permutation chunk (4 tiles)
GROUP_SIZES = (-1, 128)
# Per-channel codes are read by the kernel as the high nibble of an int8 (code * 16), so the stored
# channel scale is the real one divided by 16.
CHANNEL_SCALE_DIVISOR = 16.0


class FormatError(ValueError):
    """A QQQ tensor or config that does not follow docs/FORMAT.md."""


def _tile_permutation(group_size: int) -> torch.Tensor:
    # For each of the 32 lanes of a warp: the 8 entries of a 16x16 tile (flattened row-major as
    # [k][n]) that its int8 mma B fragments need, 4 consecutive k at column c and at column c + 8.
    lane = torch.arange(32)
    row0 = 4 * (lane % 4)
    col = lane // 4
    rows = row0[:, None] + torch.arange(4)[None, :]  # [32, 4]
    per_lane = torch.cat([16 * rows + col[:, None], 16 * rows + col[:, None] + 8], dim=1)  # [32, 8]
    # Four tiles side by side in N, each lane's 8 entries per tile kept together.
    perm = (per_lane[:, None, :] + 256 * torch.arange(4)[None, :, None]).reshape(-1, 8)
    # Order of the 8 codes inside one int32: per-channel codes are unpacked by shifting nibbles
    # into the high half of each byte, per-group codes by masking low/high nibble pairs.
    if group_size == -1:
        interleave = torch.tensor([4, 0, 5, 1, 6, 2, 7, 3])
    else:
        interleave = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    return perm[:, interleave].reshape(-1)


def _group_scale_permutation() -> torch.Tensor:
    # 64 entries: transpose of an 8x8 block.
    return (torch.arange(8)[:, None] + 8 * torch.arange(8)[None, :]).reshape(-1)


def _channel_scale_permutation() -> torch.Tensor:
    # 32 entries: pairs of adjacent columns, 8 apart, as the mma accumulator fragments hold them.
    pairs = torch.tensor([0, 1, 8, 9, 16, 17, 24, 25])
    return (2 * torch.arange(4)[:, None] + pairs[None, :]).reshape(-1)


TILE_PERM = {g: _tile_permutation(g) for g in GROUP_SIZES}
GROUP_SCALE_PERM = _group_scale_permutation()
CHANNEL_SCALE_PERM = _channel_scale_permutation()


def _permute_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, perm.numel())[:, perm.to(x.device)].reshape(x.shape)


def _unpermute_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return _permute_columns(x, torch.argsort(perm))


def check_shape(k: int, n: int, group_size: int) -> None:
    """Raise FormatError unless a K x N layer (in x out features) can be stored in the format."""
    if group_size not in GROUP_SIZES:
        raise FormatError(f"QQQ supports group_size -1 (per-channel) or 128, got {group_size}")
    if k % TILE != 0:
        raise FormatError(f"QQQ needs input features K divisible by {TILE}, got K={k}")
    if n % N_BLOCK != 0:
        raise FormatError(f"QQQ needs output features N divisible by {N_BLOCK}, got N={n}")
    if group_size != -1 and k % group_size != 0:
        raise FormatError(f"QQQ group_size {group_size} does not divide input features K={k}")


def code_range(group_size: int) -> tuple[int, int]:
    return (-7, 7) if group_size == -1 else (0, 15)


def pack_codes(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 codes [K, N] (logical, see module doc) -> B int32 [K/16, N*2]."""
    k, n = codes.shape
    check_shape(k, n, group_size)
    lo, hi = code_range(group_size)
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise FormatError(f"int4 codes must lie in [{lo}, {hi}] for group_size {group_size}")
    tiles = codes.to(torch.int64).reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3)
    flat = _permute_columns(tiles.reshape(k // TILE, n * TILE), TILE_PERM[group_size]) & 0xF
    nibbles = flat.reshape(k // TILE, -1, PACK) << (4 * torch.arange(PACK, device=codes.device))
    words = nibbles.sum(dim=-1)  # disjoint bit fields: sum == bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(b: torch.Tensor, group_size: int) -> torch.Tensor:
    """B int32 [K/16, N*2] -> int4 codes int8 [K, N] (signed for per-channel, unsigned for groups)."""
    if b.dtype != torch.int32 or b.dim() != 2 or b.shape[1] % (2 * N_BLOCK) != 0:
        raise FormatError(f"B must be int32 [K/16, N*2] with N % {N_BLOCK} == 0, got "
                          f"{b.dtype} {list(b.shape)}")
    k, n = b.shape[0] * TILE, b.shape[1] * PACK // TILE
    nibbles = (b.to(torch.int64)[:, :, None] >> (4 * torch.arange(PACK, device=b.device))) & 0xF
    if group_size == -1:
        nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    flat = _unpermute_columns(nibbles.reshape(k // TILE, n * TILE), TILE_PERM[group_size])
    codes = flat.reshape(k // TILE, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(k, n)
    return codes.to(torch.int8)


@dataclass
class QQQWeight:
    """One quantized linear layer in logical form (see module doc)."""

    codes: torch.Tensor  # int8 [K, N]
    channel: torch.Tensor  # float32 [N]
    group: torch.Tensor | None  # float16 [K/G, N], None for per-channel
    group_size: int

    def group_products(self) -> torch.Tensor:
        """round((code - 8) * s_group) as float32 [K, N], before saturation (per-group only)."""
        g = self.group.float().repeat_interleave(self.group_size, dim=0)
        return torch.round((self.codes.float() - 8.0) * g)  # exact: 4-bit int times an fp16

    def int8_weight(self) -> torch.Tensor:
        """The int8 [K, N] matrix the GEMM multiplies with (docs/FORMAT.md, 'Weight value')."""
        if self.group_size == -1:
            return self.codes.clone()
        return self.group_products().clamp(-128, 127).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """float32 [K, N] weight that the quantized layer computes with."""
        return self.int8_weight().float() * self.channel[None, :]


def pack(weight: QQQWeight) -> dict[str, torch.Tensor]:
    """Logical form -> the stored tensors {B, s_channel, s_group}."""
    k, n = weight.codes.shape
    b = pack_codes(weight.codes, weight.group_size)
    if weight.group_size == -1:
        s_channel = weight.channel.float() / CHANNEL_SCALE_DIVISOR
        s_group = torch.empty(0, dtype=torch.float16)
    else:
        s_channel = weight.channel.float()
        if weight.group is None or tuple(weight.group.shape) != (k // weight.group_size, n):
            raise FormatError(f"group scales must be [{k // weight.group_size}, {n}]")
        s_group = _permute_columns(weight.group.to(torch.float16), GROUP_SCALE_PERM).contiguous()
    s_channel = _permute_columns(s_channel.reshape(1, n), CHANNEL_SCALE_PERM).contiguous()
    return {"B": b, "s_channel": s_channel, "s_group": s_group}


def unpack(b: torch.Tensor, s_channel: torch.Tensor, s_group: torch.Tensor,
           group_size: int) -> QQQWeight:
    """The stored tensors -> logical form, checking every shape and dtype."""
    codes = unpack_codes(b, group_size)
    k, n = codes.shape
    check_shape(k, n, group_size)
    if s_channel.dtype != torch.float32 or s_channel.numel() != n:
        raise FormatError(f"s_channel must be float32 [1, {n}], got {s_channel.dtype} "
                          f"{list(s_channel.shape)}")
    channel = _unpermute_columns(s_channel.reshape(1, n), CHANNEL_SCALE_PERM).reshape(n)
    if group_size == -1:
        if s_group.numel() != 0:
            raise FormatError("s_group must be empty for a per-channel (group_size -1) layer")
        return QQQWeight(codes, channel * CHANNEL_SCALE_DIVISOR, None, -1)
    groups = k // group_size
    if s_group.dtype != torch.float16 or tuple(s_group.shape) != (groups, n):
        raise FormatError(f"s_group must be float16 [{groups}, {n}], got {s_group.dtype} "
                          f"{list(s_group.shape)}")
    group = _unpermute_columns(s_group, GROUP_SCALE_PERM)
    return QQQWeight(codes, channel, group, group_size)
