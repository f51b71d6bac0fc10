// src/model/detail/tokenizer_impl.hpp: the tokenizer's state and its pipeline (private to the
// library and its tests; src/model/tokenizer.cpp defines the public classes over it).
//
// Loading turns tokenizer.json (or GGUF metadata) into TokenizerData: the vocabulary keyed the way
// the model sees it (byte-level BPE: raw bytes, the GPT-2 map undone once here, so encoding never
// maps bytes to code points and back), a merge table keyed by id pairs, the added tokens indexed by
// first byte, the normalizer and pre-tokenizer steps, the BOS/EOS template, and each token's decoded
// bytes. Encoding: split out added tokens -> normalize -> pre-tokenize -> BPE per piece.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <mutex>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "recurformer/core/error.hpp"
#include "recurformer/model/detail/json_util.hpp"
#include "model/detail/tokenizer_bpe.hpp"
#include "model/detail/tokenizer_nfc.hpp"
#include "model/detail/tokenizer_regex.hpp"
#include "model/detail/tokenizer_unicode.hpp"
#include "recurformer/model/tokenizer.hpp"

namespace recurformer {
namespace detail {
namespace tok {

constexpr const char* kMetaspace = "\xE2\x96\x81";  // U+2581 '▁', SentencePiece's space

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip, single_word;
};

enum class SplitBehavior { isolated, removed, merged_with_previous, merged_with_next, contiguous };

struct NormStep {
  enum class Kind { prepend, replace, nfc } kind;
  std::string a, b;  // prepend: a; replace: a -> b
};

struct PreStep {
  enum class Kind { split, byte_level, metaspace } kind;
  std::shared_ptr<const Regex> re;  // split (regex or digits), byte_level with use_regex
  std::string literal;              // split on a plain string
  SplitBehavior behavior = SplitBehavior::isolated;
  bool add_prefix_space = false;    // byte_level
  enum class Prepend { always, first, never } prepend = Prepend::always;  // metaspace
  bool split = false;               // metaspace: split before each '▁'
};

/// Spans of `piece` that a split step isolates, as (begin, end, is_match).
inline void split_spans(const PreStep& st, std::string_view s, std::vector<std::pair<size_t, size_t>>& m,
                        pcre2_match_data* md) {
  m.clear();
  if (st.re) {
    st.re->find_all(s, m, md);
  } else if (!st.literal.empty()) {
    for (size_t at = s.find(st.literal); at != std::string_view::npos; at = s.find(st.literal, at + st.literal.size()))
      m.emplace_back(at, at + st.literal.size());
  }
}

struct SplitScratch {
  std::vector<std::pair<size_t, size_t>> spans;
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> parts;
  Regex::MatchData md = Regex::make_match_data();
};

/// Applies a split with HF's delimiter behaviours; appends the non-empty pieces to `out`.
inline void split_piece(const PreStep& st, std::string_view s, SplitScratch& sc, std::vector<std::string>& out) {
  auto& m = sc.spans;
  split_spans(st, s, m, sc.md.get());
  auto& parts = sc.parts;
  parts.clear();
  size_t prev = 0;
  for (auto [b, e] : m) {
    if (b > prev) parts.push_back({{prev, b}, false});
    parts.push_back({{b, e}, true});
    prev = e;
  }
  if (prev < s.size()) parts.push_back({{prev, s.size()}, false});
  const auto emit = [&](size_t b, size_t e) {
    if (e > b) out.emplace_back(s.substr(b, e - b));
  };
  switch (st.behavior) {
    case SplitBehavior::isolated:
      for (auto& p : parts) emit(p.first.first, p.first.second);
      break;
    case SplitBehavior::removed:
      for (auto& p : parts)
        if (!p.second) emit(p.first.first, p.first.second);
      break;
    case SplitBehavior::merged_with_previous: {
      size_t start = 0;
      for (auto& p : parts)
        if (p.second) emit(start, p.first.second), start = p.first.second;
      emit(start, s.size());
      break;
    }
    case SplitBehavior::merged_with_next: {
      size_t start = 0;
      for (auto& p : parts)
        if (p.second) emit(start, p.first.first), start = p.first.first;
      emit(start, s.size());
      break;
    }
    case SplitBehavior::contiguous: {
      size_t start = 0;
      bool in_match = false;
      for (auto& p : parts) {
        if (p.second != in_match && p.first.first > start) emit(start, p.first.first), start = p.first.first;
        in_match = p.second;
      }
      emit(start, s.size());
      break;
    }
  }
}

inline void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string r;
  size_t prev = 0;
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, prev)) {
    r.append(s, prev, at - prev);
    r.append(to);
    prev = at + from.size();
  }
  if (prev == 0) return;
  r.append(s, prev, std::string::npos);
  s.swap(r);
}

