// src/model/config.cpp: ModelConfig and the recurformer object: parsed from a Hugging Face config.json
// with every shape rule checked, and written back.
#include "recurformer/model/config.hpp"

#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

namespace recurformer {

bool operator==(const RecurFormerConfig& a, const RecurFormerConfig& b) {
  if (a.version != b.version || a.recurrent.d_state != b.recurrent.d_state ||
      a.recurrent.dt_rank != b.recurrent.dt_rank || a.recurrent.conv_kernel != b.recurrent.conv_kernel ||
      a.recency_window != b.recency_window || a.streaming.sink != b.streaming.sink ||
      a.streaming.window != b.streaming.window || a.recency_scores != b.recency_scores ||
      a.layout.n_layers() != b.layout.n_layers())
    return false;
  for (int l = 0; l < a.layout.n_layers(); ++l)
    if (a.layout.layers[size_t(l)].groups != b.layout.layers[size_t(l)].groups) return false;
  return true;
}

bool operator!=(const RecurFormerConfig& a, const RecurFormerConfig& b) { return !(a == b); }

namespace detail {
namespace {

std::string float_repr(float x) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);  // shortest text that reads back as x
  return std::string(buf, r.ptr);
}
// A float as the JSON number whose shortest text is the float's (0.91f is written 0.91, not
// 0.9100000262260437), so a parse gives the same float back.
json float_json(float x) { return json(std::stod(float_repr(x))); }

std::vector<int> json_index_list(const json& v, const std::string& source, const std::string& key, int n) {
  RF_CHECK(v.is_array(), source, ": ", key, " must be a list of KV-group indices, got ", json_quote(v));
  std::vector<int> r;
  for (size_t i = 0; i < v.size(); ++i)
    r.push_back(int(json_int(v[i], source, key + "[" + std::to_string(i) + "]", 0, n - 1)));
  return r;
}

}  // namespace

/// Checks the recurformer config against the model's shape; throws "SOURCE: recurformer...".
void check_recurformer(const RecurFormerConfig& rf, const ModelConfig& c, const std::string& source) {
  RF_CHECK(rf.version == 1, source, ": recurformer.version = ", rf.version, ", only version 1 is supported");
  RF_CHECK(rf.recurrent.d_state == c.head_dim, source, ": recurformer.d_state = ", rf.recurrent.d_state,
           ", expected head_dim = ", c.head_dim, " (version 1)");
  RF_CHECK(rf.recurrent.dt_rank >= 1, source, ": recurformer.dt_rank = ", rf.recurrent.dt_rank, ", expected >= 1");
  RF_CHECK(rf.recurrent.conv_kernel >= 2 && rf.recurrent.conv_kernel <= 8, source,
           ": recurformer.conv_kernel = ", rf.recurrent.conv_kernel, ", expected 2..8");
  RF_CHECK(rf.recency_window >= 1, source, ": recurformer.recency_window = ", rf.recency_window, ", expected >= 1");
  RF_CHECK(rf.streaming.sink >= 0 && rf.streaming.window >= 1, source, ": recurformer.streaming = {sink ",
           rf.streaming.sink, ", window ", rf.streaming.window, "}, expected sink >= 0 and window >= 1");
  RF_CHECK(rf.layout.n_layers() == c.n_layers, source, ": recurformer.layers has ", rf.layout.n_layers(),
           " entries, expected one per layer (", c.n_layers, ")");
  for (int l = 0; l < c.n_layers; ++l)
    RF_CHECK(rf.layout.layers[size_t(l)].n_groups() == c.n_kv, source, ": recurformer.layers[", l, "] has ",
             rf.layout.layers[size_t(l)].n_groups(), " KV groups, expected ", c.n_kv);
  if (!rf.recency_scores.empty()) {
    RF_CHECK(int(rf.recency_scores.size()) == c.n_layers, source, ": recurformer.recency_scores has ",
             rf.recency_scores.size(), " rows, expected ", c.n_layers);
    for (int l = 0; l < c.n_layers; ++l)
      RF_CHECK(int(rf.recency_scores[size_t(l)].size()) == c.n_kv, source, ": recurformer.recency_scores[", l,
               "] has ", rf.recency_scores[size_t(l)].size(), " values, expected n_kv = ", c.n_kv);
  }
}

