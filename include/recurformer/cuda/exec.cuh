// recurformer/cuda/exec.cuh: where a CUDA op runs, and the checks around every CUDA call.
//
// CudaExec is CpuExec's twin: op(params, CudaExec{stream}) selects the CUDA implementation and
// enqueues its kernels on the stream; params views point to device memory. Launches are
// asynchronous; errors from the launch itself are raised at once, errors during execution at the
// next synchronising call, both as recurformer::Error with the file and line of the check.
#pragma once

#include <cuda_runtime.h>

#include "recurformer/core/error.hpp"
#include "recurformer/core/support.hpp"

namespace recurformer {

struct CudaExec {
  cudaStream_t stream = nullptr;  ///< null: the legacy default stream
};

namespace detail {
/// v clamped to [lo, hi]: kernels read index arrays (cu_seqlens) the host checked only the shape of,
/// so a wrong offset must stay inside the batch instead of indexing past it.
__device__ __forceinline__ int64_t clamp_index(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

inline void cuda_check(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    fail(file, ":", line, ": ", what, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}
}  // namespace detail

}  // namespace recurformer

/// RF_CUDA_CHECK(cudaMemcpy(...)): throw recurformer::Error naming the call, file and line.
#define RF_CUDA_CHECK(call) ::recurformer::detail::cuda_check((call), #call, __FILE__, __LINE__)
/// After a kernel launch: raise launch-configuration errors at once.
#define RF_CUDA_CHECK_LAUNCH(kernel_name) \
  ::recurformer::detail::cuda_check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
