// recurformer/cpu/swiglu.hpp: CPU swiglu (ops/swiglu.hpp).
//
// Element-wise and memory-bound: rows are split into one contiguous block per thread, each block
// runs in one ISA entry point; silu uses the simd exp and one division per element.
// The backward has the same shape: one exp and one division (sigma) per element.
#pragma once

#include <cstdint>

#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "recurformer/ops/swiglu.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

// a / b per lane (simd.hpp has no division yet).
inline simd::F32x1 divide(simd::F32x1 a, simd::F32x1 b) { return {a.v / b.v}; }
#if RF_HAVE_X86_SIMD
RF_SIMD_AVX2 simd::F32x8 divide(simd::F32x8 a, simd::F32x8 b) { return {_mm256_div_ps(a.v, b.v)}; }
RF_SIMD_AVX512 simd::F32x16 divide(simd::F32x16 a, simd::F32x16 b) {
  return {_mm512_div_ps(a.v, b.v)};
}
#endif

// silu(g) * u = g * u / (1 + exp(-g)); exp(-g) = inf for g < -88.7 gives -0, as it should.
template <class V>
V silu_times(V g, V u) {
  return divide(g * u, V::broadcast(1.f) + exp(V::zero() - g));
}

template <class V, class T>
void swiglu_rows(int64_t rows, int64_t d, const T* gate, int64_t ldg, const T* up, int64_t ldu,
                 T* out, int64_t ldo) {
  constexpr int W = V::width;
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate + r * ldg;
    const T* u = up + r * ldu;
    T* o = out + r * ldo;
    int64_t i = 0;
    for (; i + W <= d; i += W) silu_times(V::load(g + i), V::load(u + i)).store(o + i);
    if (i < d) {
      const int n = int(d - i);
      silu_times(V::load_partial(g + i, n), V::load_partial(u + i, n)).store_partial(o + i, n);
    }
  }
}

template <class T>
void swiglu_scalar(int64_t rows, int64_t d, const T* g, int64_t ldg, const T* u, int64_t ldu, T* o,
                   int64_t ldo) {
  swiglu_rows<simd::F32x1>(rows, d, g, ldg, u, ldu, o, ldo);
}
#if RF_HAVE_X86_SIMD
template <class T>
RF_KERNEL_AVX2 void swiglu_avx2(int64_t rows, int64_t d, const T* g, int64_t ldg, const T* u,
                                int64_t ldu, T* o, int64_t ldo) {
  swiglu_rows<simd::F32x8>(rows, d, g, ldg, u, ldu, o, ldo);
}
template <class T>
RF_KERNEL_AVX512 void swiglu_avx512(int64_t rows, int64_t d, const T* g, int64_t ldg, const T* u,
                                    int64_t ldu, T* o, int64_t ldo) {
  swiglu_rows<simd::F32x16>(rows, d, g, ldg, u, ldu, o, ldo);
}
#endif

// n (<= V::width) elements: dup = dout silu(g), dgate = dout u sigma (1 + g (1 - sigma)).
template <class V, class T>
void swiglu_bwd_step(int n, const T* g, const T* u, const float* dout, float* dg, float* du) {
  const bool full = n == V::width;
  const V gv = full ? V::load(g) : V::load_partial(g, n);
  const V uv = full ? V::load(u) : V::load_partial(u, n);
  const V ov = full ? V::load(dout) : V::load_partial(dout, n);
  const V one = V::broadcast(1.f);
  const V sig = divide(one, one + exp(V::zero() - gv));
  const V vdu = ov * gv * sig;
  const V vdg = ov * uv * sig * fma(gv, one - sig, one);
  // both computed before either store: dg or du may be dout
  full ? vdu.store(du) : vdu.store_partial(du, n);
  full ? vdg.store(dg) : vdg.store_partial(dg, n);
}

template <class V, class T>
void swiglu_bwd_rows(int64_t rows, int64_t d, const T* gate, int64_t ldg, const T* up, int64_t ldu,
                     const float* dout, int64_t ldo, float* dgate, int64_t lddg, float* dup,
                     int64_t lddu) {
  constexpr int W = V::width;
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate + r * ldg;
    const T* u = up + r * ldu;
    const float* o = dout + r * ldo;
    float* dg = dgate + r * lddg;
    float* du = dup + r * lddu;
    int64_t i = 0;
    for (; i + W <= d; i += W) swiglu_bwd_step<V>(W, g + i, u + i, o + i, dg + i, du + i);
    if (i < d) swiglu_bwd_step<V>(int(d - i), g + i, u + i, o + i, dg + i, du + i);
  }
}

