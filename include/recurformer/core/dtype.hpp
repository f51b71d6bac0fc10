// recurformer/core/dtype.hpp: the storage types (float, half, bfloat16) and their conversions.
//
// half and bfloat16 are 16-bit storage types usable on host and device. Arithmetic is never done in
// them: values convert to float (exactly), are accumulated in fp32, and convert back with
// round-to-nearest-even. The bit-level conversions below are the definition; the SIMD paths
// (F16C, AVX-512) and CUDA intrinsics round the same way, which the tests check over all 65536
// encodings. The structs are layout-compatible with CUDA's __half and __nv_bfloat16.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "recurformer/core/config.hpp"

namespace recurformer {

/// Runtime tag of a storage type; used at file and API boundaries, dispatched to templates in
/// core/dispatch.hpp.
enum class DType : uint8_t { f32 = 0, f16 = 1, bf16 = 2 };

namespace detail {
RF_HOST_DEVICE inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
RF_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// float -> binary16, round to nearest even; overflow to inf, NaN stays a (quiet) NaN.
RF_HOST_DEVICE inline uint16_t float_to_half_bits(float f) {
  uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {
    // Result is subnormal (or zero): adding 0.5f puts the half's ulp (2^-24) at float's ulp, so the
    // FPU's own round-to-nearest-even does the rounding.
    const float t = bits_float(x) + 0.5f;
    return uint16_t(sign | (float_bits(t) - 0x3f000000u));
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // rebias exponent by -112, add the rounding bias (ties to even)
  return uint16_t(sign | (x >> 13));
}

RF_HOST_DEVICE inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return bits_float(sign | 0x7f800000u | ((em & 0x3ffu) << 13));
  if (em >= 0x0400u) return bits_float(sign | ((em << 13) + 0x38000000u));
  // subnormal: em * 2^-24 is exact in float
  return bits_float(sign | float_bits(float(em) * 5.9604644775390625e-8f));
}

// float -> bfloat16, round to nearest even; NaN stays a quiet NaN.
RF_HOST_DEVICE inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x0040u);
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
RF_HOST_DEVICE inline float bf16_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }
}  // namespace detail

/// IEEE binary16 storage.
struct alignas(2) half {
  uint16_t bits;
  half() = default;
  RF_HOST_DEVICE explicit half(float f) : bits(detail::float_to_half_bits(f)) {}
  RF_HOST_DEVICE static half from_bits(uint16_t b) {
    half h;
    h.bits = b;
    return h;
  }
  RF_HOST_DEVICE operator float() const { return detail::half_bits_to_float(bits); }
};

/// bfloat16 storage (the upper half of an fp32).
struct alignas(2) bfloat16 {
  uint16_t bits;
  bfloat16() = default;
  RF_HOST_DEVICE explicit bfloat16(float f) : bits(detail::float_to_bf16_bits(f)) {}
  RF_HOST_DEVICE static bfloat16 from_bits(uint16_t b) {
    bfloat16 h;
    h.bits = b;
    return h;
  }
  RF_HOST_DEVICE operator float() const { return detail::bf16_bits_to_float(bits); }
};

static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "16-bit storage types");
static_assert(std::is_trivially_copyable<half>::value && std::is_trivially_copyable<bfloat16>::value,
              "storage types are plain bits");

/// Storage -> fp32 (exact) and fp32 -> storage (round to nearest even).
RF_HOST_DEVICE inline float to_float(float x) { return x; }
RF_HOST_DEVICE inline float to_float(half x) { return float(x); }
RF_HOST_DEVICE inline float to_float(bfloat16 x) { return float(x); }
template <class T>
RF_HOST_DEVICE inline T from_float(float x) {
  return T(x);
}

/// Compile-time facts about a storage type.
template <class T>
struct DTypeTraits;
template <>
struct DTypeTraits<float> {
  static constexpr DType dtype = DType::f32;
  static constexpr const char* name = "f32";
};
template <>
struct DTypeTraits<half> {
  static constexpr DType dtype = DType::f16;
  static constexpr const char* name = "f16";
};
template <>
struct DTypeTraits<bfloat16> {
  static constexpr DType dtype = DType::bf16;
  static constexpr const char* name = "bf16";
};

template <class T>
constexpr DType dtype_of() {
  return DTypeTraits<std::remove_cv_t<T>>::dtype;
}

inline constexpr const char* dtype_name(DType t) {
  return t == DType::f32 ? "f32" : t == DType::f16 ? "f16" : t == DType::bf16 ? "bf16" : "unknown";
}
inline constexpr int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

}  // namespace recurformer
