// recurformer/cpu/rmsnorm.hpp: CPU rmsnorm (ops/rmsnorm.hpp).
//
// One pass accumulates the row's sum of squares in two fp32 vector accumulators, a second pass
// scales and multiplies by the weight. Memory-bound: rows are split into one contiguous block per
// thread, each block runs in one ISA entry point.
//
// Backward: pass 1 over rows (split across threads) stores r[t] and c[t] = r^3/d * sum_j dy w x per
// token in the workspace; pass 2 over column blocks of 16 floats (one 64-byte line, so threads
// never share a line of dweight) walks every token in order and writes dx = r dy w - c x and adds
// dy x r to dweight. Splitting pass 2 by columns keeps dweight's sum in token order whatever the
// thread count, and dx may equal dy since each element is read before it is overwritten.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "recurformer/ops/rmsnorm.hpp"
#include "recurformer/cpu/support.hpp"

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

// rc[2r] = rsqrt(mean(x[r]^2) + eps), rc[2r + 1] = rc[2r]^3 / d * sum_i dy[r, i] w[i] x[r, i].
template <class V, class T, class TW>
void rmsnorm_bwd_rows(int64_t rows, int64_t d, const T* x, int64_t ldx, const TW* w,
                      const float* dy, int64_t lddy, float eps, float* rc) {
  constexpr int W = V::width;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    const float* gr = dy + r * lddy;
    V ss = V::zero(), dot = V::zero();
    int64_t i = 0;
    for (; i + W <= d; i += W) {
      const V a = V::load(xr + i);
      ss = fma(a, a, ss);
      dot = fma(V::load(gr + i) * V::load(w + i), a, dot);
    }
    if (i < d) {
      const int n = int(d - i);
      const V a = V::load_partial(xr + i, n);
      ss = fma(a, a, ss);
      dot = fma(V::load_partial(gr + i, n) * V::load_partial(w + i, n), a, dot);
    }
    const float rs = 1.f / std::sqrt(ss.reduce_add() / float(d) + eps);
    rc[2 * r] = rs;
    rc[2 * r + 1] = rs * rs * rs * dot.reduce_add() / float(d);
  }
}

// n (<= V::width) columns of one token: dx = r dy w - c x; dw += dy x r (when dw).
template <class V, class T, class TW>
void rmsnorm_bwd_step(int n, const T* x, const TW* w, const float* dy, float* dx, float* dw, V r,
                      V c) {
  const bool full = n == V::width;
  const V xv = full ? V::load(x) : V::load_partial(x, n);
  const V gv = full ? V::load(dy) : V::load_partial(dy, n);
  const V wv = full ? V::load(w) : V::load_partial(w, n);
  if (dw) {
    const V acc = fma(gv * xv, r, full ? V::load(dw) : V::load_partial(dw, n));
    full ? acc.store(dw) : acc.store_partial(dw, n);
  }
  const V out = r * gv * wv - c * xv;
  full ? out.store(dx) : out.store_partial(dx, n);
}

// Columns [c0, c1) of every token, tokens in order. zero_dw: dweight starts at 0 (no accumulate).
template <class V, class T, class TW>
void rmsnorm_bwd_cols(int64_t tokens, int64_t c0, int64_t c1, const T* x, int64_t ldx, const TW* w,
                      const float* dy, int64_t lddy, float* dx, int64_t lddx, float* dw, int zero_dw,
                      const float* rc) {
  constexpr int W = V::width;
  if (dw && zero_dw)
    for (int64_t i = c0; i < c1; ++i) dw[i] = 0.f;
  for (int64_t t = 0; t < tokens; ++t) {
    const V r = V::broadcast(rc[2 * t]), c = V::broadcast(rc[2 * t + 1]);
    const T* xt = x + t * ldx;
    const float* gt = dy + t * lddy;
    float* ot = dx + t * lddx;
    int64_t i = c0;
    for (; i + W <= c1; i += W)
      rmsnorm_bwd_step<V>(W, xt + i, w + i, gt + i, ot + i, dw ? dw + i : nullptr, r, c);
    if (i < c1)
      rmsnorm_bwd_step<V>(int(c1 - i), xt + i, w + i, gt + i, ot + i, dw ? dw + i : nullptr, r, c);
  }
}

