// W4A8 GEMM for Hopper (sm_90a) and M > 64: the product of w4a8_gemm.cu computed transposed,
// out^T[n, m] = W[n, k] . X[m, k]^T, so that the 4-bit weights, decoded to int8 in registers,
// are wgmma's A operand (64 output channels per warpgroup) and the int8 activations are its B
// operand, read by the tensor cores straight from 128B-swizzled shared memory (BM tokens = the
// wgmma N). mma.sync (w4a8_gemm.cu) reloads every activation fragment per warp through ldmatrix
// and reaches about half of the H100's int8 rate; wgmma does not.
//
// The weight words are the same kernel layout as w4a8_gemm.cu: a lane's word for (k32 step, n8
// tile) holds its B fragments of mma.m16n8k32, and the A fragment of wgmma for rows {g, g + 8}
// of a 16-row slice is exactly the B fragments of the slice's two n8 tiles, so no new layout is
// needed. Stages of 128 k stream through a cp.async pipeline shared by all warpgroups; the
// epilogue (the reference's fp32 formula) goes through shared memory so the stores are whole
// 16-byte rows of the output.
#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"
#include "wgmma.cuh"

namespace qqq {
namespace sm90 {

constexpr int kBK = 128;
// How the decoded weights reach wgmma (being measured against each other):
// kRegs: A from registers, each stage's wgmma waited for before the next stage is decoded;
// kRegsPipelined: the same with one stage in flight (ptxas serializes the wgmmas: C7513);
// kSmemA: the decoded weights written to shared memory, A and B both by descriptor, one stage
// in flight.
constexpr int kRegs = 1, kRegsPipelined = 2, kSmemA = 3;

template <int WGS, int BM, int MODE>
struct Tile {
  static constexpr int kThreads = WGS * 128;
  static constexpr int BN = WGS * 64;  // output channels per CTA
  static constexpr int X_BYTES = BM * kBK;
  static constexpr int W_BYTES = (kBK / 32) * (BN / 8) * 32 * 4;
  static constexpr int S_BYTES = BN * 2;
  // Each stage starts 1024-byte aligned: the swizzle pattern wgmma expects is anchored there.
  static constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + S_BYTES + 1023) / 1024 * 1024;
  // 4 stages (2 in flight ahead) keep two 128-token CTAs per SM; one 256-token CTA gets 5.
  static constexpr int STAGES = (BM == 128 || MODE == kSmemA) ? 4 : 5;
  // kSmemA: each warpgroup's decoded int8 weights, 64 rows x 128 k, double-buffered.
  static constexpr int A_BYTES = MODE == kSmemA ? WGS * 2 * 64 * kBK : 0;
  static constexpr int MIN_CTAS = (BM == 128 && MODE != kSmemA) ? 2 : 1;
  static constexpr int OUT_PITCH = BN + 8;  // staged output row, in elements: conflict-free writes
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + A_BYTES + 1024;
  static_assert(BM * OUT_PITCH * 2 <= STAGES * STAGE_BYTES, "output tile fits the pipeline");
};

template <typename Out, int WGS, int BM, bool GROUPED, int MODE>
__global__ void __launch_bounds__(WGS * 128, Tile<WGS, BM, MODE>::MIN_CTAS)
    w4a8_gemm_wgmma_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale,
                           const uint32_t* __restrict__ b, const float* __restrict__ scale,
                           const half* __restrict__ group, const Out* __restrict__ bias,
                           Out* __restrict__ out, int m, int n, int k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = Tile<WGS, BM, MODE>;
  constexpr int kThreads = T::kThreads, BN = T::BN;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int n8_tiles = n / 8, iters = k / kBK;

