// Host entry points of the QQQ kernels (raw pointers; the Python side owns the tensors).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace qqq {

// dtype codes shared with vllm_qqq/ops.py
constexpr int kFloat16 = 0;
constexpr int kBFloat16 = 1;

// How a GEMM kernel decodes its weights (the kernels' template parameter DECODE; decode.cuh).
constexpr int kDecodeChannel = 0;    // per-channel codes, no group scales
constexpr int kDecodeGroupHalf = 1;  // per-group, fp16 group scales
constexpr int kDecodeGroupInt = 2;   // per-group, integer group scales (int16)
inline int decode_mode(const void* group, bool group_int) {
  return group == nullptr ? kDecodeChannel : group_int ? kDecodeGroupInt : kDecodeGroupHalf;
}
// Calls f(std::integral_constant<int, DECODE>{}) for the mode `decode`: a launcher's way to
// instantiate its kernel for a mode known at run time.
template <typename F>
void with_decode(int decode, F&& f) {
  if (decode == kDecodeGroupInt) {
    f(std::integral_constant<int, kDecodeGroupInt>{});
  } else if (decode == kDecodeGroupHalf) {
    f(std::integral_constant<int, kDecodeGroupHalf>{});
  } else {
    f(std::integral_constant<int, kDecodeChannel>{});
  }
}

// gemm_follows: the next kernel in the stream is w4a8_gemm, which waits for this one before it
// reads anything but its weights; the quantization then lets it launch at once (before its own
// wait for the kernel that wrote x), so that the GEMM prefetches its weights meanwhile.
// Otherwise it lets the next kernel launch only after that wait (common.cuh).
void quant_per_token(const void* x, int dtype, int m, int k, int8_t* q, float* scale,
                     bool gemm_follows, cudaStream_t stream);

// For x [m, 2d] (gate, up): q, scale = quantize_per_token(silu(gate) * up), h rounded to the dtype
// as PyTorch rounds it (silu_mul_quant.cu). d % 8 == 0, d <= 32768.
void silu_mul_quant(const void* x, int dtype, int m, int d, int8_t* q, float* scale,
                    cudaStream_t stream);
// Tuning: silu_mul_quant splits rows over clusters of CTAs up to this many rows (< 0: 64).
void set_silu_cluster_rows(int rows);

// For x, residual [m, h] and weight [h]: residual_out = x + residual and q, scale =
// quantize_per_token(rms_norm(x + residual) * weight), rounded as vLLM's fused_add_rms_norm
// rounds in PyTorch (add_rms_norm_quant.cu). h % 8 == 0, h <= 16384.
void add_rms_norm_quant(const void* x, const void* residual, const void* weight, float eps,
                        int dtype, int m, int h, int8_t* q, float* scale, void* residual_out,
                        cudaStream_t stream);
// Tuning: add_rms_norm_quant splits rows over clusters of CTAs up to this many rows (< 0: 0).
void set_norm_cluster_rows(int rows);

// out[m, n] = (float(sum_k a[m, k] * W[k, n]) * a_scale[m]) * scale[n] (+ bias[n]), W the int8
// weight decoded from b (kernel layout, vllm_qqq/ops.py) and, when group != nullptr, the group
// scales [K/128, N]: fp16, or (group_int) int16 integers whose products (code - 8) * s the
// loader has checked to lie in int8 (decode.cuh, decode_group_int). workspace: int32 of
// ops.workspace_size(n) entries, its counters zeroed
// and left zeroed.
// prefetch_weights: b and group are not written by the work before this call in the stream (a
// model's weights); then (sm_90+) the GEMM is launched to start early and prefetch them while the
// kernel before it (the activations' quantization) finishes, and it waits for that kernel before
// it reads or writes anything else (programmatic dependent launch).
void w4a8_gemm(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
               const void* group, bool group_int, const void* bias, void* out, int out_dtype,
               int m, int n, int k, int* workspace, int64_t workspace_entries,
               bool prefetch_weights, cudaStream_t stream);