/// Unicode White_Space (Rust's char::is_whitespace, which HF's lstrip / rstrip use).
inline bool is_unicode_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
/// Byte length of the white-space character ending at s[end) (valid UTF-8), or 0.
inline size_t space_before(std::string_view s, size_t end) {
  size_t b = end;
  while (b > 0 && (uint8_t(s[b - 1]) & 0xC0) == 0x80) --b;
  if (b == 0) return 0;
  size_t i = --b;
  return is_unicode_space(next_code_point(s, i)) ? end - b : 0;
}
/// Byte length of the white-space character starting at s[begin], or 0.
inline size_t space_at(std::string_view s, size_t begin) {
  size_t i = begin;
  return begin < s.size() && is_unicode_space(next_code_point(s, i)) ? i - begin : 0;
}
inline bool is_word_byte(char c) {
  const auto u = uint8_t(c);
  return u >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

/// "<0xAB>" -> 0xAB, else -1.
inline int parse_byte_token(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
  int v = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char c = t[i];
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

}  // namespace tok

struct TokenizerData {
  std::string source;  // file name for messages

  // Vocabulary.
  std::vector<std::string> tokens;                      // [vocab] as in the file ("" for holes)
  std::vector<std::string> pieces;                      // [vocab] decoded bytes of each token
  std::vector<uint8_t> special;                         // [vocab] special / control
  std::vector<int16_t> byte_of_token;                   // [vocab] byte-fallback token <0xXX>: XX, else -1
  std::vector<float> scores;                            // [vocab] GGUF "llama" merge priority
  std::unordered_map<std::string, int32_t> model_vocab; // model key (byte-level: raw bytes) -> id
  std::unordered_map<std::string, int32_t> token_ids;   // file string -> id
  std::array<int32_t, 256> byte_ids{};                  // id of each byte's symbol (byte-level) or <0xXX> token; -1
  tok::MergeTable merges;

  // Model.
  bool byte_level = false;     // symbols are bytes
  bool score_merges = false;   // llama.cpp SPM: merge by score, not rank
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  // SentencePiece-style files have no pre-tokenizer: the whole segment is one BPE word. When no
  // vocabulary token has a '▁' after another character, no merge can cross the start of a '▁' run,
  // so the word is cut there into short, cacheable words with identical results.
  bool split_at_metaspace = false;
  int32_t unk = -1, bos = -1, eos = -1, pad = -1;

  // Pipeline.
  std::vector<tok::AddedToken> added;
  std::array<std::vector<int32_t>, 256> added_by_first_byte;  // indices into added, longest first
  std::vector<tok::NormStep> normalizers;
  std::vector<tok::PreStep> pre;
  std::vector<int32_t> prefix, suffix;  // post-processor template around the text's ids

  // Decoder.
  bool decode_byte_level = false;  // concatenate bytes, then repair as UTF-8 (HF ByteLevel)
  bool decode_byte_fallback = false;
  int strip_left = 0;              // Strip decoder: leading spaces removed from the output

  int32_t vocab_size() const { return int32_t(tokens.size()); }
  static const std::string& kMetaspaceStr() {
    static const std::string m = tok::kMetaspace;
    return m;
  }

  void check_id(int32_t id, const char* where) const {
    if (id < 0 || id >= vocab_size())
      fail("tokenizer (", source, "): ", where, ": id ", id, " out of range [0, ", vocab_size(), ")");
  }

  // --- finishing a load ------------------------------------------------------------------------

  void set_vocab_size(size_t n) {
    tokens.resize(n);
    special.assign(n, 0);
  }

  /// Fills pieces, byte_of_token, byte_ids, token_ids, the added-token index; call last.
  void finish() {
    const auto& bm = tok::ByteUnicodeMap::get();
    const size_t n = tokens.size();
    pieces.assign(n, std::string());
    byte_of_token.assign(n, -1);
    token_ids.reserve(n);
    std::string bytes;
    for (size_t i = 0; i < n; ++i) {
      const std::string& t = tokens[i];
      token_ids.emplace(t, int32_t(i));
      if (decode_byte_level) {
        pieces[i] = bm.to_bytes(t, bytes) ? bytes : t;
      } else {
        pieces[i] = t;
        tok::replace_all(pieces[i], tok::kMetaspace, " ");
        if (decode_byte_fallback) {
          const int b = tok::parse_byte_token(t);
          if (b >= 0) byte_of_token[i] = int16_t(b), pieces[i] = std::string(1, char(b));
        }
      }
    }
    byte_ids.fill(-1);
    for (int b = 0; b < 256; ++b) {
      if (byte_level) {
        auto it = model_vocab.find(std::string(1, char(b)));
        if (it != model_vocab.end()) byte_ids[size_t(b)] = it->second;
      } else {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        auto it = model_vocab.find(name);
        if (it != model_vocab.end()) byte_ids[size_t(b)] = it->second;
      }
    }
    split_at_metaspace = !byte_level && model_vocab.count(kMetaspaceStr()) != 0;
    for (const auto& kv : model_vocab) {
      if (!split_at_metaspace) break;
      const std::string& t = kv.first;
      for (size_t at = t.find(tok::kMetaspace, 1); at != std::string::npos; at = t.find(tok::kMetaspace, at + 1))
        if (at < 3 || t.compare(at - 3, 3, tok::kMetaspace) != 0) {
          split_at_metaspace = false;
          break;
        }
    }
    for (auto& v : added_by_first_byte) v.clear();
    for (size_t i = 0; i < added.size(); ++i) {
      if (added[i].content.empty()) continue;
      added_by_first_byte[uint8_t(added[i].content[0])].push_back(int32_t(i));
      if (added[i].special) special[size_t(added[i].id)] = 1;
    }
    for (auto& v : added_by_first_byte)
      std::stable_sort(v.begin(), v.end(), [&](int32_t a, int32_t b) {
        return added[size_t(a)].content.size() > added[size_t(b)].content.size();
      });
  }

  // --- encoding ----------------------------------------------------------------------------------

  struct Segment {
    size_t begin, end;
    int32_t id;  // >= 0: an added token
  };

  /// Splits `text` around added tokens, leftmost-longest, with lstrip / rstrip / single_word.
  void split_added(std::string_view text, std::vector<Segment>& segs) const {
    segs.clear();
    size_t seg_start = 0;
    for (size_t i = 0; i < text.size();) {
      const auto& cands = added_by_first_byte[uint8_t(text[i])];
      const tok::AddedToken* hit = nullptr;
      for (int32_t c : cands) {
        const auto& a = added[size_t(c)];
        if (text.compare(i, a.content.size(), a.content) != 0) continue;
        if (a.single_word && ((i > 0 && tok::is_word_byte(text[i - 1])) ||
                              (i + a.content.size() < text.size() && tok::is_word_byte(text[i + a.content.size()]))))
          continue;
        hit = &a;
        break;
      }
      if (!hit) {
        ++i;
        continue;
      }
      size_t b = i, e = i + hit->content.size();
      if (hit->lstrip)
        for (size_t n; b > seg_start && (n = tok::space_before(text, b)) != 0 && b - n >= seg_start;) b -= n;
      if (hit->rstrip)
        for (size_t n; (n = tok::space_at(text, e)) != 0;) e += n;
      if (b > seg_start) segs.push_back({seg_start, b, -1});
      segs.push_back({b, e, hit->id});
      seg_start = i = e;
    }
    if (seg_start < text.size()) segs.push_back({seg_start, text.size(), -1});
  }

  void normalize(std::string& s) const {
    for (const auto& n : normalizers) {
      switch (n.kind) {
        case tok::NormStep::Kind::prepend:
          if (!s.empty()) s.insert(0, n.a);
          break;
        case tok::NormStep::Kind::replace:
          tok::replace_all(s, n.a, n.b);
          break;
        case tok::NormStep::Kind::nfc:
          tok::nfc::normalize(s);
          break;
      }
    }
  }

  struct Scratch {
    std::string text, key;
    std::vector<std::string> pieces, next;
    tok::SplitScratch split;
    std::vector<tok::Symbol> syms;
  };

  void pre_tokenize(bool text_start, Scratch& sc) const {
    for (const auto& st : pre) {
      sc.next.clear();
      for (size_t k = 0; k < sc.pieces.size(); ++k) {
        std::string& p = sc.pieces[k];
        switch (st.kind) {
          case tok::PreStep::Kind::split:
            tok::split_piece(st, p, sc.split, sc.next);
            break;
          case tok::PreStep::Kind::byte_level:
            if (st.add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(0, 1, ' ');
            if (st.re)
              tok::split_piece(st, p, sc.split, sc.next);
            else
              sc.next.push_back(std::move(p));
            break;
          case tok::PreStep::Kind::metaspace: {
            tok::replace_all(p, " ", tok::kMetaspace);
            const bool first = text_start && k == 0;
            if ((st.prepend == tok::PreStep::Prepend::always ||
                 (st.prepend == tok::PreStep::Prepend::first && first)) &&
                p.compare(0, 3, tok::kMetaspace) != 0)
              p.insert(0, tok::kMetaspace);
            if (st.split)
              tok::split_piece(st, p, sc.split, sc.next);
            else
              sc.next.push_back(std::move(p));
            break;
          }
        }
      }
      sc.pieces.swap(sc.next);
    }
  }

  void push_unk(std::vector<tok::Symbol>& syms, uint32_t begin, uint32_t len) const {
    if (unk < 0) return;  // HF drops what it cannot represent when there is no unk token
    if (fuse_unk && !syms.empty() && syms.back().id == unk) {
      syms.back().len += len;
      return;
    }
    syms.push_back({unk, int32_t(syms.size()) - 1, -1, begin, len});
  }

  // Word cache: pre-tokens repeat (Zipf), so the ids of short ones are kept, as HF's BPE cache
  // does. Bounded (inserts stop when full); lookups take a shared lock so concurrent encodes scale.
  static constexpr size_t kCacheMaxWord = 48, kCacheMaxEntries = size_t(1) << 16;
  mutable std::shared_mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  void bpe(std::string_view w, Scratch& sc, std::vector<int32_t>& out) const {
    if (w.size() > kCacheMaxWord) return bpe_uncached(w, sc, out);
    sc.key.assign(w.data(), w.size());
    {
      std::shared_lock<std::shared_mutex> lock(cache_mu);
      auto it = cache.find(sc.key);
      if (it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t start = out.size();
    bpe_uncached(w, sc, out);
    std::unique_lock<std::shared_mutex> lock(cache_mu);
    if (cache.size() < kCacheMaxEntries) cache.emplace(sc.key, std::vector<int32_t>(out.begin() + long(start), out.end()));
  }

  /// One pre-token through the BPE model.
  void bpe_uncached(std::string_view w, Scratch& sc, std::vector<int32_t>& out) const {
    if (w.empty()) return;
    if (ignore_merges) {
      auto it = model_vocab.find(std::string(w));
      if (it != model_vocab.end()) return out.push_back(it->second);
    }
    auto& syms = sc.syms;
    syms.clear();
    const auto push = [&](int32_t id, size_t b, size_t len) {
      syms.push_back({id, int32_t(syms.size()) - 1, -1, uint32_t(b), uint32_t(len)});
    };
    if (byte_level) {
      for (size_t i = 0; i < w.size(); ++i) {
        const int32_t id = byte_ids[uint8_t(w[i])];
        if (id >= 0)
          push(id, i, 1);
        else
          push_unk(syms, uint32_t(i), 1);
      }
    } else {
      std::string ch;
      for (size_t i = 0; i < w.size();) {
        const size_t n = std::min(tok::utf8_char_length(uint8_t(w[i])), w.size() - i);
        ch.assign(w.data() + i, n);
        auto it = model_vocab.find(ch);
        if (it != model_vocab.end()) {
          push(it->second, i, n);
        } else if (score_merges) {
          push(-1, i, n);  // resolved after merging: byte fallback or unk
        } else if (byte_fallback && std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_ids[uint8_t(c)] >= 0; })) {
          for (size_t k = 0; k < n; ++k) push(byte_ids[uint8_t(ch[k])], i + k, 1);
        } else {
          push_unk(syms, uint32_t(i), uint32_t(n));
        }
        i += n;
      }
    }
    for (size_t i = 0; i < syms.size(); ++i) syms[i].next = i + 1 < syms.size() ? int32_t(i + 1) : -1;
    if (!score_merges) return tok::merge_by_rank(syms, merges, out);

    const auto lookup = [&](std::string_view s) {
      auto it = model_vocab.find(std::string(s));
      return it == model_vocab.end() ? -1 : it->second;
    };
    const auto score = [&](int32_t id) { return scores[size_t(id)]; };
    tok::merge_by_score(w, syms, lookup, score);
    for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[size_t(i)].next) {
      const auto& s = syms[size_t(i)];
      if (s.id >= 0) {
        out.push_back(s.id);
        continue;
      }
      for (uint32_t k = 0; k < s.len; ++k) {
        const int32_t b = byte_ids[uint8_t(w[s.begin + k])];
        if (b >= 0)
          out.push_back(b);
        else if (unk >= 0)
          out.push_back(unk);
      }
    }
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const {
    const size_t bad = tok::utf8_invalid_at(text);
    if (bad != std::string_view::npos)
      fail("tokenizer (", source, "): encode: text is not valid UTF-8 at byte ", bad);
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 4);
    if (add_special) out.insert(out.end(), prefix.begin(), prefix.end());
    std::vector<Segment> segs;
    split_added(text, segs);
    Scratch sc;
    for (const auto& sg : segs) {
      if (sg.id >= 0) {
        out.push_back(sg.id);
        continue;
      }
      sc.text.assign(text.data() + sg.begin, sg.end - sg.begin);
      normalize(sc.text);
      sc.pieces.clear();
      sc.pieces.push_back(std::move(sc.text));
      pre_tokenize(sg.begin == 0, sc);
      for (const auto& p : sc.pieces) {
        if (!split_at_metaspace) {
          bpe(p, sc, out);
          continue;
        }
        const std::string_view w(p);
        size_t start = 0;
        for (size_t at = w.find(tok::kMetaspace, 1); at != std::string_view::npos; at = w.find(tok::kMetaspace, at + 3)) {
          if (at >= 3 && w.compare(at - 3, 3, tok::kMetaspace) == 0) continue;  // inside a run of '▁'
          bpe(w.substr(start, at - start), sc, out);
          start = at;
        }
        bpe(w.substr(start), sc, out);
      }
    }
    if (add_special) out.insert(out.end(), suffix.begin(), suffix.end());
    return out;
  }

  // --- decoding ----------------------------------------------------------------------------------

  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const {
    for (int32_t id : ids) check_id(id, "decode");
    std::string raw, out;
    size_t group = 0;  // trailing byte-fallback bytes in raw not yet checked
    const auto flush_group = [&]() {
      if (!group) return;
      const std::string_view g(raw.data() + raw.size() - group, group);
      if (tok::utf8_invalid_at(g) != std::string_view::npos) {  // HF ByteFallback: one U+FFFD per byte
        raw.resize(raw.size() - group);
        for (size_t k = 0; k < group; ++k) raw += tok::kReplacementChar;
      }
      group = 0;
    };
    for (int32_t id : ids) {
      if (skip_special && special[size_t(id)]) continue;
      if (!decode_byte_level && byte_of_token[size_t(id)] >= 0) {
        raw += pieces[size_t(id)];
        ++group;
        continue;
      }
      flush_group();
      raw += pieces[size_t(id)];
    }
    flush_group();
    if (decode_byte_level)
      tok::append_lossy(out, raw);
    else
      out.swap(raw);
    size_t cut = 0;
    while (cut < size_t(strip_left) && cut < out.size() && out[cut] == ' ') ++cut;
    out.erase(0, cut);
    return out;
  }
};

// --- loading tokenizer.json ------------------------------------------------------------------------

class HfLoader {
 public:
  static constexpr int64_t kMaxVocab = int64_t(1) << 22;  // 4M ids; the largest real vocabularies are ~256K

  using json = nlohmann::json;

  HfLoader(TokenizerData& d, const std::string& source) : d_(d), src_(source) {}

  [[noreturn]] void bad(const std::string& what) const { fail("tokenizer (", src_, "): ", what); }

  static std::string type_of(const json& j) {
    if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) return "";
    return j["type"].get<std::string>();
  }
  static bool flag(const json& j, const char* key, bool dflt) {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? dflt : it->get<bool>();
  }

  void load(const json& root, const json* config) {
    if (!root.is_object()) bad("the top level is not a JSON object");
    if (!root.contains("model") || !root["model"].is_object()) bad("no \"model\" object");
    const json& model = root["model"];
    const std::string mtype = type_of(model);
    if (!(mtype == "BPE" || (mtype.empty() && model.contains("merges"))))
      bad("unsupported model type \"" + mtype + "\" (supported: BPE)");

    d_.byte_level = uses_byte_level(root);
    load_vocab(model, root.contains("added_tokens") ? root["added_tokens"] : json());
    if (root.contains("normalizer")) load_normalizer(root["normalizer"]);
    if (root.contains("pre_tokenizer")) load_pre_tokenizer(root["pre_tokenizer"]);
    if (root.contains("decoder")) load_decoder(root["decoder"]);
    if (!root.contains("decoder") || root["decoder"].is_null()) d_.decode_byte_level = d_.byte_level;
    d_.finish();
    load_merges(model);
    if (root.contains("post_processor")) load_post_processor(root["post_processor"]);
    if (config) load_config(*config);
  }

 private:
  static bool has_type(const json& j, const char* t, int depth = 0) {
    if (j.is_null() || depth > kMaxDepth) return false;
    if (type_of(j) == t) return true;
    for (const char* key : {"pretokenizers", "decoders", "normalizers", "processors"})
      if (j.is_object() && j.contains(key) && j[key].is_array())
        for (const auto& c : j[key])
          if (has_type(c, t, depth + 1)) return true;
    return false;
  }
  static bool uses_byte_level(const json& root) {
    for (const char* key : {"pre_tokenizer", "decoder"})
      if (root.contains(key) && has_type(root[key], "ByteLevel")) return true;
    return false;
  }

  void load_vocab(const json& model, const json& added_tokens) {
    if (!model.contains("vocab") || !model["vocab"].is_object()) bad("model.vocab is not an object");
    const json& vocab = model["vocab"];
    int64_t max_id = -1;
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      if (!it.value().is_number_integer()) bad("model.vocab[\"" + it.key() + "\"] is not an integer id");
      const int64_t id = it.value().get<int64_t>();
      if (id < 0 || id >= kMaxVocab) bad("model.vocab id " + std::to_string(id) + " out of range");
      max_id = std::max(max_id, id);
    }
    if (!added_tokens.is_null() && !added_tokens.is_array()) bad("added_tokens is not an array");
    if (added_tokens.is_array())
      for (const auto& a : added_tokens) {
        if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
            !a["content"].is_string())
          bad("an added_tokens entry lacks an integer \"id\" or a string \"content\"");
        const int64_t id = a["id"].get<int64_t>();
        if (id < 0 || id >= kMaxVocab) bad("added token id " + std::to_string(id) + " out of range");
        max_id = std::max(max_id, id);
      }
    if (max_id < 0) bad("empty vocabulary");
    d_.set_vocab_size(size_t(max_id + 1));
    const auto& bm = ByteUnicodeMapRef();
    std::string bytes;
    d_.model_vocab.reserve(vocab.size());
    std::vector<bool> seen(size_t(max_id + 1));
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      const auto id = it.value().get<int32_t>();
      // two strings for one id: decoding would pick one of them silently
      if (seen[size_t(id)]) bad("model.vocab id " + std::to_string(id) + " is given to two tokens");
      seen[size_t(id)] = true;
      d_.tokens[size_t(id)] = it.key();
      if (d_.byte_level && bm.to_bytes(it.key(), bytes))
        d_.model_vocab.emplace(bytes, id);
      else
        d_.model_vocab.emplace(it.key(), id);
    }
    if (added_tokens.is_array())
      for (const auto& a : added_tokens) {
        tok::AddedToken t{a["content"].get<std::string>(), a["id"].get<int32_t>(), flag(a, "special", false),
                          flag(a, "lstrip", false), flag(a, "rstrip", false), flag(a, "single_word", false)};
        d_.tokens[size_t(t.id)] = t.content;
        d_.added.push_back(std::move(t));
      }

    d_.byte_fallback = flag(model, "byte_fallback", false);
    d_.fuse_unk = flag(model, "fuse_unk", false);
    d_.ignore_merges = flag(model, "ignore_merges", false);
    if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0.0)
      bad("BPE dropout is not supported");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (model.contains(k) && !model[k].is_null() && !model[k].get<std::string>().empty())
        bad(std::string("BPE ") + k + " is not supported");
    if (model.contains("unk_token") && !model["unk_token"].is_null()) {
      const std::string u = model["unk_token"].get<std::string>();
      auto it = vocab.find(u);
      if (it == vocab.end()) bad("unk_token \"" + u + "\" is not in model.vocab");
      d_.unk = it.value().get<int32_t>();
    }
  }

  static const tok::ByteUnicodeMap& ByteUnicodeMapRef() { return tok::ByteUnicodeMap::get(); }

  void load_merges(const json& model) {
    if (!model.contains("merges")) return;
    const json& merges = model["merges"];
    if (!merges.is_array()) bad("model.merges is not an array");
    d_.merges.reserve(merges.size());
    int32_t rank = 0;
    for (const auto& m : merges) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          bad("merge \"" + s + "\" is not two tokens separated by one space");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>(), b = m[1].get<std::string>();
      } else {
        bad("merge " + std::to_string(rank) + " is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const int32_t ia = file_id(a), ib = file_id(b), ir = file_id(a + b);
      if (ia < 0 || ib < 0 || ir < 0) bad("merge \"" + a + " " + b + "\" uses a token not in model.vocab");
      d_.merges.add(ia, ib, rank++, ir);
    }
  }

  int32_t file_id(const std::string& t) const {
    auto it = d_.token_ids.find(t);
    return it == d_.token_ids.end() ? -1 : it->second;
  }

  void load_normalizer(const json& n, int depth = 0) {
    if (n.is_null()) return;
    if (depth > kMaxDepth) bad("normalizer nested deeper than " + std::to_string(kMaxDepth));
    const std::string t = type_of(n);
    if (t == "Sequence") {
      if (!n.contains("normalizers") || !n["normalizers"].is_array()) bad("normalizer Sequence without a list");
      for (const auto& c : n["normalizers"]) load_normalizer(c, depth + 1);
    } else if (t == "Prepend") {
      d_.normalizers.push_back({tok::NormStep::Kind::prepend, n.at("prepend").get<std::string>(), ""});
    } else if (t == "Replace") {
      const json& p = n.at("pattern");
      if (!p.contains("String")) bad("normalizer Replace with a regex pattern is not supported");
      d_.normalizers.push_back({tok::NormStep::Kind::replace, p["String"].get<std::string>(), n.at("content").get<std::string>()});
    } else if (t == "NFC") {
      d_.normalizers.push_back({tok::NormStep::Kind::nfc, "", ""});
    } else {
      bad("unsupported normalizer \"" + t + "\" (supported: Sequence, Prepend, Replace, NFC)");
    }
  }

  tok::SplitBehavior behavior(const json& j) const {
    const std::string b = j.is_string() ? j.get<std::string>() : "";
    if (b == "Isolated") return tok::SplitBehavior::isolated;
    if (b == "Removed") return tok::SplitBehavior::removed;
    if (b == "MergedWithPrevious") return tok::SplitBehavior::merged_with_previous;
    if (b == "MergedWithNext") return tok::SplitBehavior::merged_with_next;
    if (b == "Contiguous") return tok::SplitBehavior::contiguous;
    bad("unknown Split behavior \"" + b + "\"");
  }

  void load_pre_tokenizer(const json& p, int depth = 0) {
    if (p.is_null()) return;
    if (depth > kMaxDepth) bad("pre_tokenizer nested deeper than " + std::to_string(kMaxDepth));
    const std::string t = type_of(p);
    tok::PreStep st{};
    if (t == "Sequence") {
      if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array()) bad("pre_tokenizer Sequence without a list");
      for (const auto& c : p["pretokenizers"]) load_pre_tokenizer(c, depth + 1);
      return;
    } else if (t == "Split") {
      st.kind = tok::PreStep::Kind::split;
      const json& pat = p.at("pattern");
      if (pat.contains("Regex"))
        st.re = std::make_shared<tok::Regex>(pat["Regex"].get<std::string>(), "tokenizer (" + src_ + "): Split");
      else if (pat.contains("String"))
        st.literal = pat["String"].get<std::string>();
      else
        bad("Split pattern is neither {\"Regex\": ...} nor {\"String\": ...}");
      st.behavior = behavior(p.at("behavior"));
      if (flag(p, "invert", false)) bad("Split with invert = true is not supported");
    } else if (t == "ByteLevel") {
      st.kind = tok::PreStep::Kind::byte_level;
      st.add_prefix_space = flag(p, "add_prefix_space", true);
      if (flag(p, "use_regex", true)) st.re = std::make_shared<tok::Regex>(tok::Patterns::gpt2, "ByteLevel");
    } else if (t == "Digits") {
      st.kind = tok::PreStep::Kind::split;
      st.re = std::make_shared<tok::Regex>(flag(p, "individual_digits", false) ? "\\p{N}" : "\\p{N}+", "Digits");
    } else if (t == "Metaspace") {
      st.kind = tok::PreStep::Kind::metaspace;
      if (p.contains("replacement") && p["replacement"].get<std::string>() != tok::kMetaspace)
        bad("Metaspace with a replacement other than U+2581 is not supported");
      const std::string scheme = p.contains("prepend_scheme") && p["prepend_scheme"].is_string()
                                     ? p["prepend_scheme"].get<std::string>()
                                     : (flag(p, "add_prefix_space", true) ? "always" : "never");
      st.prepend = scheme == "first" ? tok::PreStep::Prepend::first
                   : scheme == "never" ? tok::PreStep::Prepend::never
                                       : tok::PreStep::Prepend::always;
      st.split = flag(p, "split", true);
      st.literal = tok::kMetaspace;
      st.behavior = tok::SplitBehavior::merged_with_next;
    } else {
      bad("unsupported pre_tokenizer \"" + t + "\" (supported: Sequence, Split, ByteLevel, Digits, Metaspace)");
    }
    d_.pre.push_back(std::move(st));
  }

  void load_decoder(const json& dec, int depth = 0) {
    if (dec.is_null()) return;
    if (depth > kMaxDepth) bad("decoder nested deeper than " + std::to_string(kMaxDepth));
    const std::string t = type_of(dec);
    if (t == "Sequence") {
      if (!dec.contains("decoders") || !dec["decoders"].is_array()) bad("decoder Sequence without a list");
      for (const auto& c : dec["decoders"]) load_decoder(c, depth + 1);
    } else if (t == "ByteLevel") {
      d_.decode_byte_level = true;
    } else if (t == "Replace") {
      const json& p = dec.at("pattern");
      if (!p.contains("String") || p["String"].get<std::string>() != tok::kMetaspace || dec.at("content").get<std::string>() != " ")
        bad("decoder Replace other than U+2581 -> \" \" is not supported");
    } else if (t == "ByteFallback") {
      d_.decode_byte_fallback = true;
    } else if (t == "Fuse") {
    } else if (t == "Strip") {
      if (dec.at("content").get<std::string>() != " " || dec.value("stop", 0) != 0)
        bad("decoder Strip other than leading spaces is not supported");
      d_.strip_left = std::clamp(dec.value("start", 0), 0, 16);
    } else if (t == "Metaspace") {
      const std::string scheme = dec.contains("prepend_scheme") && dec["prepend_scheme"].is_string()
                                     ? dec["prepend_scheme"].get<std::string>()
                                     : (flag(dec, "add_prefix_space", true) ? "always" : "never");
      d_.strip_left = scheme == "never" ? 0 : 1;
    } else {
      bad("unsupported decoder \"" + t + "\" (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)");
    }
  }

  void load_post_processor(const json& p, int depth = 0) {
    if (p.is_null()) return;
    if (depth > kMaxDepth) bad("post_processor nested deeper than " + std::to_string(kMaxDepth));
    const std::string t = type_of(p);
    if (t == "Sequence") {
      if (!p.contains("processors") || !p["processors"].is_array()) bad("post_processor Sequence without a list");
      for (const auto& c : p["processors"]) load_post_processor(c, depth + 1);
    } else if (t == "ByteLevel") {
    } else if (t == "TemplateProcessing") {
      d_.prefix.clear(), d_.suffix.clear();
      const json& single = p.at("single");
      if (!single.is_array()) bad("TemplateProcessing.single is not a list");
      bool seen_a = false;
      for (const auto& piece : single) {
        if (piece.contains("Sequence")) {
          seen_a = true;
        } else if (piece.contains("SpecialToken")) {
          const std::string name = piece["SpecialToken"].at("id").get<std::string>();
          const json& sp = p.at("special_tokens");
          if (!sp.contains(name)) bad("TemplateProcessing uses \"" + name + "\" not in its special_tokens");
          for (const auto& id : sp[name].at("ids")) {
            const int32_t v = id.get<int32_t>();
            d_.check_id(v, "TemplateProcessing");
            (seen_a ? d_.suffix : d_.prefix).push_back(v);
          }
        } else {
          bad("TemplateProcessing piece is neither Sequence nor SpecialToken");
        }
      }
    } else {
      bad("unsupported post_processor \"" + t + "\" (supported: Sequence, ByteLevel, TemplateProcessing)");
    }
  }

  int32_t config_token(const json& c, const char* key) const {
    if (!c.contains(key) || c[key].is_null()) return -1;
    const json& v = c[key];
    const std::string s = v.is_string() ? v.get<std::string>() : v.at("content").get<std::string>();
    return file_id(s);
  }

  void load_config(const json& c) {
    if (!c.is_object()) bad("tokenizer_config.json is not a JSON object");
    d_.bos = config_token(c, "bos_token");
    d_.eos = config_token(c, "eos_token");
    d_.unk = std::max(d_.unk, config_token(c, "unk_token"));
    d_.pad = config_token(c, "pad_token");
    // transformers rebuilds the template from these flags when they are given.
    if (c.contains("add_bos_token") && c["add_bos_token"].is_boolean() && d_.bos >= 0) {
      d_.prefix.clear();
      if (c["add_bos_token"].get<bool>()) d_.prefix.push_back(d_.bos);
    }
    if (c.contains("add_eos_token") && c["add_eos_token"].is_boolean() && d_.eos >= 0) {
      d_.suffix.clear();
      if (c["add_eos_token"].get<bool>()) d_.suffix.push_back(d_.eos);
    }
  }

  static constexpr int kMaxDepth = 16;  // nesting of Sequence pieces (real files use 1)
  TokenizerData& d_;
  std::string src_;
};