  auto stage_x = [&](int s) { return smem + s * T::STAGE_BYTES; };
  auto stage_w = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * T::STAGE_BYTES + T::X_BYTES);
  };
  auto stage_s = [&](int s) {
    return reinterpret_cast<half*>(smem + s * T::STAGE_BYTES + T::X_BYTES + T::W_BYTES);
  };

  auto load_stage = [&](int s, int kb) {
    // Activations: BM rows of 128 bytes, chunk c of row r at chunk c ^ (r % 8); rows past M are
    // zero-filled.
    uint8_t* sx = stage_x(s);
#pragma unroll 4
    for (int i = tid; i < BM * 8; i += kThreads) {
      const int r = i / 8, c = i % 8;
      const bool ok = m0 + r < m;
      const int8_t* src = a + (static_cast<size_t>(ok ? m0 + r : 0) * k + kb * kBK + c * 16);
      cp_async16(sx + r * kBK + ((c ^ (r % 8)) * 16), src, ok);
    }
    // Weights: 4 k32 steps x BN / 8 n8 tiles x 32 words; BN 16-byte chunks per step.
    uint32_t* sw = stage_w(s);
#pragma unroll
    for (int i = tid; i < T::W_BYTES / 16; i += kThreads) {
      const int step = i / BN, rest = i % BN;
      const bool ok = n0 / 8 + rest / 8 < n8_tiles;
      const uint32_t* src =
          b + ((static_cast<size_t>(kb * 4 + step) * n8_tiles + (ok ? n0 / 8 : 0)) * 32 + rest * 4);
      cp_async16(sw + step * BN * 4 + rest * 4, src, ok);
    }
    if constexpr (GROUPED) {
      if (tid < BN / 8) {
        const bool ok = n0 + tid * 8 < n;
        const half* src = group + static_cast<size_t>(kb) * n + (ok ? n0 + tid * 8 : 0);
        cp_async16(stage_s(s) + tid * 8, src, ok);
      }
    }
  };

  int acc[BM / 2];  // set by the first wgmma (accumulate = false); K >= 128 is checked

  // Stage it + STAGES - 2 is loaded at iteration it into the slot of stage it - 2: every
  // warpgroup has waited for its wgmma of it - 2 before the barrier of iteration it, while the
  // wgmma of it - 1 may still run as this iteration decodes.