namespace {

RecurFormerConfig parse_recurformer(const json& o, const ModelConfig& c, const std::string& source) {
  RF_CHECK(o.is_object(), source, ": recurformer must be an object, got ", o.type_name());
  RecurFormerConfig rf;
  auto req = [&](const char* k) -> const json& { return json_require(o, k, source, "recurformer"); };
  rf.version = int(json_int(req("version"), source, "recurformer.version", 0, 1 << 30));
  RF_CHECK(rf.version == 1, source, ": recurformer.version = ", rf.version, ", only version 1 is supported");
  rf.recurrent.d_state = int(json_int(req("d_state"), source, "recurformer.d_state", 1, 1 << 20));
  rf.recurrent.dt_rank = int(json_int(req("dt_rank"), source, "recurformer.dt_rank", 1, 1 << 20));
  rf.recurrent.conv_kernel = int(json_int(req("conv_kernel"), source, "recurformer.conv_kernel", 2, 8));
  if (const json* v = json_find(o, "recency_window"))
    rf.recency_window = int(json_int(*v, source, "recurformer.recency_window", 1, 1 << 30));
  if (const json* s = json_find(o, "streaming")) {
    RF_CHECK(s->is_object(), source, ": recurformer.streaming must be an object {\"sink\", \"window\"}");
    if (const json* v = json_find(*s, "sink")) rf.streaming.sink = int(json_int(*v, source, "recurformer.streaming.sink", 0, 1 << 30));
    if (const json* v = json_find(*s, "window"))
      rf.streaming.window = int(json_int(*v, source, "recurformer.streaming.window", 1, 1 << 30));
  }
  const json& layers = req("layers");
  RF_CHECK(layers.is_array(), source, ": recurformer.layers must be a list, got ", layers.type_name());
  RF_CHECK(int64_t(layers.size()) == c.n_layers, source, ": recurformer.layers has ", layers.size(),
           " entries, expected one per layer (", c.n_layers, ")");
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::string key = "recurformer.layers[" + std::to_string(l) + "]";
    RF_CHECK(layers[l].is_object(), source, ": ", key,
             " must be an object {\"recurrent\", \"streaming\", \"windowed\"}");
    LayerLayout ll = LayerLayout::uniform(c.n_kv, HeadKind::attention);
    for (HeadKind kind : {HeadKind::recurrent, HeadKind::streaming, HeadKind::windowed}) {
      const char* name = head_kind_name(kind);
      const json* v = json_find(layers[l], name);
      if (!v) continue;
      for (int g : json_index_list(*v, source, key + "." + name, c.n_kv)) {
        const HeadKind was = ll.groups[size_t(g)];
        RF_CHECK(was == HeadKind::attention, source, ": ", key, ": KV group ", g,
                 was == kind ? std::string(" is listed twice in ") + name
                             : std::string(" is both ") + head_kind_name(was) + " and " + name);
        ll.groups[size_t(g)] = kind;
      }
    }
    rf.layout.layers.push_back(std::move(ll));
  }
  if (const json* s = json_find(o, "recency_scores")) {
    RF_CHECK(s->is_array(), source, ": recurformer.recency_scores must be a list of lists");
    for (size_t l = 0; l < s->size(); ++l) {
      const json& row = (*s)[l];
      RF_CHECK(row.is_array(), source, ": recurformer.recency_scores[", l, "] must be a list");
      std::vector<float> r;
      for (size_t g = 0; g < row.size(); ++g)
        r.push_back(float(json_number(row[g], source, "recurformer.recency_scores[" + std::to_string(l) + "]")));
      rf.recency_scores.push_back(std::move(r));
    }
  }
  check_recurformer(rf, c, source);
  return rf;
}

