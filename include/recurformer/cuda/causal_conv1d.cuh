// recurformer/cuda/causal_conv1d.cuh: causal_conv1d and causal_conv1d_update on a CUDA stream, the
// same params (ops/causal_conv1d.hpp) with every view in device memory.
//
// The conv has no recurrence, so prefill is one thread per (token row, channel): the K inputs a
// row needs come from x or, before the sequence starts, from the slot's conv_state. A second
// launch (stream-ordered after the first, so every read of the old state is done) writes each
// sequence's new conv_state, one thread per (sequence, channel). Decode is one thread per
// (row, channel) that reads, shifts and writes its slot's column of the state. The width K is a
// template argument (dispatched once, in conv_width_dispatch) so the taps stay in registers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/cuda/detail/convert.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/ops/causal_conv1d.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

using ConvWidths = ValueList<2, 3, 4, 5, 6, 7, 8>;
constexpr int kConvThreads = 128;

/// The sequence that token row t belongs to: the last s with cu[s] <= t (binary search).
template <class T>
__device__ __forceinline__ int64_t conv_sequence_of(const CausalConv1dParams<T>& p, int64_t t) {
  if (!p.cu_seqlens.data) return 0;
  int64_t lo = 0, hi = p.cu_seqlens.shape[0] - 2;  // sequences 0 .. S-1
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.cu_seqlens(mid) <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

/// The state slot of sequence s, or -1 for padding and slots outside the pool.
template <class T>
__device__ __forceinline__ int64_t conv_slot_of(const CausalConv1dParams<T>& p, int64_t s) {
  const int64_t slot = p.state_slots.data ? int64_t(p.state_slots(s)) : s;
  if (slot < 0 || (p.conv_state.data && slot >= p.conv_state.shape[0])) return -1;
  return slot;
}

template <class T>
__device__ __forceinline__ float conv_finish(const CausalConv1dParams<T>& p, float acc) {
  return p.activation == ConvActivation::silu ? acc * (1.f / (1.f + expf(-acc))) : acc;
}

// grid (ceil(Dch / kConvThreads), min(tokens, 65535)), rows grid-stride (grid.y is at most 65535)
template <int K, class T>
__global__ void __launch_bounds__(kConvThreads) causal_conv1d_kernel(const CausalConv1dParams<T> p) {
  const int64_t c = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
  if (c >= p.x.shape[1]) return;
  for (int64_t t = blockIdx.y; t < p.x.shape[0]; t += gridDim.y) {
    const int64_t s = conv_sequence_of(p, t);
    const int64_t slot = conv_slot_of(p, s);
    if (slot < 0) continue;
    const int64_t t0 = p.cu_seqlens.data ? recurformer::detail::clamp_index(p.cu_seqlens(s), 0, t) : 0;
    const bool history = p.conv_state.data && p.use_initial_state;
    float acc = p.bias.data ? p.bias(c) : 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int64_t tau = t - (K - 1) + i;  // the input this tap reads
      float v = 0.f;
      if (tau >= t0)
        v = load_float(p.x.ptr(tau, c));
      else if (history)  // row K-1 - (t0 - tau) of the state: the last K-1 inputs, oldest first
        v = load_float_rw(p.conv_state.ptr(slot, (K - 1) - (t0 - tau), c));
      acc += p.weight(c, i) * v;
    }
    store_float(p.y.ptr(t, c), conv_finish(p, acc));
  }
}

// grid (ceil(Dch / kConvThreads), min(S, 65535)), sequences grid-stride: the new state = the last
// K-1 of (old state ++ the sequence).
template <int K, class T>
__global__ void __launch_bounds__(kConvThreads)
    causal_conv1d_state_kernel(const CausalConv1dParams<T> p, int64_t n_seq) {
  const int64_t c = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
  if (c >= p.x.shape[1]) return;
  for (int64_t s = blockIdx.y; s < n_seq; s += gridDim.y) {
    const int64_t slot = conv_slot_of(p, s);
    if (slot < 0) continue;
    const int64_t tokens = p.x.shape[0];
    const int64_t t0 = p.cu_seqlens.data ? recurformer::detail::clamp_index(p.cu_seqlens(s), 0, tokens) : 0;
    const int64_t t1 = p.cu_seqlens.data ? recurformer::detail::clamp_index(p.cu_seqlens(s + 1), t0, tokens) : tokens;
    const int64_t len = t1 - t0;
    float window[K - 1];
#pragma unroll
    for (int i = 0; i < K - 1; ++i) {
      const int64_t j = len + i;  // index into (old state ++ sequence), old state first
      if (j >= K - 1)
        window[i] = load_float(p.x.ptr(t0 + j - (K - 1), c));
      else
        window[i] = p.use_initial_state ? load_float_rw(p.conv_state.ptr(slot, j, c)) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < K - 1; ++i) store_float(p.conv_state.ptr(slot, i, c), window[i]);
  }
}

