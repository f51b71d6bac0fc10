// recurformer/cpu/detail/conv_kernels.hpp: the causal conv1d kernel body and its ISA entry points.
//
// One call runs a block of up to V::width channels over the tokens of one sequence, vectorised over
// the channels (x and y rows are contiguous over channels). The width K is a template argument, so
// the K taps and the sliding window of the last K-1 inputs live in registers across the token loop:
// per token one load, K fmas, one store. The window starts as the slot's conv_state (or zeros) and
// ends as the new conv_state.
#pragma once

#include <cstdint>

#include "recurformer/cpu/detail/scan_math.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

/// One task: channels [c0, c0 + nc) over tokens [t0, t1). Pointers already offset to channel c0.
template <class T>
struct ConvBlock {
  const T* x;          // [tokens, *] token stride sx
  T* y;                // [tokens, *] token stride sy
  const float* w;      // [nc, K] row stride sw
  const float* bias;   // [nc] optional
  T* state;            // [K-1, *] row stride s_state; null: no conv_state
  int64_t sx, sy, sw, s_state, t0, t1;
  int nc;
  bool silu, use_initial_state;
};

template <int K, class V, class T>
void conv_block(const ConvBlock<T>& a) {
  constexpr int W = V::width;
  const int nc = a.nc;
  V w[K], win[K - 1];
  for (int i = 0; i < K; ++i) {
    alignas(64) float tap[W] = {};
    for (int j = 0; j < nc; ++j) tap[j] = a.w[j * a.sw + i];
    w[i] = V::load(tap);
  }
  for (int i = 0; i < K - 1; ++i)
    win[i] = a.state && a.use_initial_state ? simd::load_n<V>(a.state + i * a.s_state, nc) : V::zero();
  const V bias = a.bias ? simd::load_n<V>(a.bias, nc) : V::zero();
  for (int64_t t = a.t0; t < a.t1; ++t) {
    const V xt = simd::load_n<V>(a.x + t * a.sx, nc);
    V acc = fma(w[K - 1], xt, bias);
    for (int i = 0; i < K - 1; ++i) acc = fma(w[i], win[i], acc);
    for (int i = 0; i + 1 < K - 1; ++i) win[i] = win[i + 1];
    win[K - 2] = xt;
    if (a.silu) acc = simd::silu(acc);
    simd::store_n(acc, a.y + t * a.sy, nc);
  }
  if (a.state)
    for (int i = 0; i < K - 1; ++i) simd::store_n(win[i], a.state + i * a.s_state, nc);
}

template <int K, class T>
void conv_block_scalar(const ConvBlock<T>& a) {
  conv_block<K, simd::F32x1>(a);
}
#if RF_HAVE_X86_SIMD
template <int K, class T>
RF_KERNEL_AVX2 void conv_block_avx2(const ConvBlock<T>& a) {
  conv_block<K, simd::F32x8>(a);
}
template <int K, class T>
RF_KERNEL_AVX512 void conv_block_avx512(const ConvBlock<T>& a) {
  conv_block<K, simd::F32x16>(a);
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
