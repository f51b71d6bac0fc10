// recurformer/core/config.hpp: compiler glue shared by host and device code.
#pragma once

#if defined(__CUDACC__)
#define RF_HOST_DEVICE __host__ __device__
#define RF_DEVICE __device__
#else
#define RF_HOST_DEVICE
#define RF_DEVICE
#endif

#if defined(_MSC_VER)
#define RF_FORCEINLINE __forceinline
#else
#define RF_FORCEINLINE inline __attribute__((always_inline))
#endif

// Host SIMD: kernels are compiled for the baseline ISA and pick AVX2 / AVX-512 bodies at run time
// (cpu/detail/isa.hpp). These attributes mark the ISA-specific entry points.
// Only in optimised builds (__OPTIMIZE__: -O1 and up, -Og): an entry point relies on `flatten` to
// inline the generic body and its helpers, which GCC does not do at -O0, where a helper's
// out-of-line copy, compiled without the ISA, would take vectors under another calling convention
// (the AVX2 / AVX-512 scans returned zeros). An unoptimised (Debug) build runs the portable bodies.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDA_ARCH__) && defined(__OPTIMIZE__)
#define RF_HAVE_X86_SIMD 1
#define RF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define RF_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// An ISA entry point: everything it calls (the generic kernel body and the vector ops) is inlined
// into it, so the body is compiled for that ISA without being written twice.
#define RF_KERNEL_AVX2 __attribute__((flatten)) RF_TARGET_AVX2
#define RF_KERNEL_AVX512 __attribute__((flatten)) RF_TARGET_AVX512
// AVX-512 plus VNNI (vpdpbusd), for the integer dot products of cpu/detail/gemv_q8_kernels.hpp only;
// chosen when cpu::has_avx512_vnni() says so.
#define RF_KERNEL_AVX512_VNNI \
  __attribute__((flatten, target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
// The vector operations themselves (cpu/detail/simd.hpp). Not always_inline: GCC checks that on
// the generic body's own out-of-line copy too, which is never called but would fail to compile.
#define RF_SIMD_AVX2 inline RF_TARGET_AVX2
#define RF_SIMD_AVX512 inline RF_TARGET_AVX512
#define RF_SIMD_AVX512_VNNI \
  inline __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#else
#define RF_HAVE_X86_SIMD 0
#endif
