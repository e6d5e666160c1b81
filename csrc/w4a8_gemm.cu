// W4A8 GEMM: int8 activations x int4 weights (per-channel, or two-level per-group of 128),
// int32 accumulation with mma.sync m16n8k32, fp32 epilogue identical to the reference's.
//
// One CTA computes a BM x 128 output tile with 8 warps (WARPS_M x WARPS_N, each MT m16 tiles by
// NT n8 tiles), streaming K in stages of 128 through a STAGES-deep cp.async pipeline. Weights
// arrive in the kernel layout (vllm_qqq/ops.py): each lane's 32-bit word holds both B fragments
// of one n8 x k32 step, so decoding is a mask and a shift (per-channel, codes read as code * 16)
// or an fp16 fused multiply-add per pair (per-group: round((code - 8) * s_group) lands on the
// int8 grid exactly; the loader has checked it cannot overflow).
//
// Small M (<= 64) does not fill the GPU with N / 128 tiles, so K is split over blockIdx.z: each
// split stores its int32 partial tile to the workspace with plain stores, and the last split of a
// tile to finish (an atomic counter) adds them in order and applies the epilogue. (Adding into a
// zeroed buffer with atomics instead was measured slower on the H100 at M = 16: the atomics and
// the fence after them stalled the warps; NOTES.md "GEMM".) At M <= 16 the narrow kernel
// (w4a8_gemm_narrow.cu) takes most shapes instead: narrow_default in kernels.h.
#include <algorithm>

#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"
#include "stage_copies.cuh"

namespace qqq {

constexpr int kThreads = 256;
constexpr int kBN = 128;
constexpr int kBK = 128;
constexpr int kSplitMaxM = 64;  // rows up to which K may be split

template <int MT, int NT, int WARPS_M, int WARPS_N>
struct Tile {
  static_assert(WARPS_M * WARPS_N == kThreads / 32, "8 warps");
  static_assert(WARPS_N * NT * 8 == kBN, "tile N");
  static constexpr int BM = WARPS_M * MT * 16;
  // Measured on the H100: 6 or 8 stages at M <= 16 were no faster than 4 (within ~5% either
  // way on the Llama shapes; NOTES.md "GEMM", eleventh session).
  static constexpr int STAGES = 4;
  static constexpr int A_BYTES = BM * kBK;
  static constexpr int B_BYTES = (kBK / 32) * (kBN / 8) * 32 * 4;
  static constexpr int S_BYTES = kBN * 2;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + S_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
};

template <typename Out, int MT, int NT, int WARPS_M, int WARPS_N, int DECODE>
__global__ void __launch_bounds__(kThreads, 2)
    w4a8_gemm_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale,
                     const uint32_t* __restrict__ b, const float* __restrict__ scale,
                     const half* __restrict__ group, const Out* __restrict__ bias,
                     Out* __restrict__ out, int m, int n, int k,
                     int* __restrict__ ws_partial, int* __restrict__ ws_count) {
  constexpr bool GROUPED = DECODE != kDecodeChannel;
  using T = Tile<MT, NT, WARPS_M, WARPS_N>;
  constexpr int kStages = T::STAGES;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * T::BM;

  // This split's range of 128-deep k blocks.
  const int splits = gridDim.z;
  int kb_begin, kb_end;
  split_range(k / kBK, blockIdx.z, splits, kb_begin, kb_end);
  const int iters = kb_end - kb_begin;

  auto stage_a = [&](int s) { return smem + s * T::STAGE_BYTES; };
  auto stage_b = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * T::STAGE_BYTES + T::A_BYTES);
  };
  auto stage_s = [&](int s) {
    return reinterpret_cast<half*>(smem + s * T::STAGE_BYTES + T::A_BYTES + T::B_BYTES);
  };

  // Each call loads the next stage of its operand into slot s.
  StageCopies<T::BM, kThreads, kBN, GROUPED> copies(a, b, group, m, n, k, m0, n0, kb_begin, tid);
  auto load_a = [&](int s) { copies.activations(stage_a(s)); };
  auto load_b = [&](int s) { copies.weights(stage_b(s), stage_s(s)); };

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][j][e] = 0;

  // The weights of the first stages are requested before waiting for the kernel that wrote the
  // activations (programmatic dependent launch).
#pragma unroll
  for (int s = 0; s < kStages - 1; s++) {
    if (s < iters) load_b(s);  // joins the first cp.async group
  }
  wait_for_prior_grid();
