// recurformer/cpu/rmsnorm.hpp: CPU rmsnorm (ops/rmsnorm.hpp).
//
// One pass accumulates the row's sum of squares in two fp32 vector accumulators, a second pass
// scales and multiplies by the weight. Memory-bound: rows are split into one contiguous block per
// thread, each block runs in one ISA entry point.
#pragma once

#include <cmath>
#include <cstdint>

#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "recurformer/ops/rmsnorm.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

// y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w[:] for r in [0, rows).
template <class V, class T, class TW>
void rmsnorm_rows(int64_t rows, int64_t d, const T* x, int64_t ldx, const TW* w, T* y, int64_t ldy,
                  float eps) {
  constexpr int W = V::width;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    T* yr = y + r * ldy;
    V s0 = V::zero(), s1 = V::zero();
    int64_t i = 0;
    for (; i + 2 * W <= d; i += 2 * W) {
      const V a = V::load(xr + i), b = V::load(xr + i + W);
      s0 = fma(a, a, s0);
      s1 = fma(b, b, s1);
    }
    for (; i < d; i += W) {
      const V a = V::load_partial(xr + i, int(d - i < W ? d - i : W));
      s0 = fma(a, a, s0);
    }
    const float scale = 1.f / std::sqrt((s0 + s1).reduce_add() / float(d) + eps);
    const V vs = V::broadcast(scale);
    for (i = 0; i + W <= d; i += W) (V::load(xr + i) * vs * V::load(w + i)).store(yr + i);
    if (i < d) {
      const int n = int(d - i);
      (V::load_partial(xr + i, n) * vs * V::load_partial(w + i, n)).store_partial(yr + i, n);
    }
  }
}

template <class T, class TW>
void rmsnorm_scalar(int64_t rows, int64_t d, const T* x, int64_t ldx, const TW* w, T* y,
                    int64_t ldy, float eps) {
  rmsnorm_rows<simd::F32x1>(rows, d, x, ldx, w, y, ldy, eps);
}
#if RF_HAVE_X86_SIMD
template <class T, class TW>
RF_KERNEL_AVX2 void rmsnorm_avx2(int64_t rows, int64_t d, const T* x, int64_t ldx, const TW* w,
                                 T* y, int64_t ldy, float eps) {
  rmsnorm_rows<simd::F32x8>(rows, d, x, ldx, w, y, ldy, eps);
}
template <class T, class TW>
RF_KERNEL_AVX512 void rmsnorm_avx512(int64_t rows, int64_t d, const T* x, int64_t ldx, const TW* w,
                                     T* y, int64_t ldy, float eps) {
  rmsnorm_rows<simd::F32x16>(rows, d, x, ldx, w, y, ldy, eps);
}
#endif

}  // namespace detail
}  // namespace cpu

template <class T, class TW>
void rmsnorm(const RmsNormParams<T, TW>& p, CpuExec exec) {
  check(p);
  const int64_t d = p.x.shape[1];
  exec.parallel_for(p.x.shape[0], [&](int64_t b, int64_t e, int) {
    const T* x = p.x.data + b * p.x.stride[0];
    T* y = p.y.data + b * p.y.stride[0];
    const int64_t ldx = p.x.stride[0], ldy = p.y.stride[0];
    switch (cpu::active_isa()) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512:
        return cpu::detail::rmsnorm_avx512(e - b, d, x, ldx, p.weight.data, y, ldy, p.eps);
      case cpu::Isa::avx2:
        return cpu::detail::rmsnorm_avx2(e - b, d, x, ldx, p.weight.data, y, ldy, p.eps);
#endif
      default:
        return cpu::detail::rmsnorm_scalar(e - b, d, x, ldx, p.weight.data, y, ldy, p.eps);
    }
  });
}

}  // namespace recurformer
