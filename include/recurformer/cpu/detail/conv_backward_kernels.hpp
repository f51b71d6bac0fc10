// recurformer/cpu/detail/conv_backward_kernels.hpp: the causal conv1d backward body and its ISA
// entry points (cpu/causal_conv1d.hpp calls them).
//
// One call owns a panel of channels [c0, c1) for every token, so dweight and dbias are summed by one
// thread in token order (deterministic, no reduction across threads). Per sequence, the rows are
// swept in order, vectorised over the panel's channels (rows are contiguous over channels):
//   row r < len:  z = bias + sum_i w_i in_i (recomputed), g_r = dy * act'(z) into a ring of the last
//                 K values of g; dbias += g_r, dweight_i += g_r in_i;
//   every row r:  the input at position p = r - (K-1) has seen all its K consumers, so
//                 d_in[p] = sum_i w_i g_{r-i} (g outside [0, len) is 0: the ring starts zeroed and
//                 K-1 virtual rows past the end push zeros), written to dx (p >= 0) or to the
//                 history's gradient dconv_state (p < 0).
// Memory goes row after row as in the forward; the ring, taps and sums (a few KB) stay in L1.
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
  constexpr int W = V::width;
  constexpr int64_t P = kConvBackwardPanel;
  const int64_t pw = a.c1 - a.c0;
  alignas(64) float taps[K][P];
  alignas(64) float bias[P];
  alignas(64) float ring[K][P];  // ring[r % K] = g of row r
  alignas(64) float dw[K][P];
  alignas(64) float db[P];
  alignas(64) T zeros[P];
  std::memset(zeros, 0, sizeof zeros);  // +0 in float, half and bfloat16
  // Lanes past pw get zero taps and bias, so the last partial vector computes g = 0 there.
  for (int64_t j = 0; j < P; ++j) {
    for (int i = 0; i < K; ++i) {
      taps[i][j] = j < pw ? a.w[(a.c0 + j) * a.sw0 + i * a.sw1] : 0.f;
      dw[i][j] = 0.f;
    }
    bias[j] = a.bias && j < pw ? a.bias[a.c0 + j] : 0.f;
    db[j] = 0.f;
  }
  const size_t ring_bytes = size_t(std::min(P, (pw + W - 1) / W * W)) * sizeof(float);
  for (int64_t s = 0; s < a.seqs->count(); ++s) {
    const int64_t begin = a.seqs->begin(s), end = a.seqs->end(s), len = end - begin;
    const int64_t slot = a.seqs->slot(s);
    if (slot < 0) {  // padding: no gradient flows; dx rows are zero
      if (a.dx)
        for (int64_t t = begin; t < end; ++t) std::memset(a.dx + t * a.sdx + a.c0, 0, size_t(pw) * sizeof(float));
      continue;
    }
    for (int i = 0; i < K; ++i) std::memset(ring[i], 0, ring_bytes);
    const T* hist = a.history ? a.history + slot * a.s_hist_slot + a.c0 : nullptr;
    float* dhist = a.dhistory ? a.dhistory + slot * a.s_dhist_slot + a.c0 : nullptr;
    for (int64_t r = 0; r < len + K - 1; ++r) {
      const bool real = r < len;  // rows past the end only flush the ring with zeros
      const T* in[K];             // the row's K inputs, oldest first
      const float* dyr = nullptr;
      if (real) {
        const int64_t t = begin + r;
#pragma GCC unroll 8
        for (int i = 0; i < K; ++i) {
          const int64_t rr = r - (K - 1) + i;  // position relative to begin
          in[i] = rr >= 0 ? a.x + (begin + rr) * a.sx + a.c0
                  : hist  ? hist + (rr + K - 1) * a.s_hist
                          : zeros;
        }
        dyr = a.dy + t * a.sdy + a.c0;
      }
      const float* g[K];  // g of rows r, r-1, ..., r-K+1
#pragma GCC unroll 8
      for (int i = 0; i < K; ++i) g[i] = ring[((r - i) % K + K) % K];
      float* gr = ring[r % K];
      const int64_t p = r - (K - 1);  // the input position finished by this row
      float* dst = p >= 0 ? (a.dx ? a.dx + (begin + p) * a.sdx + a.c0 : nullptr)
                          : (dhist ? dhist + (p + K - 1) * a.s_dhist : nullptr);
      for (int64_t j = 0; j < pw; j += W) {
        const int n = int(std::min<int64_t>(W, pw - j));
        if (real) {
          V xin[K];
          V z = V::load(bias + j);
#pragma GCC unroll 8
          for (int i = 0; i < K; ++i) {
            xin[i] = simd::load_n<V>(in[i] + j, n);
            z = fma(V::load(taps[i] + j), xin[i], z);
          }
          V gv = simd::load_n<V>(dyr + j, n);
          if (a.silu) gv = gv * silu_grad(z);
          gv.store(gr + j);  // lanes past n are 0 (zero dy, taps and bias there)
          (V::load(db + j) + gv).store(db + j);
#pragma GCC unroll 8
          for (int i = 0; i < K; ++i) fma(gv, xin[i], V::load(dw[i] + j)).store(dw[i] + j);
        } else {
          V::zero().store(gr + j);
        }
        if (dst) {
          V acc = V::load(taps[0] + j) * V::load(g[0] + j);
#pragma GCC unroll 8
          for (int i = 1; i < K; ++i) acc = fma(V::load(taps[i] + j), V::load(g[i] + j), acc);
          simd::store_n(acc, dst + j, n);
        }
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
