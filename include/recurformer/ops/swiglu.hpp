// recurformer/ops/swiglu.hpp: the gated activation of the Llama MLP.
//
//   out[t, i] = silu(gate[t, i]) * up[t, i],   silu(g) = g / (1 + exp(-g))
//
// computed in fp32 and rounded to T once (HF rounds silu(gate) to the activation dtype first; for
// a 16-bit T that differs by at most one rounding). out may be gate or up itself (in place); any
// other overlap is undefined. The CPU implementation is in cpu/swiglu.hpp.
#pragma once

#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/exec.hpp"
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

/// out = silu(gate) * up, rows split across the pool (cpu/swiglu.hpp).
template <class T>
void swiglu(const SwigluParams<T>& p, CpuExec exec);

}  // namespace recurformer
