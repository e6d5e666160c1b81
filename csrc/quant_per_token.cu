// Per-token symmetric int8 quantization, bit-identical to vllm_qqq.reference.quantize_per_token:
// scale = absmax / 127 (fp32, IEEE division), q = round_half_even(x / scale) clamped to int8,
// an all-zero row gets scale 0 and q 0. One block per row, two passes over the row (the second
// mostly from L1/L2), 16-byte accesses.
#include "common.cuh"
#include "kernels.h"

namespace qqq {

constexpr int kQuantThreads = 256;
// Launched as a programmatic dependent launch after whatever kernel precedes it (vLLM's norm or
// activation): measured 0.5-0.7 us less per call on qkv / o at M = 1-64, gemm_h100_quant_pdl.log.
static bool quant_pdl = true;
void set_quant_pdl(bool on) { quant_pdl = on; }

template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quant_per_token_kernel(const T* __restrict__ x,
                                                                        int k,
                                                                        int8_t* __restrict__ q,
                                                                        float* __restrict__ scale) {
  allow_dependent_grid();  // the GEMM may start its weight prefetch now (common.cuh)
  wait_for_prior_grid();   // launched early itself (set_quant_pdl): x is written by then
  const size_t row = blockIdx.x;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * k);
  const int vecs = k / 8;  // 8 elements of 2 bytes per 16-byte vector

  float amax = 0.f;
  for (int i = threadIdx.x; i < vecs; i += kQuantThreads) {
    uint4 v = xr[i];
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(OutType<T>::to_float(e[j])));
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, off));
  __shared__ float warp_max[kQuantThreads / 32];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; w++) amax = fmaxf(amax, warp_max[w]);

  const float s = __fdiv_rn(amax, 127.f);
  if (threadIdx.x == 0) scale[row] = s;
  uint2* qr = reinterpret_cast<uint2*>(q + row * k);
  for (int i = threadIdx.x; i < vecs; i += kQuantThreads) {
    uint4 v = xr[i];
    const T* e = reinterpret_cast<const T*>(&v);
    uint32_t packed[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        int qi = 0;
        if (s > 0.f) {
          float r = rintf(__fdiv_rn(OutType<T>::to_float(e[4 * h + j]), s));
          qi = static_cast<int>(fminf(fmaxf(r, -128.f), 127.f));
        }
        word |= (static_cast<uint32_t>(qi) & 0xff) << (8 * j);
      }
      packed[h] = word;
    }
    qr[i] = make_uint2(packed[0], packed[1]);
  }
}

void quant_per_token(const void* x, int dtype, int m, int k, int8_t* q, float* scale,
                     cudaStream_t stream) {
  if (k % 8 != 0) throw std::invalid_argument("vllm_qqq: quant_per_token needs K % 8 == 0");
  if (reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(q) % 8) {
    throw std::invalid_argument("vllm_qqq: quant_per_token needs 16-byte aligned rows");
  }
  if (m == 0) return;
  const bool pdl = quant_pdl && pdl_supported();
  if (dtype == kFloat16) {
    launch_kernel(quant_per_token_kernel<half>, dim3(m), dim3(kQuantThreads), 0, stream,
                  pdl, "quant_per_token launch", static_cast<const half*>(x), k, q, scale);
  } else if (dtype == kBFloat16) {
    launch_kernel(quant_per_token_kernel<__nv_bfloat16>, dim3(m), dim3(kQuantThreads), 0, stream,
                  pdl, "quant_per_token launch", static_cast<const __nv_bfloat16*>(x), k, q,
                  scale);
  } else {
    throw std::invalid_argument("vllm_qqq: quant_per_token takes fp16 or bf16");
  }
}

}  // namespace qqq
