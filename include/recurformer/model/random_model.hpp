// recurformer/model/random_model.hpp: a seeded random-weight Llama written as a Hugging Face
// directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json), so the runner
// and the tests have a real model to load without any download.
//
// The tokenizer is a genuine byte-level BPE (GPT-2 byte alphabet: 256 byte tokens, a handful of
// English merges, three special tokens) that the HF `tokenizers` library loads too. The weights are
// drawn from a std::mt19937_64 stream by raw bits, so a seed gives the same files on every platform:
// linear weights uniform with std 1/sqrt(in features) (activations stay O(1) through the layers),
// embeddings with std 0.5 (so tied-embedding logits are neither flat nor one-hot), norms 1.
// The text such a model writes is gibberish; it exists to exercise every code path at a real shape.
#pragma once

#include <cstdint>
#include <random>
#include <string>

#include "recurformer/core/dtype.hpp"

namespace recurformer {

/// Shape and seed of a random Llama.
struct RandomModelSpec {
  int n_layers = 4;
  int d_model = 256;
  int n_q = 4;
  int n_kv = 2;
  int head_dim = 64;
  int ffn = 512;
  int vocab_size = 288;   ///< >= the tokenizer's 283 tokens
  bool tie_embeddings = true;
  DType weight_dtype = DType::f32;
  uint64_t seed = 1234;
  float rope_theta = 10000.f;
  int max_position = 32768;

  /// The runner's built-in default model (small, generates at once).
  static RandomModelSpec default_model() { return {}; }
  /// SmolLM2-135M's shape (the benchmark model).
  static RandomModelSpec smollm2_135m(DType wt = DType::f32);
};

namespace detail {

/// Number of tokens in the random models' tokenizer (bytes + merges + specials).
constexpr int kRandomTokenizerSize = 256 + 22 + 3;
constexpr int kRandomBosId = 256 + 22, kRandomEosId = 256 + 22 + 1;

/// Writes `text` to a temporary sibling and renames it over `path`, so a full disk or an error
/// leaves the old file (or none), never a truncated one.
void write_text(const std::string& path, const std::string& text);

bool path_exists(const std::string& p);
/// mkdir -p.
void make_dirs(const std::string& path);

/// Seeded values, uniform with the given standard deviation, platform-independent.
struct RandomStream {
  std::mt19937_64 g;
  explicit RandomStream(uint64_t seed) : g(seed) {}
  float uniform_std(float std);  // uniform in [-a, a) has std a / sqrt(3)
};

}  // namespace detail

/// The config.json text of a random model.
std::string random_model_config_json(const RandomModelSpec& s);

/// Writes the random model into `dir` (created if needed; existing files are replaced).
void write_random_model(const std::string& dir, const RandomModelSpec& s);

/// Writes the model into `dir` unless a complete one (config.json present) is already there.
/// Returns true when it wrote.
bool ensure_random_model(const std::string& dir, const RandomModelSpec& s);

}  // namespace recurformer
