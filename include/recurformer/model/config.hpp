// recurformer/model/config.hpp: the model hyper-parameters (ModelConfig) of a Llama-family
// checkpoint, parsed from a Hugging Face config.json (model_type llama / mistral / qwen2: Llama 2/3,
// SmolLM/SmolLM2, TinyLlama, Qwen2/2.5), with the optional "recurformer" object of spec section 7,
// and written back. GGUF metadata becomes a ModelConfig in checkpoint.hpp (model_config_from_gguf).
//
// Everything is validated here, once, so the model code can trust the numbers: n_q % n_kv == 0,
// hidden % n_q when head_dim is absent, the head layout's size and group indices, d_state == head_dim
// (version 1). Errors are one line: "SOURCE: problem".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "recurformer/core/error.hpp"
#include "recurformer/core/head_layout.hpp"
#include "recurformer/model/detail/json_util.hpp"
#include "recurformer/ops/rope.hpp"

namespace recurformer {

/// The "recurformer" object of a converted checkpoint (spec section 7).
struct RecurFormerConfig {
  int version = 1;
  RecurrentConfig recurrent;                           ///< d_state, dt_rank, conv_kernel
  int recency_window = 16;                             ///< tokens a recurrent group is fitted to (diagnostic)
  StreamingConfig streaming;                           ///< sink, window
  HeadLayout layout;                                   ///< one LayerLayout of n_kv groups per layer
  std::vector<std::vector<float>> recency_scores;      ///< [layers][n_kv], empty when absent
};

bool operator==(const RecurFormerConfig& a, const RecurFormerConfig& b);
bool operator!=(const RecurFormerConfig& a, const RecurFormerConfig& b);

/// Hyper-parameters of a Llama-family decoder.
struct ModelConfig {
  std::string architecture;         ///< "llama" (also mistral-style configs) or "qwen2"
  int vocab_size = 0;
  int d_model = 0;                  ///< hidden_size
  int n_layers = 0;                 ///< num_hidden_layers
  int n_q = 0;                      ///< num_attention_heads
  int n_kv = 0;                     ///< num_key_value_heads (n_q when absent)
  int head_dim = 0;                 ///< head_dim, or hidden_size / n_q when absent
  int ffn = 0;                      ///< intermediate_size
  float rms_eps = 1e-6f;            ///< rms_norm_eps
  float rope_theta = 10000.f;
  RopeScaling rope_scaling;         ///< none or llama3
  RopeLayout rope_layout = RopeLayout::rotate_half;  ///< rotate_half for HF weights, interleaved for llama GGUF
  bool tie_word_embeddings = false; ///< lm_head shares model.embed_tokens.weight
  bool attention_bias = false;      ///< q/k/v projections have biases (always for qwen2)
  int max_position_embeddings = 2048;
  int bos_token_id = -1;            ///< -1: none
  std::vector<int> eos_token_ids;   ///< eos_token_id, which may be a list in config.json
  std::string torch_dtype;          ///< "bfloat16", "float16", "float32" or "" when absent
  std::optional<RecurFormerConfig> recurformer;  ///< absent: a plain Llama

  int group_size() const { return n_kv > 0 ? n_q / n_kv : 0; }  ///< query heads per KV head
  /// The head layout to serve: the recurformer one, or all attention for a plain model.
  HeadLayout head_layout() const {
    return recurformer ? recurformer->layout : HeadLayout::uniform(n_layers, n_kv, HeadKind::attention);
  }
};

namespace detail {

/// Checks the recurformer config against the model's shape; throws "SOURCE: recurformer...".
void check_recurformer(const RecurFormerConfig& rf, const ModelConfig& c, const std::string& source);

}  // namespace detail

/// Checks the shape rules of a ModelConfig (and its recurformer object). `source` prefixes errors.
void check(const ModelConfig& c, const std::string& source);

/// Parses the text of a HF config.json. `source` (usually the path) prefixes every error.
ModelConfig parse_model_config(const char* begin, const char* end, const std::string& source = "config.json");

ModelConfig parse_model_config(const std::string& text, const std::string& source = "config.json");

namespace detail {
std::string read_text_file(const std::string& path);
}  // namespace detail

/// Reads and parses a config.json file; errors name the path.
ModelConfig load_model_config(const std::string& path);

/// The "recurformer" object, keys in the order of spec section 7.
nlohmann::ordered_json recurformer_to_json(const RecurFormerConfig& rf);

/// The text of `original` config.json (every key kept, in order) with its "recurformer" object
/// replaced by `rf`, or removed when rf is empty. This is what the converter writes.
std::string config_json_with_recurformer(const std::string& original, const std::optional<RecurFormerConfig>& rf,
                                         const std::string& source = "config.json");

/// A complete HF config.json for `c` (used when converting a GGUF model to a HF directory).
std::string model_config_to_json(const ModelConfig& c);

}  // namespace recurformer
