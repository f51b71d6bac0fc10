// recurformer/cpu/detail/attention_backward_kernel.hpp: the micro-kernels behind
// cpu/attention_backward.hpp (formulas in ops/attention_backward.hpp).
//
// A block is up to kAttnRows query rows (a few tokens x query heads of one KV group) against tiles
// of kAttnKeys keys of one slot and KV head. Per tile: the logits and dP = dout.V^T for the rows
// (rows_dots from the forward's kernel: each key loaded once for four rows), then P and dS in place
// ([rows][keys] fp32 on the stack, never more), then the rank-nk / rank-rows updates
//   dq block pass:    dq[rows]  += dS . K
//   dk/dv key pass:   dv[keys]  += P^T . dout,   dk[keys] += dS^T . (scale q)
// as small GEMMs whose outputs stay in registers (4 output rows x 2 or 4 vectors) across the sum.
// 16-bit tiles and rows are converted to fp32 once per block. Everything is reached through the ISA
// entry points at the bottom, which take one pointer to a plain struct.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "recurformer/cpu/detail/attention_kernel.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

/// One backward block: rows of one sequence and KV group against keys of its slot and KV head.
/// Row r is token r / n_head, head r % n_head of the block.
struct AttnBwdBlock {
  const void* q;                  // [n_tok, n_head, hd] at (token, head) strides
  const void* dout;               // [n_tok, n_head, hd]
  int64_t q_tok_stride, q_head_stride, do_tok_stride, do_head_stride;
  const float* lse;               // [n_tok, n_head] the forward's log-sum-exp
  int64_t lse_tok_stride, lse_head_stride;
  const float* d;                 // [n_tok, n_head] D = <dout, out>, unit head stride
  int64_t d_tok_stride;
  int n_tok, n_head;
  int32_t q_pos[kAttnRows];       // [n_tok] query positions
  const void* k;                  // [keys, hd] of one slot and KV head, key stride below
  const void* v;
  int64_t k_stride, v_stride;
  const int32_t* k_pos;           // key positions (null: the key's index), stride below
  int64_t k_pos_stride;
  int64_t key_begin, key_end;     // keys read: the dq pass walks them in tiles; the dk/dv pass takes one tile
  float scale;
  int sink, window;
  float* dq;                      // dq pass: [n_tok, n_head, hd] output rows at the strides below
  int64_t dq_tok_stride, dq_head_stride;
  float* dk_acc;                  // dk/dv pass: [key_end - key_begin, hd] accumulators (dense rows of hd)
  float* dv_acc;
};

