// fuzz/tokenizer_fuzz.cpp: libFuzzer target for the tokenizer loader and pipeline.
//
// Input: a tokenizer.json, optionally followed by a NUL byte and a text to encode. Loading must
// either succeed or throw recurformer::Error (never crash, hang or throw anything else); a loaded
// tokenizer must encode the text (or reject invalid UTF-8 with Error), give ids in range, decode
// them, and stream-decode them to the same text.
// An input starting with "\x01".."\x03" instead encodes the rest with one of three small built-in
// tokenizers (Llama 3-style byte-level BPE with NFC, Llama 2-style byte-fallback BPE, legacy=false
// Metaspace), so the encode paths are fuzzed from the first run, without a seed corpus.
// Good seeds: tests/data/tokenizers/*/tokenizer.json.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "recurformer/model/tokenizer.hpp"

namespace {

const char* const kBuiltin[] = {
    // Byte-level BPE, Llama 3 regex, NFC, ignore_merges, a special token and a BOS template.
    R"({"added_tokens":[{"id":9,"content":"<|bos|>","special":true}],"normalizer":{"type":"NFC"},
        "pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
        "behavior":"Isolated","invert":false},{"type":"ByteLevel","add_prefix_space":false,"use_regex":false}]},
        "post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<|bos|>"}},{"Sequence":{"id":"A"}}],
        "special_tokens":{"<|bos|>":{"id":"<|bos|>","ids":[9]}}},"decoder":{"type":"ByteLevel"},
        "model":{"type":"BPE","ignore_merges":true,"vocab":{"a":0,"b":1,"ab":2,"\u0120":3,"\u0120ab":4,"c":5,"abc":6,"1":7,"11":8},
        "merges":["a b","\u0120 ab","ab c","1 1"]}})",
    // SentencePiece-style BPE with byte fallback (Llama 2 pipeline).
    R"({"added_tokens":[{"id":1,"content":"<s>","special":true}],"normalizer":{"type":"Sequence","normalizers":[
        {"type":"Prepend","prepend":"\u2581"},{"type":"Replace","pattern":{"String":" "},"content":"\u2581"}]},
        "decoder":{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"\u2581"},"content":" "},
        {"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]},
        "model":{"type":"BPE","byte_fallback":true,"fuse_unk":true,"unk_token":"<unk>","vocab":{"<unk>":0,"<s>":1,
        "<0xC3>":2,"<0xA9>":3,"<0xE2>":4,"<0x82>":5,"<0xAC>":6,"\u2581":7,"a":8,"\u2581a":9,"b":10,"ab":11,"\u2581ab":12},
        "merges":[["\u2581","a"],["a","b"],["\u2581a","b"],["\u2581","ab"]]}})",
    // Metaspace pre-tokenizer (prepend_scheme first) and decoder, no normalizer.
    R"({"pre_tokenizer":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"first","split":true},
        "decoder":{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"first","split":true},
        "model":{"type":"BPE","unk_token":"<unk>","fuse_unk":true,"vocab":{"<unk>":0,"\u2581":1,"x":2,"\u2581x":3,"xx":4},
        "merges":["\u2581 x","x x"]}})",
};

void exercise(const recurformer::Tokenizer& tok, std::string_view text) {
  std::vector<int32_t> ids;
  try {
    ids = tok.encode(text, true);
  } catch (const recurformer::Error&) {
    return;  // invalid UTF-8, or a regex that hit PCRE2's match limit
  }
  for (int32_t id : ids)
    if (id < 0 || id >= tok.vocab_size()) std::abort();
  const std::string decoded = tok.decode(ids);
  auto sd = tok.stream_decoder(false);
  std::string streamed;
  for (int32_t id : ids) streamed += sd.push(id);
  streamed += sd.flush();
  // Streaming equals decode() whenever decode() had nothing to repair.
  if (decoded.find("\xEF\xBF\xBD") == std::string::npos && streamed != decoded) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  if (!in.empty() && in[0] >= 1 && in[0] <= 3) {
    static const std::vector<recurformer::Tokenizer> builtin = [] {
      std::vector<recurformer::Tokenizer> v;
      for (const char* j : kBuiltin) v.push_back(recurformer::Tokenizer::from_hf_json(j, {}, "builtin.json"));
      return v;
    }();
    exercise(builtin[size_t(in[0] - 1)], in.substr(1));
    return 0;
  }
  const size_t nul = in.find('\0');
  const std::string_view json = in.substr(0, nul);
  const std::string_view text = nul == std::string_view::npos ? std::string_view("Hello, world! 123 <s>") : in.substr(nul + 1);
  try {
    exercise(recurformer::Tokenizer::from_hf_json(json, {}, "fuzz.json"), text);
  } catch (const recurformer::Error&) {
  }
  return 0;
}
