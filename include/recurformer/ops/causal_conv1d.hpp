// recurformer/ops/causal_conv1d.hpp: the depthwise causal conv1d in front of the selective scan
// (spec sections 3 and 7), over packed variable-length batches, and its one-token update for decode.
//
// For channel c at token t of a sequence (window K in 2..8):
//   y[t,c] = act(bias[c] + sum_{i=0}^{K-1} weight[c,i] * x[t-K+1+i, c])
// where the inputs before the sequence's first token are its history: conv_state[slot] (the K-1
// inputs before it, oldest first) when conv_state is given and use_initial_state is true, zeros
// otherwise. When conv_state is given, conv_state[slot] is overwritten with the last K-1 inputs of
// the history followed by the sequence (so chunked prefill == one call == token-by-token updates).
// Accumulation is fp32; y is rounded to T once. A sequence whose slot is negative is padding: its y
// rows and every state slot are left as they were.
//
// causal_conv1d_backward (training) takes the forward's inputs and dL/dy and returns dL/dx,
// dL/dweight, dL/dbias and dL/d(history) in fp32, recomputing the pre-activation (no saved
// intermediates). It covers the path y <- (x, weight, bias, history) only: the forward's new
// conv_state output is not an input of the backward.
#pragma once

#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/index_memory.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/ops/selective_scan.hpp"  // detail::check_scan_sequences

