// recurformer/ops/attention.hpp: causal softmax attention of packed queries over stored K/V
// (prefill, chunked prefill, decode and the streaming sink+window mask, in one entry point).
//
// For query row (t, h) of sequence s (t in [cu[s], cu[s+1])), KV head kh = h / (n_q / n_kv), slot
// sl = kv_slots[s] (absent: s), keys j in [0, kv_lens[s]) with positions kp[j] = k_positions[sl, j]
// (absent: j), query position qp = q_positions[t]:
//   visible(j) = kp[j] <= qp && (window == 0 || kp[j] < sink || kp[j] > qp - window)
//   s_j = scale * <q[t,h], k[sl,kh,j]>,   out[t,h] = sum_j softmax_j(s_j) v[sl,kh,j]  over visible j
//   lse[t,h] = log(sum_{visible j} exp(s_j))
// A row that sees no key (e.g. a query before every stored key) gets out = 0 and lse = -inf.
// The chunk's own keys must already be in the slot (kv_lens counts them); key order in the slot is
// free when k_positions is given (a streaming ring buffer).
//
// Paged K/V (vLLM's block tables over FlashInfer's HND page layout): with page_table given, k and v
// are a pool of pages [pages, n_kv, page_size, hd] and key j of sequence s is row j % page_size of
// page page_table[s, j / page_size]. Sequences may share pages (a common prefix) and a page may sit
// anywhere in the pool. kv_slots and k_positions must then be absent, and kv_lens[s] is at most
// max_pages * page_size. The contiguous layout is the case page_size = capacity, page_table[s] =
// {kv_slots[s]}: the CPU op gives bit for bit the same output for a paged and a contiguous copy of
// the same keys.
//
// CPU (cpu/attention.hpp): the g = n_q / n_kv query heads of a KV group and a block of tokens are
// processed together, so each K/V tile is read once per block; tiles of keys with an online softmax
// (never tokens x keys); fp32 accumulation whatever the storage dtype. When there are too few
// (sequence, token block, KV head) items to keep every thread busy (decode), the keys are split
// over the threads and the partial results are merged by log-sum-exp in the caller's workspace.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/core/error.hpp"
#include "recurformer/core/index_memory.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

/// The head dimensions the attention kernels are compiled for (one dispatch point, cpu/attention.hpp).
using AttentionHeadDims = ValueList<64, 128>;

template <class T>  // storage dtype of q, k, v, out: float, half or bfloat16
struct AttentionParams {
  View<const T, 3> q;                  // [tokens, n_q, hd] packed queries (RoPE applied), unit stride in hd
  View<const T, 4> k, v;               // [slots, n_kv, capacity, hd] stored keys (RoPE applied) / values
  View<T, 3> out;                      // [tokens, n_q, hd]
  View<const int32_t, 1> cu_seqlens;   // [S+1] optional: sequence s = tokens [cu[s], cu[s+1]) (absent: one sequence)
  View<const int32_t, 1> kv_slots;     // [S] optional: slot read by sequence s (absent: s)
  View<const int32_t, 2> page_table;   // [S, max_pages] optional: paged K/V (above); k, v are then the page pool
  View<const int32_t, 1> kv_lens;      // [S] valid keys of sequence s in its slot (this chunk's keys included)
  View<const int32_t, 1> q_positions;  // [tokens] position of each query
  View<const int32_t, 2> k_positions;  // [slots, capacity] optional: position of each stored key (absent: its index)
  float scale = 0;                     // logit scale; 0 means 1/sqrt(hd)
  int sink = 0, window = 0;            // window > 0: streaming mask (see the top of this file)
  View<float, 2> lse;                  // [tokens, n_q] optional: natural log-sum-exp of each row's scaled logits
};

namespace detail {
/// The one place head_dim becomes a template argument (attention and recency_score share it):
/// f(std::integral_constant<int, HD>) for HD in AttentionHeadDims, else an Error listing them.
template <class F>
void dispatch_attention_head_dim(const char* op, int64_t head_dim, F&& f) {
  dispatch_value(op, AttentionHeadDims{}, head_dim, std::forward<F>(f));
}

/// head_dim must be one the kernels are built for (every backend dispatches the same list).
inline void check_attention_head_dim(const char* op, int64_t head_dim) {
  RF_CHECK(list_contains(AttentionHeadDims{}, head_dim), op, ": head_dim: unsupported value ", head_dim,
           " (supported: ", list_values(AttentionHeadDims{}), ")");
}

template <class T>
int64_t attention_num_sequences(const AttentionParams<T>& p) {
  return p.cu_seqlens.present() ? p.cu_seqlens.shape[0] - 1 : 1;
}
}  // namespace detail

