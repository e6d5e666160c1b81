// Per-token symmetric int8 quantization, bit-identical to vllm_qqq.reference.quantize_per_token:
// scale = absmax / 127 (fp32, IEEE division), q = round_half_even(x / scale) clamped to int8,
// an all-zero row gets scale 0 and q 0. One block per row, 16-byte accesses; rows of up to
// 16384 entries are read once into registers. From kProductMinRows rows, each x / scale is x
// times the row's reciprocal, with the IEEE division only where that could round to another
// integer (round_quotient).
#include "kernels.h"
#include "quantize.cuh"

namespace qqq {

// Launched as a programmatic dependent launch after whatever kernel precedes it (vLLM's norm or
// activation): measured 0.5-0.7 us less per call on qkv / o at M = 1-64, gemm_h100_quant_pdl.log.
static bool quant_pdl = true;
void set_quant_pdl(bool on) { quant_pdl = on; }
// The reciprocal's product instead of the division from this many rows, where the kernel is
// bound by its instructions rather than by latency: quantization alone, M = 1024, qkv / o /
// gate_up / down 7.0 / 6.7 / 7.3 / 20.3 us against 7.6 / 7.5 / 7.6 / 22.0 (M = 4096 18.9 /
// 18.7 / 20.3 / 63.4 against 21.0 / 21.0 / 22.1 / 68.9); at M = 1-16 it was 0.2-1.2 us slower
// (likely its branch per entry, which keeps a thread's 8-64 entries from overlapping; not
// profiled), gemm_h100_quant_product.log.
constexpr int kProductMinRows = 1024;
static int quant_product = -1;  // set_quant_product
void set_quant_product(int mode) { quant_product = mode; }
bool quantize_by_product(int m) {
  return quant_product < 0 ? m >= kProductMinRows : quant_product > 0;
}

// kVecs > 0: the row (at most kVecs vectors per thread) is read once, all loads in flight at
// once, and kept in registers: one memory round trip, where a loop over the row had one per
// iteration and a second pass (measured: 4.6 us for one 4096-wide row, Nsight Compute, cold).
// kVecs = 0: any K, two passes over the row (the second mostly from L1/L2).
template <typename T, int kVecs, bool kProduct>
__global__ void __launch_bounds__(kQuantThreads) quant_per_token_kernel(const T* __restrict__ x,
                                                                        int k,
                                                                        int8_t* __restrict__ q,
                                                                        float* __restrict__ scale,
                                                                        bool gemm_follows) {
  // Launched early itself (set_quant_pdl), it waits for the kernel that wrote x. The GEMM after
  // it may start its weight prefetch at once (kernels.h); any other kernel only after the wait.
  if (gemm_follows) allow_dependent_grid();
  wait_for_prior_grid();
  if (!gemm_follows) allow_dependent_grid();
  const size_t row = blockIdx.x;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * k);
  uint2* qr = reinterpret_cast<uint2*>(q + row * k);
  const int vecs = k / 8;  // 8 elements of 2 bytes per 16-byte vector

  float amax = 0.f;
  if constexpr (kVecs > 0) {
    uint4 v[kVecs];
#pragma unroll
    for (int j = 0; j < kVecs; j++) {
      const int i = threadIdx.x + j * kQuantThreads;
      v[j] = i < vecs ? load_vector(xr + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < kVecs; j++) amax = vector_absmax<T>(v[j], amax);
    const float s = __fdiv_rn(block_absmax(amax), 127.f), r = kProduct ? reciprocal(s) : 0.f;
    if (threadIdx.x == 0) scale[row] = s;
#pragma unroll
    for (int j = 0; j < kVecs; j++) {
      const int i = threadIdx.x + j * kQuantThreads;
      if (i < vecs) qr[i] = quantize_vector<T, kProduct>(v[j], s, r);
    }
  } else {
    for (int i = threadIdx.x; i < vecs; i += kQuantThreads) {
      amax = vector_absmax<T>(load_vector(xr + i), amax);
    }
    const float s = __fdiv_rn(block_absmax(amax), 127.f), r = kProduct ? reciprocal(s) : 0.f;
    if (threadIdx.x == 0) scale[row] = s;
    for (int i = threadIdx.x; i < vecs; i += kQuantThreads) {
      qr[i] = quantize_vector<T, kProduct>(load_vector(xr + i), s, r);
    }
  }
}

// The kernel for rows of `vecs` 16-byte vectors: the smallest register variant that holds them.
template <typename T, bool kProduct>
static void launch_quant(const T* x, int m, int k, int8_t* q, float* scale, bool gemm_follows,
                         bool pdl, cudaStream_t stream) {
  const int per_thread = (k / 8 + kQuantThreads - 1) / kQuantThreads;
  auto go = [&](auto kernel) {
    launch_kernel(kernel, dim3(m), dim3(kQuantThreads), 0, stream, pdl, "quant_per_token launch",
                  x, k, q, scale, gemm_follows);
  };
  if (per_thread <= 1) {
    go(quant_per_token_kernel<T, 1, kProduct>);
  } else if (per_thread <= 2) {
    go(quant_per_token_kernel<T, 2, kProduct>);
  } else if (per_thread <= 4) {
    go(quant_per_token_kernel<T, 4, kProduct>);
  } else if (per_thread <= 8) {
    go(quant_per_token_kernel<T, 8, kProduct>);
  } else {
    go(quant_per_token_kernel<T, 0, kProduct>);
  }
}

template <typename T>
static void launch_quant(const T* x, int m, int k, int8_t* q, float* scale, bool gemm_follows,
                         bool pdl, cudaStream_t stream) {
  if (quantize_by_product(m)) {
    launch_quant<T, true>(x, m, k, q, scale, gemm_follows, pdl, stream);
  } else {
    launch_quant<T, false>(x, m, k, q, scale, gemm_follows, pdl, stream);
  }
}

void quant_per_token(const void* x, int dtype, int m, int k, int8_t* q, float* scale,
                     bool gemm_follows, cudaStream_t stream) {
  if (k % 8 != 0) throw std::invalid_argument("vllm_qqq: quant_per_token needs K % 8 == 0");
  if (reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(q) % 8) {
    throw std::invalid_argument("vllm_qqq: quant_per_token needs 16-byte aligned rows");
  }
  if (m == 0) return;
  const bool pdl = quant_pdl && pdl_supported();
  if (dtype == kFloat16) {
    launch_quant(static_cast<const half*>(x), m, k, q, scale, gemm_follows, pdl, stream);
  } else if (dtype == kBFloat16) {
    launch_quant(static_cast<const __nv_bfloat16*>(x), m, k, q, scale, gemm_follows, pdl, stream);
  } else {
    throw std::invalid_argument("vllm_qqq: quant_per_token takes fp16 or bf16");
  }
}

}  // namespace qqq
