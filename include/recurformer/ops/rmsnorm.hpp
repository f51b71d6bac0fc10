// recurformer/ops/rmsnorm.hpp: RMS normalisation of each row (Llama's LlamaRMSNorm).
//
//   y[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * weight[:]
//
// computed in fp32 (the mean of squares accumulated in fp32) and rounded to T once. HF rounds the
// normalised row to the input dtype before the weight multiply; for a 16-bit T that differs from
// this by at most one rounding of the result. y may be x itself (in place); any other overlap is
// undefined. The CPU implementation is in cpu/rmsnorm.hpp.
//
// Backward (fp32 gradients, fp32 arithmetic), with r[t] = rsqrt(mean(x[t, :]^2) + eps):
//
//   dx[t, i]    = r[t] * dy[t, i] * weight[i] - x[t, i] * r[t]^3 / d * sum_j dy[t, j] weight[j] x[t, j]
//   dweight[i] (+)= sum_t dy[t, i] * x[t, i] * r[t]
//
// API:
//   RmsNormBackwardParams<T, TW>{x, weight, dy, dx, dweight, eps, accumulate}
//   rmsnorm_backward_workspace_bytes(p)              // 8 bytes per token (r and the row's dot term)
//   rmsnorm_backward(p, exec, workspace, bytes)      // dx written (may equal dy); dweight = or +=
// dweight's sum over tokens runs in token order whatever the thread count (bit-reproducible).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

template <class T, class TW>
struct RmsNormParams {
  View<const T, 2> x;        // [tokens, d]
  View<const TW, 1> weight;  // [d]
  View<T, 2> y;              // [tokens, d]  (may equal x)
  float eps = 1e-5f;
};

/// Throws Error unless p is a valid rmsnorm call.
template <class T, class TW>
void check(const RmsNormParams<T, TW>& p) {
  constexpr const char* op = "rmsnorm";
  detail::check_shape(op, "x", p.x, {-1, -1});
  const int64_t tokens = p.x.shape[0], d = p.x.shape[1];
  RF_CHECK(d >= 1, op, ": x must have at least one column");
  detail::check_shape(op, "weight", p.weight, {d});
  detail::check_shape(op, "y", p.y, {tokens, d});
  detail::check_inner_contiguous(op, "x", p.x);
  detail::check_inner_contiguous(op, "weight", p.weight);
  detail::check_inner_contiguous(op, "y", p.y);
  RF_CHECK(std::isfinite(p.eps) && p.eps >= 0.f, op, ": eps must be finite and >= 0, got ", p.eps);
}

template <class T, class TW>
struct RmsNormBackwardParams {
  View<const T, 2> x;         // [tokens, d] the forward's input
  View<const TW, 1> weight;   // [d]
  View<const float, 2> dy;    // [tokens, d] dL/dy
  View<float, 2> dx;          // [tokens, d] dL/dx, written (may equal dy; no other overlap)
  View<float, 1> dweight;     // [d] dL/dweight; optional (absent: not computed)
  float eps = 1e-5f;
  bool accumulate = false;    // dweight += (true) or dweight = (false)
};

/// Throws Error unless p is a valid rmsnorm_backward call (the workspace is checked by the call).
template <class T, class TW>
void check(const RmsNormBackwardParams<T, TW>& p) {
  constexpr const char* op = "rmsnorm_backward";
  detail::check_shape(op, "x", p.x, {-1, -1});
  const int64_t tokens = p.x.shape[0], d = p.x.shape[1];
  RF_CHECK(d >= 1, op, ": x must have at least one column");
  detail::check_shape(op, "weight", p.weight, {d});
  detail::check_shape(op, "dy", p.dy, {tokens, d});
  detail::check_shape(op, "dx", p.dx, {tokens, d});
  detail::check_optional_shape(op, "dweight", p.dweight, {d});
  detail::check_inner_contiguous(op, "x", p.x);
  detail::check_inner_contiguous(op, "weight", p.weight);
  detail::check_inner_contiguous(op, "dy", p.dy);
  detail::check_inner_contiguous(op, "dx", p.dx);
  detail::check_inner_contiguous(op, "dweight", p.dweight);
  RF_CHECK(p.dx.data != p.dy.data || p.dx.stride[0] == p.dy.stride[0], op,
           ": dx may equal dy only with the same row stride");
  RF_CHECK(std::isfinite(p.eps) && p.eps >= 0.f, op, ": eps must be finite and >= 0, got ", p.eps);
}

/// Scratch bytes rmsnorm_backward needs: two floats per token.
template <class T, class TW>
size_t rmsnorm_backward_workspace_bytes(const RmsNormBackwardParams<T, TW>& p) {
  check(p);
  return size_t(p.x.shape[0]) * 2 * sizeof(float);
}

}  // namespace recurformer