/// Throws Error naming the argument unless shapes, strides and index arrays are consistent.
/// IndexMemory::device (CUDA ops): cu_seqlens, kv_slots and kv_lens live on the device, so only
/// their shapes are checked; the kernels clamp what they read instead.
namespace detail {
/// check() with the op named in its messages (attention_backward checks its forward params here).
template <class T>
void check_attention(const char* op, const AttentionParams<T>& p, IndexMemory where) {
  detail::check_shape(op, "q", p.q, {-1, -1, -1});
  const int64_t tokens = p.q.shape[0], n_q = p.q.shape[1], hd = p.q.shape[2];
  detail::check_shape(op, "k", p.k, {-1, -1, -1, hd});
  // slots x capacity, or pages x page_size when paged
  const int64_t slots = p.k.shape[0], n_kv = p.k.shape[1], cap = p.k.shape[2];
  detail::check_shape(op, "v", p.v, {slots, n_kv, cap, hd});
  detail::check_shape(op, "out", p.out, {tokens, n_q, hd});
  RF_CHECK(n_kv > 0 && n_q > 0 && n_q % n_kv == 0, op, ": n_q (", n_q, ") must be a positive multiple of n_kv (",
           n_kv, ")");
  RF_CHECK(hd > 0, op, ": head_dim must be positive");
  detail::check_inner_contiguous(op, "q", p.q);
  detail::check_inner_contiguous(op, "k", p.k);
  detail::check_inner_contiguous(op, "v", p.v);
  detail::check_inner_contiguous(op, "out", p.out);
  check_attention_head_dim(op, hd);
  detail::check_optional_shape(op, "lse", p.lse, {tokens, n_q});
  RF_CHECK(std::isfinite(p.scale) && p.scale >= 0, op, ": scale must be finite and >= 0 (got ", p.scale, ")");
  RF_CHECK(p.sink >= 0 && p.window >= 0, op, ": sink and window must be >= 0 (got ", p.sink, ", ", p.window, ")");
  int64_t S = 1;
  const bool on_host = where == detail::IndexMemory::host;
  if (p.cu_seqlens.present()) {
    detail::check_shape(op, "cu_seqlens", p.cu_seqlens, {-1});
    S = p.cu_seqlens.shape[0] - 1;
    RF_CHECK(S >= 1, op, ": cu_seqlens needs at least 2 entries");
  }
  if (on_host && p.cu_seqlens.present()) {
    RF_CHECK(p.cu_seqlens(0) == 0 && p.cu_seqlens(S) == tokens, op, ": cu_seqlens must start at 0 and end at ",
             tokens, " (got ", p.cu_seqlens(0), " .. ", p.cu_seqlens(S), ")");
    for (int64_t s = 0; s < S; ++s)
      RF_CHECK(p.cu_seqlens(s) <= p.cu_seqlens(s + 1), op, ": cu_seqlens must be non-decreasing (at ", s, ")");
  }
  detail::check_shape(op, "kv_lens", p.kv_lens, {S});
  detail::check_optional_shape(op, "kv_slots", p.kv_slots, {S});
  detail::check_shape(op, "q_positions", p.q_positions, {tokens});
  detail::check_optional_shape(op, "k_positions", p.k_positions, {slots, cap});
  if (p.page_table.present()) {
    detail::check_shape(op, "page_table", p.page_table, {S, -1});
    RF_CHECK(p.page_table.shape[1] >= 1, op, ": page_table needs at least one page per sequence");
    detail::check_inner_contiguous(op, "page_table", p.page_table);
    RF_CHECK(!p.kv_slots.present() && !p.k_positions.present(), op,
             ": page_table (paged K/V) takes neither kv_slots nor k_positions");
    const int64_t max_keys = p.page_table.shape[1] * cap;
    for (int64_t s = 0; on_host && s < S; ++s) {
      RF_CHECK(p.kv_lens(s) >= 0 && p.kv_lens(s) <= max_keys, op, ": kv_lens[", s, "] = ", p.kv_lens(s),
               ", expected in [0, ", p.page_table.shape[1], " pages x ", cap, " keys]");
      for (int64_t pg = 0; pg * cap < p.kv_lens(s); ++pg)
        RF_CHECK(p.page_table(s, pg) >= 0 && p.page_table(s, pg) < slots, op, ": page_table[", s, ", ", pg,
                 "] = ", p.page_table(s, pg), ", expected a page in [0, ", slots, ")");
    }
    return;
  }
  for (int64_t s = 0; on_host && s < S; ++s) {
    const int64_t slot = p.kv_slots.present() ? p.kv_slots(s) : s;
    RF_CHECK(slot >= 0 && slot < slots, op, ": slot of sequence ", s, " is ", slot, ", expected in [0, ", slots, ")");
    RF_CHECK(p.kv_lens(s) >= 0 && p.kv_lens(s) <= cap, op, ": kv_lens[", s, "] = ", p.kv_lens(s),
             ", expected in [0, capacity ", cap, "]");
  }
}
}  // namespace detail

template <class T>
void check(const AttentionParams<T>& p, detail::IndexMemory where = detail::IndexMemory::host) {
  detail::check_attention("attention", p, where);
}

}  // namespace recurformer
