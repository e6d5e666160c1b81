// W4A8 GEMM for Hopper (sm_90a) above a few tokens (wgmma_default_min_m): the product of
// w4a8_gemm.cu computed transposed, out^T[n, m] = W[n, k] . X[m, k]^T, on wgmma. Each warpgroup
// owns 64 output channels (wgmma's M) and the CTA's BM tokens are wgmma's N; the activations come
// from 128B-swizzled shared memory.
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
// BM = 16, 32, 64, 128 or 256 tokens per CTA, with a deeper ring for the smaller tiles, where
// the loop waits on memory rather than on the tensor cores. Tiles that run one CTA per SM are
// persistent: one CTA per SM takes tile after tile, its producer filling the ring for the next
// tile while the math warpgroups run the last one's epilogue.
//
// Small grids (few N tiles, M <= 256) split K over blockIdx.z: each split stores its int32 tile
// to the workspace, and the last split of a tile (an atomic counter) adds the others' and applies
// the epilogue. int32 sums are exact, so the result is the reference's.
// The epilogue applies the reference's fp32 formula in registers, with the token and channel
// scales copied to shared memory before the main loop (measured: reading them after it cost
// ~3.5 us per tile), then stores the 16-bit outputs transposed by stmatrix to staging rows and
// copies those out in whole 16-byte pieces of output rows.
#include <algorithm>
#include <cstdint>
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
// Math warpgroups per CTA, 64 output channels each: 2 by default. 3 (192 channels, producer
// tiles only) is a candidate where the 128-channel tiles leave a last wave mostly idle: qkv at
// M = 1024 is 192 256-token tiles on 132 SMs, but 256 128-token tiles of 192 channels.
constexpr int kDefaultWarpgroups = 2;

// BM tokens per CTA (wgmma's N: 16, 32, 64, 128 or 256) and STAGES slots in the load ring; loads
// run STAGES - 2 stages ahead (one stage's wgmma in flight, one being decoded). TMA: a producer
// warp fills the ring with the copy engine, ahead as far as the slots the math warps have
// released. WG math warpgroups (THREADS threads) compute BN output channels.
template <int BM, int STAGES, bool TMA, int WG>
struct Tile {
  static_assert(STAGES >= 3, "one slot loading, one decoding, one in flight");
  static_assert(WG == 2 || ((WG == 3 || WG == 4) && TMA),
                "3 or 4 warpgroups with the producer only");
  static constexpr int THREADS = WG * 128;
  static constexpr int BN = WG * 64;
  static constexpr int X_BYTES = BM * kBK;
  static constexpr int W_BYTES = (kBK / 32) * (BN / 8) * 32 * 4;
  static constexpr int S_BYTES = BN * 2;
  // Each stage starts 1024-byte aligned: the swizzle pattern wgmma expects is anchored there.
  static constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + S_BYTES + 1023) / 1024 * 1024;
  // One CTA per SM with the producer (not the 64-token tile of 6 slots, two CTAs per SM): such
  // CTAs take tile after tile, the producer loading the next while the math warps run the last
  // one's epilogue, so its output rows are staged beside the ring; otherwise in the ring.
  static constexpr bool PERSISTENT = TMA && !(BM == 64 && STAGES == 6);
  static constexpr int CTAS_PER_SM = PERSISTENT ? 1 : 2;
  // The epilogue stages each warpgroup's output rows, ROUND_TOKENS tokens x its 64 channels at a
  // time (16-byte rows 144 bytes apart: stmatrix's eight rows fall in different banks).
  static constexpr int ROUND_TOKENS = BM < 128 ? BM : 128;
  static constexpr int OUT_PITCH = 64 * 2 + 16;
  static constexpr int STAGING_BYTES = WG * ROUND_TOKENS * OUT_PITCH;
  static constexpr int STAGING_OFFSET = PERSISTENT ? STAGES * STAGE_BYTES : 0;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + (PERSISTENT ? STAGING_BYTES : 0) + 1024;
  static_assert(SMEM_BYTES <= 227 * 1024, "fits the H100's shared memory per CTA");
  static_assert(STAGING_BYTES <= STAGES * STAGE_BYTES, "the staging rows fit the ring");
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

