// Decoding one weight word of the kernel layout (vllm_qqq/ops.py: 8 int4 codes of one output
// channel, k32 step) into the two int8 fragments b0 (k = 4 t .. 4 t + 3) and b1 (k = 16 + 4 t ..)
// of mma.m16n8k32, t = lane % 4.
#pragma once

#include "common.cuh"
#include "kernels.h"

namespace qqq {

// Per-channel: the codes are read as code * 16 (the channel scale carries the 1/16).
__device__ __forceinline__ void decode_channel(uint32_t w, uint32_t& b0, uint32_t& b1) {
  b0 = w & 0xf0f0f0f0u;         // high nibbles
  b1 = (w << 4) & 0xf0f0f0f0u;  // low nibbles
}

// Per-group decode of one word (8 codes of one column) into the two int8 B fragments.
__device__ __forceinline__ void decode_group(uint32_t w, uint32_t s2, uint32_t& b0, uint32_t& b1) {
  constexpr uint32_t kLo = 0x000f000f, kHi = 0x00f000f0, kExp = 0x64006400;  // 1024 + x
  const uint32_t sh = w >> 8;
  uint32_t lo02 = lop3<(0xf0 & 0xcc) | 0xaa>(w, kLo, kExp);  // bytes 0, 2: low nibble
  uint32_t lo13 = lop3<(0xf0 & 0xcc) | 0xaa>(sh, kLo, kExp);
  uint32_t hi02 = lop3<(0xf0 & 0xcc) | 0xaa>(w, kHi, kExp);  // 1024 + 16 * high nibble
  uint32_t hi13 = lop3<(0xf0 & 0xcc) | 0xaa>(sh, kHi, kExp);
  const half2 k1032 = __half2half2(__ushort_as_half(0x6408));   // 1024 + 8
  const half2 kSixteenth = __half2half2(__ushort_as_half(0x2c00));  // 1 / 16
  const half2 kMinus72 = __half2half2(__ushort_as_half(0xd480));    // -(64 + 8)
  const half2 k1280 = __half2half2(__ushort_as_half(0x6500));       // 1024 + 256
  const half2 s = *reinterpret_cast<const half2*>(&s2);
  auto& h_lo02 = *reinterpret_cast<half2*>(&lo02);
  auto& h_lo13 = *reinterpret_cast<half2*>(&lo13);
  auto& h_hi02 = *reinterpret_cast<half2*>(&hi02);
  auto& h_hi13 = *reinterpret_cast<half2*>(&hi13);
  // code - 8, exactly
  h_lo02 = __hsub2(h_lo02, k1032);
  h_lo13 = __hsub2(h_lo13, k1032);
  h_hi02 = __hfma2(h_hi02, kSixteenth, kMinus72);
  h_hi13 = __hfma2(h_hi13, kSixteenth, kMinus72);
  // 1280 + round((code - 8) * s): one rounding at unit spacing in [1024, 2048), since a product
  // that rounds into int8 lies in [-128.5, 127.5]; 1280 is even, so ties go to even as in the
  // reference. (A base of 1152 left [1023.5, 1024) for code 0 at s = 16.047-16.0625, products
  // that round to -128, and read them as 127; tests/test_format.py checks every fp16 s.)
  h_lo02 = __hfma2(h_lo02, s, k1280);
  h_lo13 = __hfma2(h_lo13, s, k1280);
  h_hi02 = __hfma2(h_hi02, s, k1280);
  h_hi13 = __hfma2(h_hi13, s, k1280);
  // the mantissa of 1280 + v is 256 + v, so each half's low byte is v in two's complement, the
  // int8 itself: gather those bytes in k order
  b0 = prmt(hi02, hi13, 0x6240);
  b1 = prmt(lo02, lo13, 0x6240);
}

// Per-group decode where s_group is an integer (stored as int16, s in [1, 18]): (code - 8) * s
// is then exact, and w8 + 128 = code * s + (128 - 8 s) lies in [0, 255] for every weight the
// loader accepts (w8 in int8), so one multiply-add makes four of them at once with no carry from
// byte to byte (the 32-bit sum is the bytes' sum: 128 - 8 s may be negative, the results are
// not). The xor turns each w8 + 128 into w8's two's complement. Codes: the even nibbles (low in
// each byte) are b1's, the odd ones b0's, as in decode_group.
__device__ __forceinline__ void decode_group_int(uint32_t w, uint32_t s, uint32_t& b0,
                                                 uint32_t& b1) {
  const uint32_t offset = 0x80808080u - s * 0x08080808u;
  b1 = ((w & 0x0f0f0f0fu) * s + offset) ^ 0x80808080u;
  b0 = (((w >> 4) & 0x0f0f0f0fu) * s + offset) ^ 0x80808080u;
}

// Per-group codes alone, for kernels that apply integer group scales after the MMA (the narrow
// kernel's group sums): (code - 8) * 16 in int8, since code ^ 8 is the 4-bit two's complement of
// code - 8 and a byte's high nibble reads as 16 times its value. Three instructions a word, as
// per-channel's decode: one LOP3 computes (x ^ 0x88888888) & 0xf0f0f0f0 (lop3 with both masks
// in registers; written in C, the compiler splits it into two LOP3s of one immediate each).
__device__ __forceinline__ void decode_group_codes(uint32_t w, uint32_t& b0, uint32_t& b1) {
  constexpr int kXorAnd = (0xf0 ^ 0xcc) & 0xaa;  // (a ^ b) & c
  b0 = lop3<kXorAnd>(w, 0x88888888u, 0xf0f0f0f0u);       // high nibbles
  b1 = lop3<kXorAnd>(w << 4, 0x88888888u, 0xf0f0f0f0u);  // low nibbles
}

// The operand decode<DECODE> takes for one column from the 16 stored bits of its group scale:
// the fp16 scale in both halves, or the integer scale.
template <int DECODE>
__device__ __forceinline__ uint32_t group_operand(unsigned short bits) {
  if constexpr (DECODE == kDecodeGroupInt) {
    return bits;
  } else {
    return static_cast<uint32_t>(bits) * 0x10001u;
  }
}

template <int DECODE>
__device__ __forceinline__ void decode(uint32_t w, uint32_t g, uint32_t& b0, uint32_t& b1) {
  if constexpr (DECODE == kDecodeChannel) {
    decode_channel(w, b0, b1);
  } else if constexpr (DECODE == kDecodeGroupHalf) {
    decode_group(w, g, b0, b1);
  } else {
    decode_group_int(w, g, b0, b1);
  }
}

}  // namespace qqq