namespace recurformer {

enum class ConvActivation { none, silu };

template <class T>
struct CausalConv1dParams {
  View<const T, 2> x;           // [tokens, Dch]
  View<const float, 2> weight;  // [Dch, K], K in 2..8
  View<const float, 1> bias;    // [Dch] optional
  View<T, 2> y;                 // [tokens, Dch]
  View<T, 3> conv_state;        // [slots, K-1, Dch] optional: the last K-1 inputs (oldest first), read as history and overwritten
  View<const int32_t, 1> cu_seqlens;   // [S+1] optional (absent: one sequence)
  View<const int32_t, 1> state_slots;  // [S] optional: conv_state slot of sequence s (absent: s); negative = padding
  ConvActivation activation = ConvActivation::none;
  bool use_initial_state = true;
};

constexpr int64_t kCausalConv1dMinWidth = 2, kCausalConv1dMaxWidth = 8;

namespace detail {
/// Everything of a causal_conv1d call but y (the backward does not read y).
template <class T>
void check_causal_conv1d_inputs(const char* op, ScanMode mode, const CausalConv1dParams<T>& p,
                                IndexMemory where = IndexMemory::host) {
  check_shape(op, "x", p.x, {-1, -1});
  const int64_t tokens = p.x.shape[0], dch = p.x.shape[1];
  RF_CHECK(dch >= 1, op, ": x must have at least one channel");
  check_shape(op, "weight", p.weight, {dch, -1});
  const int64_t k = p.weight.shape[1];
  RF_CHECK(k >= kCausalConv1dMinWidth && k <= kCausalConv1dMaxWidth, op,
           ": the width K = weight.shape[1] must be in ", kCausalConv1dMinWidth, "..",
           kCausalConv1dMaxWidth, ", got ", k);
  check_optional_shape(op, "bias", p.bias, {dch});
  if (mode == ScanMode::state_update)
    RF_CHECK(p.conv_state.present(), op, ": conv_state is required for the one-token update");
  check_optional_shape(op, "conv_state", p.conv_state, {-1, k - 1, dch});
  check_inner_contiguous(op, "x", p.x);
  check_inner_contiguous(op, "bias", p.bias);
  check_inner_contiguous(op, "conv_state", p.conv_state);
  RF_CHECK(p.activation == ConvActivation::none || p.activation == ConvActivation::silu, op,
           ": unknown activation ", int(p.activation));
  check_scan_sequences(op, mode, tokens, p.conv_state.present() ? p.conv_state.shape[0] : -1,
                       p.cu_seqlens, p.state_slots, where);
}

template <class T>
void check_causal_conv1d(const char* op, ScanMode mode, const CausalConv1dParams<T>& p,
                         IndexMemory where = IndexMemory::host) {
  check_causal_conv1d_inputs(op, mode, p, where);
  check_shape(op, "y", p.y, {p.x.shape[0], p.x.shape[1]});
  check_inner_contiguous(op, "y", p.y);
}
}  // namespace detail

/// Throws Error unless p is a valid causal_conv1d call.
template <class T>
void check(const CausalConv1dParams<T>& p) {
  detail::check_causal_conv1d("causal_conv1d", detail::ScanMode::scan, p);
}
/// The same for causal_conv1d_update: conv_state required, cu_seqlens absent, one token per row.
template <class T>
void check_conv_update(const CausalConv1dParams<T>& p) {
  detail::check_causal_conv1d("causal_conv1d_update", detail::ScanMode::state_update, p);
}

/// The backward of causal_conv1d (prefill) for training. With g = dy * act'(pre-activation):
///   dx[t,c]      = sum_i weight[c,i] * g[t+K-1-i, c]   (terms past the sequence's end are 0)
///   dweight[c,i] = sum_t g[t,c] * in[t-K+1+i, c]       (in: x, the history, or zeros)
///   dbias[c]     = sum_t g[t,c]                      (also without fwd.bias: a zero bias's gradient)
///   dconv_state[slot, h, c] = dL/d conv_state[slot, h, c], the history row h's share of dx
/// Every output is optional and overwritten; the gradients must not overlap the inputs.
template <class T>
struct CausalConv1dBackwardParams {
  CausalConv1dParams<T> fwd;   // the forward call's inputs (x, weight, bias, cu_seqlens, state_slots,
                               // activation, use_initial_state); fwd.conv_state is read only, as the
                               // history before the forward ran; fwd.y is not read (may be absent)
  View<const float, 2> dy;     // [tokens, Dch] dL/dy
  View<float, 2> dx;           // [tokens, Dch] optional; padding sequences' rows are set to 0
  View<float, 2> dweight;      // [Dch, K] optional
  View<float, 1> dbias;        // [Dch] optional
  View<float, 3> dconv_state;  // [slots, K-1, Dch] optional, needs fwd.conv_state: written for the
                               // slot of every non-padding sequence (zeros for an empty one) when
                               // fwd.use_initial_state; every other slot (and all of them when the
                               // history is not used) is left as it was
};

/// Throws Error unless p is a valid causal_conv1d_backward call.
template <class T>
void check(const CausalConv1dBackwardParams<T>& p) {
  constexpr const char* op = "causal_conv1d_backward";
  detail::check_causal_conv1d_inputs(op, detail::ScanMode::scan, p.fwd);
  const int64_t tokens = p.fwd.x.shape[0], dch = p.fwd.x.shape[1], k = p.fwd.weight.shape[1];
  detail::check_shape(op, "dy", p.dy, {tokens, dch});
  detail::check_optional_shape(op, "dx", p.dx, {tokens, dch});
  detail::check_optional_shape(op, "dweight", p.dweight, {dch, k});
  detail::check_optional_shape(op, "dbias", p.dbias, {dch});
  if (p.dconv_state.present()) {
    RF_CHECK(p.fwd.conv_state.present(), op,
             ": dconv_state needs fwd.conv_state (the history it is the gradient of)");
    detail::check_shape(op, "dconv_state", p.dconv_state, {p.fwd.conv_state.shape[0], k - 1, dch});
  }
  detail::check_inner_contiguous(op, "dy", p.dy);
  detail::check_inner_contiguous(op, "dx", p.dx);
  detail::check_inner_contiguous(op, "dbias", p.dbias);
  detail::check_inner_contiguous(op, "dconv_state", p.dconv_state);
}

}  // namespace recurformer
