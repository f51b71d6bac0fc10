// recurformer/cpu/detail/recency_kernel.hpp: the RecencyScore micro-kernel behind
// cpu/recency_score.hpp.
//
// A block is up to kAttnRows rows (tokens x query heads of one KV group) of one calibration
// sequence. Pass 1 streams the causal keys in tiles (the attention kernel's logits and tile
// helpers) keeping, per row, the running max m, the sum l of exp(s - m) and the sum of
// exp(s - m) * j, so the row's log-sum-exp and mean key index come out without storing P.
// Pass 2 recomputes only the w window logits and the sink logits and normalises them by the
// log-sum-exp.
#pragma once

#include <cmath>
#include <cstdint>

#include "recurformer/cpu/detail/attention_kernel.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

struct RecencyBlock {
  const void* q;             // row (token t, head h) at q + t * q_tok_stride + h * q_head_stride
  int64_t q_tok_stride, q_head_stride;
  int n_tok, n_head;
  int64_t t0;                // position (= index) of the block's first token
  const void* k;             // [T, hd] keys of the KV head, key stride below
  int64_t k_stride;
  float scale;
  int window, sink_tokens;
  double* out;               // [n_tok * n_head][3]: r_i, sink_i, distance_i of each row
};

/// Sum of exp(s_j - lse) over keys [j0, j1) of one row.
template <class V, int HD, class T>
RF_FORCEINLINE double row_mass(const float* qf, const T* k, int64_t k_stride, int64_t j0, int64_t j1, float lse) {
  float s[kAttnKeys];
  double sum = 0;
  for (int64_t j = j0; j < j1; j += kAttnKeys) {
    const int nk = int(j1 - j < kAttnKeys ? j1 - j : kAttnKeys);
    row_logits<V, HD>(qf, k + j * k_stride, k_stride, nk, s);
    for (int i = 0; i < nk; ++i) sum += double(simd::detail::exp_scalar(s[i] - lse));
  }
  return sum;
}

template <class V, int HD, class T>
void recency_block(const RecencyBlock& b) {
  const int R = b.n_tok * b.n_head;
  alignas(64) float qf[kAttnRows][HD];
  alignas(64) float s[kAttnKeys];
  float m[kAttnRows];
  double l[kAttnRows], lj[kAttnRows];
  const T* q = static_cast<const T*>(b.q);
  const T* k = static_cast<const T*>(b.k);
  for (int r = 0; r < R; ++r) {
    load_scaled_row<V, HD>(q + (r / b.n_head) * b.q_tok_stride + (r % b.n_head) * b.q_head_stride, b.scale, qf[r]);
    m[r] = -INFINITY;
    l[r] = 0;
    lj[r] = 0;
  }
  const int64_t t_last = b.t0 + b.n_tok - 1;
  for (int64_t j0 = 0; j0 <= t_last; j0 += kAttnKeys) {
    const int nk_all = int(t_last + 1 - j0 < kAttnKeys ? t_last + 1 - j0 : kAttnKeys);
    for (int r = 0; r < R; ++r) {
      const int64_t t = b.t0 + r / b.n_head;
      if (j0 > t) continue;
      const int nk = int(t + 1 - j0 < nk_all ? t + 1 - j0 : nk_all);  // causal: keys j <= t
      row_logits<V, HD>(qf[r], k + j0 * b.k_stride, b.k_stride, nk, s);
      const float mx = tile_max<V>(s, nk);
      const float m_new = mx > m[r] ? mx : m[r];
      const float alpha = simd::detail::exp_scalar(m[r] - m_new);
      const float sum = tile_exp_sum<V>(s, nk, m_new);
      float sum_i = 0;
      for (int i = 0; i < nk; ++i) sum_i += s[i] * float(i);
      l[r] = l[r] * alpha + sum;
      lj[r] = lj[r] * alpha + double(sum) * double(j0) + sum_i;
      m[r] = m_new;
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t t = b.t0 + r / b.n_head;
    const float lse = m[r] + float(std::log(l[r]));
    const int64_t w0 = t - b.window + 1 > 0 ? t - b.window + 1 : 0;
    const int64_t s1 = b.sink_tokens < t + 1 ? b.sink_tokens : t + 1;
    double* o = b.out + 3 * r;
    o[0] = row_mass<V, HD>(qf[r], k, b.k_stride, w0, t + 1, lse);
    o[1] = row_mass<V, HD>(qf[r], k, b.k_stride, 0, s1, lse);
    o[2] = double(t) - lj[r] / l[r];
  }
}

template <int HD, class T>
void recency_block_scalar(const RecencyBlock* b) {
  recency_block<simd::F32x1, HD, T>(*b);
}
#if RF_HAVE_X86_SIMD
template <int HD, class T>
RF_KERNEL_AVX2 void recency_block_avx2(const RecencyBlock* b) {
  recency_block<simd::F32x8, HD, T>(*b);
}
template <int HD, class T>
RF_KERNEL_AVX512 void recency_block_avx512(const RecencyBlock* b) {
  recency_block<simd::F32x16, HD, T>(*b);
}
#endif

template <int HD, class T>
void recency_block_dispatch(Isa isa, const RecencyBlock* b) {
#if RF_HAVE_X86_SIMD
  if (isa == Isa::avx512) return recency_block_avx512<HD, T>(b);
  if (isa == Isa::avx2) return recency_block_avx2<HD, T>(b);
#endif
  (void)isa;
  recency_block_scalar<HD, T>(b);
}

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