int config_int(const json& o, const char* key, const std::string& source, int64_t lo = 1) {
  return int(json_int(json_require(o, key, source), source, key, lo, std::numeric_limits<int>::max()));
}

}  // namespace

}  // namespace detail

/// Checks the shape rules of a ModelConfig (and its recurformer object). `source` prefixes errors.
void check(const ModelConfig& c, const std::string& source) {
  RF_CHECK(c.architecture == "llama" || c.architecture == "qwen2", source, ": unknown architecture \"",
           c.architecture, "\" (supported: llama, qwen2)");
  RF_CHECK(c.vocab_size > 0 && c.d_model > 0 && c.n_layers > 0 && c.n_q > 0 && c.n_kv > 0 && c.head_dim > 0 &&
               c.ffn > 0,
           source, ": vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, "
           "head_dim and intermediate_size must all be positive");
  RF_CHECK(c.n_q % c.n_kv == 0, source, ": num_attention_heads = ", c.n_q,
           " is not a multiple of num_key_value_heads = ", c.n_kv);
  RF_CHECK(c.head_dim % 2 == 0, source, ": head_dim = ", c.head_dim, " must be even (RoPE rotates pairs)");
  RF_CHECK(c.rms_eps > 0, source, ": rms_norm_eps = ", c.rms_eps, " must be positive");
  RF_CHECK(c.rope_theta > 0 && std::isfinite(c.rope_theta), source, ": rope_theta = ", c.rope_theta,
           " must be positive and finite (as a float)");
  if (c.recurformer) detail::check_recurformer(*c.recurformer, c, source);
}

