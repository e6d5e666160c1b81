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

#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"
#include "stage_copies.cuh"

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
template <int NB>
struct Narrow {
  static constexpr int NT = NB / 8;
  static constexpr int COPY_THREADS = NB == 32 ? 128 : 64;
  static constexpr int BLOCKS_PER_GROUP = kNarrowWarps / (kNarrowThreads / COPY_THREADS);
  static constexpr int SLOT_A = kNarrowBM * kBlockK;
  static constexpr int SLOT_B = (kBlockK / 32) * NT * 32 * 4;
  static constexpr int SLOT_BYTES = SLOT_A + SLOT_B + NB * 2;
  static constexpr int STAGE_BYTES = kNarrowWarps * SLOT_BYTES;
  static_assert(kNarrowWarps * NT * 4 * 32 * 4 <= 2 * STAGE_BYTES, "reduction fits the ring");
  static_assert(6 * STAGE_BYTES + 1024 <= 227 * 1024, "6 stages fit one SM");
};
// CTAs per SM for a ring of STAGES (shared memory: 33 KB a stage for 32 channels, 24 KB for 16),
// at most 3.
template <int NB, int STAGES>
constexpr int kNarrowCtasPerSm =
    std::min(3, (227 * 1024) / (STAGES * Narrow<NB>::STAGE_BYTES + 1024));

// GROUP_SUMS (integer group scales, on by default, measured in NOTES.md "GEMM"; tuning:
// set_narrow_group_sums): each warp's k block is one group, so its MMAs can take the codes alone
// (decode_group_codes, 3 instructions a word against decode_group_int's 7) and the block's sums
// join the accumulators times their columns' scales (one IMAD each, 16 a block). The sums carry a
// factor 16 (the codes sit in the high nibbles), taken out before the warps' partial tiles are
// added; a warp's sum of 16 * a * w8 over its k blocks stays below 2^31 while K <= kGroupSumsMaxK.
constexpr int kGroupSumsMaxK = 63 * 1024;  // 16 * 128 * 128 * (128 * 63 blocks) < 2^31

