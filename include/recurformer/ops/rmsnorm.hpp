// recurformer/ops/rmsnorm.hpp: RMS normalisation of each row (Llama's LlamaRMSNorm).
//
//   y[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * weight[:]
//
// computed in fp32 (the mean of squares accumulated in fp32) and rounded to T once. HF rounds the
// normalised row to the input dtype before the weight multiply; for a 16-bit T that differs from
// this by at most one rounding of the result. y may be x itself (in place); any other overlap is
// undefined. The CPU implementation is in cpu/rmsnorm.hpp.
#pragma once

#include <cmath>
#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/exec.hpp"
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

/// y = rmsnorm(x) * weight, rows split across the pool (cpu/rmsnorm.hpp).
template <class T, class TW>
void rmsnorm(const RmsNormParams<T, TW>& p, CpuExec exec);

}  // namespace recurformer