/// Parses the text of a HF config.json. `source` (usually the path) prefixes every error.
ModelConfig parse_model_config(const char* begin, const char* end, const std::string& source) {
  using namespace detail;
  const json o = parse_json(begin, end, source, "config");
  RF_CHECK(o.is_object(), source, ": config must be a JSON object, got ", o.type_name());
  ModelConfig c;
  const json* mt = json_find(o, "model_type");
  RF_CHECK(mt, source, ": missing model_type");
  const std::string& model_type = json_string(*mt, source, "model_type");
  if (model_type == "llama" || model_type == "mistral") {
    c.architecture = "llama";
  } else if (model_type == "qwen2") {
    c.architecture = "qwen2";
  } else {
    fail(source, ": unknown architecture (model_type \"", model_type, "\"; supported: llama, mistral, qwen2)");
  }
  c.vocab_size = config_int(o, "vocab_size", source);
  c.d_model = config_int(o, "hidden_size", source);
  c.n_layers = config_int(o, "num_hidden_layers", source);
  c.n_q = config_int(o, "num_attention_heads", source);
  c.n_kv = json_find(o, "num_key_value_heads") ? config_int(o, "num_key_value_heads", source) : c.n_q;
  c.ffn = config_int(o, "intermediate_size", source);
  if (json_find(o, "head_dim")) {
    c.head_dim = config_int(o, "head_dim", source);
  } else {
    RF_CHECK(c.d_model % c.n_q == 0, source, ": hidden_size = ", c.d_model,
             " is not a multiple of num_attention_heads = ", c.n_q, " and head_dim is absent");
    c.head_dim = c.d_model / c.n_q;
  }
  if (const json* v = json_find(o, "rms_norm_eps")) c.rms_eps = float(json_number(*v, source, "rms_norm_eps"));
  if (const json* v = json_find(o, "rope_theta")) c.rope_theta = float(json_number(*v, source, "rope_theta"));
  if (const json* rs = json_find(o, "rope_scaling")) {
    RF_CHECK(rs->is_object(), source, ": rope_scaling must be an object or null");
    const json* t = json_find(*rs, "rope_type");
    if (!t) t = json_find(*rs, "type");
    const std::string type = t ? json_string(*t, source, "rope_scaling.rope_type") : "default";
    if (type == "llama3") {
      c.rope_scaling.type = RopeScaling::Type::llama3;
      auto num = [&](const char* k) {
        return float(json_number(json_require(*rs, k, source, "rope_scaling"), source, std::string("rope_scaling.") + k));
      };
      c.rope_scaling.factor = num("factor");
      c.rope_scaling.low_freq_factor = num("low_freq_factor");
      c.rope_scaling.high_freq_factor = num("high_freq_factor");
      c.rope_scaling.original_max_position =
          int(json_int(json_require(*rs, "original_max_position_embeddings", source, "rope_scaling"), source,
                       "rope_scaling.original_max_position_embeddings", 1, std::numeric_limits<int>::max()));
      RF_CHECK(c.rope_scaling.factor > 0 && c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor, source,
               ": rope_scaling: expected factor > 0 and high_freq_factor > low_freq_factor");
    } else if (type != "default") {
      fail(source, ": unsupported rope_scaling type \"", type, "\" (supported: llama3, or none)");
    }
  }
  c.rope_layout = RopeLayout::rotate_half;  // HF weights
  if (const json* v = json_find(o, "tie_word_embeddings")) c.tie_word_embeddings = json_bool(*v, source, "tie_word_embeddings");
  if (c.architecture == "qwen2") {
    c.attention_bias = true;
    if (const json* v = json_find(o, "use_sliding_window"))
      RF_CHECK(!json_bool(*v, source, "use_sliding_window"), source,
               ": use_sliding_window = true is not supported (full attention only)");
  } else if (const json* v = json_find(o, "attention_bias")) {
    c.attention_bias = json_bool(*v, source, "attention_bias");
  }
  if (const json* v = json_find(o, "mlp_bias"))
    RF_CHECK(!json_bool(*v, source, "mlp_bias"), source, ": mlp_bias = true is not supported");
  if (model_type == "mistral")
    RF_CHECK(!json_find(o, "sliding_window"), source, ": sliding_window attention is not supported (set it to null)");
  if (json_find(o, "max_position_embeddings")) c.max_position_embeddings = config_int(o, "max_position_embeddings", source);
  if (const json* v = json_find(o, "bos_token_id"))
    c.bos_token_id = int(json_int(*v, source, "bos_token_id", 0, c.vocab_size - 1));
  if (const json* v = json_find(o, "eos_token_id")) {
    if (v->is_array()) {
      for (size_t i = 0; i < v->size(); ++i)
        c.eos_token_ids.push_back(int(json_int((*v)[i], source, "eos_token_id", 0, c.vocab_size - 1)));
    } else {
      c.eos_token_ids.push_back(int(json_int(*v, source, "eos_token_id", 0, c.vocab_size - 1)));
    }
  }
  if (const json* v = json_find(o, "torch_dtype")) c.torch_dtype = json_string(*v, source, "torch_dtype");
  check(c, source);  // before the layout, whose checks rely on n_layers / n_kv / head_dim
  if (const json* v = json_find(o, "recurformer")) c.recurformer = parse_recurformer(*v, c, source);
  return c;
}

ModelConfig parse_model_config(const std::string& text, const std::string& source) {
  return parse_model_config(text.data(), text.data() + text.size(), source);
}

namespace detail {
std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  RF_CHECK(f, path, ": cannot open for reading");
  std::ostringstream ss;
  ss << f.rdbuf();
  RF_CHECK(!f.bad(), path, ": read error");
  return ss.str();
}
}  // namespace detail

/// Reads and parses a config.json file; errors name the path.
ModelConfig load_model_config(const std::string& path) {
  const std::string text = detail::read_text_file(path);
  return parse_model_config(text, path);
}

