// recurformer/ops/linear.hpp: the dense layer y = x W^T + b with W stored [out, in] as in HF
// checkpoints (nn.Linear.weight), fp32 accumulation whatever the storage types.
//
//   y[t, o] = bias[o] + sum_i x[t, i] * weight[o, i]
//
// Supported: TX = float with TW = float, half, bfloat16 or BlockQ8_0 (GGUF Q8_0, dequantised in
// registers; weight is then [out, in/32] blocks and the bias fp32), and TX == TW for half and
// bfloat16 (the CPU templates accept any pair of storage types). The CPU implementation (cpu/linear.hpp)
// streams W once per call for a few tokens (decode, memory-bound GEMV) and packs W into fp32
// panels for many tokens (prefill, compute-bound blocked GEMM); the panels live in a caller-owned
// workspace of linear_workspace_bytes() bytes. y must not overlap x, weight or bias.
#pragma once

#include <cstddef>
#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/exec.hpp"
#include "recurformer/core/quant.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

/// How a weight type lies along `in`: one element per weight, or blocks of `block` weights.
template <class TW>
struct LinearWeight {
  static constexpr int64_t block = 1;
  using bias_type = TW;
};
template <>
struct LinearWeight<BlockQ8_0> {
  static constexpr int64_t block = BlockQ8_0::size;
  using bias_type = float;
};

template <class TX, class TW>
struct LinearParams {
  View<const TX, 2> x;       // [tokens, in]
  View<const TW, 2> weight;  // [out, in / LinearWeight<TW>::block], HF row-major
  View<const typename LinearWeight<TW>::bias_type, 1> bias;  // [out] optional (TW; fp32 for Q8_0)
  View<TX, 2> y;             // [tokens, out]
};

/// Throws Error unless p is a valid linear call (the workspace is checked by linear()).
template <class TX, class TW>
void check(const LinearParams<TX, TW>& p) {
  constexpr const char* op = "linear";
  detail::check_shape(op, "x", p.x, {-1, -1});
  const int64_t tokens = p.x.shape[0], in = p.x.shape[1];
  RF_CHECK(in >= 1, op, ": x must have at least one column (in features)");
  constexpr int64_t block = LinearWeight<TW>::block;
  RF_CHECK(in % block == 0, op, ": in = ", in, " must be a multiple of the weight block size ", block);
  detail::check_shape(op, "weight", p.weight, {-1, in / block});
  const int64_t out = p.weight.shape[0];
  RF_CHECK(out >= 1, op, ": weight must have at least one row (out features)");
  detail::check_optional_shape(op, "bias", p.bias, {out});
  detail::check_shape(op, "y", p.y, {tokens, out});
  detail::check_inner_contiguous(op, "x", p.x);
  detail::check_inner_contiguous(op, "weight", p.weight);
  detail::check_inner_contiguous(op, "bias", p.bias);
  detail::check_inner_contiguous(op, "y", p.y);
}

/// Scratch bytes linear(p, exec, ...) needs for these shapes and this many threads (0 when the
/// GEMV path is taken). A buffer sized for the largest token count serves every smaller call.
template <class TX, class TW>
size_t linear_workspace_bytes(const LinearParams<TX, TW>& p, CpuExec exec);

/// y = x W^T + b (cpu/linear.hpp). Throws Error, before writing, on invalid params or when
/// workspace_bytes < linear_workspace_bytes(p, exec).
template <class TX, class TW>
void linear(const LinearParams<TX, TW>& p, CpuExec exec, void* workspace, size_t workspace_bytes);

}  // namespace recurformer