#pragma unroll
  for (int s = 0; s < T::STAGES - 2; s++) {
    if (s < iters) load_stage(s, s);
    cp_async_commit();
  }

  // This warp's 16 rows are the n8 tiles tile0 and tile0 + 1 of the CTA's BN channels.
  const int tile0 = (warp / 4) * 8 + (warp % 4) * 2;
  // A fragments, double-buffered: the registers of one stage stay untouched until its wgmma
  // is known complete (wgmma reads them asynchronously).
  uint32_t af[2][kBK / 32][4];
  auto step = [&](int it, uint32_t(&cur)[kBK / 32][4], uint32_t(&prev)[kBK / 32][4]) {
    cp_async_wait<T::STAGES - 3>();
    fence_proxy_async();
    __syncthreads();
    if (it + T::STAGES - 2 < iters) {
      load_stage((it + T::STAGES - 2) % T::STAGES, it + T::STAGES - 2);
    }
    cp_async_commit();

    const int s = it % T::STAGES;
    const uint32_t* sw = stage_w(s);
    uint32_t s_lo = 0, s_hi = 0;
    if constexpr (GROUPED) {
      s_lo = static_cast<uint32_t>(__half_as_ushort(stage_s(s)[tile0 * 8 + lane / 4])) * 0x10001u;
      s_hi = static_cast<uint32_t>(__half_as_ushort(stage_s(s)[tile0 * 8 + 8 + lane / 4])) *
             0x10001u;
    }
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ks++) {
      const uint32_t w_lo = sw[ks * BN * 4 + tile0 * 32 + lane];
      const uint32_t w_hi = sw[ks * BN * 4 + tile0 * 32 + 32 + lane];
      if constexpr (GROUPED) {
        decode_group(w_lo, s_lo, cur[ks][0], cur[ks][2]);
        decode_group(w_hi, s_hi, cur[ks][1], cur[ks][3]);
      } else {
        decode_channel(w_lo, cur[ks][0], cur[ks][2]);
        decode_channel(w_hi, cur[ks][1], cur[ks][3]);
      }
    }
    const uint32_t x_base = smem_addr(stage_x(s));
    if constexpr (MODE == kSmemA) {
      // This warpgroup's A buffer for this stage parity, same 128B swizzle as the activations.
      uint8_t* sa = smem + T::STAGES * T::STAGE_BYTES + ((warp / 4) * 2 + (it & 1)) * 64 * kBK;
      const int row = (warp % 4) * 16 + lane / 4;  // and row + 8; row % 8 == lane / 4
#pragma unroll
      for (int ks = 0; ks < kBK / 32; ks++)
#pragma unroll
        for (int half_k = 0; half_k < 2; half_k++) {
          const int off = ((2 * ks + half_k) ^ (lane / 4)) * 16 + (lane % 4) * 4;
          *reinterpret_cast<uint32_t*>(sa + row * kBK + off) = cur[ks][2 * half_k];
          *reinterpret_cast<uint32_t*>(sa + (row + 8) * kBK + off) = cur[ks][2 * half_k + 1];
        }
      fence_proxy_async();
      asm volatile("bar.sync %0, 128;\n" ::"r"(1 + warp / 4) : "memory");  // this warpgroup
      const uint32_t a_base = smem_addr(sa);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kBK / 32; ks++) {
        const uint64_t da = wgmma_desc_sw128(a_base + ks * 32);
        const uint64_t db = wgmma_desc_sw128(x_base + ks * 32);
        if constexpr (BM == 128) {
          wgmma_m64n128k32_ss(acc, da, db, it > 0 || ks > 0);
        } else {
          wgmma_m64n256k32_ss(acc, da, db, it > 0 || ks > 0);
        }
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's wgmma is done: its A buffer and slot are free
      (void)prev;
      return;
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ks++) {
      if constexpr (BM == 128) {
        wgmma_m64n128k32(acc, cur[ks], wgmma_desc_sw128(x_base + ks * 32), it > 0 || ks > 0);
      } else {
        wgmma_m64n256k32(acc, cur[ks], wgmma_desc_sw128(x_base + ks * 32), it > 0 || ks > 0);
      }
    }
    wgmma_commit();
    if constexpr (MODE == kRegs) {
      wgmma_wait<0>();
      pin_registers(acc);
    } else {
      wgmma_wait<1>();  // the previous stage's wgmma is done: its registers and slot are free
#pragma unroll
      for (int ks = 0; ks < kBK / 32; ks++) pin_registers(prev[ks]);
    }
  };
  for (int it = 0; it < iters; it += 2) {
    step(it, af[0], af[1]);
    if (it + 1 < iters) step(it + 1, af[1], af[0]);
  }
  wgmma_wait<0>();
  pin_registers(acc);
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: acc[4 j + 2 h + c] is channel 16 (warp % 4) + g + 8 h of this warpgroup's 64 and
  // token 8 j + 2 (lane % 4) + c. y = (float(acc) * a_scale[token]) * scale[channel] (+ bias),
  // no contraction, exactly the reference's order.
  Out* staged = reinterpret_cast<Out*>(smem);
  const int ch_base = (warp / 4) * 64 + (warp % 4) * 16 + lane / 4;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int ch = ch_base + 8 * h;
    const bool ch_ok = n0 + ch < n;
    const float sc = ch_ok ? scale[n0 + ch] : 0.f;
    const float bi = (ch_ok && bias != nullptr) ? OutType<Out>::to_float(bias[n0 + ch]) : 0.f;
#pragma unroll
    for (int j = 0; j < BM / 8; j++)
