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

namespace detail {
// 2^f = exp(f ln2) on |f| <= 1/2: Taylor to degree 6 (truncation < 1.3e-7 relative).
constexpr float kExp2C1 = 0.693147180559945309f, kExp2C2 = 0.240226506959100712f,
                kExp2C3 = 0.0555041086648215800f, kExp2C4 = 0.00961812910762847717f,
                kExp2C5 = 0.00133335581464284434f, kExp2C6 = 0.000154035303933816099f;
template <class V>
V exp2_poly(V f) {
  V p = fma(f, V::broadcast(kExp2C6), V::broadcast(kExp2C5));
  p = fma(p, f, V::broadcast(kExp2C4));
  p = fma(p, f, V::broadcast(kExp2C3));
  p = fma(p, f, V::broadcast(kExp2C2));
  p = fma(p, f, V::broadcast(kExp2C1));
  return fma(p, f, V::broadcast(1.f));
}
}  // namespace detail

/// 2^x for the scan's decays, in as few instructions as possible (it is the scan's bottleneck):
/// no special-case fix-ups. AVX-512: exact range handling by vscalefps (underflow to 0, overflow
/// to inf, NaN stays NaN). AVX2 and scalar: x is clamped to [-126, 127] first, so very negative
/// arguments give 2^-126 instead of 0 (an absolute error below 1.2e-38).
inline F32x1 exp2(F32x1 x) {
  if (x.v != x.v) return x;
  const float n = std::nearbyint(std::fmin(std::fmax(x.v, -126.f), 127.f));
  const float f = std::fmin(std::fmax(x.v, -126.f), 127.f) - n;
  return {std::ldexp(detail::exp2_poly(F32x1{f}).v, int(n))};
}
#if RF_HAVE_X86_SIMD
RF_SIMD_AVX2 F32x8 exp2(F32x8 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x.v, _mm256_set1_ps(-126.f)), _mm256_set1_ps(127.f));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const F32x8 p = detail::exp2_poly(F32x8{_mm256_sub_ps(xc, n)});
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(e))};
}
RF_SIMD_AVX512 F32x16 exp2(F32x16 x) {
  const __m512 n = _mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const F32x16 p = detail::exp2_poly(F32x16{_mm512_sub_ps(x.v, n)});
  return {_mm512_scalef_ps(p.v, n)};
}
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