// The producer after the math warpgroups (TMA): one warp, or a whole warpgroup where the math
// warpgroups need more registers than an even share, which the producer warpgroup then gives up
// (setmaxnreg works per warpgroup): the 256-token tile (128 accumulators + 32 weight registers
// per thread; 232 registers) and three or four math warpgroups (152 or 112: with a producer
// warp, 13 warps, ptxas held the kernel to 128 registers and serialized the 128-token tile's
// wgmmas, C7512; with 17 warps the 64 x 256 tile's too, at 96).
template <bool TMA, int BM, int WG>
constexpr int kProducerThreads = !TMA ? 0 : (BM == 256 || WG >= 3 ? 128 : 32);
template <bool TMA, int BM, int WG>
constexpr bool kMoveRegisters = kProducerThreads<TMA, BM, WG> == 128;
// setmaxnreg moves registers within the CTA's pool, what it was launched with: every thread x
// the kernel's count, at most 64 K / threads rounded down to 8 (one CTA per SM). An increase the
// pool cannot cover waits forever, so the producer's and the math warpgroups' shares must fit it:
// 4 math warpgroups launch at 96 (640 threads, 61440 registers), 32 x 128 + 112 x 512 exactly.
// (ptxas launched every such kernel at that most, checked with -Xptxas -v; fewer would hang.)
template <int WG>
constexpr int kProducerRegisters = WG == 4 ? 32 : 40;
template <int WG>
constexpr int kMathRegisters = WG == 2 ? 232 : WG == 3 ? 152 : 112;
// The threads a CTA launches with: the math warpgroups and the producer.
template <int BM, int STAGES, bool TMA, int WG>
constexpr int kCtaThreads = Tile<BM, STAGES, TMA, WG>::THREADS + kProducerThreads<TMA, BM, WG>;
template <int BM, int STAGES, bool TMA, int WG>
constexpr bool registers_fit_pool() {
  constexpr int threads = kCtaThreads<BM, STAGES, TMA, WG>;
  return !kMoveRegisters<TMA, BM, WG> ||
         128 * kProducerRegisters<WG> + WG * 128 * kMathRegisters<WG> <=
             threads * (65536 / Tile<BM, STAGES, TMA, WG>::CTAS_PER_SM / threads / 8 * 8);
}