/// The "recurformer" object, keys in the order of spec section 7.
nlohmann::ordered_json recurformer_to_json(const RecurFormerConfig& rf) {
  nlohmann::ordered_json o;
  o["version"] = rf.version;
  o["d_state"] = rf.recurrent.d_state;
  o["dt_rank"] = rf.recurrent.dt_rank;
  o["conv_kernel"] = rf.recurrent.conv_kernel;
  o["recency_window"] = rf.recency_window;
  o["streaming"] = {{"sink", rf.streaming.sink}, {"window", rf.streaming.window}};
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  const bool windowed = rf.layout.count(HeadKind::windowed) > 0;  // optional key: absent when unused
  for (const LayerLayout& l : rf.layout.layers) {
    nlohmann::ordered_json e;
    e["recurrent"] = l.indices(HeadKind::recurrent);
    e["streaming"] = l.indices(HeadKind::streaming);
    if (windowed) e["windowed"] = l.indices(HeadKind::windowed);
    layers.push_back(std::move(e));
  }
  o["layers"] = std::move(layers);
  if (!rf.recency_scores.empty()) {
    nlohmann::ordered_json scores = nlohmann::ordered_json::array();
    for (const auto& row : rf.recency_scores) {
      nlohmann::ordered_json r = nlohmann::ordered_json::array();
      for (float s : row) r.push_back(std::stod(detail::float_repr(s)));
      scores.push_back(std::move(r));
    }
    o["recency_scores"] = std::move(scores);
  }
  return o;
}

/// The text of `original` config.json (every key kept, in order) with its "recurformer" object
/// replaced by `rf`, or removed when rf is empty. This is what the converter writes.
std::string config_json_with_recurformer(const std::string& original, const std::optional<RecurFormerConfig>& rf,
                                         const std::string& source) {
  nlohmann::ordered_json o =
      detail::parse_json_as<nlohmann::ordered_json>(original.data(), original.data() + original.size(), source, "config");
  RF_CHECK(o.is_object(), source, ": config must be a JSON object");
  if (rf)
    o["recurformer"] = recurformer_to_json(*rf);
  else
    o.erase("recurformer");
  return o.dump(2) + "\n";
}

/// A complete HF config.json for `c` (used when converting a GGUF model to a HF directory).
std::string model_config_to_json(const ModelConfig& c) {
  nlohmann::ordered_json o;
  const bool qwen = c.architecture == "qwen2";
  o["architectures"] = {qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"};
  o["model_type"] = qwen ? "qwen2" : "llama";
  o["vocab_size"] = c.vocab_size;
  o["hidden_size"] = c.d_model;
  o["num_hidden_layers"] = c.n_layers;
  o["num_attention_heads"] = c.n_q;
  o["num_key_value_heads"] = c.n_kv;
  o["head_dim"] = c.head_dim;
  o["intermediate_size"] = c.ffn;
  o["rms_norm_eps"] = detail::float_json(c.rms_eps);
  o["rope_theta"] = detail::float_json(c.rope_theta);
  if (c.rope_scaling.type == RopeScaling::Type::llama3) {
    o["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", detail::float_json(c.rope_scaling.factor)},
                         {"low_freq_factor", detail::float_json(c.rope_scaling.low_freq_factor)},
                         {"high_freq_factor", detail::float_json(c.rope_scaling.high_freq_factor)},
                         {"original_max_position_embeddings", c.rope_scaling.original_max_position}};
  } else {
    o["rope_scaling"] = nullptr;
  }
  o["tie_word_embeddings"] = c.tie_word_embeddings;
  if (!qwen) o["attention_bias"] = c.attention_bias;
  o["max_position_embeddings"] = c.max_position_embeddings;
  if (c.bos_token_id >= 0) o["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) o["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty()) o["eos_token_id"] = c.eos_token_ids;
  if (!c.torch_dtype.empty()) o["torch_dtype"] = c.torch_dtype;
  o["hidden_act"] = "silu";
  if (c.recurformer) o["recurformer"] = recurformer_to_json(*c.recurformer);
  return o.dump(2) + "\n";
}

}  // namespace recurformer