template <typename Out, int DECODE, int STAGES, int NB, bool GROUP_SUMS = false>
__global__ void __launch_bounds__(kNarrowThreads, kNarrowCtasPerSm<NB, STAGES>)
    w4a8_narrow_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale,
                       const uint32_t* __restrict__ b, const float* __restrict__ scale,
                       const half* __restrict__ group, const Out* __restrict__ bias,
                       Out* __restrict__ out, int m, int n, int k) {
  constexpr bool GROUPED = DECODE != kDecodeChannel;
  static_assert(!GROUP_SUMS || DECODE == kDecodeGroupInt, "group sums need integer scales");
  using L = Narrow<NB>;
  constexpr int kNarrowNT = L::NT, kSlotA = L::SLOT_A, kSlotB = L::SLOT_B;
  constexpr int kBlocksPerGroup = L::BLOCKS_PER_GROUP;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n0 = blockIdx.x * NB;
  const int kblocks = k / kBlockK;
  const int iters = (kblocks + kNarrowWarps - 1) / kNarrowWarps;
  auto slot = [&](int stage, int block) {
    return smem + stage * L::STAGE_BYTES + block * L::SLOT_BYTES;
  };

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
      uint8_t* s = slot(it % STAGES, block);
      if (it * kNarrowWarps + block < kblocks) {
        if (activations) {
          copies.activations(s);
        } else {
          copies.weights(reinterpret_cast<uint32_t*>(s + kSlotA),
                         reinterpret_cast<half*>(s + kSlotA + kSlotB));
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
  wait_for_prior_grid();
  const float out_ts = out_row < m ? load_produced(a_scale + out_row) : 0.f;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < iters) load(s, true);
    cp_async_commit();
  }

  for (int it = 0; it < iters; it++) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (it + STAGES - 1 < iters) {
      load(it + STAGES - 1, false);
      load(it + STAGES - 1, true);
    }
    cp_async_commit();

    if (it * kNarrowWarps + warp >= kblocks) continue;  // past K: this warp's block is empty
    const uint8_t* s = slot(it % STAGES, warp);
    const uint32_t* sb = reinterpret_cast<const uint32_t*>(s + kSlotA);
    [[maybe_unused]] uint32_t s2[kNarrowNT];
    if constexpr (GROUPED && !GROUP_SUMS) {
      const half* ss = reinterpret_cast<const half*>(s + kSlotA + kSlotB);
#pragma unroll
      for (int j = 0; j < kNarrowNT; j++) {
        s2[j] = group_operand<DECODE>(__half_as_ushort(ss[j * 8 + lane / 4]));
      }
    }
    [[maybe_unused]] int sums[kNarrowNT][4];  // GROUP_SUMS: this k block's (one group's) sums
#pragma unroll
    for (int ks = 0; ks < kBlockK / 32; ks++) {
      uint32_t af[4];
      const int r = lane % 16, c = ks * 2 + lane / 16;
      ldmatrix_x4(af, s + r * kBlockK + ((c ^ (r % 8)) * 16));
#pragma unroll
      for (int j = 0; j < kNarrowNT; j++) {
        const uint32_t w = sb[(ks * kNarrowNT + j) * 32 + lane];
        uint32_t b0, b1;
        if constexpr (GROUP_SUMS) {
          decode_group_codes(w, b0, b1);
          if (ks == 0) {
            mma_s8_first(sums[j], af, b0, b1);
          } else {
            mma_s8(sums[j], af, b0, b1);
          }
        } else {
          decode<DECODE>(w, s2[j], b0, b1);
          mma_s8(acc[j], af, b0, b1);
        }
      }
    }
    if constexpr (GROUP_SUMS) {
      // acc[j][e] is channel j * 8 + (lane % 4) * 2 + e % 2: two adjacent int16 scales.
      const uint16_t* ss = reinterpret_cast<const uint16_t*>(s + kSlotA + kSlotB);
#pragma unroll
      for (int j = 0; j < kNarrowNT; j++) {
        const uint32_t pair = *reinterpret_cast<const uint32_t*>(ss + j * 8 + (lane % 4) * 2);
        const int s_even = static_cast<int>(pair & 0xffffu), s_odd = static_cast<int>(pair >> 16);
        acc[j][0] += s_even * sums[j][0];
        acc[j][1] += s_odd * sums[j][1];
        acc[j][2] += s_even * sums[j][2];
        acc[j][3] += s_odd * sums[j][3];
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: the warps' partial tiles go there

  int* red = reinterpret_cast<int*>(smem);  // [warp][j][e][lane]
#pragma unroll
  for (int j = 0; j < kNarrowNT; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      red[((warp * kNarrowNT + j) * 4 + e) * 32 + lane] = GROUP_SUMS ? acc[j][e] >> 4 : acc[j][e];
    }
  __syncthreads();
  if (!out_thread) return;
  int v0 = 0, v1 = 0;
#pragma unroll
  for (int w = 0; w < kNarrowWarps; w++) {
    v0 += red[((w * kNarrowNT + out_j) * 4 + 2 * out_h) * 32 + lane];
    v1 += red[((w * kNarrowNT + out_j) * 4 + 2 * out_h + 1) * 32 + lane];
  }
  if (out_row >= m) return;
  store_scaled_pair(out, n, out_row, out_col, v0, v1, out_ts, out_sc, out_bs, bias != nullptr);
}

template <typename Out, int DECODE, int STAGES, int NB, bool GROUP_SUMS>
void launch_narrow(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                   const half* group, const void* bias, void* out, int m, int n, int k, bool pdl,
                   cudaStream_t stream) {
  constexpr auto kernel = w4a8_narrow_kernel<Out, DECODE, STAGES, NB, GROUP_SUMS>;
  constexpr int smem = STAGES * Narrow<NB>::STAGE_BYTES;
  allow_smem<kernel, smem>();
  launch_kernel(kernel, dim3(n / NB), dim3(kNarrowThreads), smem, stream, pdl,
                "w4a8_gemm narrow launch", a, a_scale, b, scale, group,
                static_cast<const Out*>(bias), static_cast<Out*>(out), m, n, k);
}

template <typename Out, int DECODE, int NB, bool GROUP_SUMS>
void launch_narrow_stages(int stages, const int8_t* a, const float* a_scale, const uint32_t* b,
                          const float* scale, const half* group, const void* bias, void* out,
                          int m, int n, int k, bool pdl, cudaStream_t stream) {
  const auto launch =
      stages == 2   ? launch_narrow<Out, DECODE, 2, NB, GROUP_SUMS>
      : stages == 4 ? launch_narrow<Out, DECODE, kNarrowDeepStages, NB, GROUP_SUMS>
      : stages == 6 ? launch_narrow<Out, DECODE, kNarrowDeeperStages, NB, GROUP_SUMS>
                    : launch_narrow<Out, DECODE, kNarrowStages, NB, GROUP_SUMS>;
  launch(a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
}

template <typename Out, int DECODE, bool GROUP_SUMS = false>
void launch_narrow_channels(int channels, int stages, const int8_t* a, const float* a_scale,
                            const uint32_t* b, const float* scale, const half* group,
                            const void* bias, void* out, int m, int n, int k, bool pdl,
                            cudaStream_t stream) {
  (channels == 16 ? launch_narrow_stages<Out, DECODE, 16, GROUP_SUMS>
                  : launch_narrow_stages<Out, DECODE, kNarrowBN, GROUP_SUMS>)(
      stages, a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
}

int narrow_stages = 0;    // set_narrow_stages; 0: by the rule above
int narrow_channels = 0;  // set_narrow_channels; 0: kNarrowBN
bool narrow_group_sums = true;  // set_narrow_group_sums

}  // namespace

void w4a8_gemm_narrow(const int8_t* a, const float* a_scale, const uint32_t* b,
                      const float* scale, const half* group, int decode, const void* bias,
                      void* out, int out_dtype, int m, int n, int k, int sms, bool pdl,
                      cudaStream_t stream) {
  const int channels = narrow_channels > 0 ? narrow_channels : kNarrowBN;
  if (m > kNarrowBM || n % channels || k % kBlockK) {
    throw std::invalid_argument("vllm_qqq: the narrow W4A8 kernel takes M <= 16, N % " +
                                std::to_string(channels) + " == 0, K % 128 == 0");
  }
  const int stages = narrow_stages > 0      ? narrow_stages
                     : n / channels > sms   ? kNarrowStages
                     : k <= 4096            ? kNarrowDeepStages
                                            : kNarrowDeeperStages;
  with_decode(decode, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if constexpr (D == kDecodeGroupInt) {
      if (narrow_group_sums && k <= kGroupSumsMaxK) {
        (out_dtype == kFloat16 ? launch_narrow_channels<half, D, true>
                               : launch_narrow_channels<__nv_bfloat16, D, true>)(
            channels, stages, a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
        return;
      }
    }
    (out_dtype == kFloat16 ? launch_narrow_channels<half, D>
                           : launch_narrow_channels<__nv_bfloat16, D>)(
        channels, stages, a, a_scale, b, scale, group, bias, out, m, n, k, pdl, stream);
  });
}

void set_narrow_stages(int stages) { narrow_stages = stages; }

void set_narrow_group_sums(bool on) { narrow_group_sums = on; }

void set_narrow_channels(int channels) {
  if (channels != 0 && channels != 16 && channels != 32) {
    throw std::invalid_argument("vllm_qqq: the narrow kernel takes 16 or 32 channels per CTA");
  }
  narrow_channels = channels;
}

}  // namespace qqq
