// W4A8 GEMM for M <= 16 without split-K: narrow tiles of 32 channels, K split over the warps of
// one CTA instead of over CTAs. The split-K kernel (w4a8_gemm.cu) pays, at the end of every
// call, a handshake through L2 (partial tiles stored, fence, counter, partials loaded back);
// here the 8 warps of a CTA each take one 128-deep block of every 1024-deep stage and add their
// partial tiles in shared memory. N / 32 CTAs (qkv 192, o and down 128 on the Llama-3-8B
// shapes) each stream their 32 channels over all of K. Which M <= 16 calls come here:
// narrow_default (kernels.h).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "cluster.cuh"
#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"
#include "stage_copies.cuh"
#include "tma.cuh"

namespace qqq {

namespace {

constexpr int kNarrowThreads = 256;
constexpr int kNarrowWarps = kNarrowThreads / 32;
// Channels per CTA: 32 (4 n8 tiles) by default; 16 is a candidate for g128, whose decode makes
// the loop issue-bound: twice the CTAs, so more warps per SM (down: 128 CTAs of 32 channels
// leave one CTA, 2 warps per scheduler, on each SM) and an even load (qkv: 192 CTAs on 132 SMs
// put two on 60 of them; 384 put 2-3 on every SM).
constexpr int kNarrowBN = 32;
constexpr int kNarrowBM = 16;   // tokens: one m16 tile
// Ring depth: 3 stages (2 CTAs per SM) where the N tiles outnumber the SMs; where they do not
// (one CTA per SM either way), a deeper ring keeps more bytes in flight: 4 stages up to K = 4096
// (all of it), 6 above. Measured on the H100 at M = 1 / 16 (gemm_h100_narrow.log): o 5.8 / 6.2 us
// with 4 stages vs 5.8 / 6.8 with 3 and 6.2 / 6.5 with 6; down 13.1 / 14.7 with 6 vs 13.8 / 15.2
// with 4 and 14.5 / 17.5 with 3; qkv (192 tiles) 7.2 / 8.0 with 3 vs 9.4 / 10.2 with 4 (1.5 waves).
constexpr int kNarrowStages = 3;
constexpr int kNarrowDeepStages = 4;
constexpr int kNarrowDeeperStages = 6;
constexpr int kBlockK = 128;    // one warp's k block per stage

// The layout for NB channels per CTA. Copy groups of COPY_THREADS threads (128 for 32 channels,
// 64 for 16: a k block's weights are then 64 16-byte pieces) each copy BLOCKS_PER_GROUP of a
// stage's 8 k blocks, one after the other. One k block's slot: activations [16 rows][128 bytes]
// (swizzled), weights [4 k32][NB / 8 n8][32 words], the block's group scales [NB channels].
// With clusters (CLUSTER > 1) the copy engine writes the activations, whose 128-byte swizzle is
// anchored at 1024-byte aligned addresses: a stage then holds its 8 blocks' activations first,
// then their weights and scales, and starts 1024-byte aligned.
template <int NB, int CLUSTER = 1>
struct Narrow {
  static constexpr int NT = NB / 8;
  static constexpr int COPY_THREADS = NB == 32 ? 128 : 64;
  static constexpr int BLOCKS_PER_GROUP = kNarrowWarps / (kNarrowThreads / COPY_THREADS);
  static constexpr int SLOT_A = kNarrowBM * kBlockK;
  static constexpr int SLOT_B = (kBlockK / 32) * NT * 32 * 4;
  static constexpr int SLOT_BYTES = SLOT_A + SLOT_B + NB * 2;
  static constexpr int STAGE_BYTES = CLUSTER == 1
                                         ? kNarrowWarps * SLOT_BYTES
                                         : (kNarrowWarps * SLOT_BYTES + 1023) / 1024 * 1024;
  // Shared memory for a ring of `stages`: with clusters, room to align the ring and, after it,
  // each stage's two barriers.
  static constexpr int smem_bytes(int stages) {
    return stages * STAGE_BYTES + (CLUSTER == 1 ? 0 : 1024 + 2 * stages * 8);
  }
  // k block `block` of ring stage `stage`: its activations, and its weights (scales after them).
  __device__ static uint8_t* a_slot(uint8_t* ring, int stage, int block) {
    return ring + stage * STAGE_BYTES + block * (CLUSTER == 1 ? SLOT_BYTES : SLOT_A);
  }
  __device__ static uint8_t* b_slot(uint8_t* ring, int stage, int block) {
    return CLUSTER == 1 ? a_slot(ring, stage, block) + SLOT_A
                        : ring + stage * STAGE_BYTES + kNarrowWarps * SLOT_A +
                              block * (SLOT_B + NB * 2);
  }
  static_assert(kNarrowWarps * NT * 4 * 32 * 4 <= 2 * STAGE_BYTES, "reduction fits the ring");
  static_assert(6 * STAGE_BYTES + 1024 + 96 <= 227 * 1024, "6 stages fit one SM");
};
// CTAs per SM for a ring of STAGES (shared memory: 33 KB a stage for 32 channels, 24 KB for 16),
// at most 3.
template <int NB, int STAGES, int CLUSTER>
constexpr int kNarrowCtasPerSm =
    std::min(3, (227 * 1024) / (Narrow<NB, CLUSTER>::smem_bytes(STAGES) + 1024));

// CLUSTER > 1 (sm_90+): CLUSTER CTAs of neighbouring channels share the activations. Each stage's
// k blocks are split among them, and each CTA's copy engine multicasts its blocks into the same
// slot of every CTA of the cluster, so a stage's activations leave L2 once per cluster instead of
// once per CTA (at M = 16 as many bytes as a CTA's weights on every shape). A stage's barrier
// `full` completes when all its activation bytes have landed; `empty` when every CTA of the
// cluster has done with the stage's slot, before any of them copies into it again.
template <typename Out, bool GROUPED, int STAGES, int NB, int CLUSTER>
__global__ void __launch_bounds__(kNarrowThreads, kNarrowCtasPerSm<NB, STAGES, CLUSTER>)
    w4a8_narrow_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale,
                       const uint32_t* __restrict__ b, const float* __restrict__ scale,
                       const half* __restrict__ group, const Out* __restrict__ bias,
                       Out* __restrict__ out, int m, int n, int k,
                       const __grid_constant__ CUtensorMap a_map) {
  using L = Narrow<NB, CLUSTER>;
  // The cluster kernels exist only where clusters do (sm_90+; the host launches them only there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  constexpr bool kMulticast = false;
  if constexpr (CLUSTER > 1) __trap();
#else
  constexpr bool kMulticast = CLUSTER > 1;
#endif
  constexpr int kNarrowNT = L::NT, kSlotA = L::SLOT_A;
  constexpr int kBlocksPerGroup = L::BLOCKS_PER_GROUP;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* smem =
      CLUSTER > 1 ? smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023) : smem_raw;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * L::STAGE_BYTES);
  uint64_t* empty = full + STAGES;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n0 = blockIdx.x * NB;
  const int kblocks = k / kBlockK;
  const int iters = (kblocks + kNarrowWarps - 1) / kNarrowWarps;
  (void)kSlotA;

  // This thread copies k blocks copy_group * kBlocksPerGroup .. + kBlocksPerGroup - 1 of every
  // stage.
  const int copy_group = tid / L::COPY_THREADS;
  StageCopies<kNarrowBM, L::COPY_THREADS, NB, GROUPED> copies(
      a, b, group, m, n, k, 0, n0, copy_group * kBlocksPerGroup, tid % L::COPY_THREADS);
  // Stage `it`'s k blocks of this copy group into its ring slots. The copies advance one k block
  // per copy; past the group's blocks of the stage they skip the other groups'.
  auto load = [&](int it, bool activations) {
#pragma unroll
    for (int j = 0; j < kBlocksPerGroup; j++) {
      const int block = copy_group * kBlocksPerGroup + j;
      if (it * kNarrowWarps + block < kblocks) {
        if (activations) {
          copies.activations(L::a_slot(smem, it % STAGES, block));
        } else {
          uint8_t* w = L::b_slot(smem, it % STAGES, block);
          copies.weights(reinterpret_cast<uint32_t*>(w), reinterpret_cast<half*>(w + L::SLOT_B));
        }
      }
    }
    constexpr int kSkip = kNarrowWarps - kBlocksPerGroup;
    if (activations) {
      copies.a_src += kSkip * kBlockK;
    } else {
      copies.w_src += static_cast<size_t>(kSkip) * (kBlockK / 32) * copies.n8_tiles * 32;
      if constexpr (GROUPED) copies.g_src += static_cast<size_t>(kSkip) * n;
    }
  };
  // With clusters: stage `it`'s activations, this CTA's share of its k blocks multicast to the
  // whole cluster (one thread). The barrier expects the stage's bytes from all the cluster.
  [[maybe_unused]] const uint32_t rank = cluster_rank();
  auto multicast = [&](int it) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int blocks = min(kNarrowWarps, kblocks - it * kNarrowWarps);
    uint64_t* bar = &full[it % STAGES];
    mbarrier_arrive_expect(bar, blocks * kSlotA);
    for (int block = rank; block < blocks; block += CLUSTER) {
      tensor_copy_2d_multicast(L::a_slot(smem, it % STAGES, block), &a_map,
                               (it * kNarrowWarps + block) * kBlockK, 0, bar,
                               static_cast<uint16_t>((1u << CLUSTER) - 1));
    }
