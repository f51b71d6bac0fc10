// recurformer/ops/embedding.hpp: token embedding lookup (a row gather with dtype conversion).
//
//   out[t, :] = table[ids[t], :]
//
// Every id is checked against the vocabulary before anything is written: an id outside
// [0, vocab) throws Error naming the token index and the id. The CPU implementation is in
// cpu/embedding.hpp.
#pragma once

#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/exec.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

template <class T, class TW>
struct EmbeddingParams {
  View<const TW, 2> table;       // [vocab, d]
  View<const int32_t, 1> ids;    // [tokens]
  View<T, 2> out;                // [tokens, d]
};

/// Throws Error unless p is a valid embedding call (including every id in range).
template <class T, class TW>
void check(const EmbeddingParams<T, TW>& p) {
  constexpr const char* op = "embedding";
  detail::check_shape(op, "table", p.table, {-1, -1});
  const int64_t vocab = p.table.shape[0], d = p.table.shape[1];
  detail::check_shape(op, "ids", p.ids, {-1});
  const int64_t tokens = p.ids.shape[0];
  detail::check_shape(op, "out", p.out, {tokens, d});
  detail::check_inner_contiguous(op, "table", p.table);
  detail::check_inner_contiguous(op, "out", p.out);
  for (int64_t t = 0; t < tokens; ++t) {
    const int32_t id = p.ids(t);
    RF_CHECK(id >= 0 && id < vocab, op, ": ids[", t, "] = ", id, " is outside the vocabulary [0, ",
             vocab, ")");
  }
}

/// out[t] = table[ids[t]] converted to T, tokens split across the pool (cpu/embedding.hpp).
template <class T, class TW>
void embedding(const EmbeddingParams<T, TW>& p, CpuExec exec);

}  // namespace recurformer
