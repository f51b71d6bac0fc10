// recurformer/model/checkpoint.hpp: one entry point to a model's weights and config, whatever the
// file format: a Hugging Face directory (config.json + model.safetensors, or
// model.safetensors.index.json + shards) or a GGUF file.
//
// Tensors are read in place from memory maps and always named and shaped as in HF checkpoints
// ("model.layers.3.self_attn.q_proj.weight", [out, in]). GGUF names are mapped to HF names and GGUF
// extents (innermost first) reversed. GGUF q/k rows stay as llama.cpp stored them: llama.cpp permutes
// the q/k rows of llama models so that interleaved RoPE on them equals rotate_half RoPE on the HF
// weights, so config().rope_layout says interleaved for a llama GGUF (and rotate_half for qwen2 GGUF
// and every HF directory, which are not permuted). Quantised GGUF tensors (Q4_0 .. Q6_K, IQ4_*:
// core/quant.hpp) are presented as fp32 copies, dequantised at open and owned by the Checkpoint
// (4 bytes per weight, what training and conversion read), and keep their mapped blocks beside
// (TensorRef::blocks), which LlamaModel's large matrices are served from. An inference-only user
// opens with CheckpointOptions::decode_quantised = false and keeps only the map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "recurformer/core/error.hpp"
#include "recurformer/model/config.hpp"
#include "recurformer/model/gguf.hpp"
#include "recurformer/model/safetensors.hpp"

namespace recurformer {

namespace detail {

/// The HF name of a GGUF tensor (llama.cpp's llama / qwen2 naming); unknown names are kept as they are.
std::string hf_name_from_gguf(const std::string& g);

/// llama.cpp stores the q/k rows of each head of a llama model permuted so that interleaved RoPE
/// on them is rotate_half RoPE on the HF rows: stored item 2i + s of a head is HF item s hd/2 + i.
/// This writes the HF order of n_heads * hd items of item_bytes each (weight rows, or the values
/// of a q / k activation vector).
void unpermute_interleaved_heads(const void* src, void* dst, int64_t n_heads, int64_t hd, size_t item_bytes);

}  // namespace detail

/// The model hyper-parameters of a llama / qwen2 GGUF file (llama.cpp's metadata keys).
ModelConfig model_config_from_gguf(const GgufFile& g);

/// How Checkpoint::open presents block-quantised GGUF tensors.
struct CheckpointOptions {
  /// Keep each one's fp32 decoding in TensorRef::data (4 bytes per weight). False: a tensor whose
  /// blocks are offered (TensorRef::blocks) gets data = nullptr and costs nothing beyond the
  /// file's map; its blocks are still decoded once at open to check that every weight is finite.
  /// For a model that only runs (LlamaModel decodes what it does not serve from blocks itself);
  /// calibration, fitting, conversion and training read the decodings.
  bool decode_quantised = true;
};

/// A model checkpoint opened for reading. Movable; TensorRefs stay valid while it lives.
class Checkpoint {
 public:
  enum class Format { safetensors, gguf };

  /// Opens a HF directory (config.json + model.safetensors or model.safetensors.index.json and its
  /// shards) or a .gguf file. Every tensor's bounds are validated here; errors name the file.
  static Checkpoint open(const std::filesystem::path& path, const CheckpointOptions& options = {});

  Format format() const { return format_; }
  const std::filesystem::path& path() const { return path_; }
  const ModelConfig& config() const { return config_; }

  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  /// The tensor, or Error "FILE: missing tensor NAME".
  const TensorRef& tensor(const std::string& name) const;
  /// The tensor, checked to have this shape: "FILE: tensor NAME has shape [a, b], expected [c, d]".
  const TensorRef& tensor(const std::string& name, const std::vector<int64_t>& shape) const;
  /// The tensor, checked to have this shape and dtype.
  const TensorRef& tensor(const std::string& name, const std::vector<int64_t>& shape, DType dtype) const;
  void check_shape(const TensorRef& t, const std::vector<int64_t>& shape) const;
  /// Every tensor name, sorted.
  std::vector<std::string> tensor_names() const;

  /// The RoPE inverse frequencies [head_dim / 2] this checkpoint's attention needs. HF:
  /// rope_inv_freq(head_dim, rope_theta, rope_scaling). GGUF: llama.cpp stores Llama-3 scaling not
  /// as metadata but as per-pair divisors in the tensor rope_freqs.weight (inv_freq / divisor is
  /// the scaled frequency, what HF computes up to fp32 rounding of the divisor), applied here.
  std::vector<float> rope_inv_freq() const;

  /// HF: the text of config.json (the converter adds the recurformer object to it); GGUF: "".
  const std::string& config_json_text() const { return config_text_; }
  /// HF: dir/tokenizer.json and dir/tokenizer_config.json when they exist, else empty paths.
  std::filesystem::path tokenizer_json() const { return existing(path_ / "tokenizer.json"); }
  std::filesystem::path tokenizer_config_json() const { return existing(path_ / "tokenizer_config.json"); }
  /// GGUF: the tokenizer metadata (nullptr for HF directories or a GGUF without tokenizer.ggml.*).
  const GgufTokenizerData* gguf_tokenizer() const { return gguf_tokenizer_ ? &*gguf_tokenizer_ : nullptr; }
  /// GGUF: the parsed file (all metadata); nullptr for HF directories.
  const GgufFile* gguf() const { return gguf_.get(); }

 private:
  static std::filesystem::path existing(const std::filesystem::path& p);

  void add(TensorRef t);

  void open_hf(const std::filesystem::path& dir);

  void check_config_against_tensors(const std::string& config_source) const;

  void open_gguf(const std::filesystem::path& file, const CheckpointOptions& options);

  Format format_ = Format::safetensors;
  std::filesystem::path path_;
  std::string source_;  ///< the file named in errors: model.safetensors, the index or the .gguf
  ModelConfig config_;
  std::string config_text_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::unique_ptr<GgufFile> gguf_;
  std::optional<GgufTokenizerData> gguf_tokenizer_;
  std::vector<std::vector<float>> owned_;  ///< dequantised tensors (vector moves keep the buffers)
  std::unordered_map<std::string, TensorRef> tensors_;
};

}  // namespace recurformer
