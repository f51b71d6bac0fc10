// src/model/checkpoint.cpp: Checkpoint, one entry point to a model's weights and config (a Hugging Face
// directory or a GGUF file), the GGUF-to-HF tensor names and the GGUF model config.
#include "recurformer/model/checkpoint.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

namespace recurformer {

namespace detail {

/// The HF name of a GGUF tensor (llama.cpp's llama / qwen2 naming); unknown names are kept as they are.
std::string hf_name_from_gguf(const std::string& g) {
  if (g == "token_embd.weight") return "model.embed_tokens.weight";
  if (g == "output_norm.weight") return "model.norm.weight";
  if (g == "output.weight") return "lm_head.weight";
  if (g.compare(0, 4, "blk.") != 0) return g;
  const size_t dot = g.find('.', 4);
  if (dot == std::string::npos || dot == 4) return g;
  const std::string layer = g.substr(4, dot - 4);
  if (layer.find_first_not_of("0123456789") != std::string::npos) return g;
  const size_t dot2 = g.find('.', dot + 1);
  if (dot2 == std::string::npos) return g;
  const std::string part = g.substr(dot + 1, dot2 - dot - 1), suffix = g.substr(dot2);  // ".weight" / ".bias"
  static const std::pair<const char*, const char*> map[] = {
      {"attn_q", "self_attn.q_proj"},   {"attn_k", "self_attn.k_proj"},
      {"attn_v", "self_attn.v_proj"},   {"attn_output", "self_attn.o_proj"},
      {"ffn_gate", "mlp.gate_proj"},    {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"},    {"attn_norm", "input_layernorm"},
      {"ffn_norm", "post_attention_layernorm"}};
  for (const auto& m : map)
    if (part == m.first) return "model.layers." + layer + "." + m.second + suffix;
  return g;
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

/// llama.cpp stores the q/k rows of each head of a llama model permuted so that interleaved RoPE
/// on them is rotate_half RoPE on the HF rows: stored item 2i + s of a head is HF item s hd/2 + i.
/// This writes the HF order of n_heads * hd items of item_bytes each (weight rows, or the values
/// of a q / k activation vector).
void unpermute_interleaved_heads(const void* src, void* dst, int64_t n_heads, int64_t hd, size_t item_bytes) {
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t i = 0; i < hd / 2; ++i)
      for (int64_t s = 0; s < 2; ++s)
        std::memcpy(out + size_t(h * hd + s * (hd / 2) + i) * item_bytes, in + size_t(h * hd + 2 * i + s) * item_bytes,
                    item_bytes);
}

}  // namespace detail

/// The model hyper-parameters of a llama / qwen2 GGUF file (llama.cpp's metadata keys).
ModelConfig model_config_from_gguf(const GgufFile& g) {
  const std::string& src = g.source();
  ModelConfig c;
  const std::string arch = g.get_string("general.architecture");
  RF_CHECK(arch == "llama" || arch == "qwen2", src, ": unknown architecture \"", arch, "\" (supported: llama, qwen2)");
  c.architecture = arch;
  const std::string p = arch + ".";
  auto get_int = [&](const std::string& key, int64_t lo) {
    const int64_t v = g.get_int(key);
    RF_CHECK(v >= lo && v <= std::numeric_limits<int>::max(), src, ": metadata ", key, " = ", v, " is out of range");
    return int(v);
  };
  c.d_model = get_int(p + "embedding_length", 1);
  c.n_layers = get_int(p + "block_count", 1);
  c.ffn = get_int(p + "feed_forward_length", 1);
  c.n_q = get_int(p + "attention.head_count", 1);
  c.n_kv = g.find(p + "attention.head_count_kv") ? get_int(p + "attention.head_count_kv", 1) : c.n_q;
  if (g.find(p + "attention.key_length")) {
    c.head_dim = get_int(p + "attention.key_length", 1);
  } else {
    RF_CHECK(c.d_model % c.n_q == 0, src, ": embedding_length ", c.d_model, " is not a multiple of head_count ", c.n_q);
    c.head_dim = c.d_model / c.n_q;
  }
  if (g.find(p + "rope.dimension_count"))
    RF_CHECK(g.get_int(p + "rope.dimension_count") == c.head_dim, src, ": metadata ", p, "rope.dimension_count = ",
             g.get_int(p + "rope.dimension_count"), ": partial rotary embeddings are not supported (head_dim ",
             c.head_dim, ")");
  if (g.find(p + "attention.layer_norm_rms_epsilon"))
    c.rms_eps = float(g.get_float(p + "attention.layer_norm_rms_epsilon"));
  if (g.find(p + "rope.freq_base")) c.rope_theta = float(g.get_float(p + "rope.freq_base"));
  if (g.find(p + "rope.scaling.type")) {
    const std::string& t = g.get_string(p + "rope.scaling.type");
    RF_CHECK(t == "none", src, ": unsupported rope scaling type \"", t, "\" (llama3 scaling comes as rope_freqs.weight)");
  }
  if (g.find(p + "context_length")) c.max_position_embeddings = get_int(p + "context_length", 1);
  if (g.find(p + "vocab_size")) {
    c.vocab_size = get_int(p + "vocab_size", 1);
  } else if (const GgufValue* t = g.find("tokenizer.ggml.tokens")) {
    c.vocab_size = int(t->array_size());
  } else if (const GgufTensorInfo* e = g.find_tensor("token_embd.weight")) {
    c.vocab_size = e->ne.size() == 2 ? int(e->ne[1]) : 0;
  }
  c.rope_layout = arch == "llama" ? RopeLayout::interleaved : RopeLayout::rotate_half;
  c.tie_word_embeddings = g.find_tensor("output.weight") == nullptr;
  c.attention_bias = arch == "qwen2" || g.find_tensor("blk.0.attn_q.bias") != nullptr;
  if (g.find("tokenizer.ggml.bos_token_id")) c.bos_token_id = get_int("tokenizer.ggml.bos_token_id", 0);
  if (g.find("tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(get_int("tokenizer.ggml.eos_token_id", 0));
  check(c, src);
  return c;
}

Checkpoint Checkpoint::open(const std::filesystem::path& path, const CheckpointOptions& options) {
  namespace fs = std::filesystem;
  Checkpoint c;
  c.path_ = path;
  if (fs::is_directory(path)) {
    c.open_hf(path);
  } else {
    RF_CHECK(fs::exists(path), path.string(), ": no such file or directory");
    RF_CHECK(path.extension() == ".gguf", path.string(),
             ": not a checkpoint (expected a directory with config.json or a .gguf file)");
    c.open_gguf(path, options);
  }
  return c;
}

const TensorRef& Checkpoint::tensor(const std::string& name) const {
  const auto it = tensors_.find(name);
  RF_CHECK(it != tensors_.end(), source_, ": missing tensor ", name);
  return it->second;
}

const TensorRef& Checkpoint::tensor(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorRef& t = tensor(name);
  check_shape(t, shape);
  return t;
}

const TensorRef& Checkpoint::tensor(const std::string& name, const std::vector<int64_t>& shape, DType dtype) const {
  const TensorRef& t = tensor(name, shape);
  RF_CHECK(t.dtype == dtype, source_, ": tensor ", name, " has dtype ", dtype_name(t.dtype), ", expected ",
           dtype_name(dtype));
  return t;
}

void Checkpoint::check_shape(const TensorRef& t, const std::vector<int64_t>& shape) const {
  RF_CHECK(t.shape == shape, source_, ": tensor ", t.name, " has shape ", t.shape_str(), ", expected ",
           detail::shape_str(shape));
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> r;
  for (const auto& kv : tensors_) r.push_back(kv.first);
  std::sort(r.begin(), r.end());
  return r;
}

std::vector<float> Checkpoint::rope_inv_freq() const {
  std::vector<float> inv = recurformer::rope_inv_freq(config_.head_dim, config_.rope_theta, config_.rope_scaling);
  if (format_ == Format::gguf && has("rope_freqs.weight")) {
    const TensorRef& f = tensor("rope_freqs.weight", {int64_t(inv.size())}, DType::f32);
    const float* div = static_cast<const float*>(f.data);
    for (size_t i = 0; i < inv.size(); ++i) {
      RF_CHECK(div[i] > 0, source_, ": rope_freqs.weight[", i, "] = ", div[i], " must be positive");
      inv[i] /= div[i];
    }
  }
  return inv;
}

std::filesystem::path Checkpoint::existing(const std::filesystem::path& p) {
  return std::filesystem::is_regular_file(p) ? p : std::filesystem::path();
}

void Checkpoint::add(TensorRef t) {
  const std::string name = t.name;
  RF_CHECK(tensors_.emplace(name, std::move(t)).second, source_, ": tensor ", name, " appears twice");
}

void Checkpoint::open_hf(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  format_ = Format::safetensors;
  const fs::path cfg = dir / "config.json";
  RF_CHECK(fs::is_regular_file(cfg), dir.string(), ": no config.json (not a Hugging Face model directory)");
  config_text_ = detail::read_text_file(cfg.string());
  config_ = parse_model_config(config_text_, cfg.string());
  const fs::path single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
  if (fs::is_regular_file(single)) {
    source_ = single.string();
    shards_.push_back(std::make_unique<SafetensorsFile>(SafetensorsFile::open(source_)));
    for (const TensorRef& t : shards_.back()->tensors()) add(t);
    check_config_against_tensors(cfg.string());
    return;
  }
  RF_CHECK(fs::is_regular_file(index), dir.string(), ": no model.safetensors or model.safetensors.index.json");
  source_ = index.string();
  const std::string text = detail::read_text_file(source_);
  const detail::json o = detail::parse_json(text.data(), text.data() + text.size(), source_, "index");
  RF_CHECK(o.is_object(), source_, ": index must be a JSON object");
  const detail::json& wm = detail::json_require(o, "weight_map", source_);
  RF_CHECK(wm.is_object(), source_, ": weight_map must be an object {tensor: shard file}");
  std::unordered_map<std::string, const SafetensorsFile*> opened;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    const std::string& file = detail::json_string(it.value(), source_, "weight_map." + it.key());
    // A shard is a file beside the index: no directories, so an index cannot point elsewhere.
    RF_CHECK(!file.empty() && file.find('/') == std::string::npos && file.find('\\') == std::string::npos &&
                 file != "." && file != "..",
             source_, ": weight_map.", it.key(), ": \"", file, "\" is not a file name in the model directory");
    auto found = opened.find(file);
    if (found == opened.end()) {
      shards_.push_back(std::make_unique<SafetensorsFile>(SafetensorsFile::open((dir / file).string())));
      found = opened.emplace(file, shards_.back().get()).first;
    }
    const TensorRef* t = found->second->find(it.key());
    RF_CHECK(t, found->second->source(), ": missing tensor ", it.key(), " (listed in ", source_, ")");
    add(*t);
  }
  check_config_against_tensors(cfg.string());
}

// The sizes a config states are checked against the tensors that carry them before anything is
// allocated per layer, head or token, so a lying config (num_hidden_layers = 10^9) fails here
// in one line instead of allocating gigabytes: every layer up to the last has its q_proj, and
// the embedding and layer 0's q_proj / k_proj have the shapes the head counts imply.
void Checkpoint::check_config_against_tensors(const std::string& config_source) const {
  const ModelConfig& c = config_;
  const std::string last = "model.layers." + std::to_string(c.n_layers - 1) + ".self_attn.q_proj.weight";
  RF_CHECK(has(last), config_source, ": the config says ", c.n_layers, " layers but ", source_,
           " has no tensor ", last);
  auto rows_of = [&](const std::string& name, int64_t want, const char* says) {
    if (!has(name)) return;  // a missing tensor is reported by whoever needs it
    const TensorRef& t = tensor(name);
    RF_CHECK(t.shape.size() == 2 && t.shape[0] == want, config_source, ": the config says ", says, " = ", want,
             " but ", source_, " has ", name, " of shape ", t.shape_str());
  };
  rows_of("model.embed_tokens.weight", c.vocab_size, "vocab_size");
  rows_of("model.layers.0.self_attn.q_proj.weight", int64_t(c.n_q) * c.head_dim, "num_attention_heads * head_dim");
  rows_of("model.layers.0.self_attn.k_proj.weight", int64_t(c.n_kv) * c.head_dim, "num_key_value_heads * head_dim");
}

void Checkpoint::open_gguf(const std::filesystem::path& file, const CheckpointOptions& options) {
  format_ = Format::gguf;
  source_ = file.string();
  gguf_ = std::make_unique<GgufFile>(GgufFile::open(source_));
  for (const GgufTensorInfo& g : gguf_->tensors()) {
    TensorRef t;
    t.name = detail::hf_name_from_gguf(g.name);
    t.shape.assign(g.ne.rbegin(), g.ne.rend());  // ne0 innermost -> row-major [.., out, in]
    switch (g.type) {
      case GgmlType::f32: t.dtype = DType::f32; t.data = g.data; break;
      case GgmlType::f16: t.dtype = DType::f16; t.data = g.data; break;
      case GgmlType::bf16: t.dtype = DType::bf16; t.data = g.data; break;
      default: {  // quantised: dequantised once to fp32 (model/gguf.hpp lists the types)
        // The blocks are read as structs with fp16 fields: offered only where 2-byte aligned
        // (general.alignment may be 1; the fp32 decoding serves then).
        const bool offered = reinterpret_cast<uintptr_t>(g.data) % alignof(BlockQ4_0) == 0;
        if (offered) t.blocks = g.data, t.quant = g.type;
        t.dtype = DType::f32;
        const GgmlTypeTraits tt = ggml_type_traits(g.type);
        // Kept, or decoded a slice at a time into scratch only to be checked.
        const bool keep = options.decode_quantised || !offered;
        const int64_t slice = keep ? g.numel() : std::min<int64_t>(g.numel(), tt.block * 4096);
        if (keep) owned_.emplace_back(size_t(g.numel()));
        std::vector<float> scratch(keep ? 0 : size_t(slice));
        float* w = keep ? owned_.back().data() : scratch.data();
        for (int64_t i0 = 0; i0 < g.numel(); i0 += slice) {
          const int64_t n = std::min(slice, g.numel() - i0);
          dequantize_row(g.type, static_cast<const unsigned char*>(g.data) + i0 / tt.block * tt.bytes, n, w);
          for (int64_t i = 0; i < n; ++i)  // a NaN or inf scale would poison every product silently
            RF_CHECK(std::isfinite(w[i]), source_, ": tensor ", g.name, " (", ggml_type_name(g.type), "): block ",
                     (i0 + i) / tt.block, " decodes to a non-finite weight (its scale is inf or NaN)");
        }
        t.data = keep ? owned_.back().data() : nullptr;
        break;
      }
    }
    // general.alignment may be as small as 1; views need element-aligned data.
    RF_CHECK(reinterpret_cast<uintptr_t>(t.data) % uintptr_t(dtype_size(t.dtype)) == 0 || g.nbytes == 0, source_,
             ": tensor ", g.name, " is not aligned to its ", dtype_size(t.dtype), "-byte elements");
    add(std::move(t));
  }
  config_ = model_config_from_gguf(*gguf_);
  check_config_against_tensors(source_ + " (metadata)");
  if (gguf_->find("tokenizer.ggml.model")) gguf_tokenizer_ = gguf_->tokenizer_data();
}

}  // namespace recurformer
