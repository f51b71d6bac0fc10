// recurformer/cpu/detail/attention_kernel.hpp: the attention micro-kernels behind cpu/attention.hpp
// and cpu/recency_score.hpp.
//
// A block is up to kAttnRows rows (a few tokens x the query heads of one KV group) against a
// contiguous key range of one KV head. Keys are read in tiles of kAttnKeys; for each tile and group
// of four rows: logits (fp32 dot products with the pre-scaled queries, each key loaded once for the
// four rows, one transposing reduction per key), the mask, the online-softmax update and the P.V
// accumulation (each value loaded once for the four rows). The tile stays in L1 while every group
// of the block reads it (16-bit tiles read by several groups are converted to fp32 once), so K/V
// are read from memory once per block. Everything here is called from the ISA entry points at the bottom
// (RF_KERNEL_*), which take one pointer to a plain struct of pointers and scalars.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "recurformer/core/config.hpp"
#include "recurformer/core/dtype.hpp"
#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/simd.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

constexpr int kAttnRows = 64;  // rows (token x query head) per block: bounds the stack scratch
constexpr int kAttnKeys = 32;  // keys per tile

/// One block of attention work. Row r is token r / n_head, head r % n_head of the block.
struct AttnBlock {
  const void* q;                  // [n_tok, n_head, hd] at (token, head) strides below
  int64_t q_tok_stride, q_head_stride;
  int n_tok, n_head;
  int32_t q_pos[kAttnRows];       // [n_tok] query positions
  const void* k;                  // [keys, hd] of one slot and KV head, key stride below
  const void* v;                  // (paged: of page 0 and the KV head)
  int64_t k_stride, v_stride;
  const int32_t* pages;           // paged K/V: the sequence's page table row (null: contiguous)
  int64_t page_size, k_page_stride, v_page_stride;
  const int32_t* k_pos;           // key positions (null: the key's index), stride below
  int64_t k_pos_stride;
  int64_t key_begin, key_end;     // key range read by this block
  float scale;
  int sink, window;
  // Final output (part == null): out normalised, lse (optional).
  void* out;
  int64_t out_tok_stride, out_head_stride;
  float* lse;
  int64_t lse_tok_stride, lse_head_stride;
  // Split-KV partial output (part != null): per row [hd] unnormalised out, then m, then l.
  float* part;
  int64_t part_tok_stride, part_head_stride;
};

RF_FORCEINLINE bool key_visible(int32_t kp, int32_t qp, int sink, int window) {
  return kp <= qp && (window == 0 || kp < sink || int64_t(kp) > int64_t(qp) - window);
}

enum class TileVisibility { none, partial, full };

/// Whether rows with query positions in [qmin, qmax] see none, some or all of a tile's keys with
/// positions in [kmin, kmax] (conservative: partial when unsure).
RF_FORCEINLINE TileVisibility tile_visibility(int32_t kmin, int32_t kmax, int32_t qmin, int32_t qmax, int sink,
                                              int window) {
  if (kmin > qmax) return TileVisibility::none;
  if (window > 0 && kmin >= sink && int64_t(kmax) <= int64_t(qmin) - window) return TileVisibility::none;
  const bool full = kmax <= qmin && (window == 0 || kmax < sink || int64_t(kmin) > int64_t(qmax) - window);
  return full ? TileVisibility::full : TileVisibility::partial;
}

/// Copies row r of a block's queries into qf (fp32, times scale).
template <class V, int HD, class T>
RF_FORCEINLINE void load_scaled_row(const T* src, float scale, float* qf) {
  const V s = V::broadcast(scale);
  for (int c = 0; c < HD; c += V::width) (V::load(src + c) * s).store(qf + c);
}

