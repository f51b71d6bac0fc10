// src/model/random_model.cpp: the seeded random-weight Llama directory (see recurformer/model/random_model.hpp).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "recurformer/model/random_model.hpp"
#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"
#include "recurformer/model/safetensors.hpp"

#include "model/detail/tokenizer_json.hpp"

namespace recurformer {

/// SmolLM2-135M's shape (the benchmark model).
RandomModelSpec RandomModelSpec::smollm2_135m(DType wt) {
  RandomModelSpec s;
  s.n_layers = 30, s.d_model = 576, s.n_q = 9, s.n_kv = 3, s.head_dim = 64, s.ffn = 1536;
  s.vocab_size = 49152, s.weight_dtype = wt;
  return s;
}

namespace detail {
namespace {

/// GPT-2's byte -> printable-codepoint table (the ByteLevel alphabet).
std::vector<uint32_t> byte_level_alphabet() {
  std::vector<uint32_t> cp(256);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    cp[size_t(b)] = printable ? uint32_t(b) : uint32_t(256 + extra++);
  }
  return cp;
}

std::string utf8(uint32_t c) {
  std::string s;
  if (c < 0x80) {
    s += char(c);
  } else if (c < 0x800) {
    s += char(0xC0 | (c >> 6)), s += char(0x80 | (c & 0x3F));
  } else {
    s += char(0xE0 | (c >> 12)), s += char(0x80 | ((c >> 6) & 0x3F)), s += char(0x80 | (c & 0x3F));
  }
  return s;
}

/// The byte-level BPE tokenizer.json and tokenizer_config.json of the random models.
/// Ids: 0..255 bytes (in byte order), then merges, then <|begin_of_text|>, <|end_of_text|>, <|pad|>.
std::pair<std::string, std::string> random_model_tokenizer_files() {
  using ojson = nlohmann::ordered_json;
  const auto alpha = byte_level_alphabet();
  const std::string sp = utf8(alpha[' ']);  // "Ġ"
  ojson vocab = ojson::object();
  for (int b = 0; b < 256; ++b) vocab[utf8(alpha[size_t(b)])] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {sp, "t"},  {"h", "e"},  {sp, "a"},  {"i", "n"},   {sp + "t", "he"}, {"e", "r"}, {"o", "n"},
      {"r", "e"}, {"a", "n"},  {sp, "s"},  {"e", "n"},   {sp, "w"},        {"o", "r"}, {"a", "t"},
      {"n", "d"}, {sp, "o"},   {"e", "s"}, {sp + "a", "nd"}, {sp, "c"},    {"i", "s"}, {"o", "u"},
      {"in", "g"}};
  ojson merge_list = ojson::array();
  int next = 256;
  for (const auto& m : merges) {
    vocab[m.first + m.second] = next++;
    merge_list.push_back(m.first + " " + m.second);
  }
  const char* specials[] = {"<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"};
  ojson added = ojson::array();
  for (const char* s : specials)
    added.push_back({{"id", next++}, {"content", s}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  const int bos = 256 + int(merges.size());
  ojson bos_piece = {{"SpecialToken", {{"id", specials[0]}, {"type_id", 0}}}};
  ojson post = {
      {"type", "TemplateProcessing"},
      {"single", {bos_piece, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"pair", {bos_piece, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, bos_piece,
                {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
      {"special_tokens", {{specials[0], {{"id", specials[0]}, {"ids", {bos}}, {"tokens", {specials[0]}}}}}}};
  const ojson tok = byte_level_bpe_tokenizer_json(
      std::move(added),
      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}},
      std::move(post), std::move(vocab), std::move(merge_list), /*ignore_merges=*/false);
  ojson cfg = {{"add_bos_token", true}, {"add_eos_token", false}, {"bos_token", specials[0]},
               {"eos_token", specials[1]}, {"pad_token", specials[2]}, {"model_max_length", 32768},
               {"tokenizer_class", "PreTrainedTokenizerFast"}, {"clean_up_tokenization_spaces", false}};
  return {tok.dump(1) + "\n", cfg.dump(2) + "\n"};
}

}  // namespace

/// Writes `text` to a temporary sibling and renames it over `path`, so a full disk or an error
/// leaves the old file (or none), never a truncated one.
void write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary);
    RF_CHECK(f, path, ": cannot open for writing");
    f << text;
    f.flush();
    if (!f) {
      std::remove(tmp.c_str());
      fail(path, ": write error");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail(path, ": cannot rename ", tmp, " over it");
  }
}

bool path_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

/// mkdir -p.
void make_dirs(const std::string& path) {
  std::string cur;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      if (!cur.empty() && !path_exists(cur))
        RF_CHECK(::mkdir(cur.c_str(), 0755) == 0 || path_exists(cur), cur, ": cannot create directory");
    }
    if (i < path.size()) cur += path[i];
  }
}

/// Seeded values, uniform with the given standard deviation, platform-independent.
float RandomStream::uniform_std(float std) {  // uniform in [-a, a) has std a / sqrt(3)
  const double u = double(g() >> 11) * (1.0 / 9007199254740992.0);
  return float((2 * u - 1) * std::sqrt(3.0) * std);
}