/// acc[m] += sum_k coef[m * cm + k * ck] * b[k] for m < M, k < K (acc rows at acc_stride, b rows at
/// b_stride, all HD wide). Four output rows x CB vectors stay in registers across the k loop, so each
/// b vector is loaded once per four rows.
template <class V, int HD, int MB, class TB>
RF_FORCEINLINE void gemm_rows_block(float* acc, int64_t acc_stride, const float* coef, int64_t cm, int64_t ck,
                                    const TB* b, int64_t b_stride, int K) {
  constexpr int NV = HD / V::width;
  constexpr int CB = (V::width >= 16 ? 4 : 2) < NV ? (V::width >= 16 ? 4 : 2) : NV;  // 16 or 8 accumulators
  static_assert(NV % CB == 0, "head_dim must be a multiple of the register block");
  for (int c0 = 0; c0 < NV; c0 += CB) {
    V a[MB][CB];
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < CB; ++c) a[m][c] = V::load(acc + m * acc_stride + (c0 + c) * V::width);
    for (int k = 0; k < K; ++k) {
      V bv[CB];
      for (int c = 0; c < CB; ++c) bv[c] = V::load(b + k * b_stride + (c0 + c) * V::width);
      for (int m = 0; m < MB; ++m) {
        const V w = V::broadcast(coef[m * cm + k * ck]);
        for (int c = 0; c < CB; ++c) a[m][c] = fma(w, bv[c], a[m][c]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < CB; ++c) a[m][c].store(acc + m * acc_stride + (c0 + c) * V::width);
  }
}

template <class V, int HD, class TB>
RF_FORCEINLINE void gemm_rows(float* acc, int64_t acc_stride, int M, const float* coef, int64_t cm, int64_t ck,
                              const TB* b, int64_t b_stride, int K) {
  int m = 0;
  for (; m + 4 <= M; m += 4)
    gemm_rows_block<V, HD, 4>(acc + m * acc_stride, acc_stride, coef + m * cm, cm, ck, b, b_stride, K);
  for (; m < M; ++m) gemm_rows_block<V, HD, 1>(acc + m * acc_stride, acc_stride, coef + m * cm, cm, ck, b, b_stride, K);
}

/// s[r][i] = <a[r], t_i> for all R rows, four at a time (rows_dots shares each tile row between them).
template <class V, int HD, class TK>
RF_FORCEINLINE void all_rows_dots(float (*a)[HD], int R, const TK* t, int64_t stride, int nk, float (*s)[kAttnKeys]) {
  for (int r = 0; r < R; r += 4) {
    const float* ar[4] = {a[r], a[r + 1 < R ? r + 1 : r], a[r + 2 < R ? r + 2 : r], a[r + 3 < R ? r + 3 : r]};
    switch (R - r) {
      case 1: rows_dots<V, HD, 1>(ar, t, stride, nk, s + r); break;
      case 2: rows_dots<V, HD, 2>(ar, t, stride, nk, s + r); break;
      case 3: rows_dots<V, HD, 3>(ar, t, stride, nk, s + r); break;
      default: rows_dots<V, HD, 4>(ar, t, stride, nk, s + r);
    }
  }
}

/// In place on one row: s[i] (a logit) becomes P = exp(s - lse), dp[i] becomes dS = P * (dp - d).
/// Masked keys (s = -inf) and rows that saw no key (lse = -inf) give 0.
template <class V>
RF_FORCEINLINE void probs_and_dscores(float* s, float* dp, int nk, float lse, float d) {
  if (lse == -INFINITY) {
    for (int i = 0; i < nk; ++i) s[i] = dp[i] = 0.f;
    return;
  }
  const V lv = V::broadcast(lse), dv = V::broadcast(d);
  int i = 0;
  for (; i + V::width <= nk; i += V::width) {
    const V p = exp(V::load(s + i) - lv);
    p.store(s + i);
    (p * (V::load(dp + i) - dv)).store(dp + i);
  }
  for (; i < nk; ++i) {
    const float p = simd::detail::exp_scalar(s[i] - lse);
    s[i] = p;
    dp[i] = p * (dp[i] - d);
  }
}

/// The rows of a block in fp32: scaled queries, dout, lse, D and positions. Returns the row count.
template <class V, int HD, class T>
RF_FORCEINLINE int load_bwd_rows(const AttnBwdBlock& b, float (*qf)[HD], float (*dof)[HD], float* lse, float* d,
                                 int32_t* rpos) {
  const int R = b.n_tok * b.n_head;
  const T* q = static_cast<const T*>(b.q);
  const T* dout = static_cast<const T*>(b.dout);
  for (int r = 0; r < R; ++r) {
    const int t = r / b.n_head, h = r % b.n_head;
    load_scaled_row<V, HD>(q + t * b.q_tok_stride + h * b.q_head_stride, b.scale, qf[r]);
    tile_to_float<V, HD>(dout + t * b.do_tok_stride + h * b.do_head_stride, 0, 1, dof[r]);
    lse[r] = b.lse[t * b.lse_tok_stride + h * b.lse_head_stride];
    d[r] = b.d[t * b.d_tok_stride + h];
    rpos[r] = b.q_pos[t];
  }
  return R;
}

/// P and dS of R rows against nk keys (fp32 tiles kt, vt at strides ks, vs), into p and ds.
template <class V, int HD, class TK>
RF_FORCEINLINE void block_probs(float (*qf)[HD], float (*dof)[HD], const float* lse, const float* d,
                                const int32_t* rpos, int R, const TK* kt, int64_t ks, const TK* vt, int64_t vs,
                                const int32_t* kp, int nk, bool full, int sink, int window, float (*p)[kAttnKeys],
                                float (*ds)[kAttnKeys]) {
  all_rows_dots<V, HD>(qf, R, kt, ks, nk, p);
  all_rows_dots<V, HD>(dof, R, vt, vs, nk, ds);
  for (int r = 0; r < R; ++r) {
    if (!full)
      for (int i = 0; i < nk; ++i)
        if (!key_visible(kp[i], rpos[r], sink, window)) p[r][i] = -INFINITY;
    probs_and_dscores<V>(p[r], ds[r], nk, lse[r], d[r]);
  }
}

/// The key positions of keys [j0, j0 + nk) and their range.
RF_FORCEINLINE void tile_key_positions(const AttnBwdBlock& b, int64_t j0, int nk, int32_t* kp, int32_t& kmin,
                                       int32_t& kmax) {
  kmin = INT32_MAX, kmax = INT32_MIN;
  for (int i = 0; i < nk; ++i) {
    kp[i] = b.k_pos ? b.k_pos[(j0 + i) * b.k_pos_stride] : int32_t(j0 + i);
    kmin = kp[i] < kmin ? kp[i] : kmin;
    kmax = kp[i] > kmax ? kp[i] : kmax;
  }
}

/// dq pass: the block's rows against keys [key_begin, key_end), writes dq of the rows.
template <class V, int HD, class T>
void attn_bwd_dq_block(const AttnBwdBlock& b) {
  alignas(64) float qf[kAttnRows][HD], dof[kAttnRows][HD], dq[kAttnRows][HD];
  alignas(64) float kf[kAttnKeys][HD], vf[kAttnKeys][HD];  // converted 16-bit tiles
  alignas(64) float p[kAttnRows][kAttnKeys], ds[kAttnRows][kAttnKeys];
  float lse[kAttnRows], d[kAttnRows];
  int32_t rpos[kAttnRows], kp[kAttnKeys];
  const int R = load_bwd_rows<V, HD, T>(b, qf, dof, lse, d, rpos);
  int32_t qmin = INT32_MAX, qmax = INT32_MIN;
  for (int r = 0; r < R; ++r) {
    qmin = rpos[r] < qmin ? rpos[r] : qmin;
    qmax = rpos[r] > qmax ? rpos[r] : qmax;
    for (int c = 0; c < HD; ++c) dq[r][c] = 0.f;
  }
  const T* k = static_cast<const T*>(b.k);
  const T* v = static_cast<const T*>(b.v);
  for (int64_t j0 = b.key_begin; j0 < b.key_end; j0 += kAttnKeys) {
    const int nk = int(b.key_end - j0 < kAttnKeys ? b.key_end - j0 : kAttnKeys);
    int32_t kmin, kmax;
    tile_key_positions(b, j0, nk, kp, kmin, kmax);
    if (kmin > qmax && !b.k_pos) break;  // index positions only grow: no later tile is visible either
    const TileVisibility vis = tile_visibility(kmin, kmax, qmin, qmax, b.sink, b.window);
    if (vis == TileVisibility::none) continue;
    const bool full = vis == TileVisibility::full;
    const T* kt = k + j0 * b.k_stride;
    const T* vt = v + j0 * b.v_stride;
    if constexpr (std::is_same<T, float>::value) {
      block_probs<V, HD>(qf, dof, lse, d, rpos, R, kt, b.k_stride, vt, b.v_stride, kp, nk, full, b.sink, b.window,
                         p, ds);
      gemm_rows<V, HD>(&dq[0][0], HD, R, &ds[0][0], kAttnKeys, 1, kt, b.k_stride, nk);
    } else {
      tile_to_float<V, HD>(kt, b.k_stride, nk, kf[0]);
      tile_to_float<V, HD>(vt, b.v_stride, nk, vf[0]);
      block_probs<V, HD>(qf, dof, lse, d, rpos, R, &kf[0][0], HD, &vf[0][0], HD, kp, nk, full, b.sink, b.window,
                         p, ds);
      gemm_rows<V, HD>(&dq[0][0], HD, R, &ds[0][0], kAttnKeys, 1, &kf[0][0], HD, nk);
    }
  }
  const V sc = V::broadcast(b.scale);
  for (int r = 0; r < R; ++r) {
    const int t = r / b.n_head, h = r % b.n_head;
    float* dst = b.dq + t * b.dq_tok_stride + h * b.dq_head_stride;
    for (int c = 0; c < HD; c += V::width) (V::load(dq[r] + c) * sc).store(dst + c);
  }
}

/// dk/dv pass: the block's rows against one tile [key_begin, key_end) (at most kAttnKeys keys),
/// adding to the tile's dk and dv accumulators.
template <class V, int HD, class T>
void attn_bwd_dkdv_block(const AttnBwdBlock& b) {
  const int nk = int(b.key_end - b.key_begin);
  int32_t kp[kAttnKeys], kmin, kmax;
  tile_key_positions(b, b.key_begin, nk, kp, kmin, kmax);
  int32_t qmin = INT32_MAX, qmax = INT32_MIN;
  for (int t = 0; t < b.n_tok; ++t) {
    qmin = b.q_pos[t] < qmin ? b.q_pos[t] : qmin;
    qmax = b.q_pos[t] > qmax ? b.q_pos[t] : qmax;
  }
  const TileVisibility vis = tile_visibility(kmin, kmax, qmin, qmax, b.sink, b.window);
  if (vis == TileVisibility::none) return;  // before loading anything
  alignas(64) float qf[kAttnRows][HD], dof[kAttnRows][HD];
  alignas(64) float kf[kAttnKeys][HD], vf[kAttnKeys][HD];
  alignas(64) float p[kAttnRows][kAttnKeys], ds[kAttnRows][kAttnKeys];
  float lse[kAttnRows], d[kAttnRows];
  int32_t rpos[kAttnRows];
  const int R = load_bwd_rows<V, HD, T>(b, qf, dof, lse, d, rpos);
  const T* kt = static_cast<const T*>(b.k) + b.key_begin * b.k_stride;
  const T* vt = static_cast<const T*>(b.v) + b.key_begin * b.v_stride;
  const bool full = vis == TileVisibility::full;
  if constexpr (std::is_same<T, float>::value) {
    block_probs<V, HD>(qf, dof, lse, d, rpos, R, kt, b.k_stride, vt, b.v_stride, kp, nk, full, b.sink, b.window, p,
                       ds);
  } else {
    tile_to_float<V, HD>(kt, b.k_stride, nk, kf[0]);
    tile_to_float<V, HD>(vt, b.v_stride, nk, vf[0]);
    block_probs<V, HD>(qf, dof, lse, d, rpos, R, &kf[0][0], HD, &vf[0][0], HD, kp, nk, full, b.sink, b.window, p,
                       ds);
  }
  // dv[i] += sum_r P[r][i] dout[r];  dk[i] += sum_r dS[r][i] (scale q[r])
  if (b.dv_acc) gemm_rows<V, HD>(b.dv_acc, HD, nk, &p[0][0], 1, kAttnKeys, &dof[0][0], HD, R);
  if (b.dk_acc) gemm_rows<V, HD>(b.dk_acc, HD, nk, &ds[0][0], 1, kAttnKeys, &qf[0][0], HD, R);
}

template <int HD, class T>
void attn_bwd_dq_scalar(const AttnBwdBlock* b) {
  attn_bwd_dq_block<simd::F32x1, HD, T>(*b);
}
template <int HD, class T>
void attn_bwd_dkdv_scalar(const AttnBwdBlock* b) {
  attn_bwd_dkdv_block<simd::F32x1, HD, T>(*b);
}
#if RF_HAVE_X86_SIMD
template <int HD, class T>
RF_KERNEL_AVX2 void attn_bwd_dq_avx2(const AttnBwdBlock* b) {
  attn_bwd_dq_block<simd::F32x8, HD, T>(*b);
}
template <int HD, class T>
RF_KERNEL_AVX2 void attn_bwd_dkdv_avx2(const AttnBwdBlock* b) {
  attn_bwd_dkdv_block<simd::F32x8, HD, T>(*b);
}
template <int HD, class T>
RF_KERNEL_AVX512 void attn_bwd_dq_avx512(const AttnBwdBlock* b) {
  attn_bwd_dq_block<simd::F32x16, HD, T>(*b);
}
template <int HD, class T>
RF_KERNEL_AVX512 void attn_bwd_dkdv_avx512(const AttnBwdBlock* b) {
  attn_bwd_dkdv_block<simd::F32x16, HD, T>(*b);
}
#endif

enum class AttnBwdPass { dq, dkdv };

/// Runs one block of a pass with the active ISA's body.
template <AttnBwdPass Pass, int HD, class T>
void attn_bwd_block_dispatch(Isa isa, const AttnBwdBlock* b) {
  if constexpr (Pass == AttnBwdPass::dq) {
#if RF_HAVE_X86_SIMD
    if (isa == Isa::avx512) return attn_bwd_dq_avx512<HD, T>(b);
    if (isa == Isa::avx2) return attn_bwd_dq_avx2<HD, T>(b);
#endif
    (void)isa;
    attn_bwd_dq_scalar<HD, T>(b);
  } else {
#if RF_HAVE_X86_SIMD
    if (isa == Isa::avx512) return attn_bwd_dkdv_avx512<HD, T>(b);
    if (isa == Isa::avx2) return attn_bwd_dkdv_avx2<HD, T>(b);
#endif
    (void)isa;
    attn_bwd_dkdv_scalar<HD, T>(b);
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
