// src/model/tokenizer.cpp: Tokenizer and StreamDecoder over the pipeline of detail/tokenizer_impl.hpp,
// and the tokenizer.json export of a GGUF vocabulary.
#include "recurformer/model/tokenizer.hpp"

#include "model/detail/tokenizer_impl.hpp"
#include "model/detail/tokenizer_json.hpp"

namespace recurformer {
namespace detail {

/// The Hugging Face tokenizer.json of a GGUF "gpt2" vocabulary: the same pre-tokenizer steps,
/// vocabulary, merges, added tokens and BOS / EOS rule that load_gguf() builds, so
/// Tokenizer::from_hf_json of the text encodes exactly as Tokenizer::from_gguf of the vocabulary.
std::string gguf_to_hf_tokenizer_json(const GgufVocab& v) {
  using ojson = nlohmann::ordered_json;
  const auto bad = [&](const std::string& what) { fail("tokenizer export (GGUF vocabulary): ", what); };
  if (v.model != "gpt2")
    bad("model \"" + v.model + "\" cannot be written as tokenizer.json yet (supported: gpt2, byte-level BPE)");
  const size_t n = v.tokens.size();
  if (n == 0) bad("no tokens");
  if (!v.token_types.empty() && v.token_types.size() != n) bad("token_types and tokens differ in length");
  const GgufPreTokenizer gp = gguf_pre_tokenizer(v.pre);
  const auto type = [&](size_t i) { return v.token_types.empty() ? 1 : v.token_types[i]; };
  ojson added = ojson::array();
  for (size_t i = 0; i < n; ++i)
    if (type(i) >= 2 && type(i) <= 4)
      added.push_back({{"id", i}, {"content", v.tokens[i]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", type(i) != 4}});
  ojson vocab = ojson::object();
  for (size_t i = 0; i < n; ++i) {
    if (vocab.contains(v.tokens[i])) bad("token \"" + v.tokens[i].substr(0, 40) + "\" appears twice");
    vocab[v.tokens[i]] = i;
  }
  ojson steps = ojson::array();
  if (gp.digits_first) steps.push_back({{"type", "Digits"}, {"individual_digits", true}});
  steps.push_back({{"type", "Split"}, {"pattern", {{"Regex", gp.pattern}}}, {"behavior", "Isolated"}, {"invert", false}});
  steps.push_back({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}});
  ojson post = nullptr;
  if (v.add_bos || v.add_eos) {
    if ((v.add_bos && v.bos < 0) || (v.add_eos && v.eos < 0)) bad("add_bos / add_eos without the token id");
    ojson single = ojson::array(), specials = ojson::object();
    auto special = [&](int32_t id) {
      const std::string& t = v.tokens[size_t(id)];
      specials[t] = {{"id", t}, {"ids", {id}}, {"tokens", {t}}};
      return ojson{{"SpecialToken", {{"id", t}, {"type_id", 0}}}};
    };
    if (v.add_bos) single.push_back(special(v.bos));
    single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
    if (v.add_eos) single.push_back(special(v.eos));
    post = {{"type", "TemplateProcessing"}, {"single", single}, {"pair", single}, {"special_tokens", specials}};
  }
  return byte_level_bpe_tokenizer_json(std::move(added), {{"type", "Sequence"}, {"pretokenizers", steps}},
                                       std::move(post), std::move(vocab), v.merges, gp.ignore_merges)
             .dump(1) +
         "\n";
}

nlohmann::ordered_json byte_level_bpe_tokenizer_json(nlohmann::ordered_json added_tokens,
                                                     nlohmann::ordered_json pre_tokenizer,
                                                     nlohmann::ordered_json post_processor,
                                                     nlohmann::ordered_json vocab,
                                                     nlohmann::ordered_json merges, bool ignore_merges) {
  nlohmann::ordered_json tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = std::move(added_tokens);
  tok["normalizer"] = nullptr;
  tok["pre_tokenizer"] = std::move(pre_tokenizer);
  tok["post_processor"] = std::move(post_processor);
  tok["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},       {"dropout", nullptr},       {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                  {"fuse_unk", false},   {"byte_fallback", false},   {"ignore_merges", ignore_merges},
                  {"vocab", std::move(vocab)}, {"merges", std::move(merges)}};
  return tok;
}

/// The tokenizer_config.json that goes with it: the special tokens by text, the BOS / EOS rule,
/// and the chat template (empty: none).
std::string gguf_to_hf_tokenizer_config_json(const GgufVocab& v, const std::string& chat_template,
                                                    int64_t max_length) {
  nlohmann::ordered_json c;
  c["add_bos_token"] = v.add_bos;
  c["add_eos_token"] = v.add_eos;
  const auto token = [&](int32_t id) { return id >= 0 && size_t(id) < v.tokens.size() ? v.tokens[size_t(id)] : std::string(); };
  if (v.bos >= 0) c["bos_token"] = token(v.bos);
  if (v.eos >= 0) c["eos_token"] = token(v.eos);
  if (v.unk >= 0) c["unk_token"] = token(v.unk);
  if (v.pad >= 0) c["pad_token"] = token(v.pad);
  if (!chat_template.empty()) c["chat_template"] = chat_template;
  c["model_max_length"] = max_length;
  c["tokenizer_class"] = "PreTrainedTokenizerFast";
  c["clean_up_tokenization_spaces"] = false;
  return c.dump(2) + "\n";
}

}  // namespace detail

// --- Tokenizer -------------------------------------------------------------------------------------

Tokenizer Tokenizer::from_hf_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json,
                                         const std::string& source) {
  auto d = std::make_shared<detail::TokenizerData>();
  d->source = source;
  try {
    const auto root = detail::parse_json(tokenizer_json.data(), tokenizer_json.data() + tokenizer_json.size(), source,
                                 "tokenizer.json");
    nlohmann::json config;
    if (!tokenizer_config_json.empty())
      config = detail::parse_json(tokenizer_config_json.data(), tokenizer_config_json.data() + tokenizer_config_json.size(),
                          source, "tokenizer_config.json");
    detail::HfLoader(*d, source).load(root, tokenizer_config_json.empty() ? nullptr : &config);
  } catch (const nlohmann::json::exception& e) {
    fail("tokenizer (", source, "): malformed JSON: ", e.what());
  }
  return Tokenizer(std::move(d));
}

Tokenizer Tokenizer::from_hf(const std::string& path) {
  std::string json_path = path, config_path;
  const bool is_json = path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0;
  const std::string dir = is_json ? (path.find('/') == std::string::npos ? std::string(".") : path.substr(0, path.rfind('/'))) : path;
  if (!is_json) json_path = dir + "/tokenizer.json";
  config_path = dir + "/tokenizer_config.json";
  const std::string text = detail::read_text_file(json_path, true);
  const std::string config = detail::read_text_file(config_path, false);
  return from_hf_json(text, config, json_path);
}

Tokenizer Tokenizer::from_gguf(const GgufVocab& vocab) {
  auto d = std::make_shared<detail::TokenizerData>();
  detail::load_gguf(*d, vocab);
  return Tokenizer(std::move(d));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  return d_->encode(text, add_special);
}
std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  return d_->decode(ids, skip_special);
}
StreamDecoder Tokenizer::stream_decoder(bool skip_special) const { return StreamDecoder(*this, skip_special); }
int32_t Tokenizer::vocab_size() const { return d_->vocab_size(); }
int32_t Tokenizer::bos_id() const { return d_->bos; }
int32_t Tokenizer::eos_id() const { return d_->eos; }
int32_t Tokenizer::unk_id() const { return d_->unk; }
int32_t Tokenizer::pad_id() const { return d_->pad; }
bool Tokenizer::add_bos() const { return !d_->prefix.empty() && d_->prefix.front() == d_->bos; }
bool Tokenizer::add_eos() const { return !d_->suffix.empty() && d_->suffix.back() == d_->eos; }
bool Tokenizer::is_special(int32_t id) const {
  d_->check_id(id, "is_special");
  return d_->special[size_t(id)] != 0;
}
const std::string& Tokenizer::token(int32_t id) const {
  d_->check_id(id, "token");
  return d_->tokens[size_t(id)];
}
int32_t Tokenizer::token_id(std::string_view token) const {
  auto it = d_->token_ids.find(std::string(token));
  return it == d_->token_ids.end() ? -1 : it->second;
}

// --- StreamDecoder ---------------------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special)
    : d_(tok.d_), skip_special_(skip_special), strip_left_(tok.d_->strip_left) {}

std::string StreamDecoder::push(int32_t id) {
  const detail::TokenizerData& d = *d_;
  d.check_id(id, "StreamDecoder::push");
  std::string out;
  if (skip_special_ && d.special[size_t(id)]) return out;
  const std::string& piece = d.pieces[size_t(id)];
  if (!d.decode_byte_level && d.byte_of_token[size_t(id)] < 0 && !pending_.empty()) {
    // A normal piece ends a run of byte-fallback tokens: what is left of it is invalid.
    for (size_t k = 0; k < pending_.size(); ++k) out += detail::tok::kReplacementChar;
    pending_.clear();
  }
  pending_ += piece;
  const size_t held = detail::tok::append_lossy(out, pending_, /*hold_incomplete=*/true);
  pending_.erase(0, pending_.size() - held);
  size_t cut = 0;
  while (strip_left_ > 0 && cut < out.size() && out[cut] == ' ') ++cut, --strip_left_;
  out.erase(0, cut);
  if (!out.empty()) strip_left_ = 0;
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  if (d_->decode_byte_level)
    detail::tok::append_lossy(out, pending_);
  else
    for (size_t k = 0; k < pending_.size(); ++k) out += detail::tok::kReplacementChar;
  reset();
  return out;
}

void StreamDecoder::reset() {
  pending_.clear();
  strip_left_ = d_->strip_left;
}

}  // namespace recurformer
