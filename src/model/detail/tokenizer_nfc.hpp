// src/model/detail/tokenizer_nfc.hpp: Unicode NFC (the normalizer of Qwen2's tokenizer.json):
// full canonical decomposition, canonical ordering of combining marks, canonical composition
// (UAX #15), with Hangul done algorithmically and tables from tokenizer_nfc_tables.hpp.
// Text whose code points are all below U+0300 is always NFC and is returned untouched without
// decoding (one byte scan), so the common case costs almost nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "model/detail/tokenizer_nfc_tables.hpp"
#include "model/detail/tokenizer_unicode.hpp"

namespace recurformer {
namespace detail {
namespace tok {
namespace nfc {

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

inline uint8_t ccc(uint32_t cp) {
  if (cp < 0x300) return 0;
  const auto* e = std::end(kCcc);
  const auto* it = std::lower_bound(std::begin(kCcc), e, cp, [](const Ccc& a, uint32_t c) { return a.cp < c; });
  return it != e && it->cp == cp ? it->ccc : 0;
}

inline void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0) {
    const auto* e = std::end(kDecomp);
    const auto* it = std::lower_bound(std::begin(kDecomp), e, cp, [](const Decomp& a, uint32_t c) { return a.cp < c; });
    if (it != e && it->cp == cp) {
      out.insert(out.end(), kDecompData + it->offset, kDecompData + it->offset + it->len);
      return;
    }
  }
  out.push_back(cp);
}

/// The primary composite of (a, b), or 0.
inline uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto* e = std::end(kPairs);
  const auto* it = std::lower_bound(std::begin(kPairs), e, std::make_pair(a, b), [](const Pair& p, const std::pair<uint32_t, uint32_t>& k) {
    return p.first != k.first ? p.first < k.first : p.second < k.second;
  });
  return it != e && it->first == a && it->second == b ? it->composite : 0;
}

/// Normalizes valid UTF-8 `s` to NFC in place.
inline void normalize(std::string& s) {
  if (std::none_of(s.begin(), s.end(), [](char c) { return uint8_t(c) >= 0xCC; })) return;  // all < U+0300
  std::vector<uint32_t> d;
  d.reserve(s.size());
  for (size_t i = 0; i < s.size();) decompose(next_code_point(s, i), d);
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (ccc(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && ccc(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + long(i), d.begin() + long(j), [](uint32_t a, uint32_t b) { return ccc(a) < ccc(b); });
    i = j;
  }
  // Canonical composition: a character joins the last starter unless blocked by a mark in between
  // of the same or higher class (or by any starter).
  std::vector<uint32_t> out;
  out.reserve(d.size());
  long starter = -1;
  for (uint32_t c : d) {
    const uint8_t cc = ccc(c);
    if (starter >= 0) {
      const bool adjacent = long(out.size()) - 1 == starter;
      if (adjacent || ccc(out.back()) < cc) {
        if (const uint32_t p = compose(out[size_t(starter)], c)) {
          out[size_t(starter)] = p;
          continue;
        }
      }
    }
    if (cc == 0) starter = long(out.size());
    out.push_back(c);
  }
  std::string r;
  r.reserve(s.size());
  for (uint32_t c : out) append_utf8(r, c);
  s.swap(r);
}

}  // namespace nfc
}  // namespace tok
}  // namespace detail
}  // namespace recurformer
