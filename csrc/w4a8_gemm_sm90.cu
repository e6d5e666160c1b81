// W4A8 GEMM for Hopper (sm_90a) and M > 16: the product of w4a8_gemm.cu computed transposed,
// out^T[n, m] = W[n, k] . X[m, k]^T, on wgmma. Each warpgroup owns 64 output channels (wgmma's
// M) and the CTA's BM tokens are wgmma's N; the activations come from 128B-swizzled shared memory.
//
// Per stage of 128 k, the int8 activations (BM x 128) and the 4-bit weights (the kernel layout of
// vllm_qqq/ops.py) land in a ring of STAGES slots; each warpgroup decodes its weights to int8
// (decode.cuh) into registers, in wgmma's A-fragment order, and issues 4 wgmma m64nBMk32 with A
// from registers (two register buffers by the stage's parity, so one stage's wgmmas stay in
// flight while the next decodes; through shared memory instead was 5-19% slower at every tile
// measured: NOTES.md "GEMM"). Two ways to fill the ring:
// - a producer (TMA): the copy engine brings the activations as swizzled boxes of a tensor map
//   and the weights as bulk copies, completing on a full barrier per slot; the math warpgroups
//   release a slot on its empty barrier once their wgmmas that read it retire. No CTA barrier
//   per stage and no copy instructions in the math warps (measured 6-18% faster than the next
//   way: NOTES.md "GEMM").
// - every thread issuing cp.async (stage_copies.cuh) at the top of each stage, after a CTA
//   barrier (the 128-token tile with two CTAs per SM, which has no room for a producer warp's
//   registers).
//
// BM = 64, 128 or 256 tokens per CTA, with a deeper ring for the smaller tiles, where the loop
// waits on memory rather than on the tensor cores.
//
// Small grids (few N tiles, M <= 256) split K over blockIdx.z: each split stores its int32 tile
// to the workspace with plain stores, and the last split of a tile (an atomic counter) adds them
// in order and applies the epilogue. int32 sums are exact, so the result is the reference's.
// The epilogue (the reference's fp32 formula) reads the int32 tile staged in shared memory, so
// every global store is a whole 16-byte piece of an output row; its token and channel scales are
// read into registers before the main loop, so their latency is not paid after it.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"
#include "stage_copies.cuh"
#include "tma.cuh"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include "wgmma.cuh"

namespace qqq {
namespace sm90 {

constexpr int kBK = 128;
constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kBN = kWarpgroups * 64;  // output channels per CTA

// BM tokens per CTA (wgmma's N: 64, 128 or 256) and STAGES slots in the load ring; loads run
// STAGES - 2 stages ahead (one stage's wgmma in flight, one being decoded). TMA: a producer warp
// fills the ring with the copy engine, ahead as far as the slots the math warps have released.
template <int BM, int STAGES>
struct Tile {
  static_assert(STAGES >= 3, "one slot loading, one decoding, one in flight");
  static constexpr int X_BYTES = BM * kBK;
  static constexpr int W_BYTES = (kBK / 32) * (kBN / 8) * 32 * 4;
  static constexpr int S_BYTES = kBN * 2;
  // Each stage starts 1024-byte aligned: the swizzle pattern wgmma expects is anchored there.
  static constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + S_BYTES + 1023) / 1024 * 1024;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
  static_assert(SMEM_BYTES <= 227 * 1024, "fits the H100's shared memory per CTA");
  static constexpr int ACC_PITCH = kBN + 4;  // staged int32 row: conflict-free writes, 16B rows
  static_assert(BM * ACC_PITCH * 4 <= STAGES * STAGE_BYTES, "int32 tile fits the pipeline");
};

// step(parity, it) for it = 0 .. iters - 1, the parity (which register buffers) known at
// compile time: by pairs, an odd last step after the loop (a step under a condition inside the
// loop made ptxas serialize the register-A wgmmas with the next decode, C7513).
template <typename Step>
__device__ __forceinline__ void by_parity(int iters, Step& step) {
  int it = 0;
  for (; it + 1 < iters; it += 2) {
    step(std::integral_constant<int, 0>{}, it);
    step(std::integral_constant<int, 1>{}, it + 1);
  }
  if (it < iters) step(std::integral_constant<int, 0>{}, it);
}

// The producer after the two math warpgroups (TMA): one warp, or a whole warpgroup where the math
// warpgroups need more registers than an even share (the 256-token tile with the weights in
// registers: 128 accumulators + 32 weight registers per thread), which the producer warpgroup
// then gives up (setmaxnreg works per warpgroup).
template <bool TMA, int BM>
constexpr int kProducerThreads = !TMA ? 0 : (BM == 256 ? 128 : 32);
template <bool TMA, int BM>
constexpr bool kMoveRegisters = kProducerThreads<TMA, BM> == 128;

template <typename Out, int BM, int STAGES, bool GROUPED, bool TMA>
__global__ void __launch_bounds__(kThreads + kProducerThreads<TMA, BM>, BM == 64 || !TMA ? 2 : 1)
    w4a8_gemm_wgmma_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale,
                           const uint32_t* __restrict__ b, const float* __restrict__ scale,
                           const half* __restrict__ group, const Out* __restrict__ bias,
                           Out* __restrict__ out, int m, int n, int k,
                           int* __restrict__ ws_partial, int* __restrict__ ws_count,
                           const __grid_constant__ CUtensorMap x_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = Tile<BM, STAGES>;
  constexpr int kStages = STAGES;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * BM;