template <typename Out, int BM, int STAGES, int DECODE, bool TMA, int WG>
__global__ void __launch_bounds__(kCtaThreads<BM, STAGES, TMA, WG>,
                                  Tile<BM, STAGES, TMA, WG>::CTAS_PER_SM)
    w4a8_gemm_wgmma_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale,
                           const uint32_t* __restrict__ b, const float* __restrict__ scale,
                           const half* __restrict__ group, const Out* __restrict__ bias,
                           Out* __restrict__ out, int m, int n, int k,
                           int* __restrict__ ws_partial, int* __restrict__ ws_count,
                           const __grid_constant__ CUtensorMap x_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool GROUPED = DECODE != kDecodeChannel;
  using T = Tile<BM, STAGES, TMA, WG>;
  static_assert(registers_fit_pool<BM, STAGES, TMA, WG>(),
                "setmaxnreg shares exceed the registers the CTA is launched with");
  constexpr int kStages = STAGES, kThreads = T::THREADS, kBN = T::BN;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Tile t covers channels (t % n_tiles) * kBN and tokens (t / n_tiles) * BM. Persistent tiles
  // (T::PERSISTENT): CTA x takes tiles x, x + gridDim.x, ..., launched as many as fit the SMs
  // (split-K: one per tile), so the producer loads the next tile while the math warps finish
  // the last. Others: the CTA's tile is (blockIdx.x, blockIdx.y). for_each_tile(f) calls
  // f(t, n0, m0) for the CTA's tiles in order until f returns false. Split-K: this split's range
  // of 128-deep k blocks, blockIdx.z of gridDim.z.
  const int n_tiles = (n + kBN - 1) / kBN;
  auto for_each_tile = [&](auto&& f) {
    if constexpr (T::PERSISTENT) {
      const int tiles = n_tiles * ((m + BM - 1) / BM);
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        if (!f(t, (t % n_tiles) * kBN, (t / n_tiles) * BM)) return;
      }
    } else {
      f(static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x), static_cast<int>(blockIdx.x) * kBN,
        static_cast<int>(blockIdx.y) * BM);
    }
  };
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

  // This warp's 16 rows of A are the n8 tiles tile0 and tile0 + 1 of the CTA's kBN channels.
  const int tile0 = (warp / 4) * 8 + (warp % 4) * 2;
  int acc[BM / 2];  // set by the first wgmma (accumulate = false); K >= 128 is checked
  // The decoded weights of a stage in the wgmma A-fragment order: two buffers, by the stage's
  // parity, so a stage decodes while the previous one's wgmmas still read theirs.
  uint32_t afrag[2][kBK / 32][4];

  // Stage it (in slot s): decode this warpgroup's weights into afrag[p], then issue and commit
  // its four wgmmas.
  auto multiply = [&](auto parity, int it, int s) {
    constexpr int p = decltype(parity)::value;
    const uint32_t* sw = stage_w(s);
    [[maybe_unused]] uint32_t s_lo = 0, s_hi = 0;  // per-group only
    if constexpr (GROUPED) {
      s_lo = group_operand<DECODE>(__half_as_ushort(stage_s(s)[tile0 * 8 + lane / 4]));
      s_hi = group_operand<DECODE>(__half_as_ushort(stage_s(s)[tile0 * 8 + 8 + lane / 4]));
    }
    // Decode: for k32 step ks, lo = n8 tile tile0, hi = tile0 + 1; [0] k 0-15, [1] k 16-31.
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ks++) {
      const uint32_t w_lo = sw[ks * kBN * 4 + tile0 * 32 + lane];
      const uint32_t w_hi = sw[ks * kBN * 4 + tile0 * 32 + 32 + lane];
      uint32_t lo[2], hi[2];
      decode<DECODE>(w_lo, s_lo, lo[0], lo[1]);
      decode<DECODE>(w_hi, s_hi, hi[0], hi[1]);
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
      if constexpr (BM == 16) {
        wgmma_m64n16k32_rs(acc, afrag[p][ks], db, accumulate);
      } else if constexpr (BM == 32) {
        wgmma_m64n32k32_rs(acc, afrag[p][ks], db, accumulate);
      } else if constexpr (BM == 64) {
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
  // A barrier of the threads that run the epilogue (with TMA the producer warp has left): named
  // barrier WG + 1, after the warpgroups' own 1 .. WG.
  auto sync_math = [] {
    if constexpr (TMA) {
      asm volatile("bar.sync %0, %1;\n" ::"n"(WG + 1), "n"(kThreads) : "memory");
    } else {
      __syncthreads();
    }
  };
  // The epilogue's token scales, channel scales and bias for the tile at (m0, n0), copied to
  // shared memory (cp.async) before its main loop, so the epilogue does not wait for them.
  __shared__ alignas(16) float token_scales[BM];
  __shared__ alignas(16) float chan_scales[kBN];
  __shared__ alignas(16) Out chan_bias[kBN];
  static_assert(BM <= kThreads, "one token scale per thread");
  auto read_scales = [&](int m0, int n0) {  // a_scale has no alignment; scale, bias 16 bytes
    if (tid < BM) cp_async4(&token_scales[tid], a_scale + min(m0 + tid, m - 1), m0 + tid < m);
    if (tid < kBN / 4) {
      cp_async16(&chan_scales[tid * 4], scale + min(n0 + tid * 4, n - 4), n0 + tid * 4 < n);
    }
    if (bias != nullptr && tid < kBN / 8) {
      cp_async16(&chan_bias[tid * 8], bias + min(n0 + tid * 8, n - 8), n0 + tid * 8 < n);
    }
  };

  // Epilogue of tile t (false: a split that is not the tile's last). acc[4 j + 2 h + c] is
  // channel ch + 8 h of the tile and token 8 j + 2 (lane % 4) + c. Each value is scaled in
  // registers, y = (float(acc) * a_scale[token]) * scale[channel] (+ bias), no contraction,
  // exactly the reference's order, and stored transposed by stmatrix to this warpgroup's staging
  // rows ([token][its 64 channels], R tokens a round), which it then copies out in 16-byte
  // pieces of output rows.
  constexpr int R = T::ROUND_TOKENS;
  const int wg = warp / 4, ch = wg * 64 + (warp % 4) * 16 + lane / 4;
  uint8_t* const staging = smem + T::STAGING_OFFSET + wg * R * T::OUT_PITCH;
  auto warpgroup_sync = [&] { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };
  auto epilogue = [&](int t, int m0, int n0) {
    if (splits > 1) {
      // Each split stores its tile in fragment order (thread tid's j-th 4 values at
      // [j * kThreads + tid]); the last split to finish adds the others'. int32 sums are exact.
      int4* const parts = reinterpret_cast<int4*>(ws_partial) +
                          static_cast<size_t>(t) * splits * (BM / 8) * kThreads;
      int4* const mine = parts + blockIdx.z * (BM / 8) * kThreads;
#pragma unroll
      for (int j = 0; j < BM / 8; j++) {
        __stcg(mine + j * kThreads + tid, make_int4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2],
                                                    acc[4 * j + 3]));
      }
      __threadfence();
      sync_math();
      __shared__ int last;
      if (tid == 0) last = atomicAdd(ws_count + t, 1) == splits - 1;
      sync_math();
      if (!last) return false;
      __threadfence();
      for (int split = 0; split < splits; split++) {
        if (split == static_cast<int>(blockIdx.z)) continue;
        const int4* other = parts + split * (BM / 8) * kThreads;
#pragma unroll
        for (int j = 0; j < BM / 8; j++) {
          const int4 v = __ldcg(other + j * kThreads + tid);
          acc[4 * j] += v.x, acc[4 * j + 1] += v.y, acc[4 * j + 2] += v.z, acc[4 * j + 3] += v.w;
        }
      }
      if (tid == 0) ws_count[t] = 0;  // ready for the next call
    }
    cp_async_wait<0>();
    sync_math();  // every thread's scales have landed (and, unpersistent, the ring is free)
    float sc[2], bi[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; h++) {
      sc[h] = chan_scales[ch + 8 * h];
      if (bias != nullptr) bi[h] = OutType<Out>::to_float(chan_bias[ch + 8 * h]);
    }
    // stmatrix x4 stores matrices (j, h = 0), (j, 1), (j + 1, 0), (j + 1, 1); lane 8 i + r gives
    // the address of matrix i's token row r.
    const uint32_t rows = smem_addr(staging) + ((lane / 16) * 8 + lane % 8) * T::OUT_PITCH +
                          ((warp % 4) * 16 + ((lane / 8) % 2) * 8) * 2;
#pragma unroll
    for (int round = 0; round < BM / R; round++) {
#pragma unroll
      for (int jj = 0; jj < R / 8; jj += 2) {
        uint32_t packed[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int j = round * (R / 8) + jj + i / 2, h = i % 2;
          const float2 ts = *reinterpret_cast<const float2*>(&token_scales[8 * j + 2 * (lane % 4)]);
          float y0 = __fmul_rn(__fmul_rn(__int2float_rn(acc[4 * j + 2 * h]), ts.x), sc[h]);
          float y1 = __fmul_rn(__fmul_rn(__int2float_rn(acc[4 * j + 2 * h + 1]), ts.y), sc[h]);
          if (bias != nullptr) y0 = __fadd_rn(y0, bi[h]), y1 = __fadd_rn(y1, bi[h]);
          packed[i] = pack_pair(OutType<Out>::from_float(y0), OutType<Out>::from_float(y1));
        }
        stmatrix_x4_trans(rows + jj * 8 * T::OUT_PITCH, packed);
      }
      warpgroup_sync();
#pragma unroll 4
      for (int i = tid % 128; i < R * 8; i += 128) {
        const int row = i / 8, token = m0 + round * R + row, c0 = n0 + wg * 64 + (i % 8) * 8;
        if (token < m && c0 < n) {
          *reinterpret_cast<uint4*>(out + static_cast<size_t>(token) * n + c0) =
              *reinterpret_cast<const uint4*>(staging + row * T::OUT_PITCH + (i % 8) * 16);
        }
      }
      warpgroup_sync();  // the rows are free for the next round or tile
    }
    return true;
  };

  if constexpr (TMA) {
    // full[s]: slot s holds its stage (the producer's arrival and the copies' bytes); empty[s]:
    // every math warp is done with it (its wgmmas retired). Stages are counted over the CTA's
    // tiles (j): stage j is in slot j % kStages, its phase (j / kStages) & 1.
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
      if constexpr (kMoveRegisters<TMA, BM, WG>) {
        set_max_registers<false, kProducerRegisters<WG>>();
      }
      if (warp == kThreads / 32 && lane == 0) {
        const int n8_tiles = n / 8;
        int j = 0;
        for_each_tile([&](int, int n0, int m0) {
          // The copies of a stage: the tile's valid n8 tiles of each k32 step (contiguous in the
          // kernel layout), their group scales, and the activation box (rows past M read as 0).
          const int tiles_here = min(kBN / 8, n8_tiles - n0 / 8);
          const uint32_t w_bytes = tiles_here * 128, g_bytes = tiles_here * 16;
          const uint32_t stage_bytes = (kBK / 32) * w_bytes + (GROUPED ? g_bytes : 0) + BM * kBK;
          auto load_w = [&](int i) {
            const int kb = kb_begin + i, s = (j + i) % kStages;
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
          auto load_x = [&](int i) {
            const int s = (j + i) % kStages;
            tensor_copy_2d(stage_x(s), &x_map, (kb_begin + i) * kBK, m0, &full[s]);
          };
          // The first tile's first stages: the weights before waiting for the kernel that wrote
          // the activations (programmatic dependent launch).
          const int first = j == 0 ? min(kStages, iters) : 0;
          for (int i = 0; i < first; i++) {
            mbarrier_arrive_expect(&full[i], stage_bytes);
            load_w(i);
          }
          if (j == 0) wait_for_prior_grid();
          for (int i = 0; i < first; i++) load_x(i);
          for (int i = first; i < iters; i++) {
            const int s = (j + i) % kStages;
            if (j + i >= kStages) mbarrier_wait(&empty[s], ((j + i) / kStages - 1) & 1);
            mbarrier_arrive_expect(&full[s], stage_bytes);
            load_w(i);
            load_x(i);
          }
          j += iters;
          return true;
        });
      }
      return;  // the math warps alone run the epilogue (named barriers 1 .. WG + 1)
    }
    if constexpr (kMoveRegisters<TMA, BM, WG>) set_max_registers<true, kMathRegisters<WG>>();
    wait_for_prior_grid();  // before reading a_scale and the workspace
    int j = 0;
    for_each_tile([&](int t, int n0, int m0) {
      if (j > 0) sync_math();  // the last tile's epilogue is done with the scales
      read_scales(m0, n0);
      cp_async_commit();
      auto consume = [&](auto parity, int it) {
        const int s = (j + it) % kStages;
        mbarrier_wait(&full[s], ((j + it) / kStages) & 1);
        multiply(parity, it, s);
        wgmma_wait<1>();  // stage it - 1's wgmmas are done: release its slot
        if (it > 0 && lane == 0) mbarrier_arrive(&empty[(j + it - 1) % kStages]);
      };
      by_parity(iters, consume);
      wgmma_wait<0>();
      pin_registers(acc);
      if (lane == 0) mbarrier_arrive(&empty[(j + iters - 1) % kStages]);
      j += iters;
      return epilogue(t, m0, n0);
    });
  } else {
    for_each_tile([&](int t, int n0, int m0) {
      // Each call loads the next stage of its operand into slot s.
      StageCopies<BM, kThreads, kBN, GROUPED> copies(a, b, group, m, n, k, m0, n0, kb_begin, tid);
      auto load_x = [&](int s) { copies.activations(stage_x(s)); };
      auto load_w = [&](int s) { copies.weights(stage_w(s), stage_s(s)); };

      // Stage it + kStages - 2 is loaded at iteration it into the slot of stage it - 2: every
      // warpgroup has waited for its wgmma of it - 2 before the barrier of iteration it, while
      // the wgmma of it - 1 may still run as this iteration decodes.
      // The weights of the first stages are requested before waiting for the kernel that wrote
      // the activations (programmatic dependent launch); they join the first cp.async group.
#pragma unroll
      for (int s = 0; s < kStages - 2; s++) {
        if (s < iters) load_w(s);
      }
      wait_for_prior_grid();
      read_scales(m0, n0);  // joins the first stage's copies
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
      wgmma_wait<0>();
      pin_registers(acc);
      cp_async_wait<0>();  // before a split that is not the tile's last leaves (with its scales)
      return epilogue(t, m0, n0);
    });
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

template <typename Out, int BM, int STAGES, int DECODE, bool TMA, int WG>
static void launch(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                   const half* group, const void* bias, void* out, int m, int n, int k,
                   int* ws_partial, int* ws_count, int sms, bool pdl, cudaStream_t stream) {
  constexpr auto kernel = w4a8_gemm_wgmma_kernel<Out, BM, STAGES, DECODE, TMA, WG>;
  using T = Tile<BM, STAGES, TMA, WG>;
  constexpr int smem = T::SMEM_BYTES, kBN = T::BN;
  constexpr int threads = kCtaThreads<BM, STAGES, TMA, WG>;
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
  // Persistent tiles: at most the CTAs that fit at once, each looping over its tiles.
  const int tiles = n_tiles * m_tiles;
  const dim3 grid = !T::PERSISTENT ? dim3(n_tiles, m_tiles, splits)
                    : splits == 1  ? dim3(std::min(tiles, sms * per_sm))
                                   : dim3(tiles, 1, splits);
  const CUtensorMap x_map = TMA ? activation_map(a, m, k, BM) : CUtensorMap{};
  launch_kernel(kernel, grid, dim3(threads), smem, stream, pdl,
                "w4a8_gemm_wgmma launch", a, a_scale, b, scale, group,
                static_cast<const Out*>(bias), static_cast<Out*>(out), m, n, k, ws_partial,
                ws_count, x_map);
}

// The tile for (M, N), unless set_wgmma_tile forced one. Measured on the H100 (NOTES.md "GEMM",
// gemm_h100_tiles.log, gemm_h100_registers_tma.log): the loop's speed per CTA hardly depends on
// the ring's depth, so what decides is how many CTAs share the work:
// - 256 tokens where its tiles alone give ~0.7 CTAs per SM (split-K of 256-token tiles lost to
//   128-token tiles: down M = 256 / 512, 56.0 / 91.6 us vs 46.7 / 67.5), and it computes at most
//   1/8 more padding tokens than the 128-token tile (gate_up M = 384: 131.6 us vs 104.6) or its
//   tiles fit one wave where the 128-token ones do not, however few they are: an SM then
//   computes 256 tokens either way, and the larger tile does it faster (o / down M = 640, 29.8
//   / 84.0 us vs 32.9 / 101.5 for two 128-token CTAs per SM, gemm_h100_amended_rule.log; g128
//   3584 x 4608 M = 512, 72 tiles on 132 SMs, 26.2 vs 35.6, gemm_h100_wide_any_n.log), but not
//   where it is the other way round: 256-token tiles in two waves, 128-token ones all at once
//   two per SM (N = 3584, M = 1152: 140 tiles of 256 tokens took 47.1 us, 252 of 128 31.4);
// - else 128 tokens where they give ~0.7 CTAs per SM, counting split-K where each split keeps
//   >= 32 k blocks (shorter splits lost to smaller tiles: qkv M = 128, 64 tokens 26 us vs 128
//   tokens split in 2, 30 us), or from M = 65 where the N tiles alone outnumber the SMs (gate_up
//   M = 128: 34.6 us vs 51.9 with 64-token tiles; at M = 64 28.7 vs 31.4 the other way), or
//   where they fit one wave and 64-token tiles would run two CTAs per SM, however few they are
//   (g128 3584 x 3584 M = 384, 84 tiles on 132 SMs: 22.1 us vs 28.2; 1536 x 2048 M = 640: 12.4
//   vs 14.9; 3584 x 4608 M = 256: 21.6 vs 27.8; per-channel 19.0 vs 22.0, 11.0 vs 12.4,
//   gemm_h100_g128_tiles.log);
// - else 64 tokens: 8 slots (one CTA per SM) or, when their CTAs exceed the SMs, 6 slots (two CTAs
//   per SM; gate_up M = 64 28.7 us vs 32.3 with 8).
// A 128-token tile with more tiles than SMs loads with cp.async, two CTAs per SM (four warpgroups
// take turns on the tensor cores: gate_up M = 128 51.9 -> 39.9 us), every other tile with the
// producer.
static int forced_bm = 0, forced_stages = 0, forced_warpgroups = 0;
static bool forced_tma = false;

static void choose_tile(int m, int n, int k, int sms, int& bm, int& stages, bool& tma) {
  constexpr int kBN = kDefaultWarpgroups * 64;
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
  const bool only_256_in_one_wave = tiles(256) <= sms && tiles(128) > sms;
  const bool two_128_per_sm_in_one_wave = tiles(256) > sms && tiles(128) <= 2 * sms;
  const bool only_128_in_one_wave = tiles(128) <= sms && tiles(64) > sms;
  if (m > 128 && !two_128_per_sm_in_one_wave &&
      (only_256_in_one_wave || (10 * tiles(256) >= 7 * sms &&
                                8 * (padding(256) - padding(128)) <= (m + 255) / 256 * 256))) {
    bm = 256;
  } else if (m > 64 && (10 * ctas(128) >= 7 * sms || wide || two_128_per_sm_in_one_wave ||
                        only_128_in_one_wave)) {
    bm = 128;
  } else {
    bm = 64;
  }
  tma = !(bm == 128 && tiles(128) > sms);
  stages = bm == 64 ? (tiles(64) > sms ? 6 : 8) : (bm == 128 && tma ? 6 : 4);
}

// 192-channel tiles (3 math warpgroups) where they fill the SMs' waves better than the
// 128-channel tile chosen above; where N is not a multiple of 192 the last tile holds 64 or 128
// channels. A choice costs waves x tile area, but per area the 128 x 192 tile
// runs ~17% slower than 256 x 128 once many waves hide the tail (gate_up M = 4608: 955.9 vs
// 807.9 us), so it takes over only where it costs at most 80% as much: gate_up M = 768 (7 waves
// against 6, 87.5%) lost 164.6 vs 145.2 us. The 64-token one only within one wave: beyond it,
// its lower arithmetic intensity cost more than the model counts (3584 x 4608, M = 3072: 107.8
// us vs 93.2 for 256 x 128 tiles). Measured on the H100, each tile forced beside the rule
// (gemm_h100_wide_tiles.log, gemm_h100_wide_any_n.log): qkv (N = 6144) M = 256, 64 x 192 tiles
// 17.2 us vs 20.3 (128 tiles against 96 of 128 x 128 on 132 SMs); M = 512 / 1024 / 1536, 128 x
// 192 tiles 24.8 / 45.3 / 64.5 us vs 28.8 / 52.3 / 77.5 for 256 x 128; N = 12288, M = 256-768,
// 12-17% faster; o (N = 4096) M = 384, 64 x 192 17.4 vs 20.8; M = 640 / 1152 / 1536, 128 x 192
// 24.4 / 42.6 / 45.0 vs 29.1 / 52.6 / 52.9 (down 68.3 / 133.7 / 145.8 vs 83.9 / 163.6 / 167.7).
// Two 128-token CTAs per SM take turns on the tensor cores, so they count as two waves: 3584 x
// 4608 M = 512, 144 of them took 28.6 us against 21.7 for 96 tiles of 128 x 192. fp16 group
// scales take the 64-token one only (g128 o / down M = 384: 23.1 / 67.7 us vs 24.6 / 74.6, qkv
// M = 256 22.9 vs 24.1, 3584 x 3584 M = 384 21.2 vs 22.1); the 128-token one gained nothing for
// them (o M = 640 29.5 vs 29.2, qkv M = 1024 53.6 vs 52.0; H200 qkv 1024 53.9 vs 53.2), and lost
// where two 128 x 128 CTAs per SM fit (3584 x 3584 M = 1152: 47.0 vs 37.8;
// gemm_h100_g128_tiles.log). Integer group scales, whose decode is half as long, take both as
// per-channel does: qkv M = 384 / 512 / 1024 / 1536 on 128 x 192 tiles 25.6 / 26.7 / 48.0 / 71.7
// us vs 29.2 / 29.1 / 51.7 / 78.3 for 256 x 128 (gemm_h100_int_tiles.log,
// gemm_h100_int_tile_rule.log).
static bool choose_wide_tile(int m, int n, int sms, int bm, bool half_groups, int& wide_bm,
                             int& wide_stages, int& wide_warpgroups) {
  auto tiles = [&](int tile_m, int tile_n) {
    return static_cast<int64_t>((m + tile_m - 1) / tile_m) * ((n + tile_n - 1) / tile_n);
  };
  // Up to 128 tokens, the 64 x 192 tile where it fills one wave and 64 x 128 tiles overflow it
  // (two CTAs per SM, or one wave of 128-token tiles that compute twice the rows): Llama-2-7B
  // gate_up (4096 x 22016) M = 32 / 64 21.1 / 21.2 us vs 23.6 / 23.5, g128 M = 16-64 23.0-23.4
  // vs 30.8-31.2; Qwen2.5-1.5B gate_up (1536 x 17920) M = 32 / 64 9.8 / 9.7 vs 11.4 / 11.6;
  // Llama-3-70B qkv (8192 x 10240) M = 128 27.5 vs 33.9, g128 38.8 vs 42.1 (gemm_h100_tile64.log).
  // Where 64 x 192 tiles overflow the wave too, the 64 x 256 tile (4 math warpgroups) where it
  // fills one (up to 64 tokens, as measured): Llama-3-8B gate_up (4096 x 28672, 112 tiles) g128
  // M = 16 / 32 / 64 28.8 / 29.0 / 29.6 us vs 32.7 / 31.6 / 32.0 for two 64 x 128 CTAs per SM
  // (Machete W4A16 31.4 at M = 16); per-channel 26.8-27.7 vs 27.6-27.9. Where it fills less
  // (Llama-2-7B gate_up, 86 tiles) the 64 x 192 one stays faster: g128 27.0 vs 22.9
  // (gemm_h100_tile256.log).
  auto pick = [&](int tile_m, int slots, int warpgroups) {
    wide_bm = tile_m;
    wide_stages = slots;
    wide_warpgroups = warpgroups;
    return true;
  };
  // 64-token tiles of tile_n channels fill one wave, at least 70% of it.
  auto fill_one_wave = [&](int tile_n) { return fills_one_wave(tiles(64, tile_n), sms); };
  if (m <= 128) {
    if (fill_one_wave(192) && tiles(64, 128) > sms) return pick(64, 8, 3);
    if (m <= 64 && fill_one_wave(256) && tiles(64, 192) > sms) return pick(64, 7, 4);
    return false;
  }
  auto cost = [&](int tile_m, int tile_n) {
    return (tiles(tile_m, tile_n) + sms - 1) / sms * tile_m * tile_n;
  };
  // The model counts no K splits: not fewer tiles than half the SMs (the launch then splits K).
  if (2 * tiles(bm, 128) <= sms) {
    return false;
  }
  int64_t best = cost(bm, 128) * 8 / 10;
  wide_bm = 0;
  constexpr int kWideTiles[][2] = {{64, 8}, {128, 5}};  // tokens, slots
  for (const auto& tile : kWideTiles) {
    if (half_groups && tile[0] == 128) continue;
    const bool one_wave = tiles(tile[0], 192) <= sms;
    if (10 * tiles(tile[0], 192) >= 7 * sms && (tile[0] == 128 || one_wave) &&
        cost(tile[0], 192) <= best) {
      best = cost(tile[0], 192);
      pick(tile[0], tile[1], 3);
    }
  }
  return wide_bm != 0;
}

// Up to 32 tokens, tiles of 16 or 32 (wgmma's N), a quarter or half the tensor work of the
// 64-token tile, where they need no second wave: 256 channels where those fill one (Llama-3-8B
// gate_up, 112 tiles), else 128 where those fit one (K split to fill the SMs: qkv, o, down).
// Measured on the H100 against the 64-token tiles (gemm_h100_tile16.log), M = 32: qkv 11.5 vs
// 12.0 us, o 10.0 vs 11.0, gate_up 25.5 vs 27.7, down 18.1 vs 19.5 (g128 13.3 / 11.0 / 27.6 /
// 21.2 vs 14.1 / 12.1 / 29.1 / 22.6); M = 16, g128 gate_up 27.0 vs 28.8, down 19.8 vs 22.2.
// Where neither fits (Llama-2-7B gate_up: 86 tiles of 256 channels, 172 of 128), the 64 x 192
// tile of choose_wide_tile.
// g128 on large weights takes 4 warpgroups where 128 channels would fit: the two-level decode
// (~15 instructions a word) stalls on its loads (ncu, down M = 16: 2.2 warps a scheduler, 5.6
// cycles per issued instruction), and twice the warps hide more of it. Down M = 1 / 16: 18.2 /
// 18.4 us against 18.8 / 19.8 for the 2-warpgroup tile (gemm_h100_g128_wg4.log); M = 17 / 32:
// 20.3 / 20.3 against 21.3 / 21.2 (gemm_h100_g128_tiles_17_256.log).
// Per-channel's cheap decode prefers the 2-warpgroup tile's deeper ring (down 16.5 vs 17.0), as
// does g128 o (10.1 vs 11.5), a small weight whose fixed costs dominate. Integer group scales
// follow per-channel: on down M = 17-32 the two tie (19.5-20.3 us, gemm_h100_int_tile_rule.log).
static bool choose_small_tile(int m, int n, int k, int sms, bool half_groups, int& bm, int& stages,
                              int& warpgroups) {
  const int tokens = m <= 16 ? 16 : 32;
  const bool wide = wide_tiles_fill_one_wave(n, sms);
  if (m > 32 || !(wide || (n + 127) / 128 <= sms)) return false;
  bm = tokens;
  const bool four = wide || (half_groups && large_weight(k, n));
  warpgroups = four ? 4 : 2;
  stages = four ? (tokens == 16 ? 7 : 6) : (tokens == 16 ? 12 : 10);
  return true;
}

template <typename Out, int DECODE>
static void dispatch(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                     const half* group, const void* bias, void* out, int m, int n, int k,
                     int* ws_partial, int* ws_count, int sms, bool pdl, cudaStream_t stream) {
  int bm = forced_bm, stages = forced_stages, wg = kDefaultWarpgroups;
  bool tma = forced_tma;
  // The tile rules below set fp16 group scales apart (their decode's ~15 instructions a word);
  // integer ones (decode_group_int, 7) follow per-channel's, as the small-M rules do (kernels.h).
  constexpr bool HALF_GROUPS = DECODE == kDecodeGroupHalf;
  if (bm == 0 && choose_small_tile(m, n, k, sms, HALF_GROUPS, bm, stages, wg)) {
    tma = true;
  } else if (bm == 0) {
    choose_tile(m, n, k, sms, bm, stages, tma);
    int wide_bm = 0, wide_stages = 0, wide_warpgroups = 0;
    if (choose_wide_tile(m, n, sms, bm, HALF_GROUPS, wide_bm, wide_stages, wide_warpgroups)) {
      bm = wide_bm;
      stages = wide_stages;
      tma = true;
      wg = wide_warpgroups;
    }
  } else if (forced_warpgroups > 0) {
    wg = forced_warpgroups;
  }
#define QQQ_TILE(BM_, STAGES_, TMA_, WG_)                                                        \
  if (bm == BM_ && stages == STAGES_ && tma == TMA_ && wg == WG_) {                              \
    return launch<Out, BM_, STAGES_, DECODE, TMA_, WG_>(a, a_scale, b, scale, group, bias, out,  \
                                                         m, n, k, ws_partial, ws_count, sms, pdl, \
                                                         stream);                                 \
  }
  QQQ_TILE(64, 6, true, 2)
  QQQ_TILE(64, 8, true, 2)
  QQQ_TILE(128, 4, false, 2)
  QQQ_TILE(128, 6, true, 2)
  QQQ_TILE(256, 4, true, 2)
  QQQ_TILE(64, 8, true, 3)
  QQQ_TILE(128, 5, true, 3)
  // 256 channels (7 slots: 8 and the staging rows exceed shared memory), up to 64 tokens where
  // 112 such tiles fill one wave and 192-channel ones make 150 (Llama-3-8B gate_up).
  QQQ_TILE(64, 7, true, 4)
  // Up to 32 tokens: wgmma of 16 or 32 tokens does a quarter or half of the 64-token tile's
  // tensor work at M <= 16 / 32, the ring about as many bytes deep.
  QQQ_TILE(16, 12, true, 2)
  QQQ_TILE(32, 10, true, 2)
  QQQ_TILE(16, 7, true, 4)
  QQQ_TILE(32, 6, true, 4)
#undef QQQ_TILE
  throw std::invalid_argument("vllm_qqq: no wgmma tile of " + std::to_string(bm) + " tokens x " +
                              std::to_string(stages) + " stages" + (tma ? " (producer warp)" : "") +
                              " x " + std::to_string(wg) + " warpgroups");
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
    if (cudaFuncGetAttributes(&attr,
                              sm90::w4a8_gemm_wgmma_kernel<half, 128, 4, kDecodeChannel, false,
                                                           2>) !=
        cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attr.ptxVersion >= 90;
  }();
  return yes;
}

void set_wgmma_tile(int bm, int stages, bool producer_warp, int warpgroups) {
  sm90::forced_bm = bm;
  sm90::forced_stages = stages;
  sm90::forced_tma = producer_warp;
  sm90::forced_warpgroups = warpgroups;
}

void w4a8_gemm_wgmma(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                     const half* group, int decode, const void* bias, void* out, int out_dtype,
                     int m, int n, int k, int* ws_partial, int* ws_count, int sms, bool pdl,
                     cudaStream_t stream) {
  with_decode(decode, [&](auto d) {
    constexpr int D = decltype(d)::value;
    (out_dtype == kFloat16 ? sm90::dispatch<half, D> : sm90::dispatch<__nv_bfloat16, D>)(
        a, a_scale, b, scale, group, bias, out, m, n, k, ws_partial, ws_count, sms, pdl, stream);
  });
}

}  // namespace qqq