template <class T>
void swiglu_bwd_scalar(int64_t rows, int64_t d, const T* g, int64_t ldg, const T* u, int64_t ldu,
                       const float* o, int64_t ldo, float* dg, int64_t lddg, float* du, int64_t lddu) {
  swiglu_bwd_rows<simd::F32x1>(rows, d, g, ldg, u, ldu, o, ldo, dg, lddg, du, lddu);
}
#if RF_HAVE_X86_SIMD
template <class T>
RF_KERNEL_AVX2 void swiglu_bwd_avx2(int64_t rows, int64_t d, const T* g, int64_t ldg, const T* u,
                                    int64_t ldu, const float* o, int64_t ldo, float* dg,
                                    int64_t lddg, float* du, int64_t lddu) {
  swiglu_bwd_rows<simd::F32x8>(rows, d, g, ldg, u, ldu, o, ldo, dg, lddg, du, lddu);
}
template <class T>
RF_KERNEL_AVX512 void swiglu_bwd_avx512(int64_t rows, int64_t d, const T* g, int64_t ldg,
                                        const T* u, int64_t ldu, const float* o, int64_t ldo,
                                        float* dg, int64_t lddg, float* du, int64_t lddu) {
  swiglu_bwd_rows<simd::F32x16>(rows, d, g, ldg, u, ldu, o, ldo, dg, lddg, du, lddu);
}
#endif

}  // namespace detail
}  // namespace cpu

/// out = silu(gate) * up, rows split across the pool.
template <class T>
void swiglu(const SwigluParams<T>& p, CpuExec exec) {
  check(p);
  const int64_t d = p.gate.shape[1];
  if (d == 0) return;
  exec.parallel_for(p.gate.shape[0], [&](int64_t b, int64_t e, int) {
    const T* g = p.gate.data + b * p.gate.stride[0];
    const T* u = p.up.data + b * p.up.stride[0];
    T* o = p.out.data + b * p.out.stride[0];
    const int64_t ldg = p.gate.stride[0], ldu = p.up.stride[0], ldo = p.out.stride[0];
    switch (cpu::active_isa()) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512: return cpu::detail::swiglu_avx512(e - b, d, g, ldg, u, ldu, o, ldo);
      case cpu::Isa::avx2: return cpu::detail::swiglu_avx2(e - b, d, g, ldg, u, ldu, o, ldo);
#endif
      default: return cpu::detail::swiglu_scalar(e - b, d, g, ldg, u, ldu, o, ldo);
    }
  });
}

/// dgate, dup from dout, rows split across the pool.
template <class T>
void swiglu_backward(const SwigluBackwardParams<T>& p, CpuExec exec) {
  check(p);
  const int64_t d = p.gate.shape[1];
  if (d == 0) return;
  const cpu::Isa isa = cpu::active_isa();
  exec.parallel_for(p.gate.shape[0], [&](int64_t b, int64_t e, int) {
    const int64_t ldg = p.gate.stride[0], ldu = p.up.stride[0], ldo = p.dout.stride[0];
    const int64_t lddg = p.dgate.stride[0], lddu = p.dup.stride[0];
    const T* g = p.gate.data + b * ldg;
    const T* u = p.up.data + b * ldu;
    const float* o = p.dout.data + b * ldo;
    float* dg = p.dgate.data + b * lddg;
    float* du = p.dup.data + b * lddu;
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512:
        return cpu::detail::swiglu_bwd_avx512(e - b, d, g, ldg, u, ldu, o, ldo, dg, lddg, du, lddu);
      case cpu::Isa::avx2:
        return cpu::detail::swiglu_bwd_avx2(e - b, d, g, ldg, u, ldu, o, ldo, dg, lddg, du, lddu);
#endif
      default:
        return cpu::detail::swiglu_bwd_scalar(e - b, d, g, ldg, u, ldu, o, ldo, dg, lddg, du, lddu);
    }
  });
}

}  // namespace recurformer