  // This split's range of 128-deep k blocks.
  const int splits = gridDim.z;
  int kb_begin, kb_end;
  split_range(k / kBK, blockIdx.z, splits, kb_begin, kb_end);
  const int iters = kb_end - kb_begin;

  auto stage_x = [&](int s) { return smem + s * T::STAGE_BYTES; };
  auto stage_w = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * T::STAGE_BYTES + T::X_BYTES);
  };
  auto stage_s = [&](int s) {
    return reinterpret_cast<half*>(smem + s * T::STAGE_BYTES + T::X_BYTES + T::W_BYTES);
  };

  // This warp's 16 rows are the n8 tiles tile0 and tile0 + 1 of the CTA's kBN channels; in the
  // A tile they are rows row and row + 8 (row % 8 == lane / 4).
  const int tile0 = (warp / 4) * 8 + (warp % 4) * 2;
  const int row = (warp % 4) * 16 + lane / 4;
  int acc[BM / 2];  // set by the first wgmma (accumulate = false); K >= 128 is checked
  // The decoded weights of a stage in the wgmma A-fragment order: two buffers, by the stage's
  // parity, so a stage decodes while the previous one's wgmmas still read theirs.
  uint32_t afrag[2][kBK / 32][4];

  // Stage it (in slot s): decode this warpgroup's weights into afrag[p], then issue and commit
  // its four wgmmas.
  auto multiply = [&](auto parity, int it, int s) {
    constexpr int p = decltype(parity)::value;
    const uint32_t* sw = stage_w(s);
    uint32_t s_lo = 0, s_hi = 0;
    if constexpr (GROUPED) {
      s_lo = static_cast<uint32_t>(__half_as_ushort(stage_s(s)[tile0 * 8 + lane / 4])) * 0x10001u;
      s_hi = static_cast<uint32_t>(__half_as_ushort(stage_s(s)[tile0 * 8 + 8 + lane / 4])) *
             0x10001u;
    }
    // Decode: for k32 step ks, lo = rows `row`, hi = rows row + 8; [0] k 0-15, [1] k 16-31.
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ks++) {
      const uint32_t w_lo = sw[ks * kBN * 4 + tile0 * 32 + lane];
      const uint32_t w_hi = sw[ks * kBN * 4 + tile0 * 32 + 32 + lane];
      uint32_t lo[2], hi[2];
      if constexpr (GROUPED) {
        decode_group(w_lo, s_lo, lo[0], lo[1]);
        decode_group(w_hi, s_hi, hi[0], hi[1]);
      } else {
        decode_channel(w_lo, lo[0], lo[1]);
        decode_channel(w_hi, hi[0], hi[1]);
      }
      afrag[p][ks][0] = lo[0];
      afrag[p][ks][1] = hi[0];
      afrag[p][ks][2] = lo[1];
      afrag[p][ks][3] = hi[1];
    }

    const uint32_t x_base = smem_addr(stage_x(s));
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ks++) pin_registers(afrag[p][ks]);
    pin_registers(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ks++) {
      const uint64_t db = wgmma_desc_sw128(x_base + ks * 32);
      const bool accumulate = it > 0 || ks > 0;
      if constexpr (BM == 64) {
        wgmma_m64n64k32_rs(acc, afrag[p][ks], db, accumulate);
      } else if constexpr (BM == 128) {
        wgmma_m64n128k32_rs(acc, afrag[p][ks], db, accumulate);
      } else {
        wgmma_m64n256k32_rs(acc, afrag[p][ks], db, accumulate);
      }
    }
    wgmma_commit();
    pin_registers(acc);
  };
  // A barrier of the threads that run the epilogue (with TMA the producer warp has left).
  auto sync_math = [] {
    if constexpr (TMA) {
      asm volatile("bar.sync 3, %0;\n" ::"n"(kThreads) : "memory");
    } else {
      __syncthreads();
    }
  };
  // The epilogue's token scales, channel scales and bias, copied to shared memory (cp.async)
  // as soon as the kernel that wrote a_scale is done, so the epilogue does not wait for them.
  __shared__ float token_scales[BM];
  __shared__ alignas(16) float chan_scales[kBN];
  __shared__ alignas(16) Out chan_bias[kBN];
  static_assert(BM <= kThreads, "one token scale per thread");
  auto read_scales = [&] {  // a_scale has no alignment; scale and bias 16 bytes (ops.py checks)
    if (tid < BM) cp_async4(&token_scales[tid], a_scale + min(m0 + tid, m - 1), m0 + tid < m);
    if (tid < kBN / 4) {
      cp_async16(&chan_scales[tid * 4], scale + min(n0 + tid * 4, n - 4), n0 + tid * 4 < n);
    }
    if (bias != nullptr && tid < kBN / 8) {
      cp_async16(&chan_bias[tid * 8], bias + min(n0 + tid * 8, n - 8), n0 + tid * 8 < n);
    }
  };

  if constexpr (TMA) {
    // full[s]: slot s holds its stage (the producer's arrival and the copies' bytes); empty[s]:
    // every math warp is done with it (its wgmmas retired).
    __shared__ uint64_t full[kStages], empty[kStages];
    if (tid == 0) {
      for (int s = 0; s < kStages; s++) {
        mbarrier_init(&full[s], 1);
        mbarrier_init(&empty[s], kThreads / 32);
      }
      fence_mbarrier_init();
    }
    __syncthreads();
    if (warp >= kThreads / 32) {
      if constexpr (kMoveRegisters<TMA, BM>) set_max_registers<false, 40>();
      if (warp == kThreads / 32 && lane == 0) {
        // The copies of a stage: the CTA's valid n8 tiles of each k32 step (contiguous in the
        // kernel layout), their group scales, and the activation box (rows past M read as 0).
        const int n8_tiles = n / 8, tiles_here = min(kBN / 8, n8_tiles - n0 / 8);
        const uint32_t w_bytes = tiles_here * 128, g_bytes = tiles_here * 16;
        const uint32_t stage_bytes = (kBK / 32) * w_bytes + (GROUPED ? g_bytes : 0) + BM * kBK;
        auto load_w = [&](int j) {
          const int kb = kb_begin + j, s = j % kStages;
#pragma unroll
          for (int ks = 0; ks < kBK / 32; ks++) {
            bulk_copy(stage_w(s) + ks * kBN * 4,
                      b + (static_cast<size_t>(kb * 4 + ks) * n8_tiles + n0 / 8) * 32, w_bytes,
                      &full[s]);
          }
          if constexpr (GROUPED) {
            bulk_copy(stage_s(s), group + static_cast<size_t>(kb) * n + n0, g_bytes, &full[s]);
          }
        };
        auto load_x = [&](int j) {
          tensor_copy_2d(stage_x(j % kStages), &x_map, (kb_begin + j) * kBK, m0,
                         &full[j % kStages]);
        };
        // The weights of the first stages before waiting for the kernel that wrote the
        // activations (programmatic dependent launch).
        const int first = min(kStages, iters);
        for (int j = 0; j < first; j++) {
          mbarrier_arrive_expect(&full[j], stage_bytes);
          load_w(j);
        }
        wait_for_prior_grid();
        for (int j = 0; j < first; j++) load_x(j);
        for (int j = first; j < iters; j++) {
          mbarrier_wait(&empty[j % kStages], (j / kStages - 1) & 1);
          mbarrier_arrive_expect(&full[j % kStages], stage_bytes);
          load_w(j);
          load_x(j);
        }
      }
      return;  // the math warps alone run the epilogue (named barrier 3)
    }
    if constexpr (kMoveRegisters<TMA, BM>) set_max_registers<true, 232>();
    wait_for_prior_grid();  // before the epilogue reads a_scale and the workspace
    read_scales();
    cp_async_commit();
    auto consume = [&](auto parity, int it) {
      const int s = it % kStages;
      mbarrier_wait(&full[s], (it / kStages) & 1);
      multiply(parity, it, s);
      wgmma_wait<1>();  // stage it - 1's wgmmas are done: release its slot
      if (it > 0 && lane == 0) mbarrier_arrive(&empty[(it - 1) % kStages]);
    };
    by_parity(iters, consume);
  } else {
    // Each call loads the next stage of its operand into slot s.
    StageCopies<BM, kThreads, kBN, GROUPED> copies(a, b, group, m, n, k, m0, n0, kb_begin, tid);
    auto load_x = [&](int s) { copies.activations(stage_x(s)); };
    auto load_w = [&](int s) { copies.weights(stage_w(s), stage_s(s)); };

    // Stage it + kStages - 2 is loaded at iteration it into the slot of stage it - 2: every
    // warpgroup has waited for its wgmma of it - 2 before the barrier of iteration it, while the
    // wgmma of it - 1 may still run as this iteration decodes.
    // The weights of the first stages are requested before waiting for the kernel that wrote the
    // activations (programmatic dependent launch); they join the first cp.async group.
#pragma unroll
    for (int s = 0; s < kStages - 2; s++) {
      if (s < iters) load_w(s);
    }
    wait_for_prior_grid();
    read_scales();  // joins the first stage's copies
#pragma unroll
    for (int s = 0; s < kStages - 2; s++) {
      if (s < iters) load_x(s);
      cp_async_commit();
    }
    auto stage = [&](auto parity, int it) {
      cp_async_wait<kStages - 3>();
      fence_proxy_async();
      __syncthreads();
      // The slot of stage it - 2 is free: both warpgroups waited for its wgmmas before this
      // barrier.
      if (it + kStages - 2 < iters) {
        load_x((it + kStages - 2) % kStages);
        load_w((it + kStages - 2) % kStages);
      }
      cp_async_commit();
      multiply(parity, it, it % kStages);
      wgmma_wait<1>();  // the previous stage's wgmma is done: its registers and slot are free
    };
    by_parity(iters, stage);
  }
  wgmma_wait<0>();
  pin_registers(acc);
  cp_async_wait<0>();
  sync_math();

  // Stage the int32 tile [token][channel]: acc[4 j + 2 h + c] is channel 16 (warp % 4) + g + 8 h
  // of this warpgroup's 64 and token 8 j + 2 (lane % 4) + c.
  int* staged = reinterpret_cast<int*>(smem);
  const int ch_base = (warp / 4) * 64 + (warp % 4) * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < BM / 8; j++)
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int c = 0; c < 2; c++) {
        staged[(8 * j + 2 * (lane % 4) + c) * T::ACC_PITCH + ch_base + 8 * h] = acc[4 * j + 2 * h + c];
      }
  sync_math();

  constexpr int kChunks = kBN / 8;  // pieces of 8 channels per row
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  // Split K: a tile's partial sums live at ws_partial[(tile * splits + split) * BM * kBN].
  auto partial = [&](int split) {
    return ws_partial + (static_cast<size_t>(tile) * splits + split) * BM * kBN;
  };
  if (splits > 1) {
    int* mine = partial(blockIdx.z);
#pragma unroll 4
    for (int i = tid; i < BM * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int4* src = reinterpret_cast<const int4*>(staged + r * T::ACC_PITCH + c * 8);
      int4* dst = reinterpret_cast<int4*>(mine + r * kBN + c * 8);
      __stcg(dst, src[0]);
      __stcg(dst + 1, src[1]);
    }
    __threadfence();
    sync_math();
    __shared__ int last;
    if (tid == 0) last = atomicAdd(ws_count + tile, 1) == splits - 1;
    sync_math();
    if (!last) return;
    __threadfence();
    if (tid == 0) ws_count[tile] = 0;  // ready for the next call
  }

  // Epilogue: y = (float(acc) * a_scale[token]) * scale[channel] (+ bias), no contraction,
  // exactly the reference's order; one thread writes 8 consecutive channels (always its piece c)
  // of every (kThreads / kChunks)-th token.
  static_assert(kThreads % kChunks == 0, "a thread keeps its piece of channels");
  const int c = tid % kChunks, ch0 = n0 + c * 8;
  if (ch0 >= n) return;
  float sc[8];
  alignas(16) Out bi[8];
