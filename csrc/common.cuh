// Small device helpers shared by the QQQ kernels: async copies, ldmatrix, int8 mma.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qqq {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("vllm_qqq: ") + what + ": " + cudaGetErrorString(err));
  }
}

template <typename T>
struct OutType;
template <>
struct OutType<half> {
  static __device__ __forceinline__ half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(half x) { return __half2float(x); }
};
template <>
struct OutType<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// The bias of channels col and col + 1 as floats (zeros without a bias).
template <typename Out>
__device__ __forceinline__ float2 bias_pair(const Out* bias, int col) {
  float2 pair = make_float2(0.f, 0.f);
  if (bias != nullptr) {
    pair = make_float2(OutType<Out>::to_float(bias[col]), OutType<Out>::to_float(bias[col + 1]));
  }
  return pair;
}

// The reference's epilogue for two adjacent outputs of one row: y = (float(acc) * a_scale[row]) *
// scale[col] (+ bias[col]), each step rounded in fp32 (no contraction), then stored.
template <typename Out>
__device__ __forceinline__ void store_scaled_pair(Out* out, int n, int row, int col, int v0,
                                                  int v1, float ts, float2 sc, float2 bs,
                                                  bool has_bias) {
  float y0 = __fmul_rn(__fmul_rn(__int2float_rn(v0), ts), sc.x);
  float y1 = __fmul_rn(__fmul_rn(__int2float_rn(v1), ts), sc.y);
  if (has_bias) {
    y0 = __fadd_rn(y0, bs.x);
    y1 = __fadd_rn(y1, bs.y);
  }
  Out* dst = out + static_cast<size_t>(row) * n + col;
  dst[0] = OutType<Out>::from_float(y0);
  dst[1] = OutType<Out>::from_float(y1);
}

// Two 16-bit values in one register, the first in the low half (an mma fragment's pair).
template <typename Out>
__device__ __forceinline__ uint32_t pack_pair(Out lo, Out hi) {
  static_assert(sizeof(Out) == 2, "16-bit values");
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&lo)) |
         static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&hi)) << 16;
}

// An attribute of the current device (host code).
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&value, attr, dev), "cudaDeviceGetAttribute");
  return value;
}

// Whether the GPU can launch kernels as programmatic dependent launches (sm_90+).
inline bool pdl_supported() {
  static const bool yes = device_attribute(cudaDevAttrComputeCapabilityMajor) >= 9;
  return yes;
}

// Raises a kernel's dynamic shared memory limit once (cudaFuncSetAttribute is per function).
template <auto kernel, int bytes>
void allow_smem() {
  static const bool done = [] {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
    return true;
  }();
  (void)done;
}

// The range [begin, end) of the k blocks that split `split` of `splits` takes (split-K).
__device__ __forceinline__ void split_range(int kblocks, int split, int splits, int& begin,
                                            int& end) {
  begin = static_cast<int>(static_cast<int64_t>(kblocks) * split / splits);
  end = static_cast<int>(static_cast<int64_t>(kblocks) * (split + 1) / splits);
}

// Programmatic dependent launch (sm_90+). The quantization kernel lets the GEMM after it start
// early; the GEMM prefetches its weights (constant) and then waits for the prior grid, complete
// and its memory visible, before it reads activations or touches the workspace. Both are no-ops
// on older GPUs and for kernels launched without the attribute (launch_kernel below).
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Loads of what the prior grid wrote, made after wait_for_prior_grid: a plain weak ld.global, the
// load CUDA's PDL model makes visible to the prior grid's writes after the wait. Never the
// read-only path (ld.global.nc, which __ldg and const __restrict__ pointers get): it declares its
// data constant for the kernel's lifetime, so ptxas may schedule it before griddepcontrol.wait,
// and did (the narrow GEMM's token scale in some ring depths, read as 0 in a CUDA graph: NOTES.md,
// "GEMM", thirty-third session). Not __ldcg or __ldca either: they compile to strong loads
// (LDG.E.STRONG.GPU / .SM), and the narrow kernel's .cg token scale cost 0.35 us at qkv M = 16
// (thirty-fourth session). Inline PTX, as NVVM makes any plain load of a const __restrict__
// pointer .nc; the memory clobber keeps NVVM from moving it above the wait (a clobber-free asm is
// a pure function to it). tests/test_pdl_loads.py checks the PTX.
__device__ __forceinline__ float load_produced(const float* p) {
  float v;
  asm("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint4 load_produced(const uint4* p) {
  uint4 v;
  asm("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p)
      : "memory");
  return v;
}
// A kernel may let the next one launch (griddepcontrol.launch_dependents) before its own wait
// only when that next kernel is known to wait for it before reading anything written before: a
// dependent such as Inductor's PDL kernels waits for the grid just before it alone and may read
// what earlier grids wrote. The GEMMs do not trigger at all (they end before the next kernel
// starts): triggering after their wait made back-to-back calls slower on the H100, down M = 16
// 15.2 -> 21.9 us (NOTES.md, "GEMM").
__device__ __forceinline__ void allow_dependent_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...) in clusters of `cluster` CTAs along x (1: no
// clusters), as a programmatic dependent launch when `programmatic` (sm_90+): the kernel may
// begin before the previous kernel in the stream has finished, and must call
// wait_for_prior_grid before it reads anything that kernel may write.
template <typename... Params, typename... Args>
void launch_kernel_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, int smem,
                            cudaStream_t stream, bool programmatic, int cluster, const char* what,
                            Args... args) {
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = programmatic ? 1 : 0;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = cluster;
  attr[1].val.clusterDim.y = 1;
  attr[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = cluster > 1 ? 2 : 1;
  check_cuda(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...), what);
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, int smem,
                   cudaStream_t stream, bool programmatic, const char* what, Args... args) {
  launch_kernel_clusters(kernel, grid, block, smem, stream, programmatic, 1, what, args...);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when `valid` is false the destination is zero-filled and the
// source is not read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}
// 4-byte global -> shared copy (for data with no 16-byte alignment), likewise.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n));
}

// Four 8x8 b16 matrices = one 16x32 int8 A fragment of mma.m16n8k32.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// mma_s8 with a zero accumulator in: c = a * b.
__device__ __forceinline__ void mma_s8_first(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}

template <int lut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(lut));
  return d;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

}  // namespace qqq
