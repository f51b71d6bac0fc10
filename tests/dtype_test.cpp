// Storage types: exhaustive checks of half and bfloat16 against definitions written independently
// of the bit tricks in core/dtype.hpp, and of the SIMD loads/stores against the scalar conversions.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "recurformer/core/dtype.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {
// binary16 value from its fields, by the textbook formula.
double half_value(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(m, -24);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  return sign * std::ldexp(1024 + m, e - 25);
}
double bf16_value(uint16_t b) {
  const int s = b >> 15, e = (b >> 7) & 255, m = b & 127;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(m, -133);
  if (e == 255) return m ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  return sign * std::ldexp(128 + m, e - 134);
}

// Round-to-nearest-even by search over the sorted non-negative encodings (0 .. inf).
template <class ValueOf>
uint16_t round_reference(double x, uint16_t inf_bits, ValueOf value_of) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  // largest encoding whose value <= a
  uint16_t lo = 0, hi = inf_bits;
  while (lo < hi) {
    const uint16_t mid = uint16_t((lo + hi + 1) / 2);
    if (value_of(mid) <= a) lo = mid; else hi = uint16_t(mid - 1);
  }
  if (lo == inf_bits) return sign | inf_bits;
  const double below = value_of(lo);
  // the value one ulp above the max finite is where inf sits for rounding purposes
  const double above = lo + 1 == inf_bits ? 2 * value_of(lo) - value_of(uint16_t(lo - 1)) : value_of(uint16_t(lo + 1));
  const double d0 = a - below, d1 = above - a;
  uint16_t r = lo;
  if (d1 < d0 || (d1 == d0 && (lo & 1))) r = uint16_t(lo + 1);
  return sign | r;
}
}  // namespace

TEST_CASE("half -> float is exact for all 65536 encodings", "[dtype]") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const double ref = half_value(uint16_t(b));
    const float got = float(half::from_bits(uint16_t(b)));
    if (std::isnan(ref)) {
      REQUIRE(std::isnan(got));
    } else {
      REQUIRE(double(got) == ref);
      // and back: every non-NaN half round-trips bit-exactly
      REQUIRE(half(got).bits == b);
    }
  }
}

TEST_CASE("bfloat16 -> float is exact for all 65536 encodings", "[dtype]") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const double ref = bf16_value(uint16_t(b));
    const float got = float(bfloat16::from_bits(uint16_t(b)));
    if (std::isnan(ref)) {
      REQUIRE(std::isnan(got));
      REQUIRE(std::isnan(float(bfloat16(got))));
    } else {
      REQUIRE(double(got) == ref);
      REQUIRE(bfloat16(got).bits == b);
    }
  }
}

TEST_CASE("float -> half rounds to nearest even at every midpoint", "[dtype]") {
  // For each pair of adjacent finite halves: the midpoint (a tie), and its float neighbours.
  for (uint32_t b = 0; b < 0x7bff; ++b) {
    const float a = float(half_value(uint16_t(b))), c = float(half_value(uint16_t(b + 1)));
    const float mid = float((double(a) + double(c)) / 2);
    for (float x : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY)}) {
      for (float s : {x, -x}) {
        const uint16_t ref = round_reference(s, 0x7c00, [](uint16_t h) { return half_value(h); });
        INFO("x = " << s);
        REQUIRE(half(s).bits == ref);
      }
    }
  }
  REQUIRE(half(65519.996f).bits == 0x7bff);
  REQUIRE(half(65520.f).bits == 0x7c00);  // tie above max rounds to even = inf
  REQUIRE(half(1e10f).bits == 0x7c00);
  REQUIRE(std::isnan(float(half(std::numeric_limits<float>::quiet_NaN()))));
}

