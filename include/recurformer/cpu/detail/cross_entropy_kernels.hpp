// recurformer/cpu/detail/cross_entropy_kernels.hpp: the bodies behind cpu/cross_entropy.hpp.
//
// ce_row: one token's row of logits [vocab]: max, sum of exp (stable log-sum-exp), the teacher's
// the same, then one pass for the KL sum and the gradient dz (written over z in place). Vector
// bodies with a scalar tail (no padded lanes can enter a max or a sum).
//
// ce_dh: dh[tokens, c0:c1] = dz[tokens, :] W[:, c0:c1], i.e. C += A B with B = W row-major
// [vocab, d]. Register tile MR tokens x NV vectors of columns; the vocab is walked in blocks of
// kVocabBlock rows so the block's W columns stay in L1 while every token tile reuses them. Each
// output element is one fp32 sum in vocab order.
//
// ce_dw: dW[v0:v1, :] (+)= dz[tokens, v0:v1]^T h[tokens, :]: tile MR vocab rows x NV vectors of
// columns, summed over the chunk's tokens in order, on top of what dW holds (or of 0).
//
// Entry points take scalars and pointers only (simd.hpp's rule); the callers split columns (dh)
// or vocab rows (dW) across threads, so no two threads write one element.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "recurformer/core/config.hpp"
#include "recurformer/core/dtype.hpp"
#include "recurformer/cpu/detail/simd.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

/// Tiles of the cross-entropy GEMM-like kernels, per vector type.
template <class V>
struct CeTile {
  static constexpr int kMR = 4;                           // tokens (dh) or vocab rows (dW)
  static constexpr int kNV = V::width == 8 ? 2 : 4;       // column vectors (AVX2 has 16 registers)
  static constexpr int64_t kVocabBlock = 256;             // dh: vocab rows per L1 block
};

// ---------------------------------------------------------------------------------------------
// Rows of logits.

template <class V>
float ce_row_max(const float* z, int64_t n) {
  constexpr int W = V::width;
  V m = V::broadcast(-INFINITY);
  int64_t i = 0;
  for (; i + W <= n; i += W) m = max(m, V::load(z + i));
  float r = m.reduce_max();
  for (; i < n; ++i) r = z[i] > r ? z[i] : r;
  return r;
}

// log(sum exp(z)) with the maximum subtracted first.
template <class V>
float ce_row_lse(const float* z, int64_t n) {
  constexpr int W = V::width;
  const float m = ce_row_max<V>(z, n);
  const V mv = V::broadcast(m);
  V s0 = V::zero(), s1 = V::zero();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 = s0 + exp(V::load(z + i) - mv);
    s1 = s1 + exp(V::load(z + i + W) - mv);
  }
  for (; i + W <= n; i += W) s0 = s0 + exp(V::load(z + i) - mv);
  float s = (s0 + s1).reduce_add();
  for (; i < n; ++i) s += exp(simd::F32x1{z[i] - m}).v;
  return m + std::log(s);
}

// One element group of the KL / gradient pass (U = V or F32x1 for the tail).
template <class U>
void ce_grad_step(const float* z, const float* zt, float* g, U lse, U lset, U a, U b, U& kl) {
  const U lps = U::load(z) - lse;
  const U ps = exp(lps);
  U pt = U::zero();
  if (zt) {
    const U lpt = U::load(zt) - lset;
    pt = exp(lpt);
    kl = fma(pt, lpt - lps, kl);
  }
  if (g) (a * ps - b * pt).store(g);
}

// Returns sum_v pt (log pt - log ps) (0 without zt); writes g = a ps - b pt when g (g may be z).
template <class V>
float ce_row_grad(const float* z, const float* zt, float* g, int64_t n, float lse, float lset,
                  float a, float b) {
  constexpr int W = V::width;
  using S = simd::F32x1;
  V kl = V::zero();
  const V lv = V::broadcast(lse), ltv = V::broadcast(lset), av = V::broadcast(a), bv = V::broadcast(b);
  int64_t i = 0;
  for (; i + W <= n; i += W)
    ce_grad_step<V>(z + i, zt ? zt + i : nullptr, g ? g + i : nullptr, lv, ltv, av, bv, kl);
  S kls = S::zero();
  for (; i < n; ++i)
    ce_grad_step<S>(z + i, zt ? zt + i : nullptr, g ? g + i : nullptr, S{lse}, S{lset}, S{a}, S{b}, kls);
  return kl.reduce_add() + kls.v;
}