#pragma unroll
      for (int c = 0; c < 2; c++) {
        const int tok = 8 * j + 2 * (lane % 4) + c;
        const float ts = m0 + tok < m ? a_scale[m0 + tok] : 0.f;
        float y = __fmul_rn(__fmul_rn(__int2float_rn(acc[4 * j + 2 * h + c]), ts), sc);
        if (bias != nullptr) y = __fadd_rn(y, bi);
        staged[tok * T::OUT_PITCH + ch] = OutType<Out>::from_float(y);
      }
  }
  __syncthreads();
  constexpr int kChunks = BN / 8;  // 16-byte chunks per output row
#pragma unroll 4
  for (int i = tid; i < BM * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    if (m0 + r < m && n0 + c * 8 < n) {
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(m0 + r) * n + n0 + c * 8) =
          *reinterpret_cast<const uint4*>(staged + r * T::OUT_PITCH + c * 8);
    }
  }
#endif
}

template <auto kernel, int bytes>
static void allow_smem() {
  static const bool done = [] {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
    return true;
  }();
  (void)done;
}

template <typename Out, int WGS, int BM, bool GROUPED, int MODE>
static void launch(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                   const half* group, const void* bias, void* out, int m, int n, int k,
                   cudaStream_t stream) {
  using T = Tile<WGS, BM, MODE>;
  constexpr auto kernel = w4a8_gemm_wgmma_kernel<Out, WGS, BM, GROUPED, MODE>;
  allow_smem<kernel, T::SMEM_BYTES>();
  dim3 grid((n + T::BN - 1) / T::BN, (m + BM - 1) / BM);
  kernel<<<grid, T::kThreads, T::SMEM_BYTES, stream>>>(a, a_scale, b, scale, group,
                                                       static_cast<const Out*>(bias),
                                                       static_cast<Out*>(out), m, n, k);
  check_cuda(cudaGetLastError(), "w4a8_gemm_wgmma launch");
}

template <typename Out, bool GROUPED, int MODE>
static void dispatch(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
                     const half* group, const void* bias, void* out, int m, int n, int k,
                     cudaStream_t stream) {
  if (m <= 128) {
    launch<Out, 2, 128, GROUPED, MODE>(a, a_scale, b, scale, group, bias, out, m, n, k, stream);
  } else {
    launch<Out, 2, 256, GROUPED, MODE>(a, a_scale, b, scale, group, bias, out, m, n, k, stream);
  }
}

template <typename Out, bool GROUPED>
static void dispatch_mode(int mode, const int8_t* a, const float* a_scale, const uint32_t* b,
                          const float* scale, const half* group, const void* bias, void* out,
                          int m, int n, int k, cudaStream_t stream) {
  if (mode == kRegs) {
    dispatch<Out, GROUPED, kRegs>(a, a_scale, b, scale, group, bias, out, m, n, k, stream);
  } else if (mode == kRegsPipelined) {
    dispatch<Out, GROUPED, kRegsPipelined>(a, a_scale, b, scale, group, bias, out, m, n, k,
                                           stream);
  } else {
    dispatch<Out, GROUPED, kSmemA>(a, a_scale, b, scale, group, bias, out, m, n, k, stream);
  }
}

}  // namespace sm90

void w4a8_gemm_wgmma(int mode, const int8_t* a, const float* a_scale, const uint32_t* b,
                     const float* scale, const half* group, const void* bias, void* out,
                     int out_dtype, int m, int n, int k, cudaStream_t stream) {
  if (out_dtype == kFloat16) {
    if (group != nullptr) {
      sm90::dispatch_mode<half, true>(mode, a, a_scale, b, scale, group, bias, out, m, n, k, stream);
    } else {
      sm90::dispatch_mode<half, false>(mode, a, a_scale, b, scale, group, bias, out, m, n, k,
                                       stream);
    }
  } else {
    if (group != nullptr) {
      sm90::dispatch_mode<__nv_bfloat16, true>(mode, a, a_scale, b, scale, group, bias, out, m, n,
                                               k, stream);
    } else {
      sm90::dispatch_mode<__nv_bfloat16, false>(mode, a, a_scale, b, scale, group, bias, out, m,
                                                n, k, stream);
    }
  }
}

}  // namespace qqq