inline std::string read_text_file(const std::string& path, bool required) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    if (required) fail("tokenizer: cannot open ", path);
    return {};
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// How a GGUF "gpt2" vocabulary pre-tokenizes, by tokenizer.ggml.pre (llama.cpp's names): one
/// Split regex, optionally after single-digit splitting (SmolLM), and whether merges are skipped
/// for whole-vocabulary words (Llama 3). Shared by the loader and the tokenizer.json export.
struct GgufPreTokenizer {
  const char* pattern;
  bool digits_first = false, ignore_merges = false;
};
inline GgufPreTokenizer gguf_pre_tokenizer(const std::string& pre) {
  if (pre == "llama-bpe" || pre == "llama3") return {tok::Patterns::llama3, false, true};
  if (pre == "qwen2") return {tok::Patterns::qwen2, false, false};
  if (pre == "smollm") return {tok::Patterns::gpt2, true, false};
  if (pre.empty() || pre == "default" || pre == "gpt2") return {tok::Patterns::gpt2, false, false};
  fail("tokenizer (GGUF vocabulary): unsupported pre-tokenizer \"", pre,
       "\" (supported: llama-bpe, qwen2, smollm, default, gpt2)");
}

inline void load_gguf(TokenizerData& d, const GgufVocab& v) {
  d.source = "GGUF vocabulary";
  const size_t n = v.tokens.size();
  const auto bad = [&](const std::string& what) { fail("tokenizer (GGUF vocabulary): ", what); };
  if (n == 0) bad("no tokens");
  if (!v.scores.empty() && v.scores.size() != n) bad("scores has " + std::to_string(v.scores.size()) + " entries, tokens " + std::to_string(n));
  if (!v.token_types.empty() && v.token_types.size() != n)
    bad("token_types has " + std::to_string(v.token_types.size()) + " entries, tokens " + std::to_string(n));
  for (int32_t id : {v.bos, v.eos, v.unk, v.pad})
    if (id < -1 || id >= int32_t(n)) bad("special token id " + std::to_string(id) + " out of range");
  d.set_vocab_size(n);
  d.tokens = v.tokens;
  const auto type = [&](size_t i) { return v.token_types.empty() ? 1 : v.token_types[i]; };

  if (v.model == "gpt2") {
    d.byte_level = true;
    d.decode_byte_level = true;
    const GgufPreTokenizer gp = gguf_pre_tokenizer(v.pre);
    d.ignore_merges = gp.ignore_merges;
    if (gp.digits_first) {
      tok::PreStep digits{};
      digits.kind = tok::PreStep::Kind::split;
      digits.re = std::make_shared<tok::Regex>("\\p{N}", "Digits");
      d.pre.push_back(digits);
    }
    tok::PreStep st{};
    st.kind = tok::PreStep::Kind::split;
    const char* pattern = gp.pattern;
    st.re = std::make_shared<tok::Regex>(pattern, "GGUF pre-tokenizer");
    d.pre.push_back(st);
    const auto& bm = tok::ByteUnicodeMap::get();
    std::string bytes;
    for (size_t i = 0; i < n; ++i)
      d.model_vocab.emplace(bm.to_bytes(v.tokens[i], bytes) ? bytes : v.tokens[i], int32_t(i));
  } else if (v.model == "llama") {
    if (v.scores.size() != n) bad("model \"llama\" needs one score per token");
    d.score_merges = true;
    d.byte_fallback = true;
    d.decode_byte_fallback = true;
    d.scores = v.scores;
    if (v.add_space_prefix) d.normalizers.push_back({tok::NormStep::Kind::prepend, tok::kMetaspace, ""});
    d.normalizers.push_back({tok::NormStep::Kind::replace, " ", tok::kMetaspace});
    d.strip_left = v.add_space_prefix ? 1 : 0;
    for (size_t i = 0; i < n; ++i)  // normal and byte tokens only: unk / control / user / unused never merge
      if (type(i) == 1 || type(i) == 6) d.model_vocab.emplace(v.tokens[i], int32_t(i));
  } else {
    bad("unsupported tokenizer model \"" + v.model + "\" (supported: llama, gpt2)");
  }
  // Unknown, control and user-defined tokens are matched in the text as a whole, as llama.cpp does.
  for (size_t i = 0; i < n; ++i)
    if (type(i) >= 2 && type(i) <= 4) d.added.push_back({v.tokens[i], int32_t(i), type(i) != 4, false, false, false});
  d.unk = v.unk, d.bos = v.bos, d.eos = v.eos, d.pad = v.pad;
  d.finish();
  if (v.model == "gpt2") {
    int32_t rank = 0;
    for (const auto& m : v.merges) {
      const size_t sp = m.find(' ');
      if (sp == std::string::npos) bad("merge \"" + m + "\" has no space");
      const auto a = d.token_ids.find(m.substr(0, sp)), b = d.token_ids.find(m.substr(sp + 1)),
                 r = d.token_ids.find(m.substr(0, sp) + m.substr(sp + 1));
      if (a == d.token_ids.end() || b == d.token_ids.end() || r == d.token_ids.end())
        bad("merge \"" + m + "\" uses a token not in the vocabulary");
      d.merges.add(a->second, b->second, rank++, r->second);
    }
  }
  if (v.add_bos) {
    if (v.bos < 0) bad("add_bos without a bos id");
    d.prefix.push_back(v.bos);
  }
  if (v.add_eos) {
    if (v.eos < 0) bad("add_eos without an eos id");
    d.suffix.push_back(v.eos);
  }
}

}  // namespace detail


}  // namespace recurformer