#pragma unroll
  for (int s = 0; s < kStages - 1; s++) {
    if (s < iters) load_a(s);
    cp_async_commit();
  }

  // Epilogue: y = (float(acc) * a_scale[row]) * scale[col] (+ bias[col]), no contraction. Its
  // scales and bias are loaded well before the sums are ready (below), so that the kernel's end
  // waits for the sums alone: loaded after them, they had cost one more L2 round trip per call.
  auto finish = [&](int row, int col, int v0, int v1, float ts, float2 sc, float2 bs) {
    store_scaled_pair(out, n, row, col, v0, v1, ts, sc, bs, bias != nullptr);
  };

  // Without split-K each thread writes its fragments' rows and columns. Their operands are
  // loaded before the main loop in the small-M tile; the larger tiles (sm_80, M > 16) have no
  // registers to spare through the loop and load them after it.
  float frag_ts[MT][2];
  float2 frag_sc[NT], frag_bs[NT];
  auto load_frag_operands = [&] {
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int row = m0 + wm * MT * 16 + i * 16 + lane / 4 + h * 8;
        frag_ts[i][h] = row < m ? load_produced(a_scale + row) : 0.f;
      }
#pragma unroll
    for (int j = 0; j < NT; j++) {
      const int col = n0 + (wn * NT + j) * 8 + (lane % 4) * 2;
      frag_sc[j] = col < n ? *reinterpret_cast<const float2*>(scale + col) : make_float2(0.f, 0.f);
      frag_bs[j] = col < n ? bias_pair(bias, col) : make_float2(0.f, 0.f);
    }
  };
  constexpr bool kOperandsFirst = MT == 1;
  if (kOperandsFirst && splits == 1) load_frag_operands();

  for (int it = 0; it < iters; it++) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < iters) {
      load_a((it + kStages - 1) % kStages);
      load_b((it + kStages - 1) % kStages);
    }
    cp_async_commit();

    const int s = it % kStages;
    const uint8_t* sa = stage_a(s);
    const uint32_t* sb = stage_b(s);
    uint32_t s2[NT];
    if constexpr (GROUPED) {
#pragma unroll
      for (int j = 0; j < NT; j++) {
        s2[j] = group_operand<DECODE>(__half_as_ushort(stage_s(s)[(wn * NT + j) * 8 + lane / 4]));
      }
    }
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ks++) {
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; i++) {
        const int r = wm * MT * 16 + i * 16 + lane % 16;
        const int c = ks * 2 + lane / 16;
        ldmatrix_x4(af[i], sa + r * kBK + ((c ^ (r % 8)) * 16));
      }
