// recurformer/train/adamw.hpp: AdamW over one flat fp32 parameter buffer, the learning-rate schedule
// (linear warmup, cosine decay) and global-norm gradient clipping that the trainers share.
//
// Parameters live in one contiguous fp32 vector (the trainer lays its tensors out in it), so one
// update loop serves every tensor; `segments` give ranges their own learning-rate scale and weight
// decay (e.g. pretrained projection rows train slower than the new recurrent tensors, and a scale
// of 0 freezes a range). The moments are fp32, as in PyTorch's AdamW; the update is
//   m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2,
//   p -= lr_t * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + lr_t * wd * p
// with decoupled weight decay (Loshchilov & Hutter) and lr_t = lr * scale * schedule(t).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "recurformer/core/error.hpp"
#include "recurformer/core/exec.hpp"

namespace recurformer {

/// A range [begin, end) of the flat parameters with its learning-rate scale and weight decay.
struct AdamWSegment {
  int64_t begin = 0, end = 0;
  float lr_scale = 1.f;     ///< 0 freezes the range
  float weight_decay = 0.f;
};

struct AdamWConfig {
  float lr = 1e-3f;  ///< peak learning rate
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
};

/// Linear warmup over `warmup` steps to 1, then cosine decay to `final_fraction` at `total` steps.
inline double warmup_cosine(int64_t step, int64_t warmup, int64_t total, double final_fraction = 0.1) {
  RF_CHECK(total >= 1 && warmup >= 0, "warmup_cosine: total must be >= 1 and warmup >= 0, got ", total, ", ", warmup);
  if (step < warmup) return double(step + 1) / double(warmup + 1);
  const double t = total > warmup ? std::min(1.0, double(step - warmup) / double(total - warmup)) : 1.0;
  return final_fraction + (1 - final_fraction) * 0.5 * (1 + std::cos(3.14159265358979323846 * t));
}

/// Scales g so its L2 norm is at most max_norm (max_norm <= 0: no clipping). Returns the norm before.
inline double clip_grad_norm(std::vector<float>& g, double max_norm) {
  double s = 0;
  for (float x : g) s += double(x) * x;
  const double norm = std::sqrt(s);
  if (max_norm > 0 && norm > max_norm) {
    const float k = float(max_norm / (norm + 1e-12));
    for (float& x : g) x *= k;
  }
  return norm;
}

class AdamW {
 public:
  /// `n` parameters; ranges not covered by a segment train at scale 1 without weight decay.
  AdamW(int64_t n, AdamWConfig cfg, std::vector<AdamWSegment> segments = {})
      : cfg_(cfg), m_(size_t(n), 0.f), v_(size_t(n), 0.f), scale_(size_t(n), 1.f), decay_(size_t(n), 0.f) {
    RF_CHECK(n >= 0, "AdamW: negative parameter count ", n);
    RF_CHECK(cfg.lr >= 0 && cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1 && cfg.eps > 0,
             "AdamW: lr >= 0, betas in [0, 1) and eps > 0 are required");
    for (const AdamWSegment& s : segments) {
      RF_CHECK(s.begin >= 0 && s.begin <= s.end && s.end <= n, "AdamW: segment [", s.begin, ", ", s.end,
               ") is outside the ", n, " parameters");
      std::fill(scale_.begin() + s.begin, scale_.begin() + s.end, s.lr_scale);
      std::fill(decay_.begin() + s.begin, decay_.begin() + s.end, s.weight_decay);
    }
  }
  int64_t steps() const { return t_; }
  /// The moments, to save a run; restore() puts them back with the step count, so a resumed run
  /// continues bit for bit.
  const std::vector<float>& first_moment() const { return m_; }
  const std::vector<float>& second_moment() const { return v_; }
  void restore(const std::vector<float>& m, const std::vector<float>& v, int64_t t) {
    RF_CHECK(m.size() == m_.size() && v.size() == v_.size() && t >= 0, "AdamW: restoring ", m.size(), " / ", v.size(),
             " moments into an optimiser of ", m_.size(), " parameters");
    m_ = m, v_ = v, t_ = t;
  }

  /// One update of `p` with gradient `g` at learning-rate multiplier `lr_mult` (the schedule's value).
  void step(std::vector<float>& p, const std::vector<float>& g, double lr_mult, CpuExec exec = {}) {
    RF_CHECK(p.size() == m_.size() && g.size() == m_.size(), "AdamW: parameters (", p.size(), ") and gradient (",
             g.size(), ") must both have ", m_.size(), " values");
    ++t_;
    const double lr = double(cfg_.lr) * lr_mult;
    const float b1 = cfg_.beta1, b2 = cfg_.beta2, eps = cfg_.eps;
    const float c1 = float(1 / (1 - std::pow(double(b1), double(t_)))), c2 = float(1 / (1 - std::pow(double(b2), double(t_))));
    exec.parallel_for(int64_t(p.size()), [&](int64_t begin, int64_t end, int) {
      for (int64_t i = begin; i < end; ++i) {
        const float gi = g[size_t(i)];
        float& m = m_[size_t(i)];
        float& v = v_[size_t(i)];
        m = b1 * m + (1 - b1) * gi;
        v = b2 * v + (1 - b2) * gi * gi;
        const float lr_i = float(lr) * scale_[size_t(i)];
        p[size_t(i)] -= lr_i * (m * c1 / (std::sqrt(v * c2) + eps) + decay_[size_t(i)] * p[size_t(i)]);
      }
    });
  }

 private:
  AdamWConfig cfg_;
  std::vector<float> m_, v_, scale_, decay_;
  int64_t t_ = 0;
};

}  // namespace recurformer
