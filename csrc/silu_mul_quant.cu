// SiLU-and-mul with the per-token int8 quantization in one kernel: for x [M, 2D] (gate, up),
// h = silu(gate) * up as vLLM's SiluAndMul computes it in PyTorch (silu in fp32, rounded to the
// dtype; the product rounded to the dtype), then vllm_qqq.reference.quantize_per_token(h), bit
// for bit. Each CTA stages its share of h in shared memory, so x is read once and h never goes to
// global memory.
//
// Why not leave it to Inductor: its fused kernel gives a row one CTA, so at decode sizes the
// whole row (Llama-3-8B: 2 x 14336 values) streams through one SM (4.8 us at M = 1 on the H100,
// benchmarks/results/row_quant_h100.log). Here rows of batches up to 64 tokens are split over a
// cluster of kClusterCtas CTAs on as many SMs; the CTAs exchange their absmax through distributed
// shared memory. Longer batches take a CTA a row: a value costs ~40 instructions (PyTorch's expf
// and IEEE division, the rounding), and from some M on, the clusters' 8x the CTAs, their barriers
// and idle threads (32 of 256 at D = 14336; not profiled) cost more than they save (measured:
// clusters 6.98 against 9.56 us at M = 64, 17.45 against 13.59 at 256, 124.6 against 69.7 at
// 2048; row_quant_h100.log).
#include <stdexcept>
#include <string>

#include "cluster.cuh"
#include "kernels.h"
#include "quantize.cuh"

namespace qqq {

constexpr int kSiluClusterRowsDefault = 64;
static int cluster_max_rows = kSiluClusterRowsDefault;
void set_silu_cluster_rows(int rows) {
  cluster_max_rows = rows < 0 ? kSiluClusterRowsDefault : rows;
}
constexpr int kSiluMaxD = 32768;  // staging of one row's share: 64 KB of fp16/bf16 at most

// h = silu(g) * u for one 16-byte vector each of gate and up values: PyTorch's silu (x / (1 +
// exp(-x)) in fp32, IEEE division, rounded to T), then the product rounded to T (exact in fp32
// before that rounding: two 11- or 8-bit significands).
template <typename T>
__device__ __forceinline__ uint4 silu_mul_vector(const uint4& g, const uint4& u) {
  const T* ge = reinterpret_cast<const T*>(&g);
  const T* ue = reinterpret_cast<const T*>(&u);
  uint4 h;
  T* he = reinterpret_cast<T*>(&h);
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const float x = OutType<T>::to_float(ge[j]);
    const T silu = OutType<T>::from_float(__fdiv_rn(x, __fadd_rn(1.f, expf(-x))));
    he[j] = OutType<T>::from_float(
        __fmul_rn(OutType<T>::to_float(silu), OutType<T>::to_float(ue[j])));
  }
  return h;
}