#pragma unroll
      for (int j = 0; j < NT; j++) {
        const uint32_t w = sb[ks * 512 + (wn * NT + j) * 32 + lane];
        uint32_t b0, b1;
        decode<DECODE>(w, s2[j], b0, b1);
#pragma unroll
        for (int i = 0; i < MT; i++) mma_s8(acc[i][j], af[i], b0, b1);
      }
    }
  }
  cp_async_wait<0>();

  if (splits == 1) {
    if (!kOperandsFirst) load_frag_operands();
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int row = m0 + wm * MT * 16 + i * 16 + lane / 4 + h * 8;
          const int col = n0 + (wn * NT + j) * 8 + (lane % 4) * 2;
          if (row < m && col < n) {
            finish(row, col, acc[i][j][2 * h], acc[i][j][2 * h + 1], frag_ts[i][h], frag_sc[j],
                   frag_bs[j]);
          }
        }
    return;
  }

  // Split K: this split's partial tile (its valid rows) goes to its own slot of the workspace;
  // the last split of the tile to finish adds the slots and applies the epilogue. Each thread of
  // that split adds 4 channels of rows r0, r0 + 8, ... over the splits with 16-byte loads,
  // several splits in flight at once. (Adding per mma fragment, one split after another,
  // chained `splits` dependent L2 round trips per fragment: measured, NOTES.md "GEMM".)
  constexpr int kQuads = kBN / 4;
  constexpr int kRowsPerThread = T::BM * kQuads / kThreads;
  static_assert(kThreads % kQuads == 0 && kRowsPerThread >= 1, "whole rows per pass");
  const int r0 = tid / kQuads, c = (tid % kQuads) * 4;
  const bool col_ok = n0 + c < n;  // n % 64 == 0: all four channels or none
  float4 sum_sc = make_float4(0.f, 0.f, 0.f, 0.f);
  float2 sum_bs[2] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
  float sum_ts[kRowsPerThread];
  auto load_sum_operands = [&] {  // before the handshake in the small-M tile, as above
    if (col_ok) {
      sum_sc = *reinterpret_cast<const float4*>(scale + n0 + c);
      sum_bs[0] = bias_pair(bias, n0 + c);
      sum_bs[1] = bias_pair(bias, n0 + c + 2);
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; i++) {
      const int row = m0 + r0 + i * (kThreads / kQuads);
      sum_ts[i] = row < m ? load_produced(a_scale + row) : 0.f;
    }
  };
  if (kOperandsFirst) load_sum_operands();

  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  auto partial = [&](int split, int r, int c) {
    return reinterpret_cast<int2*>(
        ws_partial + ((static_cast<size_t>(tile) * splits + split) * T::BM + r) * kBN + c);
  };
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int r = wm * MT * 16 + i * 16 + lane / 4 + h * 8;
        const int c = (wn * NT + j) * 8 + (lane % 4) * 2;
        if (m0 + r < m) __stcg(partial(blockIdx.z, r, c), make_int2(acc[i][j][2 * h], acc[i][j][2 * h + 1]));
      }
  // Handshake: after the CTA barrier one thread releases the CTA's partial stores with a fence
  // and counts the split in; the last split's thread acquires the others' with a second fence
  // before the CTA barrier that lets its threads read them. (Together with the early operands
  // above: -0.6 to -0.9 us per call at M <= 16 against a sequentially consistent fence in every
  // thread; NOTES.md "GEMM".)
  __syncthreads();
  __shared__ int last;
  if (tid == 0) {
    asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
    last = atomicAdd(ws_count + tile, 1) == splits - 1;
    if (last) asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
  }
  __syncthreads();
  if (!last) return;
  if (!kOperandsFirst) load_sum_operands();
  const int rows = min(T::BM, m - m0);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; i++) {
    const int r = r0 + i * (kThreads / kQuads);
    if (r >= rows || !col_ok) continue;
    int4 sum = make_int4(0, 0, 0, 0);
#pragma unroll 4
    for (int split = 0; split < splits; split++) {
      const int4 p = __ldcg(reinterpret_cast<const int4*>(partial(split, r, c)));
      sum.x += p.x;
      sum.y += p.y;
      sum.z += p.z;
      sum.w += p.w;
    }
    finish(m0 + r, n0 + c, sum.x, sum.y, sum_ts[i], make_float2(sum_sc.x, sum_sc.y), sum_bs[0]);
    finish(m0 + r, n0 + c + 2, sum.z, sum.w, sum_ts[i], make_float2(sum_sc.z, sum_sc.w),
           sum_bs[1]);
  }
  if (tid == 0) ws_count[tile] = 0;  // ready for the next call
}

static bool wgmma_enabled = true;
void set_wgmma_enabled(bool on) { wgmma_enabled = on; }
static bool pdl_allowed = true;
void set_pdl(bool on) { pdl_allowed = on; }
static int narrow_mode = -1;
void set_narrow(int mode) { narrow_mode = mode; }
static int wgmma_min_m = 0;  // 0: wgmma_default_min_m
void set_wgmma_min_m(int m) { wgmma_min_m = std::max(m, 0); }

static int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// One call's operands, passed down the host-side dispatch; pdl: launched as a programmatic
// dependent launch.
struct Call {
  const int8_t* a;
  const float* a_scale;
  const uint32_t* b;
  const float* scale;
  const half* group;
  int decode;  // decode_mode (kernels.h)
  const void* bias;
  void* out;
  int m, n, k;
  int* ws_partial;
  int* ws_count;
  bool pdl;
  cudaStream_t stream;
};

// How many ways the mma.sync kernel splits K for a tile of bm tokens: up to two CTAs per SM, each
// split keeping at least two k blocks to pipeline, and the partial tiles within the workspace's
// partial region. Splitting further (3 CTAs per SM) was measured slower. Above 8 rows at most 4
// splits, as the partial rows cost more than the extra splits gain (qkv M = 16: 12.3 us with 4
// vs 13.3 with 5, o flat from 3 to 8 splits; NOTES.md "GEMM").
constexpr int kFewSplitsAboveRows = 8;
constexpr int kFewSplits = 4;
static int split_cap = 0;  // set_split_cap: in place of kFewSplits, at every M
void set_split_cap(int splits) { split_cap = std::max(splits, 0); }

static int split_count(int m, int n, int k, int bm) {
  if (m > kSplitMaxM) return 1;
  static const int sms = sm_count();
  const int tiles = (n + kBN - 1) / kBN * ((m + bm - 1) / bm);
  const int fit = static_cast<int>(workspace_partial_entries(n) / (int64_t{tiles} * bm * kBN));
  const int splits = std::max(1, std::min({(2 * sms) / tiles, (k / kBK) / 2, fit}));
  if (split_cap > 0) return std::min(splits, split_cap);
  return m > kFewSplitsAboveRows ? std::min(splits, kFewSplits) : splits;
}

