// recurformer/cpu/rope.hpp: CPU implementation of ops/rope.hpp.
//
// Parallel over tokens. Per token, cos/sin of the fp32 angles are computed once (in chunks of
// kRopeChunk frequencies, on the stack) and applied to every head; the rotation is vectorised for
// the rotate_half layout (both halves are contiguous) and a plain loop for interleaved pairs.
// The backward is the same loop with sin negated (the inverse rotation), on the fp32 gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "recurformer/ops/rope.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

constexpr int kRopeChunk = 128;

/// Rotates frequencies [i0, i0 + n) of n_heads heads of one token; c, s: [n] cos and sin.
template <class V, class T>
void rope_token(T* x, int64_t head_stride, int64_t n_heads, int64_t n_freq, int64_t i0, int n,
                const float* c, const float* s, int interleaved) {
  for (int64_t h = 0; h < n_heads; ++h) {
    T* xh = x + h * head_stride;
    if (interleaved) {
      for (int i = 0; i < n; ++i) {
        T* pr = xh + 2 * (i0 + i);
        const float a = to_float(pr[0]), b = to_float(pr[1]);
        pr[0] = from_float<T>(a * c[i] - b * s[i]);
        pr[1] = from_float<T>(b * c[i] + a * s[i]);
      }
      continue;
    }
    T* lo = xh + i0;
    T* hi = xh + n_freq + i0;
    int i = 0;
    for (; i + V::width <= n; i += V::width) {
      const V a = V::load(lo + i), b = V::load(hi + i), cv = V::load(c + i), sv = V::load(s + i);
      (a * cv - b * sv).store(lo + i);
      fma(a, sv, b * cv).store(hi + i);
    }
    if (i < n) {
      const int r = n - i;
      const V a = V::load_partial(lo + i, r), b = V::load_partial(hi + i, r);
      const V cv = V::load_partial(c + i, r), sv = V::load_partial(s + i, r);
      (a * cv - b * sv).store_partial(lo + i, r);
      fma(a, sv, b * cv).store_partial(hi + i, r);
    }
  }
}

template <class T>
void rope_token_scalar(T* x, int64_t hs, int64_t nh, int64_t nf, int64_t i0, int n, const float* c,
                       const float* s, int il) {
  rope_token<simd::F32x1>(x, hs, nh, nf, i0, n, c, s, il);
}
#if RF_HAVE_X86_SIMD
template <class T>
RF_KERNEL_AVX2 void rope_token_avx2(T* x, int64_t hs, int64_t nh, int64_t nf, int64_t i0, int n,
                                    const float* c, const float* s, int il) {
  rope_token<simd::F32x8>(x, hs, nh, nf, i0, n, c, s, il);
}
template <class T>
RF_KERNEL_AVX512 void rope_token_avx512(T* x, int64_t hs, int64_t nh, int64_t nf, int64_t i0, int n,
                                        const float* c, const float* s, int il) {
  rope_token<simd::F32x16>(x, hs, nh, nf, i0, n, c, s, il);
}
#endif

}  // namespace detail
}  // namespace cpu

namespace cpu {
namespace detail {

/// Rotates x in place by the angles pos * inv_freq (sin_sign = 1) or their negatives (-1).
template <class T>
void rope_rotate(const View<T, 3>& xv, const View<const int32_t, 1>& positions,
                 const View<const float, 1>& inv_freq, RopeLayout layout, float sin_sign,
                 CpuExec exec) {
  const int64_t tokens = xv.shape[0], heads = xv.shape[1], n_freq = xv.shape[2] / 2;
  const int interleaved = layout == RopeLayout::interleaved;
  const cpu::Isa isa = cpu::active_isa();
  exec.parallel_for(tokens, [&](int64_t begin, int64_t end, int) {
    float c[kRopeChunk], s[kRopeChunk];
    for (int64_t t = begin; t < end; ++t) {
      const float pos = float(positions(t));
      T* x = xv.ptr(t, 0, 0);
      for (int64_t i0 = 0; i0 < n_freq; i0 += kRopeChunk) {
        const int n = int(std::min<int64_t>(kRopeChunk, n_freq - i0));
        for (int i = 0; i < n; ++i) {
          const float angle = pos * inv_freq(i0 + i);  // fp32, as transformers computes it
          c[i] = std::cos(angle);
          s[i] = sin_sign * std::sin(angle);
        }
#if RF_HAVE_X86_SIMD
        if (isa == cpu::Isa::avx512) {
          rope_token_avx512(x, xv.stride[1], heads, n_freq, i0, n, c, s, interleaved);
          continue;
        }
        if (isa == cpu::Isa::avx2) {
          rope_token_avx2(x, xv.stride[1], heads, n_freq, i0, n, c, s, interleaved);
          continue;
        }
#endif
        rope_token_scalar(x, xv.stride[1], heads, n_freq, i0, n, c, s, interleaved);
      }
    }
  });
}

}  // namespace detail
}  // namespace cpu

/// Applies RoPE in place. Calls check(p) first.
template <class T>
void rope(const RopeParams<T>& p, CpuExec exec) {
  check(p);
  cpu::detail::rope_rotate(p.x, p.positions, p.inv_freq, p.layout, 1.f, exec);
}

/// Rotates the gradient back in place. Calls check(p) first.
inline void rope_backward(const RopeBackwardParams& p, CpuExec exec) {
  check(p);
  cpu::detail::rope_rotate(p.dx, p.positions, p.inv_freq, p.layout, -1.f, exec);
}

}  // namespace recurformer
