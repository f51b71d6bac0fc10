// src/model/detail/tokenizer_unicode.hpp: the UTF-8 and byte-map helpers the tokenizers
// share: validation, code point iteration, the GPT-2 byte <-> unicode map, and lossy repair
// (invalid bytes -> U+FFFD, one per maximal invalid subpart as Rust's from_utf8_lossy).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace recurformer {
namespace detail {
namespace tok {

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

/// Length of the valid UTF-8 sequence starting at s[i] (1..4), 0 if it is invalid, or -k if the
/// k bytes up to the end are a valid but incomplete prefix of a sequence.
inline int utf8_sequence_length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return uint8_t(s[i + k]); };
  const uint8_t c = b(0);
  if (c < 0x80) return 1;
  int n;
  uint8_t lo = 0x80, hi = 0xBF;  // bounds of the second byte (no overlongs, surrogates, > U+10FFFF)
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (int k = 1; k < n; ++k) {
    if (i + k >= s.size()) return -k;
    const uint8_t x = b(k);
    if (k == 1 ? (x < lo || x > hi) : (x < 0x80 || x > 0xBF)) return 0;
  }
  return n;
}

/// Byte offset of the first invalid byte, or npos if `s` is valid UTF-8.
inline size_t utf8_invalid_at(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const int n = utf8_sequence_length(s, i);
    if (n <= 0) return i;
    i += size_t(n);
  }
  return std::string_view::npos;
}

/// Decodes the code point at s[i] (assumed valid) and advances i.
inline uint32_t next_code_point(std::string_view s, size_t& i) {
  const uint8_t c = uint8_t(s[i]);
  if (c < 0x80) {
    ++i;
    return c;
  }
  const int n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
  uint32_t cp = c & (0x7F >> n);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3F);
  i += size_t(n);
  return cp;
}

inline size_t utf8_char_length(uint8_t lead) {
  return lead < 0x80 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
}

constexpr const char* kReplacementChar = "\xEF\xBF\xBD";

/// Appends `s` to `out` with every maximal invalid subpart replaced by U+FFFD. With
/// hold_incomplete, a valid but incomplete sequence at the end is not appended; its length is
/// returned (else 0).
inline size_t append_lossy(std::string& out, std::string_view s, bool hold_incomplete = false) {
  size_t i = 0;
  while (i < s.size()) {
    const int n = utf8_sequence_length(s, i);
    if (n > 0) {
      out.append(s.data() + i, size_t(n));
      i += size_t(n);
    } else if (n < 0) {
      if (hold_incomplete) return s.size() - i;
      out += kReplacementChar;  // a truncated sequence is one maximal subpart
      i += size_t(-n);
    } else {
      // The invalid subpart is the lead byte plus the continuation bytes that were acceptable.
      size_t k = 1;
      const uint8_t c = uint8_t(s[i]);
      if (c >= 0xC2 && c <= 0xF4) {
        // Count the valid continuation prefix before the failure.
        const uint8_t lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;
        const uint8_t hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
        const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        while (k < need && i + k < s.size()) {
          const uint8_t x = uint8_t(s[i + k]);
          if (k == 1 ? (x < lo || x > hi) : (x < 0x80 || x > 0xBF)) break;
          ++k;
        }
      }
      out += kReplacementChar;
      i += k;
    }
  }
  return 0;
}

/// The GPT-2 byte-level map: printable bytes stand for themselves, the other 68 are shifted to
/// U+0100.. so every byte is a visible code point.
struct ByteUnicodeMap {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 324> cp_to_byte{};  // every mapped code point is < 324

  ByteUnicodeMap() {
    cp_to_byte.fill(-1);
    uint32_t extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[size_t(b)] = printable ? uint32_t(b) : 256 + extra++;
      cp_to_byte[byte_to_cp[size_t(b)]] = int16_t(b);
    }
  }
  static const ByteUnicodeMap& get() {
    static const ByteUnicodeMap m;
    return m;
  }
  /// The raw bytes a byte-level string stands for; false if a code point is outside the map.
  bool to_bytes(std::string_view s, std::string& out) const {
    out.clear();
    if (utf8_invalid_at(s) != std::string_view::npos) return false;
    for (size_t i = 0; i < s.size();) {
      const uint32_t cp = next_code_point(s, i);
      if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0) return false;
      out += char(cp_to_byte[cp]);
    }
    return true;
  }
  std::string to_unicode(std::string_view bytes) const {
    std::string out;
    for (char c : bytes) append_utf8(out, byte_to_cp[uint8_t(c)]);
    return out;
  }
};

}  // namespace tok
}  // namespace detail
}  // namespace recurformer
