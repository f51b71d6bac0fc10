// recurformer/cpu/detail/simd.hpp: fp32 vector types for the CPU kernels, one per ISA.
//
// A kernel body is a template over the vector type V and is written once:
//
//   template <class V> void axpy_body(int64_t n, float a, const half* x, float* y) {
//     int64_t i = 0;
//     for (; i + V::width <= n; i += V::width) fma(V::broadcast(a), V::load(x + i), V::load(y + i)).store(y + i);
//     for (; i < n; ++i) y[i] += a * float(x[i]);   // or V::load_partial / store_partial
//   }
//   RF_KERNEL_AVX512 void axpy_avx512(...) { axpy_body<simd::F32x16>(...); }   // see config.hpp
//
// F32x1 is the portable body; F32x8 needs AVX2+FMA+F16C; F32x16 needs AVX-512 F/BW/VL/DQ.
// F32x8 / F32x16 may be used only inside code reached from an RF_KERNEL_AVX2 / RF_KERNEL_AVX512
// entry point whose own arguments are scalars and pointers: the entry point is flattened, so the
// body and every vector op are inlined into it. Their ops are always_inline, so any other use fails
// to compile. No lambda, std::function or thread-pool call inside such a body (those are separate
// functions): parallelise outside, call the entry point per block.
// Loads convert half/bf16 to fp32 exactly; stores round to nearest even (as core/dtype.hpp does).
// exp() is a range-reduced polynomial, accurate to about 2 ulp over the float range; arguments
// below -87.3 give 0 and above 88.7 give +inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "recurformer/core/config.hpp"
#include "recurformer/core/dtype.hpp"

#if RF_HAVE_X86_SIMD
// GCC 12 warns falsely inside its own AVX-512 headers (GCC bug 105593) when they are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace recurformer {
namespace cpu {
namespace simd {

namespace detail {
// exp(r) on |r| <= ln2/2: Taylor to degree 6 (error < 1.3e-7 relative before rounding).
constexpr float kExpC2 = 0.5f, kExpC3 = 1.f / 6, kExpC4 = 1.f / 24, kExpC5 = 1.f / 120,
                kExpC6 = 1.f / 720;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln2 split so n*kLn2Hi is exact
constexpr float kLn2Lo = 1.428606765330187045e-06f;
constexpr float kExpMin = -87.33654f, kExpMax = 88.72283f;

inline float exp_scalar(float x) {
  if (!(x > kExpMin)) return x != x ? x : 0.f;
  if (x > kExpMax) return INFINITY;
  const float n = std::nearbyint(x * kLog2e);
  const float r = std::fma(-n, kLn2Lo, std::fma(-n, kLn2Hi, x));
  float p = std::fma(kExpC6, r, kExpC5);
  p = std::fma(p, r, kExpC4);
  p = std::fma(p, r, kExpC3);
  p = std::fma(p, r, kExpC2);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  return std::ldexp(p, int(n));
}
}  // namespace detail

/// One lane: the portable body.
struct F32x1 {
  static constexpr int width = 1;
  float v;
  static F32x1 zero() { return {0.f}; }
  static F32x1 broadcast(float x) { return {x}; }
  template <class T>
  static F32x1 load(const T* p) {
    return {to_float(*p)};
  }
  template <class T>
  static F32x1 load_partial(const T* p, int n) {
    return {n > 0 ? to_float(*p) : 0.f};
  }
  template <class T>
  void store(T* p) const {
    *p = from_float<T>(v);
  }
  template <class T>
  void store_partial(T* p, int n) const {
    if (n > 0) *p = from_float<T>(v);
  }
  friend F32x1 operator+(F32x1 a, F32x1 b) { return {a.v + b.v}; }
  friend F32x1 operator-(F32x1 a, F32x1 b) { return {a.v - b.v}; }
  friend F32x1 operator*(F32x1 a, F32x1 b) { return {a.v * b.v}; }
  friend F32x1 fma(F32x1 a, F32x1 b, F32x1 c) { return {std::fma(a.v, b.v, c.v)}; }
  friend F32x1 max(F32x1 a, F32x1 b) { return {a.v > b.v ? a.v : b.v}; }
  friend F32x1 min(F32x1 a, F32x1 b) { return {a.v < b.v ? a.v : b.v}; }
  friend F32x1 exp(F32x1 a) { return {detail::exp_scalar(a.v)}; }
  float reduce_add() const { return v; }
  float reduce_max() const { return v; }
};

#if RF_HAVE_X86_SIMD

/// Eight lanes (AVX2 + FMA + F16C).
struct F32x8 {
  static constexpr int width = 8;
  __m256 v;