// grid (kCtas, M) in clusters of kCtas: CTA (c, row) takes vectors [c * per, (c + 1) * per) of
// the row's D / 8; kCtas = 1: grid (M), a CTA a row (x, which takes any M).
template <typename T, int kCtas, bool kProduct>
__global__ void __launch_bounds__(kQuantThreads)
    silu_mul_quant_kernel(const T* __restrict__ x, int d, int8_t* __restrict__ q,
                          float* __restrict__ scale) {
  extern __shared__ uint4 staged[];
  __shared__ float cta_max[kCtas];
  if constexpr (kCtas > 1) cluster_arrive_relaxed();  // this CTA is running (see cluster_wait)
  // As the quantization kernel does when no GEMM is known to follow (common.cuh): the next
  // kernel launches once this one has waited for the kernel that wrote x.
  wait_for_prior_grid();
  allow_dependent_grid();

  const size_t row = kCtas > 1 ? blockIdx.y : blockIdx.x;
  const int vecs = d / 8, per = (vecs + kCtas - 1) / kCtas;
  const int begin = kCtas > 1 ? static_cast<int>(blockIdx.x) * per : 0;
  const int end = min(vecs, begin + per);
  const uint4* gate = reinterpret_cast<const uint4*>(x + row * 2 * d);
  const uint4* up = gate + vecs;
  float amax = 0.f;
  for (int first = begin + threadIdx.x; first < end; first += kLoadBatch * kQuantThreads) {
    uint4 g[kLoadBatch], u[kLoadBatch];
#pragma unroll
    for (int j = 0; j < kLoadBatch; j++) {
      const int i = first + j * kQuantThreads;
      if (i < end) g[j] = load_vector(gate + i), u[j] = load_vector(up + i);
    }
#pragma unroll
    for (int j = 0; j < kLoadBatch; j++) {
      const int i = first + j * kQuantThreads;
      if (i < end) {
        const uint4 h = silu_mul_vector<T>(g[j], u[j]);
        staged[i - begin] = h;
        amax = vector_absmax<T>(h, amax);
      }
    }
  }
  amax = block_absmax(amax);
  if constexpr (kCtas > 1) {
    cluster_wait();  // every CTA of the cluster runs
    amax = cluster_combine<kCtas>(amax, cta_max, [](float a, float b) { return fmaxf(a, b); });
  }
  const float s = __fdiv_rn(amax, 127.f), r = kProduct ? reciprocal(s) : 0.f;
  if (begin == 0 && threadIdx.x == 0) scale[row] = s;
  uint2* qr = reinterpret_cast<uint2*>(q + row * d);
  for (int i = begin + threadIdx.x; i < end; i += kQuantThreads) {
    // This thread's own vectors.
    qr[i] = quantize_vector<T, kProduct>(load_shared_vector(staged + (i - begin)), s, r);
  }
}

template <typename T, int kCtas, bool kProduct>
static void launch_silu_mul_quant(const T* x, int m, int d, int8_t* q, float* scale,
                                  cudaStream_t stream) {
  constexpr auto kernel = silu_mul_quant_kernel<T, kCtas, kProduct>;
  allow_smem<kernel, kSiluMaxD / kCtas * static_cast<int>(sizeof(T))>();
  const int per = (d / 8 + kCtas - 1) / kCtas;
  launch_kernel_clusters(kernel, kCtas > 1 ? dim3(kCtas, m) : dim3(m), dim3(kQuantThreads),
                         per * 16, stream, pdl_supported(), kCtas, "silu_mul_quant launch", x, d,
                         q, scale);
}

template <typename T>
static void launch_silu_mul_quant(const T* x, int m, int d, int8_t* q, float* scale,
                                  cudaStream_t stream) {
  if (rows_in_clusters(m, cluster_max_rows)) {
    launch_silu_mul_quant<T, kClusterCtas, false>(x, m, d, q, scale, stream);
  } else if (quantize_by_product(m)) {
    launch_silu_mul_quant<T, 1, true>(x, m, d, q, scale, stream);
  } else {
    launch_silu_mul_quant<T, 1, false>(x, m, d, q, scale, stream);
  }
}

void silu_mul_quant(const void* x, int dtype, int m, int d, int8_t* q, float* scale,
                    cudaStream_t stream) {
  if (d % 8 != 0 || d > kSiluMaxD) {
    throw std::invalid_argument("vllm_qqq: silu_mul_quant needs D % 8 == 0 and D <= " +
                                std::to_string(kSiluMaxD) + ", got D = " + std::to_string(d));
  }
  if (reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(q) % 8) {
    throw std::invalid_argument("vllm_qqq: silu_mul_quant needs 16-byte aligned rows");
  }
  if (m == 0) return;
  if (dtype == kFloat16) {
    launch_silu_mul_quant(static_cast<const half*>(x), m, d, q, scale, stream);
  } else if (dtype == kBFloat16) {
    launch_silu_mul_quant(static_cast<const __nv_bfloat16*>(x), m, d, q, scale, stream);
  } else {
    throw std::invalid_argument("vllm_qqq: silu_mul_quant takes fp16 or bf16");
  }
}

}  // namespace qqq
