// src/model/detail/tokenizer_bpe.hpp: the two BPE merge loops.
//
//  * merge_by_rank (HF BPE model): repeatedly merge the adjacent pair with the lowest merge rank,
//    leftmost first. Symbols form a linked list over an array and candidate pairs sit in a min-heap
//    keyed (rank, position); a popped pair that no longer matches its neighbours is stale and
//    skipped. O(n log n) per word instead of the naive O(n^2) rescans.
//  * merge_by_score (llama.cpp's SentencePiece BPE): the adjacent pair whose concatenation is a
//    vocabulary token with the highest score merges first, leftmost on ties; same list + heap.
#pragma once

#include <cstdint>
#include <functional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace recurformer {
namespace detail {
namespace tok {

struct Merge {
  int32_t rank;
  int32_t result;  // id of the merged token
};

/// (left id, right id) -> merge, for the rank-ordered loop.
class MergeTable {
 public:
  void add(int32_t a, int32_t b, int32_t rank, int32_t result) {
    map_.emplace(key(a, b), Merge{rank, result});  // the first (lowest-rank) entry wins
  }
  const Merge* find(int32_t a, int32_t b) const {
    auto it = map_.find(key(a, b));
    return it == map_.end() ? nullptr : &it->second;
  }
  size_t size() const { return map_.size(); }
  void reserve(size_t n) { map_.reserve(n); }

 private:
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  std::unordered_map<uint64_t, Merge> map_;
};

/// A symbol of the word being merged: a token id over a byte range of the word.
struct Symbol {
  int32_t id;
  int32_t prev, next;  // neighbours in the list, -1 at the ends
  uint32_t begin, len; // byte range in the word (len 0: merged away)
};

/// Merges `syms` (linked in order) by rank and appends the resulting ids to `out`.
inline void merge_by_rank(std::vector<Symbol>& syms, const MergeTable& merges, std::vector<int32_t>& out) {
  struct Cand {
    int32_t rank, pos, result;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const int32_t n = int32_t(syms.size());
  if (n > 1) {
    std::vector<Cand> heap_storage;
    heap_storage.reserve(size_t(n));
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap(std::greater<Cand>(),
                                                                        std::move(heap_storage));
    for (int32_t i = 0; i + 1 < n; ++i)
      if (const Merge* m = merges.find(syms[size_t(i)].id, syms[size_t(i) + 1].id))
        heap.push({m->rank, i, m->result});
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      Symbol& left = syms[size_t(c.pos)];
      if (left.len == 0 || left.next < 0) continue;
      Symbol& right = syms[size_t(left.next)];
      const Merge* m = merges.find(left.id, right.id);
      if (!m || m->result != c.result) continue;  // stale: a neighbour changed since the push
      left.id = c.result;
      left.len += right.len;
      right.len = 0;
      left.next = right.next;
      if (left.next >= 0) syms[size_t(left.next)].prev = c.pos;
      if (left.prev >= 0)
        if (const Merge* pm = merges.find(syms[size_t(left.prev)].id, left.id)) heap.push({pm->rank, left.prev, pm->result});
      if (left.next >= 0)
        if (const Merge* nm = merges.find(left.id, syms[size_t(left.next)].id)) heap.push({nm->rank, c.pos, nm->result});
    }
  }
  for (int32_t i = n > 0 ? 0 : -1; i >= 0; i = syms[size_t(i)].next) out.push_back(syms[size_t(i)].id);
}

/// Merges `syms` over `word` by vocabulary score (llama.cpp SPM). `lookup(text)` returns the id of a
/// vocabulary string or -1; `score(id)` its score. Merged symbols take the merged token's id.
/// The list stays in `syms` (walk it from 0 by next): symbols never merged keep their initial id.
template <class Lookup, class Score>
void merge_by_score(std::string_view word, std::vector<Symbol>& syms, const Lookup& lookup, const Score& score) {
  struct Cand {
    float score;
    int32_t pos;
    uint32_t len;  // byte length of the merged text, to detect staleness
    int32_t id;
    bool operator<(const Cand& o) const { return score != o.score ? score < o.score : pos > o.pos; }
  };
  std::priority_queue<Cand> heap;
  const auto try_push = [&](int32_t l) {
    if (l < 0) return;
    const Symbol& a = syms[size_t(l)];
    if (a.next < 0) return;
    const Symbol& b = syms[size_t(a.next)];
    const int32_t id = lookup(word.substr(a.begin, size_t(a.len) + b.len));
    if (id >= 0) heap.push({score(id), l, a.len + b.len, id});
  };
  for (int32_t i = 0; i + 1 < int32_t(syms.size()); ++i) try_push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Symbol& left = syms[size_t(c.pos)];
    if (left.len == 0 || left.next < 0) continue;
    Symbol& right = syms[size_t(left.next)];
    if (left.len + right.len != c.len) continue;  // stale
    left.id = c.id;
    left.len += right.len;
    right.len = 0;
    left.next = right.next;
    if (left.next >= 0) syms[size_t(left.next)].prev = c.pos;
    try_push(left.prev);
    try_push(c.pos);
  }
}

}  // namespace tok
}  // namespace detail
}  // namespace recurformer
