// recurformer/cpu/detail/scan_math.hpp: the element-wise functions of the scan and the conv
// (softplus, silu) over the simd.hpp vector types, written once for every ISA.
//
// Both need a division, which simd.hpp does not offer, so div() is added here per vector type.
// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(e) = 2 atanh(e / (2 + e)) by its odd series
// on [0, 1/3] (7 terms, truncation < 1.5e-8 relative): a few ulp, no vector log needed. For x > 20
// the log1p term is below half an ulp of x, so the result is exactly x, as the spec's cut-off says.
#pragma once

#include "recurformer/cpu/detail/simd.hpp"

namespace recurformer {
namespace cpu {
namespace simd {

inline F32x1 div(F32x1 a, F32x1 b) { return {a.v / b.v}; }
#if RF_HAVE_X86_SIMD
RF_SIMD_AVX2 F32x8 div(F32x8 a, F32x8 b) { return {_mm256_div_ps(a.v, b.v)}; }
RF_SIMD_AVX512 F32x16 div(F32x16 a, F32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
#endif

/// log(1 + exp(x)), exactly x for x > 20.
template <class V>
V softplus(V x) {
  const V zero = V::zero();
  const V e = exp(zero - max(x, zero - x));  // exp(-|x|) in (0, 1]
  const V s = div(e, V::broadcast(2.f) + e);  // in [0, 1/3]
  const V s2 = s * s;
  V p = fma(s2, V::broadcast(2.f / 13), V::broadcast(2.f / 11));
  p = fma(p, s2, V::broadcast(2.f / 9));
  p = fma(p, s2, V::broadcast(2.f / 7));
  p = fma(p, s2, V::broadcast(2.f / 5));
  p = fma(p, s2, V::broadcast(2.f / 3));
  p = fma(p, s2, V::broadcast(2.f));
  return fma(s, p, max(x, zero));
}

/// x * sigmoid(x) = x / (1 + exp(-x)); -0 for very negative x.
template <class V>
V silu(V x) {
  return div(x, V::broadcast(1.f) + exp(V::zero() - x));
}

/// Loads / stores the first n (1..width) lanes; the full-width path avoids F32x8's staged partials.
template <class V, class T>
V load_n(const T* p, int n) {
  return n == V::width ? V::load(p) : V::load_partial(p, n);
}
template <class V, class T>
void store_n(V v, T* p, int n) {
  if (n == V::width)
    v.store(p);
  else
    v.store_partial(p, n);
}

}  // namespace simd
}  // namespace cpu
}  // namespace recurformer