#pragma unroll
  for (int e = 0; e < 8; e++) sc[e] = chan_scales[c * 8 + e];
  *reinterpret_cast<uint4*>(bi) = *reinterpret_cast<const uint4*>(&chan_bias[c * 8]);
#pragma unroll 4
  for (int r = tid / kChunks; r < BM; r += kThreads / kChunks) {
    if (m0 + r >= m) break;
    int v[8];
    if (splits == 1) {
      const int4* p = reinterpret_cast<const int4*>(staged + r * T::ACC_PITCH + c * 8);
      const int4 x0 = p[0], x1 = p[1];
      v[0] = x0.x, v[1] = x0.y, v[2] = x0.z, v[3] = x0.w;
      v[4] = x1.x, v[5] = x1.y, v[6] = x1.z, v[7] = x1.w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; e++) v[e] = 0;
      for (int split = 0; split < splits; split++) {
        const int4* p = reinterpret_cast<const int4*>(partial(split) + r * kBN + c * 8);
        const int4 x0 = __ldcg(p), x1 = __ldcg(p + 1);
        v[0] += x0.x, v[1] += x0.y, v[2] += x0.z, v[3] += x0.w;
        v[4] += x1.x, v[5] += x1.y, v[6] += x1.z, v[7] += x1.w;
      }
    }
    const float ts = token_scales[r];
    alignas(16) Out y[8];
