// recurformer/cpu/detail/conv_backward_kernels.hpp: the causal conv1d backward body and its ISA
// entry points (cpu/causal_conv1d.hpp calls them).
//
// One call owns a panel of channels [c0, c1) for every token, so dweight and dbias are summed by one
// thread in token order (deterministic, no reduction across threads). Per sequence, the rows are
// swept in order, vectorised over the panel's channels (rows are contiguous over channels):
//   row r < len:  z = bias + sum_i w_i in_i (recomputed), g_r = dy * act'(z);
//                 dbias += g_r, dweight_i += g_r in_i;
//   every row r:  the input at position p = r - (K-1) has seen all its K consumers, so
//                 d_in[p] = sum_i w_i g_{r-i} (g outside [0, len) is 0: K-1 virtual rows past the
//                 end have zero dy), written to dx (p >= 0) or to dconv_state (p < 0).
// Rows go in blocks of kConvBackwardRows; for each vector of channels the block keeps the taps,
// the dweight / dbias sums and sliding windows of the last K inputs and K values of g in
// registers, so a row costs one load of x, one of dy and one store of d_in (3K+1 FMAs): a third
// of the time of a row-at-a-time loop that went through L1 for every term. The g of the K-1 rows
// before a block carry over in a small buffer.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "recurformer/cpu/detail/scan_math.hpp"
#include "recurformer/cpu/detail/scan_sequences.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

constexpr int64_t kConvBackwardPanel = 256;  // channels per task, at most (multiple of 16)
constexpr int kConvBackwardRows = 8;          // rows per block: the windows stay in registers

/// The whole call for the channels [c0, c1), c1 - c0 <= kConvBackwardPanel.
template <class T>
struct ConvBackwardPanel {
  const T* x;              // [tokens, dch] row stride sx
  const float* dy;         // [tokens, dch] row stride sdy
  float* dx;               // [tokens, dch] row stride sdx; null: not wanted
  const float* w;          // [dch, K] strides sw0, sw1
  const float* bias;       // [dch]; null: none
  float* dw;               // [dch, K] strides sdw0, sdw1; null: not wanted
  float* db;               // [dch]; null: not wanted
  const T* history;        // [slots, K-1, dch] strides s_hist_slot, s_hist; null: zeros
  float* dhistory;         // [slots, K-1, dch] strides s_dhist_slot, s_dhist; null: not wanted
  const PackedSequences* seqs;
  int64_t sx, sdy, sdx, sw0, sw1, sdw0, sdw1, s_hist_slot, s_hist, s_dhist_slot, s_dhist, c0, c1;
  bool silu;
};

// d/dz silu(z) = s (1 + z (1 - s)), s = sigmoid(z).
template <class V>
V silu_grad(V z) {
  const V one = V::broadcast(1.f);
  const V s = simd::div(one, one + exp(V::zero() - z));
  return s * fma(z, one - s, one);
}

