// recurformer/ops/rope.hpp: rotary position embedding (RoPE), in place on packed heads.
//
//   x[t, h, :] is rotated by the angles pos[t] * inv_freq[i], i in [0, hd/2), over one of two pair
//   layouts:
//     rotate_half  (Hugging Face checkpoints, GGUF after the loader's row permutation):
//                  pairs (i, i + hd/2)
//     interleaved  (llama2.c, GGUF's raw row order): pairs (2i, 2i + 1)
//   (a, b) -> (a cos - b sin, b cos + a sin).
//
// Precision: the angle is rounded to fp32 (float(pos) * inv_freq, as transformers computes it),
// cos/sin and the rotation are fp32, and each output is rounded once to the storage type.
// (transformers rounds cos/sin to a 16-bit model dtype and rotates in it; we round only once.)
// CPU implementation: cpu/rope.hpp.
//
// Backward: the rotation is orthogonal, so dL/dx is dL/dy rotated by the opposite angles,
// (a, b) -> (a cos + b sin, b cos - a sin), in place on an fp32 gradient view:
//   RopeBackwardParams{dx, positions, inv_freq, layout}   // dx holds dL/dy on entry, dL/dx on return
//   rope_backward(p, exec)
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "recurformer/core/error.hpp"
#include "recurformer/core/index_memory.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

enum class RopeLayout { rotate_half, interleaved };

/// Frequency scaling of the inv_freq table (Hugging Face "rope_scaling").
struct RopeScaling {
  enum class Type { none, llama3 } type = Type::none;
  float factor = 8, low_freq_factor = 1, high_freq_factor = 4;
  int original_max_position = 8192;
};

/// inv_freq[i] = 1 / theta^(2i / hd), i in [0, hd/2), then the Llama-3 scaling if asked: all in
/// fp32, operation by operation as transformers' _compute_default_rope_parameters and
/// _compute_llama3_parameters do it (a / b on tensors as reciprocal(b) * a, scalars rounded to
/// fp32), so the table matches a Hugging Face model's buffer.
inline std::vector<float> rope_inv_freq(int head_dim, float theta, const RopeScaling& scaling = {}) {
  RF_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope_inv_freq: head_dim must be positive and even (got ",
           head_dim, ")");
  RF_CHECK(theta > 1.f, "rope_inv_freq: theta must be > 1 (got ", theta, ")");
  const int n_freq = head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(n_freq));
  for (int i = 0; i < n_freq; ++i) {
    const float e = float(2 * i) / float(head_dim);
    inv[size_t(i)] = 1.0f / std::pow(theta, e);
  }
  if (scaling.type == RopeScaling::Type::llama3) {
    const float factor = scaling.factor, lo = scaling.low_freq_factor, hi = scaling.high_freq_factor;
    const float old_len = float(scaling.original_max_position);
    RF_CHECK(factor > 0 && hi > lo && lo > 0 && old_len > 0,
             "rope_inv_freq: llama3 scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 "
             "and original_max_position > 0");
    const float low_freq_wavelen = float(double(scaling.original_max_position) / double(lo));
    const float high_freq_wavelen = float(double(scaling.original_max_position) / double(hi));
    const float two_pi = float(2.0 * 3.14159265358979323846);
    for (float& f : inv) {
      const float wavelen = (1.0f / f) * two_pi;
      const float scaled = wavelen > low_freq_wavelen ? f / factor : f;
      const float smooth = ((1.0f / wavelen) * old_len - lo) / (hi - lo);
      const float smoothed = ((1.0f - smooth) * scaled) / factor + smooth * scaled;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      f = medium ? smoothed : scaled;
    }
  }
  return inv;
}

template <class T>  // storage dtype: float, half or bfloat16
struct RopeParams {
  View<T, 3> x;                       // [tokens, heads, hd] rotated in place; hd even, unit stride
  View<const int32_t, 1> positions;   // [tokens] position of each token (>= 0)
  View<const float, 1> inv_freq;      // [hd/2] from rope_inv_freq
  RopeLayout layout = RopeLayout::rotate_half;
};

namespace detail {
/// The checks shared by rope and rope_backward (x: the rotated view, data or gradient).
template <class T>
void check_rope(const char* op, const char* xname, const View<T, 3>& x,
                const View<const int32_t, 1>& positions, const View<const float, 1>& inv_freq,
                IndexMemory where) {
  check_shape(op, xname, x, {-1, -1, -1});
  const int64_t tokens = x.shape[0], hd = x.shape[2];
  RF_CHECK(hd > 0 && hd % 2 == 0, op, ": ", xname, " head_dim must be positive and even (got ", hd, ")");
  check_inner_contiguous(op, xname, x);
  check_shape(op, "positions", positions, {tokens});
  check_shape(op, "inv_freq", inv_freq, {hd / 2});
  if (where == IndexMemory::device) return;
  for (int64_t t = 0; t < tokens; ++t)
    RF_CHECK(positions(t) >= 0, op, ": positions[", t, "] = ", positions(t), ", expected >= 0");
}
}  // namespace detail

/// Throws Error naming the argument unless the shapes, strides and positions are valid.
/// IndexMemory::device (the CUDA op): positions live on the device and only their shape is
/// checked (the kernel leaves a token with a negative position unrotated).
template <class T>
void check(const RopeParams<T>& p, detail::IndexMemory where = detail::IndexMemory::host) {
  detail::check_rope("rope", "x", p.x, p.positions, p.inv_freq, where);
}

struct RopeBackwardParams {
  View<float, 3> dx;                  // [tokens, heads, hd] dL/dy in, dL/dx out; hd even, unit stride
  View<const int32_t, 1> positions;   // [tokens] the forward's positions (>= 0)
  View<const float, 1> inv_freq;      // [hd/2] the forward's table
  RopeLayout layout = RopeLayout::rotate_half;
};

/// Throws Error naming the argument unless the shapes, strides and positions are valid.
inline void check(const RopeBackwardParams& p) {
  detail::check_rope("rope_backward", "dx", p.dx, p.positions, p.inv_freq, detail::IndexMemory::host);
}

}  // namespace recurformer