#pragma unroll
    for (int e = 0; e < 8; e++) {
      float f = __fmul_rn(__fmul_rn(__int2float_rn(v[e]), ts), sc[e]);
      if (bias != nullptr) f = __fadd_rn(f, OutType<Out>::to_float(bi[e]));
      y[e] = OutType<Out>::from_float(f);
    }
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(m0 + r) * n + ch0) =
        *reinterpret_cast<const uint4*>(y);
  }
#else
  __trap();  // not built for sm_90a: wgmma_available() keeps the host from launching this
#endif
}

// The tensor map of the int8 activations [m, k] for the copy engine: boxes of bm rows x 128 bytes
// stored with the 128-byte swizzle (the layout wgmma_desc_sw128 describes); rows past m read 0.
static CUtensorMap activation_map(const int8_t* a, int m, int k, int bm) {
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                cudaEnableDefault, &found),
               "cuTensorMapEncodeTiled lookup");
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
      throw std::runtime_error("vllm_qqq: the driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(m)};
  const cuuint64_t row_bytes[1] = {static_cast<cuuint64_t>(k)};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(bm)}, steps[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(a), dims,
                            row_bytes, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error("vllm_qqq: cuTensorMapEncodeTiled failed (" + std::to_string(r) +
                             ")");
  }
  return map;
}

