// recurformer/model/sampling.hpp: picking the next token from a row of logits.
//
// Greedy (temperature <= 0) is the arg-max, ties to the lowest id. Otherwise the chain is
// llama.cpp's: keep the top_k largest logits, then the smallest prefix of them (by probability,
// computed before temperature) whose mass reaches top_p, then apply the temperature and draw from
// the renormalised distribution with a seeded std::mt19937_64, so a seed reproduces a run on every
// platform (the draw uses the generator's raw output, not std::uniform_*_distribution, whose
// results differ between standard libraries).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "recurformer/core/error.hpp"

namespace recurformer {

struct SamplingParams {
  float temperature = 0.8f;  ///< <= 0: greedy
  int top_k = 40;            ///< <= 0 or >= vocab: no top-k cut
  float top_p = 0.95f;       ///< >= 1: no nucleus cut
  uint64_t seed = 0x5eed;
};

/// The id of the largest logit (the lowest id among equal maxima). n >= 1.
int32_t argmax(const float* logits, int64_t n);

/// One candidate token of the sampling chain.
struct TokenProb {
  int32_t id;
  float p;
};

/// The tokens that survive top-k and top-p, most probable first, with their probabilities after
/// temperature (summing to 1). Temperature must be > 0.
std::vector<TokenProb> sampling_candidates(const float* logits, int64_t n,
                                           const SamplingParams& sp);

/// Stateful sampler: one per generated sequence; the seed fixes the whole run.
class Sampler {
 public:
  explicit Sampler(SamplingParams sp = {}) : sp_(sp), rng_(sp.seed) {}
  const SamplingParams& params() const { return sp_; }

  int32_t sample(const float* logits, int64_t n);

 private:
  SamplingParams sp_;
  std::mt19937_64 rng_;
};

}  // namespace recurformer
