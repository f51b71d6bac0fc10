// src/model/detail/tokenizer_regex.hpp: the pre-tokenizer regexes, compiled with PCRE2 in
// UTF mode with Unicode properties for \s, \w, \d (UCP), as Oniguruma does in HF tokenizers, and
// JIT-compiled when the library has a JIT. Text is validated once by the caller, so matching skips
// PCRE2's own UTF check.
#pragma once

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "recurformer/core/error.hpp"

namespace recurformer {
namespace detail {
namespace tok {

class Regex {
 public:
  /// Throws Error naming `where` when the pattern does not compile.
  Regex(const std::string& pattern, const std::string& where) : pattern_(pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail(where, ": regex /", pattern, "/ does not compile at offset ", off, ": ",
           reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // failure just means interpreted matching
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  const std::string& pattern() const { return pattern_; }

  /// Match data for find_all, reusable across patterns and calls (one per thread).
  using MatchData = std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)>;
  static MatchData make_match_data() {
    MatchData md(pcre2_match_data_create(16, nullptr), &pcre2_match_data_free);
    if (!md) fail("tokenizer: out of memory for regex match data");
    return md;
  }

  /// Appends the [begin, end) byte spans of every non-overlapping match in `s` (valid UTF-8),
  /// left to right; an empty match advances by one character.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& spans, pcre2_match_data* md) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t at = 0;
    while (at <= s.size()) {
      const int rc = pcre2_match(code_, subject, s.size(), at, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {  // rc == 0 only says the ovector holds fewer groups than the pattern has
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        fail("tokenizer: regex /", pattern_, "/ failed: ", reinterpret_cast<const char*>(msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e > b) {
        spans.emplace_back(b, e);
        at = e;
      } else {  // empty match: step over one whole character
        if (b >= s.size()) break;
        at = b + 1;
        while (at < s.size() && (uint8_t(s[at]) & 0xC0) == 0x80) ++at;
      }
    }
  }

 private:
  std::string pattern_;
  pcre2_code* code_ = nullptr;
};

/// The pre-tokenizer patterns of the Llama family's tokenizer.json files and llama.cpp's `pre` names.
struct Patterns {
  // GPT-2 (ByteLevel use_regex, SmolLM).
  static constexpr const char* gpt2 =
      "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
  // Llama 3.
  static constexpr const char* llama3 =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
      "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  // Qwen2.
  static constexpr const char* qwen2 =
      "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
      "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
};

}  // namespace tok
}  // namespace detail
}  // namespace recurformer
