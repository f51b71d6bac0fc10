// recurformer/cuda/linear.cuh: linear (ops/linear.hpp) on a CUDA stream with cuBLAS; x, weight,
// bias, y and the workspace in device memory.
//
// Row-major y[tokens, out] = x[tokens, in] W[out, in]^T is, read column-major, the cuBLAS product
//   C = y^T (out x tokens, ldc = y.stride[0]) = op_T(A = W, lda = W.stride[0]) * op_N(B = x, ldb = x.stride[0])
// i.e. one cublasGemmEx(CUBLAS_OP_T, CUBLAS_OP_N, m = out, n = tokens, k = in); no transposed copy.
//
// Precision contract (fp32 compute everywhere, y rounded once):
//   - TX = TW = float: an fp32 GEMM (CUBLAS_COMPUTE_32F with default math, no TF32), so it matches
//     the CPU op to fp32 rounding (the summation order differs).
//   - TX = float, TW = half / bfloat16: x is rounded once to TW into the workspace, then a
//     tensor-core GEMM TW x TW -> fp32 y with fp32 accumulation. The rounding of x is the one extra
//     error against the CPU op (which multiplies fp32 x by the widened weights): per product at most
//     the unit roundoff of TW (2^-11 half, 2^-8 bfloat16) relative to |x_i w_i|.
//   - TX = TW = half / bfloat16: a GEMM with TW inputs and output, fp32 accumulation, no split-K
//     reduction in TW (the handle disallows it), so y is rounded once from fp32.
//   Bias: broadcast into y first, then the GEMM runs with beta = 1, so b is added in fp32 before
//   the single rounding of y (beta = 0 without a bias).
//
// Supported (TX, TW): (float, float | half | bfloat16), (half, half), (bfloat16, bfloat16).
// GGUF block weights are not supported on CUDA (a compile-time error). Host checks (before any
// launch): check(p) from ops/linear.hpp, then what cuBLAS needs: every size and row stride fits in
// int, row strides at least the row length (rows may not overlap), the workspace size. Alignment is
// not required; cuBLAS picks its fastest kernels when data pointers are 16-byte aligned and row
// strides are multiples of 16 bytes. y must not overlap x, weight, bias or the workspace.
// tokens == 0 launches nothing. The cuBLAS handle is per (host thread, device) and internal
// (cuda/detail/linear_cublas.cuh); a program that includes this header links recurformer::cuda
// (CUDA::cudart + CUDA::cublas).
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "recurformer/cuda/detail/convert.cuh"
#include "recurformer/cuda/detail/linear_cublas.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/ops/linear.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

template <class TX, class TW>
struct LinearCudaSupported
    : std::integral_constant<bool, (std::is_same<TX, float>::value &&
                                    (std::is_same<TW, float>::value || std::is_same<TW, half>::value ||
                                     std::is_same<TW, bfloat16>::value)) ||
                                       (std::is_same<TX, TW>::value &&
                                        (std::is_same<TW, half>::value || std::is_same<TW, bfloat16>::value))> {};

template <class TX, class TW>
constexpr void static_check_linear_types() {
  static_assert(!is_quant_block_v<TW>,
                "linear on CUDA: GGUF block weights (BlockQ4_0 .. BlockIQ4_XS) are not supported; dequantise "
                "them to half or bfloat16 at load");
  static_assert(LinearCudaSupported<TX, TW>::value || is_quant_block_v<TW>,  // one message each
                "linear on CUDA: supported (TX, TW) pairs are (float, float), (float, half), (float, "
                "bfloat16), (half, half) and (bfloat16, bfloat16)");
}

/// fp32 x is converted to the weight type for the tensor-core GEMM; otherwise x is used as is.
template <class TX, class TW>
constexpr bool linear_converts_x() {
  return !std::is_same<TX, TW>::value;
}

constexpr int64_t kLinearWsAlign = 256;  ///< the converted x starts here (cudaMalloc's alignment)
constexpr int64_t kLinearWsLdAlign = 8;  ///< its row stride in elements: 16 bytes for 2-byte TW

/// Row stride (elements) of the converted x in the workspace: in rounded up to 16 bytes, so every
/// row starts aligned as cuBLAS's vectorised tensor-core kernels want.
inline int64_t linear_ws_ld(int64_t in) { return (in + kLinearWsLdAlign - 1) / kLinearWsLdAlign * kLinearWsLdAlign; }

