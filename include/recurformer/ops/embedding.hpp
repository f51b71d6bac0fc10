// recurformer/ops/embedding.hpp: token embedding lookup (a row gather with dtype conversion).
//
//   out[t, :] = table[ids[t], :]
//
// Every id is checked against the vocabulary before anything is written: an id outside
// [0, vocab) throws Error naming the token index and the id. The CPU implementation is in
// cpu/embedding.hpp. A GGUF block-quantised table is gathered from its blocks
// (embedding(p, BlockWeight, exec)): each row decoded as core/quant.hpp's dequantize() does, so
// the rows are bit for bit those of the table's fp32 decoding.
//
// Backward (fp32): the rows of dout scatter-added into the table's gradient,
//
//   dtable[v, :] (+)= sum over t with ids[t] == v of dout[t, :]
//
// API:
//   EmbeddingBackwardParams{ids, dout, dtable, accumulate}
//   embedding_backward(p, exec)    // dtable = (zeroed first) or += (accumulate)
// Threads split the columns, each walking the tokens in order: no two threads ever add to the
// same element and every row's sum runs in token order whatever the thread count.
#pragma once

#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/ops/block_weight.hpp"

namespace recurformer {

namespace detail {
/// Every id in [0, vocab), or an Error naming the token and the id.
inline void check_ids(const char* op, const View<const int32_t, 1>& ids, int64_t vocab) {
  for (int64_t t = 0; t < ids.shape[0]; ++t) {
    const int32_t id = ids(t);
    RF_CHECK(id >= 0 && id < vocab, op, ": ids[", t, "] = ", id, " is outside the vocabulary [0, ",
             vocab, ")");
  }
}
}  // namespace detail

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
  detail::check_ids(op, p.ids, vocab);
}

/// Throws Error unless p is a valid embedding call reading its rows from `blocks` when present
/// (the table view then gives the shape only: [vocab, d], d whole blocks).
template <class TW>
void check(const EmbeddingParams<float, TW>& p, BlockWeight blocks) {
  check(p);
  if (blocks.present()) detail::check_blocks("embedding", "d", p.table.shape[1], blocks);
}

struct EmbeddingBackwardParams {
  View<const int32_t, 1> ids;   // [tokens] the forward's ids
  View<const float, 2> dout;    // [tokens, d] dL/dout
  View<float, 2> dtable;        // [vocab, d] dL/dtable
  bool accumulate = false;      // dtable += (true) or dtable = (false: rows no id names become 0)
};

/// Throws Error unless p is a valid embedding_backward call (including every id in range).
inline void check(const EmbeddingBackwardParams& p) {
  constexpr const char* op = "embedding_backward";
  detail::check_shape(op, "dtable", p.dtable, {-1, -1});
  const int64_t vocab = p.dtable.shape[0], d = p.dtable.shape[1];
  detail::check_shape(op, "ids", p.ids, {-1});
  detail::check_shape(op, "dout", p.dout, {p.ids.shape[0], d});
  detail::check_inner_contiguous(op, "dtable", p.dtable);
  detail::check_inner_contiguous(op, "dout", p.dout);
  detail::check_ids(op, p.ids, vocab);
}

}  // namespace recurformer