template <class T, class TW>
void rmsnorm_bwd_rows_scalar(int64_t rows, int64_t d, const T* x, int64_t ldx, const TW* w,
                             const float* dy, int64_t lddy, float eps, float* rc) {
  rmsnorm_bwd_rows<simd::F32x1>(rows, d, x, ldx, w, dy, lddy, eps, rc);
}
template <class T, class TW>
void rmsnorm_bwd_cols_scalar(int64_t tokens, int64_t c0, int64_t c1, const T* x, int64_t ldx,
                             const TW* w, const float* dy, int64_t lddy, float* dx, int64_t lddx,
                             float* dw, int zero_dw, const float* rc) {
  rmsnorm_bwd_cols<simd::F32x1>(tokens, c0, c1, x, ldx, w, dy, lddy, dx, lddx, dw, zero_dw, rc);
}
#if RF_HAVE_X86_SIMD
template <class T, class TW>
RF_KERNEL_AVX2 void rmsnorm_bwd_rows_avx2(int64_t rows, int64_t d, const T* x, int64_t ldx,
                                          const TW* w, const float* dy, int64_t lddy, float eps,
                                          float* rc) {
  rmsnorm_bwd_rows<simd::F32x8>(rows, d, x, ldx, w, dy, lddy, eps, rc);
}
template <class T, class TW>
RF_KERNEL_AVX2 void rmsnorm_bwd_cols_avx2(int64_t tokens, int64_t c0, int64_t c1, const T* x,
                                          int64_t ldx, const TW* w, const float* dy, int64_t lddy,
                                          float* dx, int64_t lddx, float* dw, int zero_dw,
                                          const float* rc) {
  rmsnorm_bwd_cols<simd::F32x8>(tokens, c0, c1, x, ldx, w, dy, lddy, dx, lddx, dw, zero_dw, rc);
}
template <class T, class TW>
RF_KERNEL_AVX512 void rmsnorm_bwd_rows_avx512(int64_t rows, int64_t d, const T* x, int64_t ldx,
                                              const TW* w, const float* dy, int64_t lddy, float eps,
                                              float* rc) {
  rmsnorm_bwd_rows<simd::F32x16>(rows, d, x, ldx, w, dy, lddy, eps, rc);
}
template <class T, class TW>
RF_KERNEL_AVX512 void rmsnorm_bwd_cols_avx512(int64_t tokens, int64_t c0, int64_t c1, const T* x,
                                              int64_t ldx, const TW* w, const float* dy,
                                              int64_t lddy, float* dx, int64_t lddx, float* dw,
                                              int zero_dw, const float* rc) {
  rmsnorm_bwd_cols<simd::F32x16>(tokens, c0, c1, x, ldx, w, dy, lddy, dx, lddx, dw, zero_dw, rc);
}
#endif

/// Columns per block of the backward's column pass: one 64-byte line of fp32 dweight.
constexpr int64_t kRmsNormBwdCols = 16;

}  // namespace detail
}  // namespace cpu

/// y = rmsnorm(x) * weight, rows split across the pool.
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

/// dx (and dweight) from dy. Throws Error, before writing, on invalid params or
/// when workspace_bytes < rmsnorm_backward_workspace_bytes(p).
template <class T, class TW>
void rmsnorm_backward(const RmsNormBackwardParams<T, TW>& p, CpuExec exec, void* workspace,
                      size_t workspace_bytes) {
  const size_t need = rmsnorm_backward_workspace_bytes(p);  // checks p
  RF_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr), "rmsnorm_backward: workspace has ",
           workspace_bytes, " bytes", workspace ? "" : " (null)", ", expected at least ", need,
           " (rmsnorm_backward_workspace_bytes)");
  RF_CHECK(reinterpret_cast<uintptr_t>(workspace) % alignof(float) == 0,
           "rmsnorm_backward: workspace must be aligned to 4 bytes");
  namespace D = cpu::detail;
  const int64_t tokens = p.x.shape[0], d = p.x.shape[1];
  float* rc = static_cast<float*>(workspace);
  const cpu::Isa isa = cpu::active_isa();
  const T* x = p.x.data;
  const TW* w = p.weight.data;
  const float* dy = p.dy.data;
  const int64_t ldx = p.x.stride[0], lddy = p.dy.stride[0], lddx = p.dx.stride[0];
  exec.parallel_for(tokens, [&](int64_t b, int64_t e, int) {
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512:
        return D::rmsnorm_bwd_rows_avx512(e - b, d, x + b * ldx, ldx, w, dy + b * lddy, lddy, p.eps, rc + 2 * b);
      case cpu::Isa::avx2:
        return D::rmsnorm_bwd_rows_avx2(e - b, d, x + b * ldx, ldx, w, dy + b * lddy, lddy, p.eps, rc + 2 * b);
#endif
      default:
        return D::rmsnorm_bwd_rows_scalar(e - b, d, x + b * ldx, ldx, w, dy + b * lddy, lddy, p.eps, rc + 2 * b);
    }
  });
  // With no tokens dweight is still set (to 0) unless accumulating.
  float* dw = p.dweight.data;
  const int zero_dw = !p.accumulate;
  const int64_t blocks = (d + D::kRmsNormBwdCols - 1) / D::kRmsNormBwdCols;
  exec.parallel_for(blocks, [&](int64_t b, int64_t e, int) {
    const int64_t c0 = b * D::kRmsNormBwdCols, c1 = std::min(d, e * D::kRmsNormBwdCols);
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512:
        return D::rmsnorm_bwd_cols_avx512(tokens, c0, c1, x, ldx, w, dy, lddy, p.dx.data, lddx, dw, zero_dw, rc);
      case cpu::Isa::avx2:
        return D::rmsnorm_bwd_cols_avx2(tokens, c0, c1, x, ldx, w, dy, lddy, p.dx.data, lddx, dw, zero_dw, rc);
#endif
      default:
        return D::rmsnorm_bwd_cols_scalar(tokens, c0, c1, x, ldx, w, dy, lddy, p.dx.data, lddx, dw, zero_dw, rc);
    }
  });
}

}  // namespace recurformer