template <int K, class V, class T>
void conv_backward_panel(const ConvBackwardPanel<T>& a) {
  constexpr int W = V::width, RB = kConvBackwardRows;
  constexpr int64_t P = kConvBackwardPanel;
  const int64_t pw = a.c1 - a.c0;
  alignas(64) float taps[K][P];
  alignas(64) float bias[P];
  alignas(64) float gprev[K - 1][P];  // g of the K-1 rows before the current block
  alignas(64) float dw[K][P];
  alignas(64) float db[P];
  alignas(64) T zeros[P];
  alignas(64) float fzeros[P];
  alignas(64) float discard[P];  // where d_in goes when nobody wants it
  std::memset(zeros, 0, sizeof zeros);  // +0 in float, half and bfloat16
  std::memset(fzeros, 0, sizeof fzeros);
  // Lanes past pw get zero taps and bias, so the last partial vector computes g = 0 there.
  for (int64_t j = 0; j < P; ++j) {
    for (int i = 0; i < K; ++i) {
      taps[i][j] = j < pw ? a.w[(a.c0 + j) * a.sw0 + i * a.sw1] : 0.f;
      dw[i][j] = 0.f;
    }
    bias[j] = a.bias && j < pw ? a.bias[a.c0 + j] : 0.f;
    db[j] = 0.f;
  }
  const size_t panel_bytes = size_t(std::min(P, (pw + W - 1) / W * W)) * sizeof(float);
  for (int64_t s = 0; s < a.seqs->count(); ++s) {
    const int64_t begin = a.seqs->begin(s), end = a.seqs->end(s), len = end - begin;
    const int64_t slot = a.seqs->slot(s);
    if (slot < 0) {  // padding: no gradient flows; dx rows are zero
      if (a.dx)
        for (int64_t t = begin; t < end; ++t) std::memset(a.dx + t * a.sdx + a.c0, 0, size_t(pw) * sizeof(float));
      continue;
    }
    for (int i = 0; i < K - 1; ++i) std::memset(gprev[i], 0, panel_bytes);
    const T* hist = a.history ? a.history + slot * a.s_hist_slot + a.c0 : nullptr;
    float* dhist = a.dhistory ? a.dhistory + slot * a.s_dhist_slot + a.c0 : nullptr;
    // Rows in blocks of RB; row r reads input position r (and the K-1 before it) and finishes
    // position r - (K-1). Rows r >= len are virtual: zero dy (so g = 0), zero input.
    for (int64_t r0 = 0; r0 < len + K - 1; r0 += RB) {
      const int nr = int(std::min<int64_t>(RB, len + K - 1 - r0));
      const T* in[RB + K - 1];  // input positions r0-K+1 .. r0+nr-1
      const float* dyr[RB];
      float* dst[RB];
      for (int q = 0; q < nr + K - 1; ++q) {
        const int64_t pos = r0 - (K - 1) + q;
        in[q] = pos >= len ? zeros
                : pos >= 0 ? a.x + (begin + pos) * a.sx + a.c0
                : hist     ? hist + (pos + K - 1) * a.s_hist
                           : zeros;
      }
      for (int q = 0; q < nr; ++q) {
        const int64_t r = r0 + q, p = r - (K - 1);
        dyr[q] = r < len ? a.dy + (begin + r) * a.sdy + a.c0 : fzeros;
        float* d = p >= 0 ? (a.dx ? a.dx + (begin + p) * a.sdx + a.c0 : nullptr)
                          : (dhist ? dhist + (p + K - 1) * a.s_dhist : nullptr);
        dst[q] = d ? d : discard;
      }
      for (int64_t j = 0; j < pw; j += W) {
        const int n = int(std::min<int64_t>(W, pw - j));
        V w[K], xw[K], gw[K], dwv[K];  // windows: xw[K-1] / gw[K-1] are the newest row's
#pragma GCC unroll 8
        for (int i = 0; i < K; ++i) {
          w[i] = V::load(taps[i] + j);
          dwv[i] = V::load(dw[i] + j);
        }
#pragma GCC unroll 8
        for (int i = 0; i < K - 1; ++i) {
          xw[i] = simd::load_n<V>(in[i] + j, n);
          gw[i] = V::load(gprev[i] + j);
        }
        const V b = V::load(bias + j);
        V dbv = V::load(db + j);
        for (int q = 0; q < nr; ++q) {
          xw[K - 1] = simd::load_n<V>(in[q + K - 1] + j, n);
          V z = b;
#pragma GCC unroll 8
          for (int i = 0; i < K; ++i) z = fma(w[i], xw[i], z);
          V g = simd::load_n<V>(dyr[q] + j, n);
          if (a.silu) g = g * silu_grad(z);
          gw[K - 1] = g;
          dbv = dbv + g;
          V d = w[0] * gw[K - 1];
#pragma GCC unroll 8
          for (int i = 0; i < K; ++i) {
            dwv[i] = fma(g, xw[i], dwv[i]);
            if (i > 0) d = fma(w[i], gw[K - 1 - i], d);
          }
          simd::store_n(d, dst[q] + j, n);
#pragma GCC unroll 8
          for (int i = 0; i < K - 1; ++i) {
            xw[i] = xw[i + 1];
            gw[i] = gw[i + 1];
          }
        }
#pragma GCC unroll 8
        for (int i = 0; i < K; ++i) dwv[i].store(dw[i] + j);
#pragma GCC unroll 8
        for (int i = 0; i < K - 1; ++i) gw[i].store(gprev[i] + j);  // lanes past n are 0
        dbv.store(db + j);
      }
    }
  }
  for (int64_t j = 0; j < pw; ++j) {
    if (a.dw)
      for (int i = 0; i < K; ++i) a.dw[(a.c0 + j) * a.sdw0 + i * a.sdw1] = dw[i][j];
    if (a.db) a.db[a.c0 + j] = db[j];
  }
}

template <int K, class T>
void conv_backward_scalar(const ConvBackwardPanel<T>& a) {
  conv_backward_panel<K, simd::F32x1>(a);
}
#if RF_HAVE_X86_SIMD
template <int K, class T>
RF_KERNEL_AVX2 void conv_backward_avx2(const ConvBackwardPanel<T>& a) {
  conv_backward_panel<K, simd::F32x8>(a);
}
template <int K, class T>
RF_KERNEL_AVX512 void conv_backward_avx512(const ConvBackwardPanel<T>& a) {
  conv_backward_panel<K, simd::F32x16>(a);
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