TEST_CASE("float -> bfloat16 rounds to nearest even at every midpoint", "[dtype]") {
  for (uint32_t b = 0; b < 0x7f7f; ++b) {
    const double a = bf16_value(uint16_t(b)), c = bf16_value(uint16_t(b + 1));
    const float mid = float((a + c) / 2);
    for (float x : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY)}) {
      for (float s : {x, -x}) {
        const uint16_t ref = round_reference(s, 0x7f80, [](uint16_t h) { return bf16_value(h); });
        INFO("x = " << s);
        REQUIRE(bfloat16(s).bits == ref);
      }
    }
  }
}

TEST_CASE("float -> half/bf16 on random floats of every magnitude", "[dtype]") {
  std::uniform_int_distribution<uint32_t> bits(0, 0xffffffffu);
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = bits(rftest::rng());
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    REQUIRE(half(f).bits == round_reference(f, 0x7c00, [](uint16_t h) { return half_value(h); }));
    REQUIRE(bfloat16(f).bits == round_reference(f, 0x7f80, [](uint16_t h) { return bf16_value(h); }));
  }
}

namespace {
// Vector conversions run inside flattened ISA entry points (see cpu/detail/simd.hpp).
template <class V, class T>
void convert_body(int64_t n, const T* in16, float* out32, const float* in32, T* out16) {
  for (int64_t i = 0; i + V::width <= n; i += V::width) {
    V::load(in16 + i).store(out32 + i);
    V::load(in32 + i).store(out16 + i);
  }
}
template <class T>
void convert_scalar(int64_t n, const T* a, float* b, const float* c, T* d) {
  convert_body<recurformer::cpu::simd::F32x1>(n, a, b, c, d);
}
#if RF_HAVE_X86_SIMD
template <class T>
RF_KERNEL_AVX2 void convert_avx2(int64_t n, const T* a, float* b, const float* c, T* d) {
  convert_body<recurformer::cpu::simd::F32x8>(n, a, b, c, d);
}
template <class T>
RF_KERNEL_AVX512 void convert_avx512(int64_t n, const T* a, float* b, const float* c, T* d) {
  convert_body<recurformer::cpu::simd::F32x16>(n, a, b, c, d);
}
#endif

// every 16-bit encoding through the vector load, and random floats of every magnitude through
// the vector store
template <class T, class Convert>
void simd_roundtrip_check(Convert convert) {
  const int64_t n = 65536;
  std::vector<T> enc(n), dst(n);
  for (uint32_t b = 0; b < n; ++b) std::memcpy(&enc[b], &b, 2);
  std::vector<float> out(n), src(n);
  std::uniform_int_distribution<uint32_t> bits(0, 0xffffffffu);
  for (auto& f : src) {
    uint32_t u = bits(rftest::rng());
    std::memcpy(&f, &u, 4);
  }
  convert(n, enc.data(), out.data(), src.data(), dst.data());
  for (uint32_t b = 0; b < n; ++b) {
    const float ref = float(enc[b]);
    if (std::isnan(ref)) REQUIRE(std::isnan(out[b])); else REQUIRE(out[b] == ref);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(src[i])) REQUIRE(std::isnan(float(dst[i]))); else REQUIRE(dst[i].bits == T(src[i]).bits);
  }
}
}  // namespace

TEST_CASE("SIMD loads and stores convert exactly like the scalar definitions", "[dtype][simd]") {
  using namespace recurformer::cpu;
  simd_roundtrip_check<half>(convert_scalar<half>);
  simd_roundtrip_check<bfloat16>(convert_scalar<bfloat16>);
#if RF_HAVE_X86_SIMD
  if (detected_isa() >= Isa::avx2) {
    simd_roundtrip_check<half>(convert_avx2<half>);
    simd_roundtrip_check<bfloat16>(convert_avx2<bfloat16>);
  }
  if (detected_isa() >= Isa::avx512) {
    simd_roundtrip_check<half>(convert_avx512<half>);
    simd_roundtrip_check<bfloat16>(convert_avx512<bfloat16>);
  }
#endif
}