// The GEMM's int32 workspace, shared by all layers of a device (vllm_qqq/ops.py agrees): first
// one counter per tile that the kernels keep zeroed (split-K: which split of a tile finishes
// last), then, at the END of the buffer, the split-K partial tiles: kWgmmaPartialRows x N entries
// for N <= 8192 (the Hopper kernel's tiles up to 256 tokens), kSplitPartialRows x N above (the
// mma.sync kernel's 16-token tiles, up to 4 splits); each launch keeps splits x token rows of its
// tiles within them. Anchoring the partials at the end keeps them clear of every layer's counters
// when the buffer is sized max(counters) + max(partials).
// Weights of >= 32M entries (Llama-3-8B gate_up and down; qkv and o are below).
inline bool large_weight(int k, int n) {
  return static_cast<int64_t>(k) * n >= (int64_t{32} << 20);
}
// Whether `tiles` CTAs fill one wave of the SMs, at least 70% of it.
inline bool fills_one_wave(int64_t tiles, int sms) {
  return tiles <= sms && 10 * tiles >= 7 * sms;
}
// Whether N's 256-channel tiles fill one wave: where the Hopper kernel's small-M tiles take 256
// channels (w4a8_gemm_sm90.cu, choose_small_tile), and so take over from M = 1 (below).
inline bool wide_tiles_fill_one_wave(int n, int sms) {
  return fills_one_wave((n + 255) / 256, sms);
}
// The smallest M the Hopper kernel takes by default (measured on the H100, NOTES.md "GEMM",
// gemm_h100_tile16.log):
// - from 1 on large weights whose 256-channel tiles fill one wave (Llama-3-8B gate_up, 112
//   tiles): its 16 x 256 tile wins at every M (M = 1 / 8 / 16: per-channel 24.2 / 24.9 / 25.0
//   us against the narrow kernel's 25.3 / 26.2 / 27.4; g128 25.6 / 26.6 / 27.0 against
//   split-K's 28.0 / 28.9 / 28.8);
// - from 5 on other large g128 weights (down), where the narrow kernel is slow and split-K
//   slows from M = 5 (down M = 4 / 5 / 6: 17.2 / 20.4 / 20.5 us) while the 16-token tile stays
//   at ~18 (its 4-warpgroup form, gemm_h100_g128_wg4.log: 18.1-18.2 at M = 1-4, 18.0-18.4 at
//   5-16);
// - else from 17: below, the narrow kernel wins (down M = 16: 15.0 vs 16.5 us for the 16-token
//   tile, qkv 8.0 vs 11.3).
inline int wgmma_default_min_m(int k, int n, bool grouped, int sms) {
  if (large_weight(k, n) && wide_tiles_fill_one_wave(n, sms)) return 1;
  return grouped && large_weight(k, n) ? 5 : 17;
}
constexpr int kWgmmaPartialRows = 1024;
constexpr int kSplitPartialRows = 64;
inline bool wgmma_split_k_allowed(int m, int n) { return m <= 256 && n <= 8192; }
inline int64_t workspace_zeroed_entries(int n) { return (n + 127) / 128 * 4; }
inline int64_t workspace_partial_entries(int n) {
  return int64_t{n <= 8192 ? kWgmmaPartialRows : kSplitPartialRows} * n;
}

// The same product on Hopper (sm_90a) with wgmma; w4a8_gemm calls it from M =
// wgmma_default_min_m on sm_90 (below, the narrow or the split-K mma.sync kernel wins).
// decode: decode_mode(group, group_int) of w4a8_gemm's arguments.
void w4a8_gemm_wgmma(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                     const half* group, int decode, const void* bias, void* out, int out_dtype,
                     int m, int n, int k, int* ws_partial, int* ws_count, int sms, bool pdl,
                     cudaStream_t stream);

