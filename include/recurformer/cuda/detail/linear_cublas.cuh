// recurformer/cuda/detail/linear_cublas.cuh: what the cuBLAS-backed ops share: RF_CUBLAS_CHECK
// (RF_CUDA_CHECK's twin for cublasStatus_t) and one cuBLAS handle per (host thread, device),
// created lazily and kept for the thread's life (creating a handle costs milliseconds and
// allocates; a call must not).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <utility>
#include <vector>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"
#include "recurformer/cuda/exec.cuh"

namespace recurformer {
namespace detail {
inline void cublas_check(cublasStatus_t s, const char* what, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    fail(file, ":", line, ": ", what, " failed: ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ")");
}
}  // namespace detail
}  // namespace recurformer

/// RF_CUBLAS_CHECK(cublasGemmEx(...)): throw recurformer::Error naming the call, its status, file
/// and line.
#define RF_CUBLAS_CHECK(call) ::recurformer::detail::cublas_check((call), #call, __FILE__, __LINE__)

namespace recurformer {
namespace cuda {
namespace detail {

/// The cudaDataType of a storage dtype.
template <class T>
struct CublasType;
template <>
struct CublasType<float> {
  static constexpr cudaDataType_t value = CUDA_R_32F;
};
template <>
struct CublasType<half> {
  static constexpr cudaDataType_t value = CUDA_R_16F;
};
template <>
struct CublasType<bfloat16> {
  static constexpr cudaDataType_t value = CUDA_R_16BF;
};

/// This host thread's handle for the current device. The caller sets the stream before each call
/// (cublasSetStream also selects cuBLAS's default workspace for that stream). The handle is
/// private to the library, so its math mode is fixed once here: default math (no TF32 for fp32
/// GEMMs: CUBLAS_COMPUTE_32F then means real fp32 FMAs) and no reduction (split-K) in the 16-bit
/// output type, so a 16-bit y is rounded once, from fp32.
inline cublasHandle_t cublas_handle() {
  struct Cache {
    std::vector<std::pair<int, cublasHandle_t>> handles;  // (device, handle); a few devices at most
    Cache() = default;
    Cache(const Cache&) = delete;
    Cache& operator=(const Cache&) = delete;
    // Runs at thread exit (for the main thread before static destructors and the CUDA runtime's
    // own teardown); a failure there cannot be reported, so the status is ignored.
    ~Cache() {
      for (auto& e : handles) cublasDestroy(e.second);
    }
  };
  thread_local Cache cache;
  int device = 0;
  RF_CUDA_CHECK(cudaGetDevice(&device));
  for (const auto& e : cache.handles)
    if (e.first == device) return e.second;
  cublasHandle_t h = nullptr;
  RF_CUBLAS_CHECK(cublasCreate(&h));
  const cublasStatus_t s =
      cublasSetMathMode(h, cublasMath_t(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
  if (s != CUBLAS_STATUS_SUCCESS) cublasDestroy(h);  // do not leak the handle we cannot use
  recurformer::detail::cublas_check(s, "cublasSetMathMode(default math, no reduced-precision reduction)", __FILE__,
                                    __LINE__);
  cache.handles.emplace_back(device, h);
  return h;
}

}  // namespace detail
}  // namespace cuda
}  // namespace recurformer
