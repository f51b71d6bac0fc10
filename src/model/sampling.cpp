// src/model/sampling.cpp: greedy arg-max and llama.cpp's top-k / top-p / temperature chain with a
// seeded draw.
#include "recurformer/model/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace recurformer {

/// The id of the largest logit (the lowest id among equal maxima). n >= 1.
int32_t argmax(const float* logits, int64_t n) {
  RF_CHECK(n >= 1, "argmax: empty logits row");
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return int32_t(best);
}

/// The tokens that survive top-k and top-p, most probable first, with their probabilities after
/// temperature (summing to 1). Temperature must be > 0.
std::vector<TokenProb> sampling_candidates(const float* logits, int64_t n,
                                           const SamplingParams& sp) {
  RF_CHECK(n >= 1, "sampling: empty logits row");
  RF_CHECK(sp.temperature > 0, "sampling: candidates need temperature > 0 (got ", sp.temperature, ")");
  RF_CHECK(std::isfinite(sp.top_p), "sampling: top_p must be finite");
  std::vector<TokenProb> c(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) c[size_t(i)] = {int32_t(i), logits[i]};
  auto by_logit = [](const TokenProb& a, const TokenProb& b) {
    return a.p > b.p || (a.p == b.p && a.id < b.id);
  };
  const size_t k = sp.top_k > 0 && sp.top_k < n ? size_t(sp.top_k) : size_t(n);
  std::partial_sort(c.begin(), c.begin() + std::ptrdiff_t(k), c.end(), by_logit);
  c.resize(k);
  // top-p on the untempered distribution of the top-k survivors (as llama.cpp).
  if (sp.top_p < 1.f) {
    const float mx = c[0].p;
    double z = 0;
    for (const auto& t : c) z += std::exp(double(t.p) - mx);
    double cum = 0;
    size_t keep = c.size();
    for (size_t i = 0; i < c.size(); ++i) {
      cum += std::exp(double(c[i].p) - mx) / z;
      if (cum >= double(sp.top_p)) {
        keep = i + 1;
        break;
      }
    }
    c.resize(std::max<size_t>(keep, 1));
  }
  const float mx = c[0].p;
  double z = 0;
  for (auto& t : c) {
    const double e = std::exp((double(t.p) - mx) / sp.temperature);
    t.p = float(e);
    z += e;
  }
  for (auto& t : c) t.p = float(double(t.p) / z);
  return c;
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (!(sp_.temperature > 0)) return argmax(logits, n);
  const auto c = sampling_candidates(logits, n, sp_);
  // 53 random bits -> [0, 1), the same on every standard library.
  const double u = double(rng_() >> 11) * (1.0 / 9007199254740992.0);
  double cum = 0;
  for (const auto& t : c) {
    cum += t.p;
    if (u < cum) return t.id;
  }
  return c.back().id;  // u within rounding of 1
}

}  // namespace recurformer