// One token. out[0] = ce_t, out[1] = kl_t. With g: g = s ((1 + lam) ps - lam pt - onehot(target)).
template <class V>
void ce_row(int64_t n, const float* z, const float* zt, int32_t target, float lam, float s, float* g,
            float* out) {
  const float lse = ce_row_lse<V>(z, n);
  const float lset = zt ? ce_row_lse<V>(zt, n) : 0.f;
  const float zy = z[target];  // read before g may overwrite z
  out[0] = lse - zy;
  out[1] = 0.f;
  if (zt || g) out[1] = ce_row_grad<V>(z, zt, g, n, lse, lset, s * (1.f + lam), s * lam);
  if (g) g[target] -= s;
}

inline void ce_row_scalar(int64_t n, const float* z, const float* zt, int32_t target, float lam,
                          float s, float* g, float* out) {
  ce_row<simd::F32x1>(n, z, zt, target, lam, s, g, out);
}
#if RF_HAVE_X86_SIMD
RF_KERNEL_AVX2 inline void ce_row_avx2(int64_t n, const float* z, const float* zt, int32_t target,
                                       float lam, float s, float* g, float* out) {
  ce_row<simd::F32x8>(n, z, zt, target, lam, s, g, out);
}
RF_KERNEL_AVX512 inline void ce_row_avx512(int64_t n, const float* z, const float* zt,
                                           int32_t target, float lam, float s, float* g,
                                           float* out) {
  ce_row<simd::F32x16>(n, z, zt, target, lam, s, g, out);
}
#endif

// ---------------------------------------------------------------------------------------------
// Register tiles. kTail: the last of the NV vectors holds only `tail` columns.

template <class V, bool kTail, class T>
V ce_load(const T* p, bool last, int tail) {
  return kTail && last ? V::load_partial(p, tail) : V::load(p);
}
template <class V, bool kTail>
void ce_store(V v, float* p, bool last, int tail) {
  if (kTail && last)
    v.store_partial(p, tail);
  else
    v.store(p);
}

