// The per-token int8 quantization's arithmetic, shared by the quantization kernel and the GEMM
// that quantizes its own activations at small M: bit-identical to
// vllm_qqq.reference.quantize_per_token (scale = absmax / 127 by IEEE division; q =
// round_half_even(x / scale) clamped to int8; scale 0 gives q 0).
#pragma once

#include "common.cuh"

namespace qqq {

// The largest |x| of 8 activations held in one 16-byte vector.
template <typename T>
__device__ __forceinline__ float absmax8(uint4 v) {
  const T* e = reinterpret_cast<const T*>(&v);
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(OutType<T>::to_float(e[j])));
  return amax;
}

__device__ __forceinline__ float token_scale(float absmax) { return __fdiv_rn(absmax, 127.f); }

// 8 activations -> 8 int8 codes (byte j = element j) on the grid of scale s.
template <typename T>
__device__ __forceinline__ uint2 quantize8(uint4 v, float s) {
  const T* e = reinterpret_cast<const T*>(&v);
  uint32_t packed[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int qi = 0;
      if (s > 0.f) {
        const float r = rintf(__fdiv_rn(OutType<T>::to_float(e[4 * h + j]), s));
        qi = static_cast<int>(fminf(fmaxf(r, -128.f), 127.f));
      }
      word |= (static_cast<uint32_t>(qi) & 0xff) << (8 * j);
    }
    packed[h] = word;
  }
  return make_uint2(packed[0], packed[1]);
}

}  // namespace qqq
