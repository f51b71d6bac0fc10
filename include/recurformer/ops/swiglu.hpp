// recurformer/ops/swiglu.hpp: the gated activation of the Llama MLP.
//
//   out[t, i] = silu(gate[t, i]) * up[t, i],   silu(g) = g / (1 + exp(-g))
//
// computed in fp32 and rounded to T once (HF rounds silu(gate) to the activation dtype first; for
// a 16-bit T that differs by at most one rounding). out may be gate or up itself (in place); any
// other overlap is undefined. The CPU implementation is in cpu/swiglu.hpp.
//
// Backward (fp32 gradients and arithmetic), sigma = 1 / (1 + exp(-g)):
//
//   dup[t, i]   = dout[t, i] * silu(gate[t, i])
//   dgate[t, i] = dout[t, i] * up[t, i] * sigma * (1 + gate[t, i] * (1 - sigma))
//
// API:
//   SwigluBackwardParams<T>{gate, up, dout, dgate, dup}
//   swiglu_backward(p, exec)       // dgate or dup (not both) may equal dout
#pragma once

#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

template <class T>
struct SwigluParams {
  View<const T, 2> gate;  // [tokens, d]
  View<const T, 2> up;    // [tokens, d]
  View<T, 2> out;         // [tokens, d]  (may equal gate or up)
};

/// Throws Error unless p is a valid swiglu call.
template <class T>
void check(const SwigluParams<T>& p) {
  constexpr const char* op = "swiglu";
  detail::check_shape(op, "gate", p.gate, {-1, -1});
  const int64_t tokens = p.gate.shape[0], d = p.gate.shape[1];
  detail::check_shape(op, "up", p.up, {tokens, d});
  detail::check_shape(op, "out", p.out, {tokens, d});
  detail::check_inner_contiguous(op, "gate", p.gate);
  detail::check_inner_contiguous(op, "up", p.up);
  detail::check_inner_contiguous(op, "out", p.out);
}

template <class T>
struct SwigluBackwardParams {
  View<const T, 2> gate;      // [tokens, d] the forward's inputs
  View<const T, 2> up;        // [tokens, d]
  View<const float, 2> dout;  // [tokens, d] dL/dout
  View<float, 2> dgate;       // [tokens, d] dL/dgate, written (may equal dout)
  View<float, 2> dup;         // [tokens, d] dL/dup, written (may equal dout, not dgate)
};

/// Throws Error unless p is a valid swiglu_backward call.
template <class T>
void check(const SwigluBackwardParams<T>& p) {
  constexpr const char* op = "swiglu_backward";
  detail::check_shape(op, "gate", p.gate, {-1, -1});
  const int64_t tokens = p.gate.shape[0], d = p.gate.shape[1];
  detail::check_shape(op, "up", p.up, {tokens, d});
  detail::check_shape(op, "dout", p.dout, {tokens, d});
  detail::check_shape(op, "dgate", p.dgate, {tokens, d});
  detail::check_shape(op, "dup", p.dup, {tokens, d});
  detail::check_inner_contiguous(op, "gate", p.gate);
  detail::check_inner_contiguous(op, "up", p.up);
  detail::check_inner_contiguous(op, "dout", p.dout);
  detail::check_inner_contiguous(op, "dgate", p.dgate);
  detail::check_inner_contiguous(op, "dup", p.dup);
  RF_CHECK(p.dgate.data != p.dup.data || tokens * d == 0, op, ": dgate and dup must not be the same memory");
  RF_CHECK(p.dgate.data != p.dout.data || p.dgate.stride[0] == p.dout.stride[0], op,
           ": dgate may equal dout only with the same row stride");
  RF_CHECK(p.dup.data != p.dout.data || p.dup.stride[0] == p.dout.stride[0], op,
           ": dup may equal dout only with the same row stride");
}

}  // namespace recurformer
