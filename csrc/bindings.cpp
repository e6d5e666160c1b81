// pybind11 module vllm_qqq._C: thin wrappers over the kernel entry points. Tensors cross as
// device pointers (ints) so the module does not depend on libtorch's C++ ABI; vllm_qqq/ops.py
// checks shapes and dtypes and registers the torch ops.
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;

template <typename T>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "QQQ W4A8 CUDA kernels";
  m.def(
      "quant_per_token",
      [](uintptr_t x, int dtype, int rows, int k, uintptr_t q, uintptr_t scale, bool gemm_follows,
         uintptr_t stream) {
        qqq::quant_per_token(ptr<const void>(x), dtype, rows, k, ptr<int8_t>(q), ptr<float>(scale),
                             gemm_follows, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("m"), py::arg("k"), py::arg("q"), py::arg("scale"),
      py::arg("gemm_follows"), py::arg("stream"));
  m.def(
      "silu_mul_quant",
      [](uintptr_t x, int dtype, int rows, int d, uintptr_t q, uintptr_t scale, uintptr_t stream) {
        qqq::silu_mul_quant(ptr<const void>(x), dtype, rows, d, ptr<int8_t>(q), ptr<float>(scale),
                            reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("m"), py::arg("d"), py::arg("q"), py::arg("scale"),
      py::arg("stream"));
  m.def(
      "add_rms_norm_quant",
      [](uintptr_t x, uintptr_t residual, uintptr_t weight, float eps, int dtype, int rows, int h,
         uintptr_t q, uintptr_t scale, uintptr_t residual_out, uintptr_t stream) {
        qqq::add_rms_norm_quant(ptr<const void>(x), ptr<const void>(residual),
                                ptr<const void>(weight), eps, dtype, rows, h, ptr<int8_t>(q),
                                ptr<float>(scale), ptr<void>(residual_out),
                                reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("dtype"),
      py::arg("m"), py::arg("h"), py::arg("q"), py::arg("scale"), py::arg("residual_out"),
      py::arg("stream"));
  m.def(
      "gemm",
      [](uintptr_t a, uintptr_t a_scale, uintptr_t b, uintptr_t scale, uintptr_t group,
         uintptr_t bias, uintptr_t out, int out_dtype, int rows, int n, int k, uintptr_t workspace,
         int64_t workspace_entries, uintptr_t stream, bool prefetch_weights, bool group_int) {
        qqq::w4a8_gemm(ptr<const int8_t>(a), ptr<const float>(a_scale), ptr<const uint32_t>(b),
                       ptr<const float>(scale), ptr<const void>(group), group_int,
                       ptr<const void>(bias),
                       ptr<void>(out), out_dtype, rows, n, k, ptr<int>(workspace),
                       workspace_entries, prefetch_weights, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("a"), py::arg("a_scale"), py::arg("b"), py::arg("scale"), py::arg("group"),
      py::arg("bias"), py::arg("out"), py::arg("out_dtype"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("workspace"), py::arg("workspace_entries"), py::arg("stream"),
      py::arg("prefetch_weights") = false, py::arg("group_int") = false);
  m.def("wgmma_available", &qqq::wgmma_available,
        "Whether the Hopper wgmma kernel can run on the current GPU.");
  m.def("set_wgmma", &qqq::set_wgmma_enabled, py::arg("on"),
        "Use the Hopper wgmma kernel where the GPU has it (the default).");
  m.def("set_split_cap", &qqq::set_split_cap, py::arg("splits"),
        "Tuning: at most this many K splits in the small-M kernel (<= 0: by the rule).");
  m.def("set_narrow", &qqq::set_narrow, py::arg("mode"),
        "Tuning/tests: M <= 16 on the narrow kernel (K split over warps): < 0 by the rule "
        "(default), 0 never (split-K), > 0 always.");
  m.def("set_narrow_stages", &qqq::set_narrow_stages, py::arg("stages"),
        "Tuning: the narrow kernel's ring depth, 2, 3, 4 or 6 stages (0: by the rule).");
  m.def("set_narrow_channels", &qqq::set_narrow_channels, py::arg("channels"),
        "Tuning: the narrow kernel's channels per CTA, 16 or 32 (0: 32, the default).");
  m.def("set_narrow_group_sums", &qqq::set_narrow_group_sums, py::arg("on"),
        "Tuning: integer group scales applied to the narrow kernel's per-group sums instead of "
        "decoded into its weights (default on; off: the integer decode).");
  m.def("set_pdl", &qqq::set_pdl, py::arg("on"),
        "Tuning/tests: launch the GEMM as a programmatic dependent launch (sm_90+, default).");
  m.def("set_quant_pdl", &qqq::set_quant_pdl, py::arg("on"),
        "Tuning/tests: launch the quantization kernel as a programmatic dependent launch "
        "(sm_90+, default).");
  m.def("set_quant_product", &qqq::set_quant_product, py::arg("mode"),
        "Tuning/tests: the quantization rounds x * (1 / scale), dividing only where that could "
        "round to another integer (1), divides every entry (0), or the first from 1024 rows "
        "(-1, default). The same codes either way.");
  m.def("set_silu_cluster_rows", &qqq::set_silu_cluster_rows, py::arg("rows"),
        "Tuning: silu_mul_quant splits each row over a cluster of 8 CTAs up to this many rows "
        "(< 0: the default, 64; 0: never).");
  m.def("set_norm_cluster_rows", &qqq::set_norm_cluster_rows, py::arg("rows"),
        "Tuning: add_rms_norm_quant splits each row over a cluster of 8 CTAs up to this many "
        "rows (< 0: the default, 0: never).");
  m.def("set_wgmma_min_m", &qqq::set_wgmma_min_m, py::arg("m"),
        "Tuning/tests: the smallest M the Hopper kernel takes (<= 0: the default).");
  m.def(
      "workspace_entries",
      [](int n) {
        return py::make_tuple(qqq::workspace_zeroed_entries(n), qqq::workspace_partial_entries(n));
      },
      py::arg("n"),
      "(counters kept zeroed, split-K partial entries) the GEMM needs for N (ops.workspace).");
  m.def("set_wgmma_tile", &qqq::set_wgmma_tile, py::arg("bm"), py::arg("stages"),
        py::arg("producer_warp") = false, py::arg("warpgroups") = 2,
        "Tuning/tests: force the Hopper kernel's tile (bm tokens x stages, loads by all threads "
        "or a producer warp, warpgroups x 64 channels); bm = 0: by M.");
}
