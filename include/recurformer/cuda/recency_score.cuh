// recurformer/cuda/recency_score.cuh: recency_score (ops/recency_score.hpp) on a CUDA stream: q,
// k and the [n_q] RecencyHeadStats array in device memory (accumulated into, like the CPU op).
//
// One block per query head; its warps take the scored queries t = w + warp, w + warp + 8, ...
// For a query the lanes stride over the causal keys with a per-lane online softmax (max in fp32,
// the sums of exp(s - m) and of exp(s - m) * j in double, as the CPU op keeps them), combined by
// warp shuffles into the row's log-sum-exp and mean key index; then the window and sink logits are
// recomputed and normalised by it. Each warp adds its rows in token order and the block adds its
// warps in order, so the result is deterministic: no atomics. (A calibration pass, so one block
// per head is enough parallelism: n_q blocks of 8 warps.)
#pragma once

#include <cmath>
#include <cstdint>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/cuda/detail/convert.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/ops/recency_score.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

constexpr int kRecencyWarps = 8;

__device__ __forceinline__ double warp_sum_double(double x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class T, int HD>
__device__ __forceinline__ float recency_logit(const float* q, const T* k) {
  float s = 0.f;
#pragma unroll 8
  for (int d = 0; d < HD; ++d) s += q[d] * load_float(k + d);
  return s;
}

// grid n_q, block 32 * kRecencyWarps.
template <class T, int HD>
__global__ void __launch_bounds__(32 * kRecencyWarps)
    recency_score_kernel(const RecencyScoreParams<T> p, float scale) {
  __shared__ float qs[kRecencyWarps][HD];
  __shared__ double partial[kRecencyWarps][3];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t h = blockIdx.x, T_ = p.q.shape[0], kh = h / (p.q.shape[1] / p.k.shape[1]);
  double sum_r = 0, sum_sink = 0, sum_dist = 0;  // this warp's rows (lane 0's copy is used)
  for (int64_t t = p.window + warp; t < T_; t += kRecencyWarps) {
    for (int d = lane; d < HD; d += 32) qs[warp][d] = load_float(p.q.ptr(t, h, d)) * scale;
    __syncwarp();
    float m = -INFINITY;
    double l = 0, lj = 0;
    for (int64_t j = lane; j <= t; j += 32) {
      const float s = recency_logit<T, HD>(qs[warp], p.k.ptr(j, kh, 0));
      if (s > m) {
        const double alpha = double(expf(m - s));  // 0 on the first key
        l *= alpha, lj *= alpha, m = s;
      }
      const double e = double(expf(s - m));
      l += e, lj += e * double(j);
    }
    float M = m;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const double w = m == -INFINITY ? 0.0 : double(expf(m - M));  // lanes without keys add 0
    l = warp_sum_double(l * w);
    lj = warp_sum_double(lj * w);
    const float lse = M + float(log(l));
    // Window [t - w + 1, t] and sink [0, min(sink_tokens, t + 1)) masses.
    const int64_t w0 = t - p.window + 1 > 0 ? t - p.window + 1 : 0;
    const int64_t s1 = p.sink_tokens < t + 1 ? p.sink_tokens : t + 1;
    double win = 0, sink = 0;
    for (int64_t j = w0 + lane; j <= t; j += 32)
      win += double(expf(recency_logit<T, HD>(qs[warp], p.k.ptr(j, kh, 0)) - lse));
    for (int64_t j = lane; j < s1; j += 32)
      sink += double(expf(recency_logit<T, HD>(qs[warp], p.k.ptr(j, kh, 0)) - lse));
    win = warp_sum_double(win);
    sink = warp_sum_double(sink);
    sum_r += win, sum_sink += sink, sum_dist += double(t) - lj / l;
    __syncwarp();  // qs[warp] is rewritten for the next row
  }
  if (lane == 0) partial[warp][0] = sum_r, partial[warp][1] = sum_sink, partial[warp][2] = sum_dist;
  __syncthreads();
  if (threadIdx.x == 0) {
    RecencyHeadStats& st = p.stats(h);
    for (int i = 0; i < kRecencyWarps; ++i) {
      st.recency_sum += partial[i][0];
      st.sink_sum += partial[i][1];
      st.distance_sum += partial[i][2];
    }
    st.queries += T_ - p.window;
  }
}

}  // namespace detail
}  // namespace cuda

/// Whether recency_score(p, CudaExec) runs (core/support.hpp): p's check (which asks for a head_dim
/// of AttentionHeadDims, the kernel's dispatch list).
template <class T>
Support supports(const RecencyScoreParams<T>& p, CudaExec) {
  return detail::support_of([&] { check(p); });
}

/// Adds one calibration sequence's statistics to p.stats on the device (see ops/recency_score.hpp).
/// Calls check(p) first (it reads shapes only); head_dim must be in AttentionHeadDims.
template <class T>
void recency_score(const RecencyScoreParams<T>& p, CudaExec exec) {
  check(p);
  const float scale = p.scale > 0 ? p.scale : float(1.0 / std::sqrt(double(p.q.shape[2])));
  detail::dispatch_attention_head_dim("recency_score: head_dim", p.q.shape[2], [&](auto hd) {
    if (p.q.shape[0] <= p.window || p.q.shape[1] == 0) return;  // no scored query: stats unchanged
    cuda::detail::recency_score_kernel<T, decltype(hd)::value>
        <<<unsigned(p.q.shape[1]), 32 * cuda::detail::kRecencyWarps, 0, exec.stream>>>(p, scale);
    RF_CUDA_CHECK_LAUNCH("recency_score_kernel");
  });
}

}  // namespace recurformer
