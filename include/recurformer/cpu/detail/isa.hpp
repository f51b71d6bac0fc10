// recurformer/cpu/detail/isa.hpp: which vector ISA the CPU kernels use, chosen at run time.
//
// The library is compiled for the baseline ISA; kernels carry AVX2 and AVX-512 bodies (marked with
// RF_KERNEL_AVX2 / RF_KERNEL_AVX512) and pick one per call from active_isa(). The portable scalar
// body always exists. set_isa_limit() (or the environment variable RECURFORMER_ISA=scalar|avx2|avx512)
// caps the choice, so tests exercise every body on one machine.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "recurformer/core/config.hpp"
#include "recurformer/core/error.hpp"

namespace recurformer {
namespace cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa i) {
  return i == Isa::avx512 ? "avx512" : i == Isa::avx2 ? "avx2" : "scalar";
}

#if RF_HAVE_X86_SIMD
namespace detail {
/// F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know "f16c".
inline bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29));
}
/// AVX512_VNNI from CPUID leaf 7, sub-leaf 0 (ECX bit 11).
inline bool cpu_has_avx512_vnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 11));
}
}  // namespace detail
#endif

/// The best ISA this processor supports.
inline Isa detected_isa() {
#if RF_HAVE_X86_SIMD
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool f16c = detail::cpu_has_f16c();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma") && f16c)
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
      return Isa::avx2;
    return Isa::scalar;
  }();
  return isa;
#else
  return Isa::scalar;
#endif
}

namespace detail {
inline std::atomic<int>& isa_limit() {
  static std::atomic<int> limit{[] {
    const char* env = std::getenv("RECURFORMER_ISA");
    if (!env || !*env) return int(Isa::avx512);
    if (!std::strcmp(env, "scalar")) return int(Isa::scalar);
    if (!std::strcmp(env, "avx2")) return int(Isa::avx2);
    if (!std::strcmp(env, "avx512")) return int(Isa::avx512);
    fail("RECURFORMER_ISA: unknown value '", env, "' (expected scalar, avx2 or avx512)");
  }()};
  return limit;
}
}  // namespace detail

/// Caps the ISA the kernels may use (never raises it above what the processor has).
inline void set_isa_limit(Isa limit) { detail::isa_limit().store(int(limit)); }

/// The ISA kernels use now: min(detected, limit).
inline Isa active_isa() {
  const int d = int(detected_isa()), l = detail::isa_limit().load(std::memory_order_relaxed);
  return Isa(d < l ? d : l);
}

/// Whether the integer kernels may use AVX-512 VNNI: the active ISA is AVX-512 and the processor
/// has VNNI (without it they run their AVX2 body).
inline bool has_avx512_vnni() {
#if RF_HAVE_X86_SIMD
  static const bool vnni = detail::cpu_has_avx512_vnni();
  return active_isa() == Isa::avx512 && vnni;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace recurformer
