// Thread-block clusters (sm_90+): the barrier and distributed shared memory that let the CTAs of
// one cluster combine a per-row value (silu_mul_quant.cu, add_rms_norm_quant.cu). The kernels
// that use them run with clusters only on sm_90+; on older GPUs these compile to nothing.
#pragma once

#include "common.cuh"

namespace qqq {

constexpr int kClusterCtas = 8;  // a row's CTAs: the largest portable cluster

// Whether a row kernel takes m rows in clusters: on sm_90+, up to max_rows rows, and within the
// grid's y limit (a row each).
inline bool rows_in_clusters(int m, int max_rows) {
  return m <= max_rows && m <= 65535 && pdl_supported();
}

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
#endif
  return rank;
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
// value -> the float at `local` (a shared-memory address of this CTA) in CTA `rank`'s shared
// memory.
__device__ __forceinline__ void store_to_cluster_rank(const float* local, uint32_t rank,
                                                      float value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(remote)
               : "r"(smem_addr(local)), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(value) : "memory");
#endif
}

// Every CTA of the cluster gets `value` of every other (each CTA's thread c < kCtas stores it into
// CTA c's slots[rank]), combined by `combine`. Before the first call, the cluster must have
// passed cluster_arrive_relaxed() + cluster_wait() (all its CTAs running); slots must not be
// reused by a later call (a CTA may still be reading them).
template <int kCtas, typename Combine>
__device__ __forceinline__ float cluster_combine(float value, float* slots, Combine combine) {
  if (threadIdx.x < kCtas) store_to_cluster_rank(&slots[cluster_rank()], threadIdx.x, value);
  cluster_arrive();
  cluster_wait();
  float all = slots[0];
#pragma unroll
  for (int c = 1; c < kCtas; c++) all = combine(all, slots[c]);
  return all;
}

}  // namespace qqq
