// recurformer/cpu/detail/conv_kernels.hpp: the causal conv1d kernel body and its ISA entry points.
//
// Each output row depends only on K input rows, so unlike the scan the conv parallelises over
// tokens: one call computes the packed rows [t0, t1) (across sequence boundaries), vectorised over
// channels (rows are contiguous over channels). Channels go in panels of kConvPanel: the panel's K
// taps are transposed once into a stack buffer (up to 64 KB), then the rows are swept in order, each row reading
// its K inputs from x (the K-1 older ones are L1 hits: they were the previous rows' inputs), from
// the sequence's history (the slot's conv_state) or from zeros. Memory is read row after row, which
// the prefetchers follow; per output vector: K loads, K fmas, one store. K is a template argument.
// Writing the new conv_state is a separate pass (run after every row has read the old one).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "recurformer/cpu/detail/scan_math.hpp"
#include "recurformer/cpu/detail/scan_sequences.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

constexpr int64_t kConvPanel = 2048;  // channels per panel: long row segments for the prefetchers (taps: K x 8 KB)

/// Packed rows [t0, t1); s0 is the sequence that holds row t0.
template <class T>
struct ConvRows {
  const T* x;          // [tokens, dch] row stride sx
  T* y;                // [tokens, dch] row stride sy
  const float* w;      // [dch, K] row stride sw
  const float* bias;   // [dch] optional
  const T* history;    // [slots, K-1, dch] strides s_hist_slot, s_hist: the inputs before each
                       // sequence start; null: zeros
  const PackedSequences* seqs;
  int64_t sx, sy, sw, s_hist_slot, s_hist, dch, s0, t0, t1;
  bool silu;
};

template <int K, class V, class T>
void conv_rows(const ConvRows<T>& a) {
  constexpr int W = V::width;
  alignas(64) float taps[K][kConvPanel];
  alignas(64) float bias[kConvPanel];
  alignas(64) T zeros[kConvPanel];
  std::memset(zeros, 0, sizeof zeros);  // +0 in float, half and bfloat16
  for (int64_t p0 = 0; p0 < a.dch; p0 += kConvPanel) {
    const int64_t pw = std::min(kConvPanel, a.dch - p0);
    for (int64_t j = 0; j < pw; ++j) {
      for (int i = 0; i < K; ++i) taps[i][j] = a.w[(p0 + j) * a.sw + i];
      bias[j] = a.bias ? a.bias[p0 + j] : 0.f;
    }
    int64_t s = a.s0;
    for (int64_t t = a.t0; t < a.t1; ++t) {
      while (a.seqs->end(s) <= t) ++s;
      const int64_t slot = a.seqs->slot(s), begin = a.seqs->begin(s);
      if (slot < 0) continue;  // padding
      const T* in[K];  // the panel's K input rows, oldest first
#pragma GCC unroll 8
      for (int i = 0; i < K; ++i) {
        const int64_t tt = t - (K - 1) + i;
        in[i] = tt >= begin    ? a.x + tt * a.sx + p0
                : a.history    ? a.history + slot * a.s_hist_slot + (tt - begin + K - 1) * a.s_hist + p0
                               : zeros;
      }
      T* out = a.y + t * a.sy + p0;
      int64_t j = 0;
      for (; j + W <= pw; j += W) {
        V acc = V::load(bias + j);
#pragma GCC unroll 8
        for (int i = 0; i < K; ++i) acc = fma(V::load(taps[i] + j), V::load(in[i] + j), acc);
        if (a.silu) acc = simd::silu(acc);
        acc.store(out + j);
      }
      if (j < pw) {
        const int nc = int(pw - j);
        V acc = V::load(bias + j);
#pragma GCC unroll 8
        for (int i = 0; i < K; ++i) acc = fma(V::load(taps[i] + j), V::load_partial(in[i] + j, nc), acc);
        if (a.silu) acc = simd::silu(acc);
        acc.store_partial(out + j, nc);
      }
    }
  }
}

template <int K, class T>
void conv_rows_scalar(const ConvRows<T>& a) {
  conv_rows<K, simd::F32x1>(a);
}
#if RF_HAVE_X86_SIMD
template <int K, class T>
RF_KERNEL_AVX2 void conv_rows_avx2(const ConvRows<T>& a) {
  conv_rows<K, simd::F32x8>(a);
}
template <int K, class T>
RF_KERNEL_AVX512 void conv_rows_avx512(const ConvRows<T>& a) {
  conv_rows<K, simd::F32x16>(a);
}
#endif

/// The new conv_state of one sequence: the last K-1 rows of its history (kept in `state`, or zeros
/// when it is not used) followed by its rows x[begin, end). Row i takes history row i + len >= i,
/// so updating in place front to back reads every history row before it is overwritten.
template <class T>
void write_conv_state(T* state, int64_t s_state, const T* x, int64_t sx, int64_t dch, int64_t k,
                      int64_t begin, int64_t end, bool use_history) {
  const int64_t len = end - begin;
  if (len == 0 && use_history) return;  // an empty sequence keeps its history as it is
  for (int64_t i = 0; i < k - 1; ++i) {
    T* dst = state + i * s_state;
    const int64_t tt = end - (k - 1) + i;
    if (tt >= begin)
      std::memcpy(dst, x + tt * sx, size_t(dch) * sizeof(T));
    else if (use_history)
      std::memcpy(dst, state + (i + len) * s_state, size_t(dch) * sizeof(T));
    else
      std::memset(dst, 0, size_t(dch) * sizeof(T));  // +0 in float, half and bfloat16
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
