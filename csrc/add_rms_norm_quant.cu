// vLLM's fused add + RMSNorm with the per-token int8 quantization in one kernel: for x, residual
// [M, H] and weight [H] (fp16/bf16), as vLLM's fused_add_rms_norm computes it in PyTorch
// (vllm/ir/ops/layernorm.py): s = float(x) + float(residual); residual_out = s rounded to the
// dtype; y = s * rsqrt(mean(s^2) + eps), rounded to the dtype, times weight, rounded; then
// vllm_qqq.reference.quantize_per_token(y). The sum of squares adds up in another order than
// PyTorch's, so y may differ from it in the last place now and then (and a code by one).
//
// A CTA a row: it stages the row's s in fp32 and the weight in shared memory, so that x, the
// residual and the weight are read in one round trip. For measurements, rows can also be split
// over a cluster of 8 CTAs as in silu_mul_quant.cu (the CTAs combine their sums of squares, then
// their absmax, through distributed shared memory); that was slower at every M measured.
#include <stdexcept>
#include <string>

#include "cluster.cuh"
#include "kernels.h"
#include "quantize.cuh"

namespace qqq {

constexpr int kNormMaxH = 16384;  // staging of one row's share: 96 KB at most (s and weight)
// Vectors of x, residual and weight in flight per thread: two (one round trip for H = 4096),
// where kLoadBatch's four took 80 registers, 3 CTAs an SM.
constexpr int kNormLoadBatch = 2;
// A CTA a row at every M by default: it was faster than the clusters even at M = 1 (2.88 against
// 3.34 us for H = 4096; row_quant_h100.log), where a row's share is one vector a thread on 64 of
// a CTA's 256 threads and the two cluster barriers come on top. The clusters stay for
// set_norm_cluster_rows (measurements, tests).
constexpr int kNormClusterRowsDefault = 0;
static int norm_cluster_max_rows = kNormClusterRowsDefault;
void set_norm_cluster_rows(int rows) {
  norm_cluster_max_rows = rows < 0 ? kNormClusterRowsDefault : rows;
}

// The 8 values of y = T(T(s * inv) * w) for one vector of s (two float4) and one of the weight.
template <typename T>
__device__ __forceinline__ uint4 normalized_vector(const float4& s0, const float4& s1, float inv,
                                                   const uint4& w) {
  const float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
  const T* we = reinterpret_cast<const T*>(&w);
  uint4 y;
  T* ye = reinterpret_cast<T*>(&y);
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const T n = OutType<T>::from_float(__fmul_rn(s[j], inv));
    ye[j] = OutType<T>::from_float(__fmul_rn(OutType<T>::to_float(n), OutType<T>::to_float(we[j])));
  }
  return y;
}

// grid (kCtas, M) in clusters of kCtas, or (M) for kCtas = 1, as silu_mul_quant_kernel.
template <typename T, int kCtas, bool kProduct>
__global__ void __launch_bounds__(kQuantThreads)
    add_rms_norm_quant_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                              const T* __restrict__ weight, float eps, int h,
                              int8_t* __restrict__ q, float* __restrict__ scale,
                              T* __restrict__ residual_out) {
  // This CTA's vectors: s (two float4 each), then the weight's (uint4 each), so that the weight
  // is read with x and the residual, in the same round trip.
  extern __shared__ float4 sums[];
  __shared__ float per_warp_sum[kQuantThreads / 32];
  __shared__ float cta_sum[kCtas], cta_max[kCtas];
  if constexpr (kCtas > 1) cluster_arrive_relaxed();  // this CTA is running (cluster.cuh)
  wait_for_prior_grid();
  allow_dependent_grid();  // as quant_per_token without a GEMM known to follow (common.cuh)

  const size_t row = kCtas > 1 ? blockIdx.y : blockIdx.x;
  const int vecs = h / 8, per = (vecs + kCtas - 1) / kCtas;
  const int begin = kCtas > 1 ? static_cast<int>(blockIdx.x) * per : 0;
  const int end = min(vecs, begin + per);
  uint4* weights = reinterpret_cast<uint4*>(sums + 2 * per);
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * h);
  const uint4* rr = reinterpret_cast<const uint4*>(residual + row * h);
  uint4* ro = reinterpret_cast<uint4*>(residual_out + row * h);
  const uint4* wv = reinterpret_cast<const uint4*>(weight);

  float sumsq = 0.f;
  for (int first = begin + threadIdx.x; first < end; first += kNormLoadBatch * kQuantThreads) {
    uint4 xa[kNormLoadBatch], ra[kNormLoadBatch], wa[kNormLoadBatch];
#pragma unroll
    for (int j = 0; j < kNormLoadBatch; j++) {
      const int i = first + j * kQuantThreads;
      if (i < end) {
        xa[j] = load_vector(xr + i), ra[j] = load_vector(rr + i), wa[j] = load_vector(wv + i);
      }
    }
#pragma unroll
    for (int j = 0; j < kNormLoadBatch; j++) {
      const int i = first + j * kQuantThreads;
      if (i >= end) continue;
      const T* xe = reinterpret_cast<const T*>(&xa[j]);
      const T* re = reinterpret_cast<const T*>(&ra[j]);
      float v[8];
      uint4 rounded;
      T* oe = reinterpret_cast<T*>(&rounded);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        v[e] = __fadd_rn(OutType<T>::to_float(xe[e]), OutType<T>::to_float(re[e]));
        oe[e] = OutType<T>::from_float(v[e]);
        sumsq = __fmaf_rn(v[e], v[e], sumsq);
      }
      ro[i] = rounded;
      sums[2 * (i - begin)] = make_float4(v[0], v[1], v[2], v[3]);
      sums[2 * (i - begin) + 1] = make_float4(v[4], v[5], v[6], v[7]);
      weights[i - begin] = wa[j];
    }
  }
  const auto add = [](float a, float b) { return __fadd_rn(a, b); };
  const auto larger = [](float a, float b) { return fmaxf(a, b); };
  sumsq = block_combine(sumsq, per_warp_sum, add);
  if constexpr (kCtas > 1) {
    cluster_wait();  // every CTA of the cluster runs
    sumsq = cluster_combine<kCtas>(sumsq, cta_sum, add);
  }
  // PyTorch's mean: the sum times 1 / H.
  const float inv = rsqrtf(__fadd_rn(__fmul_rn(sumsq, 1.f / static_cast<float>(h)), eps));

  float amax = 0.f;
  for (int i = begin + threadIdx.x; i < end; i += kQuantThreads) {
    amax = vector_absmax<T>(normalized_vector<T>(sums[2 * (i - begin)],
                                                 sums[2 * (i - begin) + 1], inv,
                                                 load_shared_vector(weights + (i - begin))),
                            amax);
  }
  amax = block_absmax(amax);
  if constexpr (kCtas > 1) amax = cluster_combine<kCtas>(amax, cta_max, larger);
  const float sc = __fdiv_rn(amax, 127.f), r = kProduct ? reciprocal(sc) : 0.f;
  if (begin == 0 && threadIdx.x == 0) scale[row] = sc;
  uint2* qr = reinterpret_cast<uint2*>(q + row * h);
  for (int i = begin + threadIdx.x; i < end; i += kQuantThreads) {
    const uint4 y = normalized_vector<T>(sums[2 * (i - begin)], sums[2 * (i - begin) + 1], inv,
                                         load_shared_vector(weights + (i - begin)));
    qr[i] = quantize_vector<T, kProduct>(y, sc, r);
  }
}