template <typename Out, int BM, int STAGES, bool GROUPED, bool TMA>
static void launch(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                   const half* group, const void* bias, void* out, int m, int n, int k,
                   int* ws_partial, int* ws_count, int sms, bool pdl, cudaStream_t stream) {
  constexpr auto kernel = w4a8_gemm_wgmma_kernel<Out, BM, STAGES, GROUPED, TMA>;
  constexpr int smem = Tile<BM, STAGES>::SMEM_BYTES;
  constexpr int threads = kThreads + kProducerThreads<TMA, BM>;
  allow_smem<kernel, smem>();
  static const int per_sm = [] {
    int blocks = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem),
               "occupancy");
    return std::max(blocks, 1);
  }();
  const int n_tiles = (n + kBN - 1) / kBN, m_tiles = (m + BM - 1) / BM;
  int splits = 1;
  if (wgmma_split_k_allowed(m, n)) {
    // One wave of CTAs, each split keeping at least 8 k blocks to pipeline, and the partial
    // tiles within the workspace's partial region.
    const int64_t tile_entries = static_cast<int64_t>(n_tiles) * m_tiles * BM * kBN;
    const int fit = static_cast<int>(workspace_partial_entries(n) / tile_entries);
    splits = std::max(1, std::min({sms * per_sm / (n_tiles * m_tiles), (k / kBK) / 8, fit}));
  }
  const CUtensorMap x_map = TMA ? activation_map(a, m, k, BM) : CUtensorMap{};
  launch_kernel(kernel, dim3(n_tiles, m_tiles, splits), dim3(threads), smem, stream, pdl,
                "w4a8_gemm_wgmma launch", a, a_scale, b, scale, group,
                static_cast<const Out*>(bias), static_cast<Out*>(out), m, n, k, ws_partial,
                ws_count, x_map);
}