// The same product for M <= 16 without split-K (w4a8_gemm_narrow.cu): 32-channel tiles, K split
// over the warps of a CTA. N % 32 == 0, K % 128 == 0; sms: the GPU's SM count (ring depth).
void w4a8_gemm_narrow(const int8_t* a, const float* a_scale, const uint32_t* b,
                      const float* scale, const half* group, int decode, const void* bias,
                      void* out, int out_dtype, int m, int n, int k, int sms, bool pdl,
                      cudaStream_t stream);
// Whether M <= 16 (below the Hopper kernel) runs the narrow kernel rather than split-K. Measured
// on the H100 (NOTES.md "GEMM", twelfth session): per-channel, narrow is 22-27% faster on qkv and
// o and 8% on down at M = 1-4, a tie on gate_up; g128, narrow is 7-22% faster on qkv and o but
// 10-15% slower on gate_up and down (large_weight; not profiled yet: the g128 decode issues 8.5x
// the instructions per weight word, and down's 128 narrow CTAs leave one per SM). `grouped`
// here and in wgmma_default_min_m means fp16 group scales: with integer ones (decode_group_int,
// about half the fp16 decode's instructions) down g128 at M = 1 / 8 / 16 took 15.5 / 17.1 / 17.7
// us on the narrow kernel against 16.9-17.1 / 17.5 / 17.7 on split-K and the 16-token tile, so
// they follow the per-channel rules (NOTES.md "GEMM", forty-first session).
inline bool narrow_default(int k, int n, bool grouped) { return !grouped || !large_weight(k, n); }
// Tuning/tests: < 0 the rule above (default), 0 always split-K, > 0 always narrow (M <= 16).
void set_narrow(int mode);
// Tuning: the narrow kernel's ring depth, 2, 3, 4 or 6 stages of 1024 k (0: by the rule).
void set_narrow_stages(int stages);
// Tuning: the narrow kernel's channels per CTA, 16 or 32 (0: 32, the default).
void set_narrow_channels(int channels);
// Tuning: integer group scales applied to the narrow kernel's per-group sums (default on;
// measured qkv / o / down M = 1 8.3 / 6.5 / 15.3 -> 7.9 / 6.2 / 14.5 us) or, off, decoded into
// the weights (w4a8_gemm_narrow.cu, GROUP_SUMS).
void set_narrow_group_sums(bool on);

// True on compute capability 9.0 when the extension holds the sm_90a build of the kernel.
bool wgmma_available();

// Tests and tuning. Off: every M runs the mma.sync kernel on sm_90 too (what sm_80 runs).
void set_wgmma_enabled(bool on);
// The smallest M the Hopper kernel takes (<= 0: wgmma_default_min_m).
void set_wgmma_min_m(int m);
// At most this many K splits in the small-M kernel, in place of the rule's cap of 4 above 8 rows
// (<= 0: the rule, the default).
void set_split_cap(int splits);
// Programmatic dependent launch of the prefetch_weights GEMMs (sm_90+; default on).
void set_pdl(bool on);
// The quantization kernel itself as a programmatic dependent launch after whatever kernel comes
// before it (it waits for that kernel before reading x; sm_90+; default on).
void set_quant_pdl(bool on);
// How the quantization rounds x / scale (the same codes either way; tests, A/B): 1 by x times
// 1 / scale with the division only where that could round to another integer, 0 by the division
// for every entry, -1 (default) the first from kProductMinRows rows, the second below.
void set_quant_product(int mode);
// Force the Hopper kernel's tile: bm tokens (64, 128, 256) x stages, the loads by every thread
// (cp.async) or by a producer (the copy engine), warpgroups x 64 channels (2, or 3 for the
// producer tiles 64 x 8 and 128 x 5, 4 for 64 x 7); bm = 0: chosen by M.
void set_wgmma_tile(int bm, int stages, bool producer_warp, int warpgroups);

}  // namespace qqq