/// cuBLAS's leading dimension for a [rows, cols] row-major operand: its row stride (linear_limits
/// checked it). With one row the stride is never used to address anything, so cols stands in for
/// it (a [1, n] view may carry any stride).
inline int linear_ld(int64_t rows, int64_t cols, int64_t stride) { return int(rows <= 1 ? cols : stride); }

/// cuBLAS's limits on valid params, each one a call meets a reason in s: its int sizes, and
/// leading dimensions of at least the column count (cuBLAS's ld >= rows, column-major) that fit in int.
template <class TX, class TW>
void linear_limits(const LinearParams<TX, TW>& p, Support& s) {
  using recurformer::detail::support_limit;
  const int64_t tokens = p.x.shape[0], in = p.x.shape[1], out = p.weight.shape[0];
  support_limit(s, tokens <= INT_MAX, "linear: x has ", tokens, " tokens; cuBLAS takes at most ", INT_MAX, " per call");
  support_limit(s, in <= INT_MAX - kLinearWsLdAlign, "linear: x has ", in, " columns (in); at most ",
                INT_MAX - kLinearWsLdAlign, " on CUDA (cuBLAS int sizes)");
  support_limit(s, out <= INT_MAX, "linear: weight has ", out, " rows (out); cuBLAS takes at most ", INT_MAX);
  auto leading_dim = [&](const char* name, int64_t rows, int64_t cols, int64_t stride) {
    if (rows <= 1) return;
    support_limit(s, stride >= cols, "linear: ", name, " has row stride ", stride, ", expected at least its row length ",
                  cols, " (cuBLAS leading dimension)");
    support_limit(s, stride <= INT_MAX, "linear: ", name, " has row stride ", stride, ", which does not fit in int (cuBLAS)");
  };
  leading_dim("weight", out, in, p.weight.stride[0]);
  leading_dim("x", tokens, in, p.x.stride[0]);  // also the converting kernel's source rows
  leading_dim("y", tokens, out, p.y.stride[0]);
}

/// The cuBLAS arguments of one call, after every host check.
struct LinearGemmDims {
  int m = 0, n = 0, k = 0;      // out, tokens, in
  int lda = 0, ldb = 0, ldc = 0;  // weight, x (or its converted copy), y
};

template <class TX, class TW>
LinearGemmDims check_cuda_linear(const LinearParams<TX, TW>& p) {
  static_check_linear_types<TX, TW>();
  check(p);
  Support s;
  linear_limits(p, s);
  recurformer::detail::require_supported(s);
  const int64_t tokens = p.x.shape[0], in = p.x.shape[1], out = p.weight.shape[0];
  LinearGemmDims d;
  d.m = int(out), d.n = int(tokens), d.k = int(in);
  d.lda = linear_ld(out, in, p.weight.stride[0]);
  d.ldb = linear_converts_x<TX, TW>() ? int(linear_ws_ld(in)) : linear_ld(tokens, in, p.x.stride[0]);
  d.ldc = linear_ld(tokens, out, p.y.stride[0]);
  return d;
}

template <class TX, class TW>
size_t linear_ws_bytes(const LinearParams<TX, TW>& p) {
  const int64_t tokens = p.x.shape[0];
  if (!linear_converts_x<TX, TW>() || tokens == 0) return 0;
  return size_t(tokens * linear_ws_ld(p.x.shape[1])) * sizeof(TW) + size_t(kLinearWsAlign);
}

constexpr int kLinearCopyThreads = 256;
constexpr int64_t kLinearCopyMaxBlocksX = 1024, kLinearCopyMaxBlocksY = 65535;

/// dst[r * dst_ld + c] = TO(src[r * src_ld + c]) for r < rows, c < cols, through fp32 (exact for
/// every widening, one round-to-nearest-even for fp32 -> 16 bits). src_ld = 0 repeats one source
/// row (the bias broadcast into y). Rows on grid y, columns on grid x, both grid-stride, int64
/// indices: no division per element.
template <class TI, class TO>
__global__ void __launch_bounds__(kLinearCopyThreads)
    linear_copy_rows_kernel(const TI* __restrict__ src, int64_t src_ld, TO* __restrict__ dst, int64_t dst_ld,
                            int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
    for (int64_t c = int64_t(blockIdx.x) * kLinearCopyThreads + threadIdx.x; c < cols;
         c += int64_t(gridDim.x) * kLinearCopyThreads)
      store_float(dst + r * dst_ld + c, load_float(src + r * src_ld + c));
}

