// The cp.async copies one thread makes for each 128-k stage of the W4A8 GEMMs (w4a8_gemm.cu and
// w4a8_gemm_sm90.cu): the same 16-byte pieces every stage, 128 k further along, so their
// addresses are computed once per CTA. (Recomputing them per piece and stage was ~2/3 of the
// Hopper kernel's loop instructions, and that loop is bound by its instruction stream:
// NOTES.md "GEMM".)
#pragma once

#include "common.cuh"

namespace qqq {

// ROWS activation rows (tokens) and BN weight channels per CTA, THREADS threads copying.
template <int ROWS, int THREADS, int BN, bool GROUPED>
struct StageCopies {
  static constexpr int kBK = 128;
  // Activations: chunk a_chunk (16 of a row's 128 bytes) of rows a_row + kRowsPerPass j, stored
  // at chunk a_chunk ^ (row % 8) (the 128-byte swizzle); rows past M are zero-filled.
  static constexpr int kRowsPerPass = THREADS / 8;
  static constexpr int kACopies = (ROWS + kRowsPerPass - 1) / kRowsPerPass;
  // Weights (the kernel layout of vllm_qqq/ops.py): 4 k32 steps x BN / 8 n8 tiles x 32 words
  // per stage, each step's tiles contiguous in global memory; this thread's chunk w_rest of steps
  // w_step + kStepsPerPass j. Channels past N (a last half tile) are zero-filled.
  static constexpr int kStepsPerPass = THREADS / BN;
  static constexpr int kWCopies = (kBK / 32) / kStepsPerPass;
  static_assert(THREADS % BN == 0 && (kBK / 32) % kStepsPerPass == 0, "whole weight passes");

  const int8_t* a;  // a valid address for the zero-filled pieces (never read)
  const int8_t* a_src;
  const uint32_t* w_src;
  const half* g_src;
  int k, n, n8_tiles, tid, a_row, a_dst, a_rows_left, w_dst;
  bool w_ok, g_ok;

  // The copies of stage kb_begin of the CTA whose tile starts at token m0 and channel n0.
  __device__ __forceinline__ StageCopies(const int8_t* a_, const uint32_t* b, const half* group,
                                         int m, int n_, int k_, int m0, int n0, int kb_begin,
                                         int tid_)
      : a(a_), k(k_), n(n_), n8_tiles(n_ / 8), tid(tid_) {
    a_row = tid / 8;
    const int a_chunk = tid % 8;
    a_dst = a_row * kBK + ((a_chunk ^ (a_row % 8)) * 16);
    a_rows_left = m - m0 - a_row;
    a_src = a + static_cast<size_t>(m0 + a_row) * k + static_cast<size_t>(kb_begin) * kBK +
            a_chunk * 16;
    const int w_step = tid / BN, w_rest = tid % BN;
    w_ok = n0 / 8 + w_rest / 8 < n8_tiles;
    w_dst = (w_step * BN + w_rest) * 4;
    w_src = b + (static_cast<size_t>(kb_begin * 4 + w_step) * n8_tiles + (w_ok ? n0 / 8 : 0)) * 32 +
            w_rest * 4;
    g_ok = tid < BN / 8 && n0 + tid * 8 < n;
    g_src = GROUPED ? group + static_cast<size_t>(kb_begin) * n + (g_ok ? n0 + tid * 8 : 0)
                    : nullptr;
  }

  // The next stage's activations into the slot starting at `slot`.
  __device__ __forceinline__ void activations(uint8_t* slot) {
    uint8_t* dst = slot + a_dst;
#pragma unroll
    for (int j = 0; j < kACopies; j++) {
      if (ROWS % kRowsPerPass == 0 || a_row + j * kRowsPerPass < ROWS) {
        const bool ok = j * kRowsPerPass < a_rows_left;
        cp_async16(dst + j * kRowsPerPass * kBK,
                   ok ? a_src + static_cast<size_t>(j) * kRowsPerPass * k : a, ok);
      }
    }
    a_src += kBK;
  }

  // The next stage's weights into slot_w, and (GROUPED) its BN group scales into slot_s.
  __device__ __forceinline__ void weights(uint32_t* slot_w, half* slot_s) {
    uint32_t* dst = slot_w + w_dst;
#pragma unroll
    for (int j = 0; j < kWCopies; j++) {
      cp_async16(dst + j * kStepsPerPass * BN * 4,
                 w_src + static_cast<size_t>(j) * kStepsPerPass * n8_tiles * 32, w_ok);
    }
    w_src += static_cast<size_t>(kBK / 32) * n8_tiles * 32;
    if constexpr (GROUPED) {
      if (tid < BN / 8) cp_async16(slot_s + tid * 8, g_src, g_ok);
      g_src += n;
    }
  }
};

}  // namespace qqq
