"""The values a QQQ layer can represent, and round-to-nearest onto them.

Per-channel: w = channel[n] * code, code in [-7, 7], channel = absmax(row) / 7.
Per-group (two-level): w = channel[n] * round((code - 8) * group[k / G, n]), code in [0, 15]
(in [1, 15] where group > 16, so that every product stays in int8),
channel = absmax(row) / 127 (the int8 step), group = fp16(absmax(group) / (7 * channel)), so the
largest weight of each group maps to code 8 +- 7 and every product lands on the int8 grid.
With integer group scales (the QQQ paper's int8 group scales), group is the floor or the ceiling
of that, whichever rounds the group with the lesser error: the GPU kernels then decode the
weights with integer arithmetic, about half the instructions of the fp16 decode.
"""

import torch

from vllm_qqq.format import QQQWeight, check_shape

_TINY = 1e-12  # keeps scales positive for all-zero rows or groups


class Grid:
    """Scales for one weight [N, K] (torch Linear layout, out x in), fixed before quantization
    (GPTQ's static groups), and rounding of any column block onto them."""

    def __init__(self, weight: torch.Tensor, group_size: int, clip: bool = False,
                 int_scales: bool = False):
        """clip: shrink each row's (per-channel) or group's (g128) range by the factor of CLIPS
        that minimizes its round-to-nearest squared error, instead of always using its absmax.
        int_scales: integer group scales (g128 only)."""
        n, k = weight.shape
        check_shape(k, n, group_size)
        w = weight.float()
        self.group_size = group_size
        absmax = w.abs().amax(dim=1).clamp_min(_TINY)
        if int_scales and group_size == -1:
            raise ValueError("integer group scales need group_size 128")
        if group_size == -1:
            self.channel = _div(absmax, 7)
            self.group = None
            if clip:
                errors = torch.stack([_channel_error(w, _div(absmax * c, 7)) for c in CLIPS])
                self.channel = _div(absmax * _best(errors), 7)
        else:
            self.channel = _div(absmax, 127)
            w3 = w.reshape(n, k // group_size, group_size)
            gmax = w3.abs().amax(dim=2).clamp_min(_TINY)
            factor = 1.0
            if clip:
                errors = torch.stack([
                    _group_error(w3, self.channel, _fp16_group_scales(gmax * c, self.channel))
                    for c in CLIPS])
                factor = _best(errors)
            scales = _fp16_group_scales(gmax * factor, self.channel)
            if int_scales:
                scales = _int_group_scales(w3, self.channel, scales)
            self.group = scales.t()  # [K/G, N]
            self._group_f = self.group.float()

    def _group_scale(self, k0: int, cols: int) -> torch.Tensor:
        """float32 [N, cols]: the group scale of each column k0 .. k0 + cols - 1."""
        if cols == 1:
            return self._group_f[k0 // self.group_size][:, None]
        idx = torch.arange(k0, k0 + cols, device=self.group.device) // self.group_size
        return self._group_f[idx].t()

    def codes(self, w: torch.Tensor, k0: int) -> torch.Tensor:
        """Round w [N, cols] (columns k0 .. k0 + cols - 1 of the weight) to codes (int64)."""
        w = w.float()
        if self.group is None:
            return _channel_codes(w, self.channel[:, None]).long()
        return _group_codes(w, self.channel[:, None], self._group_scale(k0, w.shape[1])).long()

    def dequant(self, codes: torch.Tensor, k0: int) -> torch.Tensor:
        """float32 values of codes [N, cols] for columns starting at k0."""
        if self.group is None:
            return codes.float() * self.channel[:, None]
        return _group_values(codes.float(), self.channel[:, None],
                             self._group_scale(k0, codes.shape[1]))

    def quantize(self, w: torch.Tensor, k0: int = 0) -> torch.Tensor:
        """Fake-quantize w [N, cols]: round to the grid and return the float values."""
        return self.dequant(self.codes(w, k0), k0)

    def to_weight(self, codes: torch.Tensor) -> QQQWeight:
        """codes [N, K] -> the layer in logical form (codes transposed to [K, N]), on the CPU
        (the checkpoint's side, wherever the layer was calibrated)."""
        return QQQWeight(codes.t().to(torch.int8).cpu().contiguous(), self.channel.cpu().clone(),
                         None if self.group is None else self.group.cpu().clone(), self.group_size)


def rtn(weight: torch.Tensor, group_size: int, clip: bool = False,
        int_scales: bool = False) -> QQQWeight:
    """Round-to-nearest QQQ quantization of a Linear weight [N, K]."""
    grid = Grid(weight, group_size, clip, int_scales)
    return grid.to_weight(grid.codes(weight, 0))


def _div(x: torch.Tensor, d: float) -> torch.Tensor:
    """x / d, correctly rounded on every device. CUDA computes x / <Python number> as
    x * (1 / d), which differs from the CPU's quotient in the last bit (on about half the rows
    at d = 7); dividing by a tensor on x's device takes CUDA's IEEE division, as the CPU does."""
    return x / x.new_tensor(d)


# Range factors the clipping search tries (1.0 first: ties keep the absmax range).
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _fp16_group_scales(gmax: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """fp16 group scales [N, G] that map gmax to code 8 +- 7 on the channel's int8 step."""
    scales = (gmax / (7 * channel[:, None])).to(torch.float16)
    return scales.clamp_min(torch.finfo(torch.float16).tiny)


# The largest integer group scale: (code - 8) * 18 stays in int8 for codes 1-15, which
# _group_codes keeps to above 16 (the format's limit is 127.5 / 7).
MAX_INT_GROUP_SCALE = 18


def _int_group_scales(w3: torch.Tensor, channel: torch.Tensor,
                      scales: torch.Tensor) -> torch.Tensor:
    """Integer group scales [N, G] (as fp16): the floor or the ceiling of the fp16 scales [N, G],
    whichever gives the group w3 [N, G, size] the lesser round-to-nearest error (the ceiling on
    a tie: it never narrows the group's range)."""
    s = scales.float()
    floor = s.floor().clamp(1, MAX_INT_GROUP_SCALE).to(torch.float16)
    ceil = s.ceil().clamp(1, MAX_INT_GROUP_SCALE).to(torch.float16)
    take_ceil = _group_error(w3, channel, ceil) <= _group_error(w3, channel, floor)
    return torch.where(take_ceil, ceil, floor)


def _channel_codes(w: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """Per-channel codes (float) of w; channel broadcasts against w."""
    return torch.round(w / channel).clamp(-7, 7)


def _group_codes(w: torch.Tensor, channel: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """Two-level codes (float) of w with float32 group scales gs; both broadcast against w."""
    codes = (torch.round(w / (channel * gs)) + 8).clamp(0, 15)
    # Code 0 means -8 * s_group, outside int8 when s_group > 16 (GPTQ's updates can ask for
    # values beyond a group's original absmax): the lowest code is then 1.
    return torch.maximum(codes, (gs > 16).to(codes.dtype))


def _group_values(codes: torch.Tensor, channel: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """The float values of two-level codes (float)."""
    return torch.round((codes - 8) * gs).clamp(-128, 127) * channel


def _group_error(w3: torch.Tensor, channel: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Squared round-to-nearest error [N, G] of w3 [N, G, size] with fp16 group scales [N, G].
    The squares are IEEE fp32 on every device; summed in fp64, whose rounding is too fine for
    the CPU's and the GPU's summation orders to pick different scales (the checkpoint is the
    same from either, tests/test_pipeline.py)."""
    gs, ch = group.float()[:, :, None], channel[:, None, None]
    residual = w3 - _group_values(_group_codes(w3, ch, gs), ch, gs)
    return residual.pow(2).sum(dim=2, dtype=torch.float64)


def _channel_error(w: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """Squared round-to-nearest error [N] of w [N, K] with per-channel scales [N]."""
    ch = channel[:, None]
    return (w - _channel_codes(w, ch) * ch).pow(2).sum(dim=1)


def _best(errors: torch.Tensor) -> torch.Tensor:
    """The CLIPS factor with the least error, per entry of errors [len(CLIPS), ...]."""
    return torch.tensor(CLIPS, dtype=torch.float32, device=errors.device)[errors.argmin(dim=0)]
