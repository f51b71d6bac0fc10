// recurformer/model/tokenizer.hpp: the tokenizers of the Llama family, giving the same ids as
// Hugging Face `tokenizers` for the pipelines they use.
//
//  * Byte-level BPE (Llama 3, SmolLM/SmolLM2, Qwen2 tokenizer.json): NFC normalizer, Split(regex) / Digits /
//    ByteLevel pre-tokenizers, GPT-2 byte-to-unicode map, rank-ordered merges ("a b" strings or
//    ["a", "b"] pairs), ignore_merges.
//  * SentencePiece-style BPE (Llama 2, TinyLlama tokenizer.json): Prepend/Replace normalizers (or the
//    legacy=false Metaspace pre-tokenizer), BPE with byte_fallback (<0xXX>) and fuse_unk, decoder
//    Replace/ByteFallback/Fuse/Strip or Metaspace.
//  * GGUF vocabularies (GgufVocab below): "gpt2" (byte-level BPE, regex chosen by `pre`) and "llama"
//    (SentencePiece: merges by token score, as llama.cpp's SPM tokenizer).
//
// Added tokens (special or not) are split out of the raw text first, leftmost-longest, honouring
// lstrip / rstrip / single_word; the rest goes through normalizer -> pre-tokenizer -> BPE. The
// post-processor's TemplateProcessing (or tokenizer_config.json's add_bos_token / add_eos_token,
// which win as in transformers' LlamaTokenizerFast) adds BOS / EOS when encode(text, true).
//
// A Tokenizer is immutable after loading and cheap to copy (shared state): encode / decode may be
// called from many threads (a bounded cache of short words sits behind a shared lock). Regexes are
// PCRE2 (UTF + UCP, JIT when available). Anything else in a tokenizer.json (Unigram / WordPiece
// models, other normalizers, pre-tokenizers, decoders or post-processors) is refused with an Error.
//
// Known gaps: added tokens flagged normalized=true are matched in the raw text, not in the
// normalized text; single_word treats every non-ASCII character as a word character.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "recurformer/core/error.hpp"
#include "recurformer/model/gguf_vocab.hpp"

namespace recurformer {

namespace detail {
struct TokenizerData;
}

namespace detail {
/// tokenizer.json / tokenizer_config.json texts equivalent to a GGUF "gpt2" vocabulary (the
/// converter writes them when its input is a GGUF file); Error for any other vocabulary model.
std::string gguf_to_hf_tokenizer_json(const GgufVocab& v);
std::string gguf_to_hf_tokenizer_config_json(const GgufVocab& v, const std::string& chat_template, int64_t max_length);
}  // namespace detail

class StreamDecoder;

/// A loaded tokenizer. Ids are int32_t, as everywhere else in the library.
class Tokenizer {
 public:
  /// `path`: a model directory holding tokenizer.json (and optionally tokenizer_config.json), or
  /// the path of a tokenizer.json (tokenizer_config.json beside it is read if present).
  /// Throws Error naming the file and the problem on malformed or unsupported content.
  static Tokenizer from_hf(const std::string& path);
  /// The same from the files' contents; `source` names them in error messages.
  static Tokenizer from_hf_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json = {},
                                const std::string& source = "tokenizer.json");
  /// From GGUF metadata. Throws Error on an unknown model / pre-tokenizer or inconsistent sizes.
  static Tokenizer from_gguf(const GgufVocab& vocab);

  /// Token ids of `text` (UTF-8; invalid UTF-8 throws Error). add_special: apply the
  /// post-processor (BOS / EOS as the tokenizer's template says). Special tokens written in the
  /// text are always recognised, as in HF.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;

  /// The text of `ids`, as HF's decode (invalid UTF-8 becomes U+FFFD). Throws Error on an id out of
  /// range. skip_special: drop special (control) tokens first.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  /// Streaming decode: push ids one by one, get only complete UTF-8 back.
  StreamDecoder stream_decoder(bool skip_special = true) const;

  int32_t vocab_size() const;                       // ids are in [0, vocab_size())
  int32_t bos_id() const;                           // -1 when there is none
  int32_t eos_id() const;                           // -1 when there is none
  int32_t unk_id() const;                           // -1 when there is none
  int32_t pad_id() const;                           // -1 when there is none
  bool add_bos() const;                             // encode(text, true) starts with bos_id()
  bool add_eos() const;                             // encode(text, true) ends with eos_id()
  bool is_special(int32_t id) const;                // a special / control token
  const std::string& token(int32_t id) const;       // the vocabulary string (as in the file)
  int32_t token_id(std::string_view token) const;   // the id of a vocabulary string, -1 if absent

  /// The shared implementation state (for StreamDecoder and tests; defined in the library's
  /// src/model/detail/tokenizer_impl.hpp).
  const detail::TokenizerData& data() const { return *d_; }

 private:
  explicit Tokenizer(std::shared_ptr<const detail::TokenizerData> d) : d_(std::move(d)) {}
  friend class StreamDecoder;
  std::shared_ptr<const detail::TokenizerData> d_;
};

/// Incremental decoder: push(id) returns the newly completed text, holding back bytes of a
/// character not yet complete (e.g. byte-fallback tokens or byte-level pieces of a multi-byte
/// character). The concatenation of every push() and a final flush() equals
/// decode(ids, skip_special) whenever that decode contains no U+FFFD.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true);
  std::string push(int32_t id);  // throws Error on an id out of range (state unchanged)
  std::string flush();           // what is held back, invalid bytes as U+FFFD; then reset()
  void reset();                  // start a new text (the leading-space strip applies again)

 private:
  std::shared_ptr<const detail::TokenizerData> d_;
  bool skip_special_;
  int strip_left_ = 0;   // leading spaces the decoder's Strip may still remove (nothing emitted yet)
  std::string pending_;  // bytes of an incomplete UTF-8 character
};

}  // namespace recurformer