template <typename T, int kCtas, bool kProduct>
static void launch_add_rms_norm_quant(const T* x, const T* residual, const T* weight, float eps,
                                      int m, int h, int8_t* q, float* scale, T* residual_out,
                                      cudaStream_t stream) {
  constexpr auto kernel = add_rms_norm_quant_kernel<T, kCtas, kProduct>;
  allow_smem<kernel, kNormMaxH / kCtas * 6>();  // 4 bytes of s and 2 of the weight a value
  const int per = (h / 8 + kCtas - 1) / kCtas;
  launch_kernel_clusters(kernel, kCtas > 1 ? dim3(kCtas, m) : dim3(m), dim3(kQuantThreads),
                         per * 48, stream, pdl_supported(), kCtas, "add_rms_norm_quant launch",
                         x, residual, weight, eps, h, q, scale, residual_out);
}

template <typename T>
static void launch_add_rms_norm_quant(const T* x, const T* residual, const T* weight, float eps,
                                      int m, int h, int8_t* q, float* scale, T* residual_out,
                                      cudaStream_t stream) {
  if (rows_in_clusters(m, norm_cluster_max_rows)) {
    launch_add_rms_norm_quant<T, kClusterCtas, false>(x, residual, weight, eps, m, h, q, scale,
                                                   residual_out, stream);
  } else if (quantize_by_product(m)) {
    launch_add_rms_norm_quant<T, 1, true>(x, residual, weight, eps, m, h, q, scale, residual_out,
                                          stream);
  } else {
    launch_add_rms_norm_quant<T, 1, false>(x, residual, weight, eps, m, h, q, scale,
                                           residual_out, stream);
  }
}

void add_rms_norm_quant(const void* x, const void* residual, const void* weight, float eps,
                        int dtype, int m, int h, int8_t* q, float* scale, void* residual_out,
                        cudaStream_t stream) {
  if (h % 8 != 0 || h > kNormMaxH) {
    throw std::invalid_argument("vllm_qqq: add_rms_norm_quant needs H % 8 == 0 and H <= " +
                                std::to_string(kNormMaxH) + ", got H = " + std::to_string(h));
  }
  for (const void* p : {x, residual, weight, static_cast<const void*>(residual_out)}) {
    if (reinterpret_cast<uintptr_t>(p) % 16) {
      throw std::invalid_argument("vllm_qqq: add_rms_norm_quant needs 16-byte aligned rows");
    }
  }
  if (reinterpret_cast<uintptr_t>(q) % 8) {
    throw std::invalid_argument("vllm_qqq: add_rms_norm_quant needs 8-byte aligned codes");
  }
  if (m == 0) return;
  if (dtype == kFloat16) {
    launch_add_rms_norm_quant(static_cast<const half*>(x), static_cast<const half*>(residual),
                              static_cast<const half*>(weight), eps, m, h, q, scale,
                              static_cast<half*>(residual_out), stream);
  } else if (dtype == kBFloat16) {
    launch_add_rms_norm_quant(static_cast<const __nv_bfloat16*>(x),
                              static_cast<const __nv_bfloat16*>(residual),
                              static_cast<const __nv_bfloat16*>(weight), eps, m, h, q, scale,
                              static_cast<__nv_bfloat16*>(residual_out), stream);
  } else {
    throw std::invalid_argument("vllm_qqq: add_rms_norm_quant takes fp16 or bf16");
  }
}

}  // namespace qqq