/// out[0..4) = the horizontal sums of a0..a3. One transposing reduction for four vectors costs
/// about half the shuffles of four reduce_add() calls (the shuffle port bounds the decode kernel).
/// (A candidate for cpu/detail/simd.hpp.)
RF_FORCEINLINE void reduce4(simd::F32x1 a0, simd::F32x1 a1, simd::F32x1 a2, simd::F32x1 a3, float* out) {
  out[0] = a0.v, out[1] = a1.v, out[2] = a2.v, out[3] = a3.v;
}
#if RF_HAVE_X86_SIMD
RF_SIMD_AVX2 void reduce4(simd::F32x8 a0, simd::F32x8 a1, simd::F32x8 a2, simd::F32x8 a3, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0.v, a1.v), _mm256_hadd_ps(a2.v, a3.v));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
RF_SIMD_AVX512 void reduce4(simd::F32x16 a0, simd::F32x16 a1, simd::F32x16 a2, simd::F32x16 a3, float* out) {
  // per 128-bit lane: [a0 a1 a0 a1] and [a2 a3 a2 a3] partial sums, then [a0 a1 a2 a3]
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a0.v, a1.v), _mm512_unpackhi_ps(a0.v, a1.v));
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a2.v, a3.v), _mm512_unpackhi_ps(a2.v, a3.v));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x01, x23, 0x44), _mm512_shuffle_ps(x01, x23, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(y), _mm512_extractf32x8_ps(y, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#endif

/// s[i] = <qf, k_i> for the nk keys starting at k (fp32 accumulation).
template <class V, int HD, class T>
RF_FORCEINLINE void row_logits(const float* qf, const T* k, int64_t k_stride, int nk, float* s) {
  constexpr int NV = HD / V::width;
  V qv[NV];
  for (int c = 0; c < NV; ++c) qv[c] = V::load(qf + c * V::width);
  int i = 0;
  for (; i + 4 <= nk; i += 4) {  // four keys at once: independent FMA chains, one reduction
    const T* k0 = k + int64_t(i) * k_stride;
    V a0 = qv[0] * V::load(k0), a1 = qv[0] * V::load(k0 + k_stride);
    V a2 = qv[0] * V::load(k0 + 2 * k_stride), a3 = qv[0] * V::load(k0 + 3 * k_stride);
    for (int c = 1; c < NV; ++c) {
      const int64_t o = c * V::width;
      a0 = fma(qv[c], V::load(k0 + o), a0);
      a1 = fma(qv[c], V::load(k0 + k_stride + o), a1);
      a2 = fma(qv[c], V::load(k0 + 2 * k_stride + o), a2);
      a3 = fma(qv[c], V::load(k0 + 3 * k_stride + o), a3);
    }
    reduce4(a0, a1, a2, a3, s + i);
  }
  for (; i < nk; ++i) {
    const T* k0 = k + int64_t(i) * k_stride;
    V a0 = qv[0] * V::load(k0);
    for (int c = 1; c < NV; ++c) a0 = fma(qv[c], V::load(k0 + c * V::width), a0);
    s[i] = a0.reduce_add();
  }
}

/// Converts nk rows of HD storage values (row stride `stride`) to a dense fp32 tile, so a tile read
/// by several rows is converted once.
template <class V, int HD, class T>
RF_FORCEINLINE void tile_to_float(const T* src, int64_t stride, int nk, float* dst) {
  for (int i = 0; i < nk; ++i)
    for (int c = 0; c < HD; c += V::width) V::load(src + int64_t(i) * stride + c).store(dst + i * HD + c);
}

/// max of s[0..n) (n <= kAttnKeys), vectorised.
template <class V>
RF_FORCEINLINE float tile_max(const float* s, int n) {
  V m = V::broadcast(-INFINITY);
  int i = 0;
  for (; i + V::width <= n; i += V::width) m = max(m, V::load(s + i));
  float r = m.reduce_max();
  for (; i < n; ++i) r = s[i] > r ? s[i] : r;
  return r;
}

/// s[i] = exp(s[i] - m) for i < n; returns the sum.
template <class V>
RF_FORCEINLINE float tile_exp_sum(float* s, int n, float m) {
  const V mv = V::broadcast(m);
  V acc = V::zero();
  int i = 0;
  for (; i + V::width <= n; i += V::width) {
    const V p = exp(V::load(s + i) - mv);
    p.store(s + i);
    acc = acc + p;
  }
  float r = acc.reduce_add();
  for (; i < n; ++i) {
    const float p = simd::detail::exp_scalar(s[i] - m);
    s[i] = p;
    r += p;
  }
  return r;
}

/// s[r][i] = <a[r], t_i> for RB <= 4 fp32 rows a[r] and the nk tile rows t_i (fp32 accumulation):
/// each tile row is loaded (and converted) once for the RB rows, one transposing reduction per key.
/// (Shared with the backward, cpu/detail/attention_backward_kernel.hpp.)
template <class V, int HD, int RB, class TK>
RF_FORCEINLINE void rows_dots(const float* const* a, const TK* t, int64_t stride, int nk, float (*s)[kAttnKeys]) {
  constexpr int NV = HD / V::width;
  for (int i = 0; i < nk; ++i) {
    const TK* ti = t + int64_t(i) * stride;
    V acc[4];
    {
      const V tv = V::load(ti);
      for (int r = 0; r < RB; ++r) acc[r] = V::load(a[r]) * tv;
    }
    for (int c = 1; c < NV; ++c) {
      const V tv = V::load(ti + c * V::width);
      for (int r = 0; r < RB; ++r) acc[r] = fma(V::load(a[r] + c * V::width), tv, acc[r]);
    }
    if constexpr (RB == 4) {
      float x[4];
      reduce4(acc[0], acc[1], acc[2], acc[3], x);
      for (int r = 0; r < 4; ++r) s[r][i] = x[r];
    } else {
      for (int r = 0; r < RB; ++r) s[r][i] = acc[r].reduce_add();
    }
  }
}

/// RB rows (RB <= 4) against one tile, sharing every K/V load (and 16-bit conversion) between the
/// rows: per key, the RB logits come from one transposing reduction and P.V updates RB
/// accumulator rows. q[r], o[r]: the rows' scaled queries and running outputs.
template <class V, int HD, int RB, class TK>
RF_FORCEINLINE void rows_update(float* const* q, const TK* kt, int64_t k_stride, const TK* vt, int64_t v_stride,
                                int nk, const int32_t* kp, const int32_t* qpos, bool full, int sink, int window,
                                float (*s)[kAttnKeys], float* m, float* l, float* const* o) {
  constexpr int NV = HD / V::width;
  rows_dots<V, HD, RB>(q, kt, k_stride, nk, s);
  float alpha[RB];
  for (int r = 0; r < RB; ++r) {
    if (!full)
      for (int i = 0; i < nk; ++i)
        if (!key_visible(kp[i], qpos[r], sink, window)) s[r][i] = -INFINITY;
    const float mx = tile_max<V>(s[r], nk);
    if (mx == -INFINITY) {  // this row sees no key of the tile: it adds nothing
      for (int i = 0; i < nk; ++i) s[r][i] = 0.f;
      alpha[r] = 1.f;
      continue;
    }
    const float m_new = mx > m[r] ? mx : m[r];
    alpha[r] = simd::detail::exp_scalar(m[r] - m_new);
    l[r] = l[r] * alpha[r] + tile_exp_sum<V>(s[r], nk, m_new);
    m[r] = m_new;
  }
  V acc[RB][NV];
  for (int r = 0; r < RB; ++r) {
    const V a = V::broadcast(alpha[r]);
    for (int c = 0; c < NV; ++c) acc[r][c] = V::load(o[r] + c * V::width) * a;
  }
  for (int i = 0; i < nk; ++i) {
    const TK* vi = vt + int64_t(i) * v_stride;
    V p[RB];
    for (int r = 0; r < RB; ++r) p[r] = V::broadcast(s[r][i]);
    for (int c = 0; c < NV; ++c) {
      const V vv = V::load(vi + c * V::width);
      for (int r = 0; r < RB; ++r) acc[r][c] = fma(p[r], vv, acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c].store(o[r] + c * V::width);
}

/// All rows of a block against one tile, in groups of up to four rows.
template <class V, int HD, class TK>
RF_FORCEINLINE void block_update(float (*qf)[HD], const TK* kt, int64_t k_stride, const TK* vt, int64_t v_stride,
                                 int R, int nk, const int32_t* kp, const int32_t* rpos, bool full, int sink,
                                 int window, float* m, float* l, float (*o)[HD]) {
  alignas(64) float s[4][kAttnKeys];
  int r = 0;
  for (; r < R; r += 4) {
    float* qr[4] = {qf[r], qf[r + 1 < R ? r + 1 : r], qf[r + 2 < R ? r + 2 : r], qf[r + 3 < R ? r + 3 : r]};
    float* orow[4] = {o[r], o[r + 1 < R ? r + 1 : r], o[r + 2 < R ? r + 2 : r], o[r + 3 < R ? r + 3 : r]};
    switch (R - r) {
      case 1:
        rows_update<V, HD, 1>(qr, kt, k_stride, vt, v_stride, nk, kp, rpos + r, full, sink, window, s, m + r, l + r, orow);
        break;
      case 2:
        rows_update<V, HD, 2>(qr, kt, k_stride, vt, v_stride, nk, kp, rpos + r, full, sink, window, s, m + r, l + r, orow);
        break;
      case 3:
        rows_update<V, HD, 3>(qr, kt, k_stride, vt, v_stride, nk, kp, rpos + r, full, sink, window, s, m + r, l + r, orow);
        break;
      default:
        rows_update<V, HD, 4>(qr, kt, k_stride, vt, v_stride, nk, kp, rpos + r, full, sink, window, s, m + r, l + r, orow);
    }
  }
}

template <class V, int HD, class T>
void attend_block(const AttnBlock& b) {
  const int R = b.n_tok * b.n_head;
  alignas(64) float qf[kAttnRows][HD];
  alignas(64) float o[kAttnRows][HD];
  alignas(64) float kf[kAttnKeys][HD], vf[kAttnKeys][HD];  // converted 16-bit tiles
  float m[kAttnRows], l[kAttnRows];
  int32_t rpos[kAttnRows];
  const T* q = static_cast<const T*>(b.q);
  const T* k = static_cast<const T*>(b.k);
  const T* v = static_cast<const T*>(b.v);
  int32_t qmin = INT32_MAX, qmax = INT32_MIN;
  for (int r = 0; r < R; ++r) {
    const int t = r / b.n_head, h = r % b.n_head;
    load_scaled_row<V, HD>(q + t * b.q_tok_stride + h * b.q_head_stride, b.scale, qf[r]);
    for (int c = 0; c < HD; ++c) o[r][c] = 0.f;
    m[r] = -INFINITY;
    l[r] = 0.f;
    rpos[r] = b.q_pos[t];
    qmin = rpos[r] < qmin ? rpos[r] : qmin;
    qmax = rpos[r] > qmax ? rpos[r] : qmax;
  }
  int32_t kp[kAttnKeys];
  for (int64_t j0 = b.key_begin; j0 < b.key_end; j0 += kAttnKeys) {
    const int nk = int(b.key_end - j0 < kAttnKeys ? b.key_end - j0 : kAttnKeys);
    int32_t kmin = INT32_MAX, kmax = INT32_MIN;
    for (int i = 0; i < nk; ++i) {
      kp[i] = b.k_pos ? b.k_pos[(j0 + i) * b.k_pos_stride] : int32_t(j0 + i);
      kmin = kp[i] < kmin ? kp[i] : kmin;
      kmax = kp[i] > kmax ? kp[i] : kmax;
    }
    if (kmin > qmax) {
      if (!b.k_pos) break;  // index positions only grow: no later tile is visible either
      continue;
    }
    const TileVisibility vis = tile_visibility(kmin, kmax, qmin, qmax, b.sink, b.window);
    if (vis == TileVisibility::none) continue;
    const bool full = vis == TileVisibility::full;
    // 16-bit K/V read by more than one group of four rows: convert the tile once.
    const T* kt = k + j0 * b.k_stride;
    const T* vt = v + j0 * b.v_stride;
    if (b.pages) {
      // The hardware prefetchers do not follow a group's keys from page to page: ask for the
      // tile after next, row by row, while this one is computed.
      for (int64_t j = j0 + 2 * kAttnKeys, e = std::min<int64_t>(j + kAttnKeys, b.key_end); j < e; ++j) {
        const int64_t pg = b.pages[j / b.page_size], r = j % b.page_size;
        const char* kr = reinterpret_cast<const char*>(k + pg * b.k_page_stride + r * b.k_stride);
        const char* vr = reinterpret_cast<const char*>(v + pg * b.v_page_stride + r * b.v_stride);
        for (int c = 0; c < int(HD * sizeof(T)); c += 64) {
          __builtin_prefetch(kr + c);
          __builtin_prefetch(vr + c);
        }
      }
      const int64_t row = j0 % b.page_size, page = b.pages[j0 / b.page_size];
      kt = k + page * b.k_page_stride + row * b.k_stride;
      vt = v + page * b.v_page_stride + row * b.v_stride;
      if (row + nk > b.page_size) {
        // The tile crosses a page: gather its rows (widened exactly), so the arithmetic and its
        // order stay those of the contiguous layout.
        for (int i = 0; i < nk; ++i) {
          const int64_t j = j0 + i, pg = b.pages[j / b.page_size], r = j % b.page_size;
          tile_to_float<V, HD>(k + pg * b.k_page_stride + r * b.k_stride, 0, 1, kf[i]);
          tile_to_float<V, HD>(v + pg * b.v_page_stride + r * b.v_stride, 0, 1, vf[i]);
        }
        block_update<V, HD>(qf, &kf[0][0], HD, &vf[0][0], HD, R, nk, kp, rpos, full, b.sink, b.window, m, l, o);
        continue;
      }
    }
    if (!std::is_same<T, float>::value && R > 4) {
      tile_to_float<V, HD>(kt, b.k_stride, nk, kf[0]);
      tile_to_float<V, HD>(vt, b.v_stride, nk, vf[0]);
      block_update<V, HD>(qf, &kf[0][0], HD, &vf[0][0], HD, R, nk, kp, rpos, full, b.sink, b.window, m, l, o);
    } else {
      block_update<V, HD>(qf, kt, b.k_stride, vt, b.v_stride, R, nk, kp, rpos, full, b.sink, b.window, m, l, o);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int t = r / b.n_head, h = r % b.n_head;
    if (b.part) {
      float* dst = b.part + t * b.part_tok_stride + h * b.part_head_stride;
      for (int c = 0; c < HD; ++c) dst[c] = o[r][c];
      dst[HD] = m[r];
      dst[HD + 1] = l[r];
      continue;
    }
    const V inv = V::broadcast(l[r] > 0 ? 1.f / l[r] : 0.f);
    T* dst = static_cast<T*>(b.out) + t * b.out_tok_stride + h * b.out_head_stride;
    for (int c = 0; c < HD; c += V::width) (V::load(o[r] + c) * inv).store(dst + c);
    if (b.lse) b.lse[t * b.lse_tok_stride + h * b.lse_head_stride] = l[r] > 0 ? m[r] + std::log(l[r]) : -INFINITY;
  }
}

template <int HD, class T>
void attend_block_scalar(const AttnBlock* b) {
  attend_block<simd::F32x1, HD, T>(*b);
}
#if RF_HAVE_X86_SIMD
template <int HD, class T>
RF_KERNEL_AVX2 void attend_block_avx2(const AttnBlock* b) {
  attend_block<simd::F32x8, HD, T>(*b);
}
template <int HD, class T>
RF_KERNEL_AVX512 void attend_block_avx512(const AttnBlock* b) {
  attend_block<simd::F32x16, HD, T>(*b);
}
#endif

/// Runs one block with the active ISA's body.
template <int HD, class T>
void attend_block_dispatch(Isa isa, const AttnBlock* b) {
#if RF_HAVE_X86_SIMD
  if (isa == Isa::avx512) return attend_block_avx512<HD, T>(b);
  if (isa == Isa::avx2) return attend_block_avx2<HD, T>(b);
#endif
  (void)isa;
  attend_block_scalar<HD, T>(b);
}

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