  RF_SIMD_AVX2 static F32x8 zero() { return {_mm256_setzero_ps()}; }
  RF_SIMD_AVX2 static F32x8 broadcast(float x) { return {_mm256_set1_ps(x)}; }
  RF_SIMD_AVX2 static F32x8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  RF_SIMD_AVX2 static F32x8 load(const half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  RF_SIMD_AVX2 static F32x8 load(const bfloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  template <class T>
  RF_SIMD_AVX2 static F32x8 load_partial(const T* p, int n) {
    T buf[8] = {};
    for (int i = 0; i < n && i < 8; ++i) buf[i] = p[i];
    return load(buf);
  }
  RF_SIMD_AVX2 void store(float* p) const { _mm256_storeu_ps(p, v); }
  RF_SIMD_AVX2 void store(half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  RF_SIMD_AVX2 void store(bfloat16* p) const {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(nan));
    // pack the 8 low halves: packus works within 128-bit lanes, so fix the order after
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  template <class T>
  RF_SIMD_AVX2 void store_partial(T* p, int n) const {
    T buf[8];
    store(buf);
    for (int i = 0; i < n && i < 8; ++i) p[i] = buf[i];
  }
  RF_SIMD_AVX2 friend F32x8 operator+(F32x8 a, F32x8 b) { return {_mm256_add_ps(a.v, b.v)}; }
  RF_SIMD_AVX2 friend F32x8 operator-(F32x8 a, F32x8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
  RF_SIMD_AVX2 friend F32x8 operator*(F32x8 a, F32x8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
  RF_SIMD_AVX2 friend F32x8 fma(F32x8 a, F32x8 b, F32x8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  RF_SIMD_AVX2 friend F32x8 max(F32x8 a, F32x8 b) { return {_mm256_max_ps(a.v, b.v)}; }
  RF_SIMD_AVX2 friend F32x8 min(F32x8 a, F32x8 b) { return {_mm256_min_ps(a.v, b.v)}; }
  RF_SIMD_AVX2 friend F32x8 exp(F32x8 a) {
    using namespace detail;
    const __m256 x = _mm256_min_ps(a.v, _mm256_set1_ps(kExpMax));
    const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpC6), r, _mm256_set1_ps(kExpC5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    // 2^n in two steps so n = 128 (x near kExpMax) does not overflow the exponent field
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i h = _mm256_srai_epi32(ni, 1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
    __m256 res = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    res = _mm256_blendv_ps(res, _mm256_setzero_ps(), _mm256_cmp_ps(a.v, _mm256_set1_ps(kExpMin), _CMP_LE_OQ));
    res = _mm256_blendv_ps(res, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(a.v, _mm256_set1_ps(kExpMax), _CMP_GT_OQ));
    return {_mm256_blendv_ps(res, a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
  }
  RF_SIMD_AVX2 float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  RF_SIMD_AVX2 float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

/// Sixteen lanes (AVX-512 F/BW/VL/DQ).
struct F32x16 {
  static constexpr int width = 16;
  __m512 v;

  RF_SIMD_AVX512 static __mmask16 mask(int n) {
    return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n > 0 ? n : 0)) - 1u);
  }
  RF_SIMD_AVX512 static F32x16 zero() { return {_mm512_setzero_ps()}; }
  RF_SIMD_AVX512 static F32x16 broadcast(float x) { return {_mm512_set1_ps(x)}; }
  RF_SIMD_AVX512 static F32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  RF_SIMD_AVX512 static F32x16 load(const half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  RF_SIMD_AVX512 static F32x16 load(const bfloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  RF_SIMD_AVX512 static F32x16 load_partial(const float* p, int n) {
    return {_mm512_maskz_loadu_ps(mask(n), p)};
  }
  RF_SIMD_AVX512 static F32x16 load_partial(const half* p, int n) {
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p))};
  }
  RF_SIMD_AVX512 static F32x16 load_partial(const bfloat16* p, int n) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(n), p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  RF_SIMD_AVX512 __m256i bf16_bits() const {
    const __m512i x = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
  }
  RF_SIMD_AVX512 void store(float* p) const { _mm512_storeu_ps(p, v); }
  RF_SIMD_AVX512 void store(half* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  RF_SIMD_AVX512 void store(bfloat16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits());
  }
  RF_SIMD_AVX512 void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  RF_SIMD_AVX512 void store_partial(half* p, int n) const {
    _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  RF_SIMD_AVX512 void store_partial(bfloat16* p, int n) const {
    _mm256_mask_storeu_epi16(p, mask(n), bf16_bits());
  }
  RF_SIMD_AVX512 friend F32x16 operator+(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
  RF_SIMD_AVX512 friend F32x16 operator-(F32x16 a, F32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  RF_SIMD_AVX512 friend F32x16 operator*(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  RF_SIMD_AVX512 friend F32x16 fma(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  RF_SIMD_AVX512 friend F32x16 max(F32x16 a, F32x16 b) { return {_mm512_max_ps(a.v, b.v)}; }
  RF_SIMD_AVX512 friend F32x16 min(F32x16 a, F32x16 b) { return {_mm512_min_ps(a.v, b.v)}; }
  RF_SIMD_AVX512 friend F32x16 exp(F32x16 a) {
    using namespace detail;
    const __m512 x = _mm512_max_ps(_mm512_min_ps(a.v, _mm512_set1_ps(kExpMax)), _mm512_set1_ps(kExpMin));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpC6), r, _mm512_set1_ps(kExpC5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    __m512 res = _mm512_scalef_ps(p, n);  // p * 2^n without exponent-field overflow
    res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(kExpMin), _CMP_LE_OQ), _mm512_setzero_ps());
    res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(kExpMax), _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
    return {_mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
  }
  RF_SIMD_AVX512 float reduce_add() const { return _mm512_reduce_add_ps(v); }
  RF_SIMD_AVX512 float reduce_max() const { return _mm512_reduce_max_ps(v); }
};

#endif  // RF_HAVE_X86_SIMD

}  // namespace simd

}  // namespace cpu
}  // namespace recurformer
