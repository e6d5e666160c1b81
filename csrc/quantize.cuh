// Device helpers of the per-token int8 quantization (quant_per_token.cu, silu_mul_quant.cu,
// add_rms_norm_quant.cu): the reference's arithmetic (vllm_qqq.reference.quantize_per_token) on
// 16-byte vectors of 8 fp16/bf16 values, and reductions over a block's share of a row.
#pragma once

#include "common.cuh"

namespace qqq {

constexpr int kQuantThreads = 256;

// Whether a quantization of m rows rounds by the product with the reciprocal (round_quotient)
// rather than by the division: the same codes either way (quant_per_token.cu has the rule).
bool quantize_by_product(int m);

// round_half_even(x / s) for the IEEE quotient x / s, given r = 1 / s (IEEE, s normal). x * r is
// within 3 units in the last place of the quotient (r and the product each round once), under
// 2.3e-5 since |x / s| <= 127.00002, so both round to the same integer unless the product lies
// that close to a half-integer: only those (~2 in 1000 entries of random fp16 rows) take the
// division, a dozen instructions where the product is one.
__device__ __forceinline__ float round_quotient(float x, float s, float r) {
  const float y = __fmul_rn(x, r);
  if (fabsf(__fsub_rn(__fsub_rn(y, floorf(y)), 0.5f)) < 1.2e-4f) return rintf(__fdiv_rn(x, s));
  return rintf(y);
}

// The 8 codes of one 16-byte vector of x at scale s, rounded as the reference rounds: by the
// division, or (kProduct) by the product with r = 1 / s where r > 0 (0: s subnormal, where 1 / s
// may overflow, also divides).
template <typename T, bool kProduct>
__device__ __forceinline__ uint2 quantize_vector(const uint4& v, float s, float r) {
  const T* e = reinterpret_cast<const T*>(&v);
  uint32_t packed[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int qi = 0;
      if (s > 0.f) {
        const float x = OutType<T>::to_float(e[4 * h + j]);
        const float code =
            kProduct && r > 0.f ? round_quotient(x, s, r) : rintf(__fdiv_rn(x, s));
        qi = static_cast<int>(fminf(fmaxf(code, -128.f), 127.f));
      }
      word |= (static_cast<uint32_t>(qi) & 0xff) << (8 * j);
    }
    packed[h] = word;
  }
  return make_uint2(packed[0], packed[1]);
}

// One 16-byte load that stays one load, of what the prior grid wrote (and the norm weight read
// beside it). Where a plain uint4 load is only read through T* views (silu_mul_vector,
// vector_absmax), nvcc split it into eight 2-byte loads (seen in the PTX of silu_mul_quant.cu and
// add_rms_norm_quant.cu): 8x the load instructions. Not __ldg: see load_produced.
__device__ __forceinline__ uint4 load_vector(const uint4* p) { return load_produced(p); }
// The same for a vector this thread staged in shared memory: split, its eight 2-byte loads at a
// 16-byte stride also hit each bank four times a warp (32 wavefronts a warp's vectors, not 4).
// The clobber keeps it after this thread's store of the vector.
__device__ __forceinline__ uint4 load_shared_vector(const uint4* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr(p))
               : "memory");
  return v;
}

// Rows are read in batches of kLoadBatch vectors per thread, every load of a batch in flight at
// once: one memory round trip a batch where a plain loop had one a vector.
constexpr int kLoadBatch = 4;

template <typename T>
__device__ __forceinline__ float vector_absmax(const uint4& v, float amax) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(OutType<T>::to_float(e[j])));
  return amax;
}

// The r of quantize_vector: 1 / s where s is normal (a zero row's s = 0 leaves every code 0).
__device__ __forceinline__ float reciprocal(float s) {
  return s >= 1.17549435e-38f ? __frcp_rn(s) : 0.f;
}

// `value` combined over the block's kQuantThreads threads by `combine`, for every thread;
// per_warp: kQuantThreads / 32 floats of shared memory, not in use by another call.
template <typename Combine>
__device__ __forceinline__ float block_combine(float value, float* per_warp, Combine combine) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    value = combine(value, __shfl_xor_sync(0xffffffff, value, off));
  }
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = value;
  __syncthreads();
  value = per_warp[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; w++) value = combine(value, per_warp[w]);
  return value;
}

__device__ __forceinline__ float block_absmax(float amax) {
  __shared__ float warp_max[kQuantThreads / 32];
  return block_combine(amax, warp_max, [](float a, float b) { return fmaxf(a, b); });
}

}  // namespace qqq
