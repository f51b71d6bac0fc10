// recurformer/ops/linear.hpp: the dense layer y = x W^T + b with W stored [out, in] as in HF
// checkpoints (nn.Linear.weight), fp32 accumulation whatever the storage types.
//
//   y[t, o] = bias[o] + sum_i x[t, i] * weight[o, i]
//
// Supported: TX = float with TW = float, half, bfloat16 or any GGUF block type of core/quant.hpp
// (BlockQ4_0 .. BlockIQ4_XS, unpacked in registers or per block on the stack; weight is then
// [out, in / block] blocks and the bias fp32), and TX == TW for half and bfloat16 (the CPU
// templates accept any pair of dense storage types). The CPU implementation (cpu/linear.hpp)
// streams W once per call for a few tokens (decode, memory-bound GEMV) and packs W into fp32
// panels for many tokens (prefill, compute-bound blocked GEMM); the panels live in a caller-owned
// workspace of linear_workspace_bytes() bytes. y must not overlap x, weight or bias.
//
// linear_backward computes dx = dy W and dweight = dy^T x with the same packed micro-kernel
// (packing rows of W, rows of x and a transposed block of dy into a caller-owned workspace) and
// dbias as column sums of dy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/quant.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/ops/block_weight.hpp"

namespace recurformer {

/// How a weight type lies along `in`: one element per weight, or blocks of `block` weights.
template <class TW, class = void>
struct LinearWeight {
  static constexpr int64_t block = 1;
  using bias_type = TW;
};
template <class TW>
struct LinearWeight<TW, std::enable_if_t<is_quant_block_v<TW>>> {
  static constexpr int64_t block = TW::size;
  using bias_type = float;
};

template <class TX, class TW>
struct LinearParams {
  View<const TX, 2> x;       // [tokens, in]
  View<const TW, 2> weight;  // [out, in / LinearWeight<TW>::block], HF row-major
  View<const typename LinearWeight<TW>::bias_type, 1> bias;  // [out] optional (TW; fp32 for blocks)
  View<TX, 2> y;             // [tokens, out]
};

/// Throws Error unless p is a valid linear call (the workspace is checked by linear()).
template <class TX, class TW>
void check(const LinearParams<TX, TW>& p) {
  static_assert(!is_quant_block_v<TW> || std::is_same_v<TX, float>, "linear: quantised weights take fp32 x");
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

/// Throws Error unless p is valid and, when present, `blocks` can stand for p.weight: a block type
/// whose block divides in (p.weight then only gives the shape), and no bias unless TW is float.
template <class TW>
void check(const LinearParams<float, TW>& p, BlockWeight blocks) {
  check(p);
  if (!blocks.present()) return;
  detail::check_blocks("linear", "in", p.x.shape[1], blocks);
  RF_CHECK((std::is_same_v<TW, float>) || !p.bias.present(), "linear: a bias with block weights must be fp32");
}

/// The backward of linear for training, fp32 accumulation and fp32 gradients:
///   dx = dy W,  dweight = dy^T x (summed over tokens),  dbias = column sums of dy.
/// Weights in float, half or bfloat16 (not the quantised types), with TX = float or TX == TW.
/// Each output is optional; with accumulate they are added to (several projections reading one
/// x, or gradient accumulation over micro-batches), else overwritten. The result does not depend
/// on the number of threads (every element is summed by one thread in a fixed order). The
/// gradients must not overlap the inputs or each other.
template <class TX, class TW>
struct LinearBackwardParams {
  View<const TX, 2> x;       // [tokens, in] the forward's input
  View<const TW, 2> weight;  // [out, in] the forward's weight
  View<const float, 2> dy;   // [tokens, out] dL/dy
  View<float, 2> dx;         // [tokens, in] optional
  View<float, 2> dweight;    // [out, in] optional
  View<float, 1> dbias;      // [out] optional
  bool accumulate = false;   // true: add into dx / dweight / dbias; false: overwrite them
};

/// Throws Error unless p is a valid linear_backward call (the workspace is checked by the call).
template <class TX, class TW>
void check(const LinearBackwardParams<TX, TW>& p) {
  static_assert(LinearWeight<TW>::block == 1,
                "linear_backward: weights in float, half or bfloat16 (not the quantised types)");
  constexpr const char* op = "linear_backward";
  detail::check_shape(op, "x", p.x, {-1, -1});
  const int64_t tokens = p.x.shape[0], in = p.x.shape[1];
  RF_CHECK(in >= 1, op, ": x must have at least one column (in features)");
  detail::check_shape(op, "weight", p.weight, {-1, in});
  const int64_t out = p.weight.shape[0];
  RF_CHECK(out >= 1, op, ": weight must have at least one row (out features)");
  detail::check_shape(op, "dy", p.dy, {tokens, out});
  detail::check_optional_shape(op, "dx", p.dx, {tokens, in});
  detail::check_optional_shape(op, "dweight", p.dweight, {out, in});
  detail::check_optional_shape(op, "dbias", p.dbias, {out});
  detail::check_inner_contiguous(op, "x", p.x);
  detail::check_inner_contiguous(op, "weight", p.weight);
  detail::check_inner_contiguous(op, "dy", p.dy);
  detail::check_inner_contiguous(op, "dx", p.dx);
  detail::check_inner_contiguous(op, "dweight", p.dweight);
  detail::check_inner_contiguous(op, "dbias", p.dbias);
}

}  // namespace recurformer
