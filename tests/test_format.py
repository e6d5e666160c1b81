"""The stored format: packing round trips, agreement with an independent loop-by-loop
description of the original QQQ tool's packing, and shape/dtype checks."""

import pytest
import torch

from vllm_qqq import format as fmt
from vllm_qqq.format import FormatError, QQQWeight, pack, pack_codes, unpack, unpack_codes


def random_codes(k, n, g, seed):
    lo, hi = fmt.code_range(g)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (k, n), generator=gen, dtype=torch.int8)


def random_weight(k, n, g, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    codes = random_codes(k, n, g, seed)
    channel = torch.rand(n, generator=gen) + 0.01
    group = None if g == -1 else (torch.rand(k // g, n, generator=gen) * 16 + 0.1).half()
    return QQQWeight(codes, channel, group, g)


def original_pack(codes: torch.Tensor, g: int) -> torch.Tensor:
    """B exactly as the original QQQ tool lays it out, written out loop by loop from its
    description: 16x16 tiles (k-major inside), 1024-entry chunks, each lane's 4 consecutive k at
    columns c and c + 8, interleaved, 8 nibbles per int32 (nibble i at bits 4i)."""
    k, n = codes.shape
    rows = []
    for kt in range(k // 16):
        flat = []
        for nt in range(n // 16):
            tile = codes[16 * kt:16 * kt + 16, 16 * nt:16 * nt + 16]
            flat.extend(int(tile[r, c]) for r in range(16) for c in range(16))
        perm = []
        for lane in range(32):
            entries = [16 * (4 * (lane % 4) + i) + lane // 4 + 8 * blk for blk in (0, 1)
                       for i in range(4)]
            for j in range(4):
                perm.extend(e + 256 * j for e in entries)
        order = [4, 0, 5, 1, 6, 2, 7, 3] if g == -1 else [0, 2, 4, 6, 1, 3, 5, 7]
        perm = [perm[8 * i + o] for i in range(len(perm) // 8) for o in order]
        out = []
        for c0 in range(0, len(flat), 1024):
            chunk = flat[c0:c0 + 1024]
            out.extend(chunk[p] for p in perm)
        words = []
        for w0 in range(0, len(out), 8):
            word = 0
            for i in range(8):
                word |= (out[w0 + i] & 0xF) << (4 * i)
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("g", [-1, 128])
@pytest.mark.parametrize("k,n,seed", [(128, 64, 0), (256, 192, 1), (384, 128, 2)])
def test_codes_round_trip(k, n, g, seed):
    codes = random_codes(k, n, g, seed)
    b = pack_codes(codes, g)
    assert b.dtype == torch.int32 and tuple(b.shape) == (k // 16, n * 2)
    assert torch.equal(unpack_codes(b, g), codes)


@pytest.mark.parametrize("g", [-1, 128])
def test_packing_matches_original_layout(g):
    codes = random_codes(128, 128, g, seed=7)
    assert torch.equal(pack_codes(codes, g), original_pack(codes, g))


@pytest.mark.parametrize("g", [-1, 128])
def test_scale_permutations_match_original(g):
    n = 128
    w = random_weight(256, n, g, seed=3)
    stored = pack(w)
    # The original stores s_channel (per-channel: scale / 16) permuted within blocks of 32 by
    # [2i + j for i in 0..3 for j in (0, 1, 8, 9, 16, 17, 24, 25)], s_group within blocks of 64
    # by [i + 8j for i in 0..7 for j in 0..7].
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    channel = w.channel / (16 if g == -1 else 1)
    expect = torch.cat([channel[b:b + 32][single] for b in range(0, n, 32)])
    assert torch.equal(stored["s_channel"].reshape(-1), expect)
    if g == -1:
        assert stored["s_group"].numel() == 0
    else:
        full = [i + 8 * j for i in range(8) for j in range(8)]
        expect = torch.cat([w.group[:, b:b + 64][:, full] for b in range(0, n, 64)], dim=1)
        assert torch.equal(stored["s_group"], expect)


@pytest.mark.parametrize("g", [-1, 128])
def test_weight_round_trip_and_values(g):
    w = random_weight(256, 128, g, seed=11)
    stored = pack(w)
    back = unpack(stored["B"], stored["s_channel"], stored["s_group"], g)
    assert torch.equal(back.codes, w.codes)
    assert torch.equal(back.channel, w.channel)
    if g != -1:
        assert torch.equal(back.group, w.group)
    # The int8 weight: codes themselves (per-channel), round((code - 8) * s_group) (groups).
    expect = (w.codes.double() if g == -1 else
              torch.round((w.codes.double() - 8) * w.group.double().repeat_interleave(g, 0)))
    assert torch.equal(w.int8_weight().double(), expect.clamp(-128, 127))


def test_bad_shapes_and_codes_rejected():
    with pytest.raises(FormatError, match="divisible by 16"):
        pack_codes(torch.zeros(120, 64, dtype=torch.int8), -1)
    with pytest.raises(FormatError, match="divisible by 64"):
        pack_codes(torch.zeros(128, 96, dtype=torch.int8), -1)
    with pytest.raises(FormatError, match="does not divide"):
        pack_codes(torch.zeros(144, 64, dtype=torch.int8), 128)
    with pytest.raises(FormatError, match="group_size"):
        pack_codes(torch.zeros(128, 64, dtype=torch.int8), 64)
    with pytest.raises(FormatError, match=r"\[-7, 7\]"):
        pack_codes(torch.full((128, 64), -8, dtype=torch.int8), -1)
    w = random_weight(256, 128, 128, seed=0)
    stored = pack(w)
    with pytest.raises(FormatError, match="s_channel must be float32"):
        unpack(stored["B"], stored["s_channel"].half(), stored["s_group"], 128)
    with pytest.raises(FormatError, match="s_group must be float16"):
        unpack(stored["B"], stored["s_channel"], stored["s_group"][:1], 128)
    with pytest.raises(FormatError, match="must be empty"):
        unpack(stored["B"], stored["s_channel"], stored["s_group"], -1)
    with pytest.raises(FormatError, match="B must be int32"):
        unpack(stored["B"].long(), stored["s_channel"], stored["s_group"], 128)


def test_every_accepted_group_product_decodes_exactly_in_fp16():
    """The kernels' g128 decode (csrc/decode.cuh) computes 1280 + (code - 8) * s_group with one
    fp16 fma and takes the low byte of the result as the int8 weight. That is exact only where
    the sum stays in [1024, 2048) (unit spacing, so the fma's rounding is round-half-even of the
    product, 1280 being even, and the mantissa is 256 + w8). Check it for every fp16 group scale
    the loader accepts and every code whose product rounds into int8, emulating the fma."""
    from vllm_qqq.linear_method import _MAX_GROUP_SCALE
    s = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16)
    s = s[s.double() <= _MAX_GROUP_SCALE].double()
    for code in range(16):
        product = (code - 8) * s  # exact in float64
        w8 = torch.round(product)  # the reference: round half to even
        accepted = (w8 >= -128) & (w8 <= 127)
        fma = (1280 + product[accepted]).half()  # one rounding, as __hfma2
        assert ((fma.double() >= 1024) & (fma.double() < 2048)).all()
        low_byte = fma.view(torch.int16).to(torch.int32) & 0xFF
        assert torch.equal(torch.where(low_byte > 127, low_byte - 256, low_byte).double(),
                           w8[accepted])


def pack_nibbles(codes):
    """One kernel-layout word: 8 codes, the first in the lowest nibble."""
    return sum(c << (4 * i) for i, c in enumerate(codes))


def check_fragment_bytes(codes, b0, b1, factor):
    """The decode's two registers of one word: b1's bytes hold the even nibbles' codes, b0's the
    odd ones', each as (code - 8) * factor in two's complement."""
    for j in range(4):
        for b, code in ((b1, codes[2 * j]), (b0, codes[2 * j + 1])):
            byte = (b >> (8 * j)) & 0xFF
            assert byte - 256 * (byte > 127) == (code - 8) * factor


def test_every_accepted_integer_group_product_decodes_exactly():
    """The integer g128 decode (csrc/decode.cuh, decode_group_int), emulated in 32-bit integers:
    for integer group scales 1-18 and 4 codes a register, code * s + (128 - 8 s) summed as one
    32-bit multiply-add, then xor 0x80 per byte, gives each byte (code - 8) * s in two's
    complement, for every combination of codes whose products the loader accepts (in int8): no
    carry crosses a byte, even where 128 - 8 s < 0. Its bytes are the fp16 decode's: the even
    nibbles b1's, the odd ones b0's."""
    mask = (1 << 32) - 1
    gen = torch.Generator().manual_seed(0)
    for s in range(1, 19):
        codes = torch.arange(16)
        codes = codes[((codes - 8) * s >= -128) & ((codes - 8) * s <= 127)]
        # every code in every byte position, and random mixes
        picks = torch.cat([codes.repeat_interleave(8).reshape(-1, 8),
                           codes[torch.randint(0, len(codes), (4096, 8), generator=gen)]])
        offset = (0x80808080 - s * 0x08080808) & mask
        for row in picks.tolist():
            w = pack_nibbles(row)
            b1 = ((((w & 0x0F0F0F0F) * s) + offset) & mask) ^ 0x80808080
            b0 = (((((w >> 4) & 0x0F0F0F0F) * s) + offset) & mask) ^ 0x80808080
            check_fragment_bytes(row, b0, b1, s)


def test_group_sums_decode_and_bound():
    """The narrow kernel's group sums (csrc/decode.cuh decode_group_codes, w4a8_gemm_narrow.cu
    GROUP_SUMS), emulated in integers: (w ^ 0x88888888) & 0xf0f0f0f0 and the same of w << 4 give
    each byte (code - 8) * 16 in two's complement, for all 16 codes in every nibble; a block's
    sums of a * (code - 8) * 16, times each column's integer scale and summed over a warp's
    blocks, then shifted right by 4, equal the sum of a * w8 with w8 = (code - 8) * s; and the
    largest |a * w8| over 63 blocks of 128 (kGroupSumsMaxK) keeps 16 times the sum in int32."""
    mask = (1 << 32) - 1
    gen = torch.Generator().manual_seed(1)
    picks = torch.cat([torch.arange(16).repeat_interleave(8).reshape(-1, 8),
                       torch.randint(0, 16, (4096, 8), generator=gen)])
    for row in picks.tolist():
        w = pack_nibbles(row)
        b0 = (w ^ 0x88888888) & 0xF0F0F0F0
        b1 = (((w << 4) & mask) ^ 0x88888888) & 0xF0F0F0F0
        check_fragment_bytes(row, b0, b1, 16)
    # One warp's share of a column: 14 blocks of 128 (Llama-3-8B down over 8 warps).
    codes = torch.randint(0, 16, (14, 128), generator=gen)
    s = torch.randint(1, 17, (14, 1), generator=gen)
    a = torch.randint(-127, 128, (14, 128), generator=gen)
    sums = (a * (codes - 8) * 16).sum(dim=1, keepdim=True)  # each block's MMAs
    assert ((s * sums).sum() >> 4) == (a * (codes - 8) * s).sum()
    # |a| <= 128 (qqq.gemm takes any int8 activations), |w8| <= 128: 63 blocks fit, 64 do not
    assert 16 * 128 * 128 * 128 * 63 < 2**31 <= 16 * 128 * 128 * 128 * 64