// grid (ceil(Dch / kConvThreads), min(rows, 65535)), rows grid-stride: row t is a one-token
// sequence on its slot.
template <int K, class T>
__global__ void __launch_bounds__(kConvThreads)
    causal_conv1d_update_kernel(const CausalConv1dParams<T> p) {
  const int64_t c = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
  if (c >= p.x.shape[1]) return;
  for (int64_t t = blockIdx.y; t < p.x.shape[0]; t += gridDim.y) {
    const int64_t slot = conv_slot_of(p, t);
    if (slot < 0) continue;
    float window[K - 1];
#pragma unroll
    for (int i = 0; i < K - 1; ++i)
      window[i] = p.use_initial_state ? load_float_rw(p.conv_state.ptr(slot, i, c)) : 0.f;
    const float x = load_float(p.x.ptr(t, c));
    float acc = (p.bias.data ? p.bias(c) : 0.f) + p.weight(c, K - 1) * x;
#pragma unroll
    for (int i = 0; i < K - 1; ++i) acc += p.weight(c, i) * window[i];
    store_float(p.y.ptr(t, c), conv_finish(p, acc));
#pragma unroll
    for (int i = 0; i + 1 < K - 1; ++i) store_float(p.conv_state.ptr(slot, i, c), window[i + 1]);
    store_float(p.conv_state.ptr(slot, K - 2, c), x);
  }
}

/// The one place the conv width becomes a template argument.
template <class F>
void conv_width_dispatch(const char* op, int64_t k, F&& f) {
  dispatch_value(op, ConvWidths{}, int(k), std::forward<F>(f));
}

// The kernels stride over rows, so any count fits grid.y's 65535 (a limit here would throw in the
// middle of a hybrid layer call, after it wrote the cache).
inline dim3 conv_grid(int64_t channels, int64_t rows) {
  return dim3(unsigned((channels + kConvThreads - 1) / kConvThreads), unsigned(std::min<int64_t>(rows, 65535)));
}

}  // namespace detail
}  // namespace cuda

/// Whether causal_conv1d(p, CudaExec) runs (core/support.hpp): the kernels take every valid call
/// (K in 2..8, any row count), so this is p's check with the index arrays in device memory.
template <class T>
Support supports(const CausalConv1dParams<T>& p, CudaExec) {
  return detail::support_of([&] {
    detail::check_causal_conv1d("causal_conv1d", detail::ScanMode::scan, p, detail::IndexMemory::device);
  });
}
/// Whether causal_conv1d_update(p, CudaExec) runs.
template <class T>
Support supports_update(const CausalConv1dParams<T>& p, CudaExec) {
  return detail::support_of([&] {
    detail::check_causal_conv1d("causal_conv1d_update", detail::ScanMode::state_update, p,
                                detail::IndexMemory::device);
  });
}

/// Prefill over the packed sequences on the device.
template <class T>
void causal_conv1d(const CausalConv1dParams<T>& p, CudaExec exec) {
  detail::check_causal_conv1d("causal_conv1d", detail::ScanMode::scan, p, detail::IndexMemory::device);
  const int64_t tokens = p.x.shape[0], dch = p.x.shape[1];
  const int64_t n_seq = p.cu_seqlens.data ? p.cu_seqlens.shape[0] - 1 : 1;
  cuda::detail::conv_width_dispatch("causal_conv1d: width K", p.weight.shape[1], [&](auto k) {
    constexpr int K = decltype(k)::value;
    if (tokens > 0) {
      cuda::detail::causal_conv1d_kernel<K, T>
          <<<cuda::detail::conv_grid(dch, tokens), cuda::detail::kConvThreads, 0, exec.stream>>>(p);
      RF_CUDA_CHECK_LAUNCH("causal_conv1d_kernel");
    }
    if (p.conv_state.data && n_seq > 0) {
      cuda::detail::causal_conv1d_state_kernel<K, T>
          <<<cuda::detail::conv_grid(dch, n_seq), cuda::detail::kConvThreads, 0, exec.stream>>>(p, n_seq);
      RF_CUDA_CHECK_LAUNCH("causal_conv1d_state_kernel");
    }
  });
}

/// Decode on the device: row t is a one-token sequence on slot state_slots[t] (absent: t).
template <class T>
void causal_conv1d_update(const CausalConv1dParams<T>& p, CudaExec exec) {
  detail::check_causal_conv1d("causal_conv1d_update", detail::ScanMode::state_update, p,
                              detail::IndexMemory::device);
  const int64_t rows = p.x.shape[0];
  if (rows == 0) return;
  cuda::detail::conv_width_dispatch("causal_conv1d_update: width K", p.weight.shape[1], [&](auto k) {
    constexpr int K = decltype(k)::value;
    cuda::detail::causal_conv1d_update_kernel<K, T>
        <<<cuda::detail::conv_grid(p.x.shape[1], rows), cuda::detail::kConvThreads, 0, exec.stream>>>(p);
    RF_CUDA_CHECK_LAUNCH("causal_conv1d_update_kernel");
  });
}

}  // namespace recurformer
