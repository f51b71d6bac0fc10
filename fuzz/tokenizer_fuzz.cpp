// fuzz/tokenizer_fuzz.cpp: libFuzzer target for the tokenizer loader and pipeline.
//
// Input: a tokenizer.json, optionally followed by a NUL byte and a text to encode. Loading must
// either succeed or throw recurformer::Error (never crash, hang or throw anything else); a loaded
// tokenizer must encode the text (or reject invalid UTF-8 with Error), decode the ids, and stream-
// decode them to the same text. Seeds: tests/data/tokenizers/*/tokenizer.json.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "recurformer/model/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string_view json = in.substr(0, nul);
  const std::string_view text = nul == std::string_view::npos ? std::string_view("Hello, world! 123 <s>") : in.substr(nul + 1);
  try {
    const auto tok = recurformer::Tokenizer::from_hf_json(json, {}, "fuzz.json");
    std::vector<int32_t> ids;
    try {
      ids = tok.encode(text, true);
    } catch (const recurformer::Error&) {
      return 0;  // invalid UTF-8 (or a regex that hit PCRE2's match limit)
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
  } catch (const recurformer::Error&) {
  }
  return 0;
}