// The tile for (M, N), unless set_wgmma_tile forced one. Measured on the H100 (NOTES.md "GEMM",
// gemm_h100_tiles.log, gemm_h100_registers_tma.log): the loop's speed per CTA hardly depends on
// the ring's depth, so what decides is how many CTAs share the work:
// - 256 tokens where its tiles alone give ~0.7 CTAs per SM (split-K of 256-token tiles lost to
//   128-token tiles: down M = 256 / 512, 56.0 / 91.6 us vs 46.7 / 67.5), and it computes at most
//   1/8 more padding tokens than the 128-token tile (gate_up M = 384: 131.6 us vs 104.6);
// - else 128 tokens where they give ~0.7 CTAs per SM, counting split-K where each split keeps
//   >= 32 k blocks (shorter splits lost to smaller tiles: qkv M = 128, 64 tokens 26 us vs 128
//   tokens split in 2, 30 us), or from M = 65 where the N tiles alone outnumber the SMs (gate_up
//   M = 128: 34.6 us vs 51.9 with 64-token tiles; at M = 64 28.7 vs 31.4 the other way);
// - else 64 tokens: 8 slots (one CTA per SM) or, when their CTAs exceed the SMs, 6 slots (two CTAs
//   per SM; gate_up M = 64 28.7 us vs 32.3 with 8).
// A 128-token tile with more tiles than SMs loads with cp.async, two CTAs per SM (four warpgroups
// take turns on the tensor cores: gate_up M = 128 51.9 -> 39.9 us), every other tile with the
// producer.
static int forced_bm = 0, forced_stages = 0;
static bool forced_tma = false;