namespace {

/// Bytes of `n` values in `dt`.
std::vector<uint8_t> encode_values(const std::vector<float>& v, DType dt) {
  std::vector<uint8_t> out(v.size() * size_t(dtype_size(dt)));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == DType::f32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t b = dt == DType::f16 ? half(v[i]).bits : bfloat16(v[i]).bits;
      std::memcpy(out.data() + 2 * i, &b, 2);
    }
  }
  return out;
}

}  // namespace

}  // namespace detail

/// The config.json text of a random model.
std::string random_model_config_json(const RandomModelSpec& s) {
  nlohmann::ordered_json o;
  o["architectures"] = {"LlamaForCausalLM"};
  o["model_type"] = "llama";
  o["vocab_size"] = s.vocab_size;
  o["hidden_size"] = s.d_model;
  o["num_hidden_layers"] = s.n_layers;
  o["num_attention_heads"] = s.n_q;
  o["num_key_value_heads"] = s.n_kv;
  o["head_dim"] = s.head_dim;
  o["intermediate_size"] = s.ffn;
  o["rms_norm_eps"] = 1e-5;
  o["rope_theta"] = double(s.rope_theta);
  o["rope_scaling"] = nullptr;
  o["tie_word_embeddings"] = s.tie_embeddings;
  o["attention_bias"] = false;
  o["max_position_embeddings"] = s.max_position;
  o["bos_token_id"] = detail::kRandomBosId;
  o["eos_token_id"] = detail::kRandomEosId;
  o["torch_dtype"] = s.weight_dtype == DType::f32 ? "float32" : s.weight_dtype == DType::f16 ? "float16" : "bfloat16";
  o["hidden_act"] = "silu";
  o["recurformer_random_seed"] = s.seed;  // informational: how this directory was made
  return o.dump(2) + "\n";
}

/// Writes the random model into `dir` (created if needed; existing files are replaced).
void write_random_model(const std::string& dir, const RandomModelSpec& s) {
  RF_CHECK(s.vocab_size >= detail::kRandomTokenizerSize, "write_random_model: vocab_size ", s.vocab_size,
           " is smaller than the tokenizer's ", detail::kRandomTokenizerSize, " tokens");
  RF_CHECK(s.n_layers >= 1 && s.d_model >= 1 && s.n_q >= 1 && s.n_kv >= 1 && s.n_q % s.n_kv == 0 &&
               s.head_dim >= 2 && s.head_dim % 2 == 0 && s.ffn >= 1,
           "write_random_model: inconsistent shape");
  detail::make_dirs(dir);
  detail::RandomStream rs(s.seed);
  struct Owned {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Owned> owned;
  auto add = [&](std::string name, std::vector<int64_t> shape, float std, bool ones = false) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = ones ? 1.f : rs.uniform_std(std);
    owned.push_back({std::move(name), std::move(shape), detail::encode_values(v, s.weight_dtype)});
  };
  const int64_t d = s.d_model, hd = s.head_dim, nq = s.n_q, nkv = s.n_kv, ffn = s.ffn;
  const float sd = 1.f / std::sqrt(float(d)), sf = 1.f / std::sqrt(float(ffn)), so = 1.f / std::sqrt(float(nq * hd));
  add("model.embed_tokens.weight", {s.vocab_size, d}, 0.5f);
  for (int l = 0; l < s.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {d}, 0, true);
    // q and k a little larger than 1/sqrt(d), so some heads attend sharply (gives calibration
    // something to tell apart even in a random model).
    add(p + "self_attn.q_proj.weight", {nq * hd, d}, 2.f * sd);
    add(p + "self_attn.k_proj.weight", {nkv * hd, d}, 2.f * sd);
    add(p + "self_attn.v_proj.weight", {nkv * hd, d}, sd);
    add(p + "self_attn.o_proj.weight", {d, nq * hd}, so);
    add(p + "post_attention_layernorm.weight", {d}, 0, true);
    add(p + "mlp.gate_proj.weight", {ffn, d}, sd);
    add(p + "mlp.up_proj.weight", {ffn, d}, sd);
    add(p + "mlp.down_proj.weight", {d, ffn}, sf);
  }
  add("model.norm.weight", {d}, 0, true);
  if (!s.tie_embeddings) add("lm_head.weight", {s.vocab_size, d}, sd);
  std::vector<TensorRef> refs;
  for (const auto& o : owned) refs.push_back({o.name, s.weight_dtype, o.shape, o.bytes.data()});
  write_safetensors(dir + "/model.safetensors", refs, {{"format", "pt"}});
  const auto tok = detail::random_model_tokenizer_files();
  detail::write_text(dir + "/tokenizer.json", tok.first);
  detail::write_text(dir + "/tokenizer_config.json", tok.second);
  // config.json last: its presence marks a complete directory (see ensure_random_model).
  detail::write_text(dir + "/config.json", random_model_config_json(s));
}

/// Writes the model into `dir` unless a complete one (config.json present) is already there.
/// Returns true when it wrote.
bool ensure_random_model(const std::string& dir, const RandomModelSpec& s) {
  if (detail::path_exists(dir + "/config.json") && detail::path_exists(dir + "/model.safetensors")) return false;
  write_random_model(dir, s);
  return true;
}

}  // namespace recurformer
