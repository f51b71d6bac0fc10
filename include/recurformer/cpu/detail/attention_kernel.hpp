// recurformer/cpu/detail/attention_kernel.hpp: the attention micro-kernels behind cpu/attention.hpp
// and cpu/recency_score.hpp.
//
// A block is up to kAttnRows rows (a few tokens x the query heads of one KV group) against a
// contiguous key range of one KV head. Keys are read in tiles of kAttnKeys; for each tile and row:
// logits (fp32 dot products with the pre-scaled query), the mask, the online-softmax update and the
// P.V accumulation. The tile stays in L1 while every row of the block reads it, so K/V are read
// from memory once per block. Everything here is called from the ISA entry points at the bottom
// (RF_KERNEL_*), which take one pointer to a plain struct of pointers and scalars.
#pragma once

#include <cmath>
#include <cstdint>

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
  const void* v;
  int64_t k_stride, v_stride;
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

/// Copies row r of a block's queries into qf (fp32, times scale).
template <class V, int HD, class T>
RF_FORCEINLINE void load_scaled_row(const T* src, float scale, float* qf) {
  const V s = V::broadcast(scale);
  for (int c = 0; c < HD; c += V::width) (V::load(src + c) * s).store(qf + c);
}

/// s[i] = <qf, k_i> for the nk keys starting at k (fp32 accumulation).
template <class V, int HD, class T>
RF_FORCEINLINE void row_logits(const float* qf, const T* k, int64_t k_stride, int nk, float* s) {
  constexpr int NV = HD / V::width;
  V qv[NV];
  for (int c = 0; c < NV; ++c) qv[c] = V::load(qf + c * V::width);
  int i = 0;
  for (; i + 2 <= nk; i += 2) {  // two keys at once: independent chains hide the FMA latency
    const T* k0 = k + int64_t(i) * k_stride;
    const T* k1 = k0 + k_stride;
    V a0 = qv[0] * V::load(k0), a1 = qv[0] * V::load(k1);
    for (int c = 1; c < NV; ++c) {
      a0 = fma(qv[c], V::load(k0 + c * V::width), a0);
      a1 = fma(qv[c], V::load(k1 + c * V::width), a1);
    }
    s[i] = a0.reduce_add();
    s[i + 1] = a1.reduce_add();
  }
  for (; i < nk; ++i) {
    const T* k0 = k + int64_t(i) * k_stride;
    V a0 = qv[0] * V::load(k0);
    for (int c = 1; c < NV; ++c) a0 = fma(qv[c], V::load(k0 + c * V::width), a0);
    s[i] = a0.reduce_add();
  }
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

template <class V, int HD, class T>
void attend_block(const AttnBlock& b) {
  constexpr int NV = HD / V::width;
  const int R = b.n_tok * b.n_head;
  alignas(64) float qf[kAttnRows][HD];
  alignas(64) float o[kAttnRows][HD];
  alignas(64) float s[kAttnKeys];
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
    if (b.window > 0 && kmin >= b.sink && int64_t(kmax) <= int64_t(qmin) - b.window) continue;
    const bool full = kmax <= qmin && (b.window == 0 || kmax < b.sink || int64_t(kmin) > int64_t(qmax) - b.window);
    const T* kt = k + j0 * b.k_stride;
    const T* vt = v + j0 * b.v_stride;
    for (int r = 0; r < R; ++r) {
      row_logits<V, HD>(qf[r], kt, b.k_stride, nk, s);
      if (!full)
        for (int i = 0; i < nk; ++i)
          if (!key_visible(kp[i], rpos[r], b.sink, b.window)) s[i] = -INFINITY;
      const float mx = tile_max<V>(s, nk);
      if (mx == -INFINITY) continue;  // this row sees no key of the tile
      const float m_new = mx > m[r] ? mx : m[r];
      const float alpha = simd::detail::exp_scalar(m[r] - m_new);
      l[r] = l[r] * alpha + tile_exp_sum<V>(s, nk, m_new);
      m[r] = m_new;
      V acc[NV];
      const V av = V::broadcast(alpha);
      for (int c = 0; c < NV; ++c) acc[c] = V::load(o[r] + c * V::width) * av;
      for (int i = 0; i < nk; ++i) {
        const V p = V::broadcast(s[i]);
        const T* vi = vt + int64_t(i) * b.v_stride;
        for (int c = 0; c < NV; ++c) acc[c] = fma(p, V::load(vi + c * V::width), acc[c]);
      }
      for (int c = 0; c < NV; ++c) acc[c].store(o[r] + c * V::width);
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