static void choose_tile(int m, int n, int k, int sms, int& bm, int& stages, bool& tma) {
  const int n_tiles = (n + kBN - 1) / kBN;
  auto tiles = [&](int tile) { return n_tiles * ((m + tile - 1) / tile); };
  auto ctas = [&](int tile) {
    const int deep_splits = wgmma_split_k_allowed(m, n)
                                ? std::max(1, std::min(sms / tiles(tile), (k / kBK) / 32))
                                : 1;
    return tiles(tile) * deep_splits;
  };
  // Tokens computed past M: the 256-token tile pads M = 384 to 512, the 128-token one not at all.
  auto padding = [&](int tile) { return (m + tile - 1) / tile * tile - m; };
  const bool wide = n_tiles > sms;  // 128-token tiles from registers, two CTAs per SM
  if (m > 128 && 10 * tiles(256) >= 7 * sms &&
      8 * (padding(256) - padding(128)) <= (m + 255) / 256 * 256) {
    bm = 256;
  } else if (m > 64 && (10 * ctas(128) >= 7 * sms || wide)) {
    bm = 128;
  } else {
    bm = 64;
  }
  tma = !(bm == 128 && tiles(128) > sms);
  stages = bm == 64 ? (tiles(64) > sms ? 6 : 8) : (bm == 128 && tma ? 6 : 4);
}

template <typename Out, bool GROUPED>
static void dispatch(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                     const half* group, const void* bias, void* out, int m, int n, int k,
                     int* ws_partial, int* ws_count, int sms, bool pdl, cudaStream_t stream) {
  int bm = forced_bm, stages = forced_stages;
  bool tma = forced_tma;
  if (bm == 0) choose_tile(m, n, k, sms, bm, stages, tma);
#define QQQ_TILE(BM_, STAGES_, TMA_)                                                           \
  if (bm == BM_ && stages == STAGES_ && tma == TMA_) {                                         \
    return launch<Out, BM_, STAGES_, GROUPED, TMA_>(a, a_scale, b, scale, group, bias, out, m, n, \
                                                    k, ws_partial, ws_count, sms, pdl, stream);   \
  }
  QQQ_TILE(64, 6, true)
  QQQ_TILE(64, 8, true)
  QQQ_TILE(128, 4, false)
  QQQ_TILE(128, 6, true)
  QQQ_TILE(256, 4, true)
#undef QQQ_TILE
  throw std::invalid_argument("vllm_qqq: no wgmma tile of " + std::to_string(bm) + " tokens x " +
                              std::to_string(stages) + " stages" + (tma ? " (producer warp)" : ""));
}

}  // namespace sm90

bool wgmma_available() {
  static const bool yes = [] {
    if (device_attribute(cudaDevAttrComputeCapabilityMajor) != 9 ||
        device_attribute(cudaDevAttrComputeCapabilityMinor) != 0) {
      return false;
    }
    // The kernel must come from the sm_90a build, not be JIT-compiled from older PTX (a build
    // without 90a in QQQ_CUDA_ARCHS), where its body is compiled out.
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, sm90::w4a8_gemm_wgmma_kernel<half, 128, 4, false, false>) !=
        cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attr.ptxVersion >= 90;
  }();
  return yes;
}

void set_wgmma_tile(int bm, int stages, bool producer_warp) {
  sm90::forced_bm = bm;
  sm90::forced_stages = stages;
  sm90::forced_tma = producer_warp;
}

void w4a8_gemm_wgmma(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                     const half* group, const void* bias, void* out, int out_dtype, int m, int n,
                     int k, int* ws_partial, int* ws_count, int sms, bool pdl, cudaStream_t stream) {
  if (out_dtype == kFloat16) {
    if (group != nullptr) {
      sm90::dispatch<half, true>(a, a_scale, b, scale, group, bias, out, m, n, k, ws_partial,
                                 ws_count, sms, pdl, stream);
    } else {
      sm90::dispatch<half, false>(a, a_scale, b, scale, group, bias, out, m, n, k, ws_partial,
                                  ws_count, sms, pdl, stream);
    }
  } else {
    if (group != nullptr) {
      sm90::dispatch<__nv_bfloat16, true>(a, a_scale, b, scale, group, bias, out, m, n, k,
                                          ws_partial, ws_count, sms, pdl, stream);
    } else {
      sm90::dispatch<__nv_bfloat16, false>(a, a_scale, b, scale, group, bias, out, m, n, k,
                                           ws_partial, ws_count, sms, pdl, stream);
    }
  }
}

}  // namespace qqq