#endif
  };

  if constexpr (kMulticast) {
    if (tid == 0) {
      for (int s = 0; s < STAGES; s++) {
        mbarrier_init(&full[s], 1);
        mbarrier_init(&empty[s], CLUSTER);
      }
      fence_mbarrier_init();
    }
    cluster_arrive_relaxed();  // waited for below: the cluster's barriers are ready
  }

  // Epilogue operands first (thread t writes channels j = t / 64, rows h = (t / 32) % 2 of the
  // fragment pairs of `lane`; with 16 channels, threads 0-127 alone), so that the end of the
  // kernel waits for the sums alone.
  const int out_j = tid / 64, out_h = (tid / 32) % 2;
  const bool out_thread = NB == 32 || out_j < kNarrowNT;
  const int out_row = lane / 4 + out_h * 8;
  const int out_col = n0 + out_j * 8 + (lane % 4) * 2;
  float2 out_sc = make_float2(0.f, 0.f), out_bs = make_float2(0.f, 0.f);
  if (out_thread) {
    out_sc = *reinterpret_cast<const float2*>(scale + out_col);
    out_bs = bias_pair(bias, out_col);
  }

  int acc[kNarrowNT][4] = {};
  // Weights of the first stages before waiting for the kernel that wrote the activations.
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < iters) load(s, false);
  }
  if constexpr (kMulticast) cluster_wait();
  wait_for_prior_grid();
  const float out_ts = out_row < m ? load_produced(a_scale + out_row) : 0.f;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if constexpr (kMulticast) {
      if (tid == 0 && s < iters) multicast(s);
    } else {
      if (s < iters) load(s, true);
    }
    cp_async_commit();
  }

  for (int it = 0; it < iters; it++) {
    cp_async_wait<STAGES - 2>();
    if constexpr (kMulticast) mbarrier_wait(&full[it % STAGES], (it / STAGES) & 1);
    __syncthreads();
    if (it + STAGES - 1 < iters) {
      load(it + STAGES - 1, false);
      if constexpr (kMulticast) {
        // The slot of stage it - 1 is free here; the copy into it waits until it is free in
        // every CTA of the cluster.
        if (tid < CLUSTER && it > 0) mbarrier_arrive_cluster(&empty[(it - 1) % STAGES], tid);
        if (tid == 0) {
          const int next = it + STAGES - 1;
          if (next >= STAGES) mbarrier_wait(&empty[next % STAGES], (next / STAGES - 1) & 1);
          multicast(next);
        }
      } else {
        load(it + STAGES - 1, true);
      }
    }
    cp_async_commit();

    if (it * kNarrowWarps + warp >= kblocks) continue;  // past K: this warp's block is empty
    const uint8_t* s = L::a_slot(smem, it % STAGES, warp);
    const uint32_t* sb = reinterpret_cast<const uint32_t*>(L::b_slot(smem, it % STAGES, warp));
    uint32_t s2[kNarrowNT];
    if constexpr (GROUPED) {
      const half* ss = reinterpret_cast<const half*>(sb + L::SLOT_B / 4);
#pragma unroll
      for (int j = 0; j < kNarrowNT; j++) {
        s2[j] = static_cast<uint32_t>(__half_as_ushort(ss[j * 8 + lane / 4])) * 0x10001u;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kBlockK / 32; ks++) {
      uint32_t af[4];
      const int r = lane % 16, c = ks * 2 + lane / 16;
      ldmatrix_x4(af, s + r * kBlockK + ((c ^ (r % 8)) * 16));
#pragma unroll
      for (int j = 0; j < kNarrowNT; j++) {
        const uint32_t w = sb[(ks * kNarrowNT + j) * 32 + lane];
        uint32_t b0, b1;
        if constexpr (GROUPED) {
          decode_group(w, s2[j], b0, b1);
        } else {
          decode_channel(w, b0, b1);
        }
        mma_s8(acc[j], af, b0, b1);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: the warps' partial tiles go there
  // With clusters, no CTA may leave while another may still arrive on its barriers: every arrival
  // precedes its CTA's end of the main loop, here.
  if constexpr (kMulticast) cluster_arrive();

  int* red = reinterpret_cast<int*>(smem);  // [warp][j][e][lane]
#pragma unroll
  for (int j = 0; j < kNarrowNT; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) red[((warp * kNarrowNT + j) * 4 + e) * 32 + lane] = acc[j][e];
  __syncthreads();
  if (out_thread) {
    int v0 = 0, v1 = 0;
#pragma unroll
    for (int w = 0; w < kNarrowWarps; w++) {
      v0 += red[((w * kNarrowNT + out_j) * 4 + 2 * out_h) * 32 + lane];
      v1 += red[((w * kNarrowNT + out_j) * 4 + 2 * out_h + 1) * 32 + lane];
    }
    if (out_row < m) {
      store_scaled_pair(out, n, out_row, out_col, v0, v1, out_ts, out_sc, out_bs,
                        bias != nullptr);
    }
  }
  if constexpr (kMulticast) cluster_wait();
}

template <typename Out, bool GROUPED, int STAGES, int NB, int CLUSTER>
void launch_narrow(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                   const half* group, const void* bias, void* out, int m, int n, int k, bool pdl,
                   cudaStream_t stream) {
  constexpr auto kernel = w4a8_narrow_kernel<Out, GROUPED, STAGES, NB, CLUSTER>;
  constexpr int smem = Narrow<NB, CLUSTER>::smem_bytes(STAGES);
  allow_smem<kernel, smem>();
  const CUtensorMap a_map = CLUSTER > 1 ? activation_map(a, m, k, kNarrowBM) : CUtensorMap{};
  launch_kernel_clusters(kernel, dim3(n / NB), dim3(kNarrowThreads), smem, stream, pdl, CLUSTER,
                         "w4a8_gemm narrow launch", a, a_scale, b, scale, group,
                         static_cast<const Out*>(bias), static_cast<Out*>(out), m, n, k, a_map);
}

template <typename Out, bool GROUPED, int STAGES, int NB>
void launch_narrow_cluster(int cluster, const int8_t* a, const float* a_scale, const uint32_t* b,
                           const float* scale, const half* group, const void* bias, void* out,
                           int m, int n, int k, bool pdl, cudaStream_t stream) {
  // Clusters only for 32 channels and the rule's ring depths (fewer kernels to build).
  constexpr bool kClusters = NB == kNarrowBN && STAGES != 2;
  const auto launch = !kClusters || cluster <= 1
                          ? launch_narrow<Out, GROUPED, STAGES, NB, 1>
                      : cluster == 2 ? launch_narrow<Out, GROUPED, STAGES, NB, kClusters ? 2 : 1>
                                     : launch_narrow<Out, GROUPED, STAGES, NB, kClusters ? 4 : 1>;
  launch(a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
}

template <typename Out, bool GROUPED, int NB>
void launch_narrow_stages(int stages, int cluster, const int8_t* a, const float* a_scale,
                          const uint32_t* b, const float* scale, const half* group,
                          const void* bias, void* out, int m, int n, int k, bool pdl,
                          cudaStream_t stream) {
  const auto launch = stages == 2   ? launch_narrow_cluster<Out, GROUPED, 2, NB>
                      : stages == 4 ? launch_narrow_cluster<Out, GROUPED, kNarrowDeepStages, NB>
                      : stages == 6 ? launch_narrow_cluster<Out, GROUPED, kNarrowDeeperStages, NB>
                                    : launch_narrow_cluster<Out, GROUPED, kNarrowStages, NB>;
  launch(cluster, a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
}

template <typename Out, bool GROUPED>
void launch_narrow_channels(int channels, int stages, int cluster, const int8_t* a,
                            const float* a_scale, const uint32_t* b, const float* scale,
                            const half* group, const void* bias, void* out, int m, int n, int k,
                            bool pdl, cudaStream_t stream) {
  (channels == 16 ? launch_narrow_stages<Out, GROUPED, 16>
                  : launch_narrow_stages<Out, GROUPED, kNarrowBN>)(
      stages, cluster, a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
}

int narrow_stages = 0;    // set_narrow_stages; 0: by the rule above
int narrow_channels = 0;  // set_narrow_channels; 0: kNarrowBN
int narrow_cluster = 0;   // set_narrow_cluster; 0 or 1: no clusters

}  // namespace

void w4a8_gemm_narrow(const int8_t* a, const float* a_scale, const uint32_t* b,
                      const float* scale, const half* group, const void* bias, void* out,
                      int out_dtype, int m, int n, int k, int sms, bool pdl,
                      cudaStream_t stream) {
  const int channels = narrow_channels > 0 ? narrow_channels : kNarrowBN;
  if (m > kNarrowBM || n % channels || k % kBlockK) {
    throw std::invalid_argument("vllm_qqq: the narrow W4A8 kernel takes M <= 16, N % " +
                                std::to_string(channels) + " == 0, K % 128 == 0");
  }
  const bool grouped = group != nullptr;
  const int stages = narrow_stages > 0      ? narrow_stages
                     : n / channels > sms   ? kNarrowStages
                     : k <= 4096            ? kNarrowDeepStages
                                            : kNarrowDeeperStages;
  // Clusters where the copy engine and clusters exist, of 32-channel CTAs that divide evenly.
  const int cluster = narrow_cluster > 1 && channels == kNarrowBN && stages != 2 &&
                              (n / channels) % narrow_cluster == 0 && wgmma_available()
                          ? narrow_cluster
                          : 1;
  if (out_dtype == kFloat16) {
    (grouped ? launch_narrow_channels<half, true> : launch_narrow_channels<half, false>)(
        channels, stages, cluster, a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
  } else {
    (grouped ? launch_narrow_channels<__nv_bfloat16, true>
             : launch_narrow_channels<__nv_bfloat16, false>)(
        channels, stages, cluster, a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
  }
}

void set_narrow_stages(int stages) { narrow_stages = stages; }

void set_narrow_channels(int channels) {
  if (channels != 0 && channels != 16 && channels != 32) {
    throw std::invalid_argument("vllm_qqq: the narrow kernel takes 16 or 32 channels per CTA");
  }
  narrow_channels = channels;
}

void set_narrow_cluster(int ctas) {
  if (ctas != 0 && ctas != 1 && ctas != 2 && ctas != 4) {
    throw std::invalid_argument("vllm_qqq: the narrow kernel's clusters take 1, 2 or 4 CTAs");
  }
  narrow_cluster = ctas;
}

}  // namespace qqq