template <class TI, class TO>
void linear_copy_rows(const TI* src, int64_t src_ld, TO* dst, int64_t dst_ld, int64_t rows, int64_t cols,
                      cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const int64_t col_blocks = (cols + kLinearCopyThreads - 1) / kLinearCopyThreads;
  const dim3 grid(unsigned(std::min(col_blocks, kLinearCopyMaxBlocksX)),
                  unsigned(std::min(rows, kLinearCopyMaxBlocksY)));
  linear_copy_rows_kernel<TI, TO><<<grid, kLinearCopyThreads, 0, stream>>>(src, src_ld, dst, dst_ld, rows, cols);
  RF_CUDA_CHECK_LAUNCH("linear_copy_rows_kernel");
}

}  // namespace detail
}  // namespace cuda

/// Whether linear(p, CudaExec, ...) runs (core/support.hpp): p's check, then every cuBLAS limit
/// the call meets (int sizes; leading dimensions of at least the row length, fitting in int).
template <class TX, class TW>
Support supports(const LinearParams<TX, TW>& p, CudaExec) {
  cuda::detail::static_check_linear_types<TX, TW>();
  Support s;
  if (detail::support_check(s, [&] { check(p); })) cuda::detail::linear_limits(p, s);
  return s;
}

/// Bytes of device scratch linear(p, CudaExec, ...) needs: the fp32 x rounded to TW
/// (tokens x in rounded up to 8 elements, plus 256 bytes to align the start) for TX = float with a
/// 16-bit TW; 0 otherwise and when tokens == 0. Grows with tokens, so a buffer sized for the
/// largest call serves every smaller one.
template <class TX, class TW>
size_t linear_workspace_bytes(const LinearParams<TX, TW>& p, CudaExec) {
  cuda::detail::check_cuda_linear(p);
  return cuda::detail::linear_ws_bytes(p);
}

/// y = x W^T + b on exec.stream (see the precision contract above). Throws Error, before any
/// launch or write, on invalid params or when workspace_bytes < linear_workspace_bytes(p, exec).
template <class TX, class TW>
void linear(const LinearParams<TX, TW>& p, CudaExec exec, void* workspace, size_t workspace_bytes) {
  using cuda::detail::CublasType;
  const cuda::detail::LinearGemmDims d = cuda::detail::check_cuda_linear(p);
  const size_t need = cuda::detail::linear_ws_bytes(p);
  RF_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr), "linear: workspace has ", workspace_bytes,
           " bytes", workspace ? "" : " (null)", ", expected at least ", need, " (linear_workspace_bytes)");
  const int64_t tokens = p.x.shape[0], in = p.x.shape[1], out = p.weight.shape[0];
  if (tokens == 0) return;
  // Handle creation and stream binding can fail: both before the first launch writes anything.
  cublasHandle_t handle = cuda::detail::cublas_handle();
  RF_CUBLAS_CHECK(cublasSetStream(handle, exec.stream));

  // B: x itself, or x rounded to TW into the (aligned) workspace, rows of ldb elements.
  const void* gemm_x = p.x.data;
  if constexpr (cuda::detail::linear_converts_x<TX, TW>()) {
    const auto base = reinterpret_cast<uintptr_t>(workspace);
    constexpr auto align = uintptr_t(cuda::detail::kLinearWsAlign);
    TW* xw = reinterpret_cast<TW*>((base + align - 1) & ~(align - 1));  // <= 255 bytes in: the slack
    cuda::detail::linear_copy_rows(p.x.data, p.x.stride[0], xw, int64_t(d.ldb), tokens, in, exec.stream);
    gemm_x = xw;
  }
  // y = bias (one source row repeated: src_ld = 0), then y = x W^T + 1 * y in fp32, rounded once.
  if (p.bias.data)
    cuda::detail::linear_copy_rows(p.bias.data, int64_t(0), p.y.data, p.y.stride[0], tokens, out, exec.stream);
  const float alpha = 1.f, beta = p.bias.data ? 1.f : 0.f;  // host scalars: the handle's default pointer mode
  RF_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, d.m, d.n, d.k, &alpha, p.weight.data,
                               CublasType<TW>::value, d.lda, gemm_x, CublasType<TW>::value, d.ldb, &beta, p.y.data,
                               CublasType<TX>::value, d.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace recurformer