template <typename Out, int MT, int NT, int WARPS_M, int WARPS_N, int DECODE>
static void launch(const Call& c) {
  using T = Tile<MT, NT, WARPS_M, WARPS_N>;
  constexpr auto kernel = w4a8_gemm_kernel<Out, MT, NT, WARPS_M, WARPS_N, DECODE>;
  allow_smem<kernel, T::SMEM_BYTES>();
  launch_kernel(kernel,
                dim3((c.n + kBN - 1) / kBN, (c.m + T::BM - 1) / T::BM,
                     split_count(c.m, c.n, c.k, T::BM)),
                dim3(kThreads), T::SMEM_BYTES, c.stream, c.pdl, "w4a8_gemm launch", c.a,
                c.a_scale, c.b, c.scale, c.group,
                static_cast<const Out*>(c.bias), static_cast<Out*>(c.out), c.m, c.n, c.k,
                c.ws_partial, c.ws_count);
}

template <typename Out, int MT, int NT, int WARPS_M, int WARPS_N>
static void launch_for_decode(const Call& c) {
  with_decode(c.decode,
              [&](auto d) { launch<Out, MT, NT, WARPS_M, WARPS_N, decltype(d)::value>(c); });
}

template <typename Out>
static void dispatch(const Call& c) {
  // The tile is chosen from M here, inside the op: vLLM's compiled graphs must not bake it in.
  if (c.m <= 16) {
    launch_for_decode<Out, 1, 2, 1, 8>(c);
  } else if (c.m <= 32) {
    launch_for_decode<Out, 2, 2, 1, 8>(c);
  } else if (c.m <= 64) {
    launch_for_decode<Out, 2, 4, 2, 4>(c);
  } else {
    launch_for_decode<Out, 4, 4, 2, 4>(c);
  }
}

void w4a8_gemm(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
               const void* group, bool group_int, const void* bias, void* out, int out_dtype,
               int m, int n, int k, int* workspace, int64_t workspace_entries,
               bool prefetch_weights, cudaStream_t stream) {
  if (k <= 0 || k % kBK != 0 || n <= 0 || n % 64 != 0) {
    throw std::invalid_argument(
        "vllm_qqq: w4a8_gemm needs K and N positive, K % 128 == 0 and N % 64 == 0");
  }
  if (out_dtype != kFloat16 && out_dtype != kBFloat16) {
    throw std::invalid_argument("vllm_qqq: w4a8_gemm writes fp16 or bf16");
  }
  if (workspace_entries < workspace_zeroed_entries(n) + workspace_partial_entries(n)) {
    throw std::invalid_argument("vllm_qqq: w4a8_gemm workspace too small");
  }
  if (workspace_entries % 4) {  // the partial tiles at its end are read in 16-byte pieces
    throw std::invalid_argument("vllm_qqq: w4a8_gemm workspace entries must be a multiple of 4");
  }
  if (m == 0) return;
  const int decode = decode_mode(group, group_int);
  const Call c{a, a_scale, b, scale, static_cast<const half*>(group), decode, bias, out, m, n, k,
               workspace + (workspace_entries - workspace_partial_entries(n)), workspace,
               prefetch_weights && pdl_allowed && pdl_supported(), stream};
  static const int sms = sm_count();
  // The small-M rules below treat integer group scales as per-channel: their decode is cheap
  // enough for the narrow kernel on large weights too (kernels.h, narrow_default).
  const bool half_groups = decode == kDecodeGroupHalf;
  const int min_m =
      wgmma_min_m > 0 ? wgmma_min_m : wgmma_default_min_m(k, n, half_groups, sms);
  if (m >= min_m && wgmma_enabled && wgmma_available()) {
    w4a8_gemm_wgmma(c.a, c.a_scale, c.b, c.scale, c.group, decode, c.bias, c.out, out_dtype,
                    m, n, k, c.ws_partial, c.ws_count, sms, c.pdl, stream);
  } else if (m <= 16 && (narrow_mode < 0 ? narrow_default(k, n, half_groups)
                                          : narrow_mode > 0)) {
    w4a8_gemm_narrow(c.a, c.a_scale, c.b, c.scale, c.group, decode, c.bias, c.out,
                     out_dtype, m, n, k, sms, c.pdl, stream);
  } else if (out_dtype == kFloat16) {
    dispatch<half>(c);
  } else {
    dispatch<__nv_bfloat16>(c);
  }
}

}  // namespace qqq