// dh[MR rows, NV vectors] (+)= sum_{k < kb} g[i, k] w[k, :]. zero: start from 0, not from dh.
template <class V, int MR, int NV, bool kTail, class TW>
void ce_dh_tile(int64_t kb, const float* g, int64_t ldg, const TW* w, int64_t ldw, float* dh,
                int64_t lddh, int tail, int zero) {
  constexpr int W = V::width;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j)
      acc[i][j] = zero ? V::zero() : ce_load<V, kTail>(dh + i * lddh + j * W, j == NV - 1, tail);
  for (int64_t k = 0; k < kb; ++k) {
    const TW* wk = w + k * ldw;
    V wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = ce_load<V, kTail>(wk + j * W, j == NV - 1, tail);
    for (int i = 0; i < MR; ++i) {
      const V gi = V::broadcast(g[i * ldg + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = fma(gi, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) ce_store<V, kTail>(acc[i][j], dh + i * lddh + j * W, j == NV - 1, tail);
}

// Runs ce_dh_tile over `rows` (<= MR) tokens, picking the tile height.
template <class V, int NV, bool kTail, class TW>
void ce_dh_rows(int rows, int64_t kb, const float* g, int64_t ldg, const TW* w, int64_t ldw,
                float* dh, int64_t lddh, int tail, int zero) {
  static_assert(CeTile<V>::kMR == 4, "the switch below lists heights 1..4");
  switch (rows) {
    case 4: return ce_dh_tile<V, 4, NV, kTail>(kb, g, ldg, w, ldw, dh, lddh, tail, zero);
    case 3: return ce_dh_tile<V, 3, NV, kTail>(kb, g, ldg, w, ldw, dh, lddh, tail, zero);
    case 2: return ce_dh_tile<V, 2, NV, kTail>(kb, g, ldg, w, ldw, dh, lddh, tail, zero);
    default: return ce_dh_tile<V, 1, NV, kTail>(kb, g, ldg, w, ldw, dh, lddh, tail, zero);
  }
}

// dh[0:tokens, c0:c1] = g[0:tokens, 0:vocab] w[0:vocab, c0:c1].
template <class V, class TW>
void ce_dh(int64_t tokens, int64_t vocab, int64_t c0, int64_t c1, const float* g, int64_t ldg,
           const TW* w, int64_t ldw, float* dh, int64_t lddh) {
  using Tile = CeTile<V>;
  constexpr int W = V::width, MR = Tile::kMR, NV = Tile::kNV, NR = NV * W;
  for (int64_t v0 = 0; v0 < vocab; v0 += Tile::kVocabBlock) {
    const int64_t kb = std::min(Tile::kVocabBlock, vocab - v0);
    const int zero = v0 == 0;
    const TW* wb = w + v0 * ldw;
    int64_t c = c0;
    for (; c + NR <= c1; c += NR)
      for (int64_t t = 0; t < tokens; t += MR)
        ce_dh_rows<V, NV, false>(int(std::min<int64_t>(MR, tokens - t)), kb, g + t * ldg + v0, ldg,
                                 wb + c, ldw, dh + t * lddh + c, lddh, W, zero);
    for (; c < c1; c += W) {
      const int n = int(std::min<int64_t>(W, c1 - c));
      for (int64_t t = 0; t < tokens; t += MR) {
        const int rows = int(std::min<int64_t>(MR, tokens - t));
        if (n == W)
          ce_dh_rows<V, 1, false>(rows, kb, g + t * ldg + v0, ldg, wb + c, ldw, dh + t * lddh + c, lddh, W, zero);
        else
          ce_dh_rows<V, 1, true>(rows, kb, g + t * ldg + v0, ldg, wb + c, ldw, dh + t * lddh + c, lddh, n, zero);
      }
    }
  }
}

// dw[MR rows, NV vectors] (+)= sum_{t < tokens} g[t, i] h[t, :]. zero: start from 0, not from dw.
template <class V, int MR, int NV, bool kTail>
void ce_dw_tile(int64_t tokens, const float* g, int64_t ldg, const float* h, int64_t ldh, float* dw,
                int64_t lddw, int tail, int zero) {
  constexpr int W = V::width;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j)
      acc[i][j] = zero ? V::zero() : ce_load<V, kTail>(dw + i * lddw + j * W, j == NV - 1, tail);
  for (int64_t t = 0; t < tokens; ++t) {
    V hv[NV];
    for (int j = 0; j < NV; ++j) hv[j] = ce_load<V, kTail>(h + t * ldh + j * W, j == NV - 1, tail);
    for (int i = 0; i < MR; ++i) {
      const V gi = V::broadcast(g[t * ldg + i]);
      for (int j = 0; j < NV; ++j) acc[i][j] = fma(gi, hv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) ce_store<V, kTail>(acc[i][j], dw + i * lddw + j * W, j == NV - 1, tail);
}

template <class V, int NV, bool kTail>
void ce_dw_rows(int rows, int64_t tokens, const float* g, int64_t ldg, const float* h, int64_t ldh,
                float* dw, int64_t lddw, int tail, int zero) {
  static_assert(CeTile<V>::kMR == 4, "the switch below lists heights 1..4");
  switch (rows) {
    case 4: return ce_dw_tile<V, 4, NV, kTail>(tokens, g, ldg, h, ldh, dw, lddw, tail, zero);
    case 3: return ce_dw_tile<V, 3, NV, kTail>(tokens, g, ldg, h, ldh, dw, lddw, tail, zero);
    case 2: return ce_dw_tile<V, 2, NV, kTail>(tokens, g, ldg, h, ldh, dw, lddw, tail, zero);
    default: return ce_dw_tile<V, 1, NV, kTail>(tokens, g, ldg, h, ldh, dw, lddw, tail, zero);
  }
}

// dw[v0:v1, 0:d] (+)= g[0:tokens, v0:v1]^T h[0:tokens, 0:d].
template <class V>
void ce_dw(int64_t tokens, int64_t d, int64_t v0, int64_t v1, const float* g, int64_t ldg,
           const float* h, int64_t ldh, float* dw, int64_t lddw, int zero) {
  using Tile = CeTile<V>;
  constexpr int W = V::width, MR = Tile::kMR, NV = Tile::kNV, NR = NV * W;
  for (int64_t v = v0; v < v1; v += MR) {
    const int rows = int(std::min<int64_t>(MR, v1 - v));
    float* dwv = dw + v * lddw;
    int64_t c = 0;
    for (; c + NR <= d; c += NR)
      ce_dw_rows<V, NV, false>(rows, tokens, g + v, ldg, h + c, ldh, dwv + c, lddw, W, zero);
    for (; c < d; c += W) {
      const int n = int(std::min<int64_t>(W, d - c));
      if (n == W)
        ce_dw_rows<V, 1, false>(rows, tokens, g + v, ldg, h + c, ldh, dwv + c, lddw, W, zero);
      else
        ce_dw_rows<V, 1, true>(rows, tokens, g + v, ldg, h + c, ldh, dwv + c, lddw, n, zero);
    }
  }
}

template <class TW>
void ce_dh_scalar(int64_t tokens, int64_t vocab, int64_t c0, int64_t c1, const float* g,
                  int64_t ldg, const TW* w, int64_t ldw, float* dh, int64_t lddh) {
  ce_dh<simd::F32x1>(tokens, vocab, c0, c1, g, ldg, w, ldw, dh, lddh);
}
inline void ce_dw_scalar(int64_t tokens, int64_t d, int64_t v0, int64_t v1, const float* g,
                         int64_t ldg, const float* h, int64_t ldh, float* dw, int64_t lddw, int zero) {
  ce_dw<simd::F32x1>(tokens, d, v0, v1, g, ldg, h, ldh, dw, lddw, zero);
}
#if RF_HAVE_X86_SIMD
template <class TW>
RF_KERNEL_AVX2 void ce_dh_avx2(int64_t tokens, int64_t vocab, int64_t c0, int64_t c1,
                               const float* g, int64_t ldg, const TW* w, int64_t ldw, float* dh,
                               int64_t lddh) {
  ce_dh<simd::F32x8>(tokens, vocab, c0, c1, g, ldg, w, ldw, dh, lddh);
}
template <class TW>
RF_KERNEL_AVX512 void ce_dh_avx512(int64_t tokens, int64_t vocab, int64_t c0, int64_t c1,
                                   const float* g, int64_t ldg, const TW* w, int64_t ldw,
                                   float* dh, int64_t lddh) {
  ce_dh<simd::F32x16>(tokens, vocab, c0, c1, g, ldg, w, ldw, dh, lddh);
}
RF_KERNEL_AVX2 inline void ce_dw_avx2(int64_t tokens, int64_t d, int64_t v0, int64_t v1,
                                      const float* g, int64_t ldg, const float* h, int64_t ldh,
                                      float* dw, int64_t lddw, int zero) {
  ce_dw<simd::F32x8>(tokens, d, v0, v1, g, ldg, h, ldh, dw, lddw, zero);
}
RF_KERNEL_AVX512 inline void ce_dw_avx512(int64_t tokens, int64_t d, int64_t v0, int64_t v1,
                                          const float* g, int64_t ldg, const float* h, int64_t ldh,
                                          float* dw, int64_t lddw, int zero) {
  ce_dw<simd::F32x16>(tokens, d, v0, v1, g, ldg, h, ldh, dw, lddw, zero);
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
