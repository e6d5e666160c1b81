// Host entry points of the QQQ kernels (raw pointers; the Python side owns the tensors).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qqq {

// dtype codes shared with vllm_qqq/ops.py
constexpr int kFloat16 = 0;
constexpr int kBFloat16 = 1;

void quant_per_token(const void* x, int dtype, int m, int k, int8_t* q, float* scale,
                     cudaStream_t stream);

// out[m, n] = (float(sum_k a[m, k] * W[k, n]) * a_scale[m]) * scale[n] (+ bias[n]), W the int8
// weight decoded from b (kernel layout, vllm_qqq/ops.py) and, when group != nullptr, the fp16
// group scales [K/128, N]. workspace: zeroed int32 of ops.workspace_size(n) entries, left zeroed.
void w4a8_gemm(const int8_t* a, const float* a_scale, const uint32_t* b, const float* scale,
               const void* group, const void* bias, void* out, int out_dtype, int m, int n, int k,
               int* workspace, int64_t workspace_entries, cudaStream_t stream);

// The same product on Hopper (sm_90a) with wgmma; w4a8_gemm calls it for M > 64 on sm_90.
// mode: 1, 2, 3 = how the decoded weights reach wgmma (w4a8_gemm_sm90.cu).
void w4a8_gemm_wgmma(int mode, const int8_t* a, const float* a_scale, const uint32_t* b,
                     const float* scale, const half* group, const void* bias, void* out,
                     int out_dtype, int m, int n, int k, cudaStream_t stream);
// 0: M > 64 runs the mma.sync kernel on sm_90 too; 1-3: the wgmma variant (tests, benchmarks).
void set_wgmma_mode(int mode);

}  // namespace qqq
