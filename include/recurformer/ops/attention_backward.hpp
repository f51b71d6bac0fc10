// recurformer/ops/attention_backward.hpp: gradients of attention (ops/attention.hpp) with respect
// to q, k and v, from the forward's output and its saved log-sum-exp (FlashAttention-2's backward).
//
// For a visible (row r = (t, h), key j) pair of the forward, with s_rj = scale * <q_r, k_j>:
//   P_rj  = exp(s_rj - lse_r)          (the forward's probabilities, recomputed from the saved lse)
//   dP_rj = <dout_r, v_j>,   D_r = <dout_r, out_r>,   dS_rj = P_rj * (dP_rj - D_r)
//   dq_r = scale * sum_j dS_rj k_j,   dk_j = scale * sum_r dS_rj q_r,   dv_j = sum_r P_rj dout_r
// where the sums over r run over every row that reads key j: the g query heads of its KV group, in
// every sequence whose slot holds it (two sequences naming one slot both add to its gradients).
// Rows that saw no key (lse = -inf) get dq = 0 and add nothing; stored keys no row reads (past
// every reader's kv_len, or in a slot no sequence names) get dk = dv = 0.
//
// CPU (cpu/attention_backward.hpp): never tokens x keys; tiles of 32 keys are recomputed from q, k
// and lse, fp32 throughout whatever the storage dtype. Three passes over the thread pool:
//   0. D for every row, into the workspace (tokens x n_q floats);
//   1. dq: items (sequence, token block, KV head) as in the forward, each the only writer of its rows;
//   2. dk, dv: items (slot, KV head, block of 32 keys), each the only writer of its keys, walking
//      every query row that can see them.
// Why two passes and not FA2's one (items over key blocks, dq reduced across them): one pass needs
// either atomic adds on dq (races, and sums that depend on the schedule), or per key block partial dq
// (key blocks x tokens x n_q x hd floats: ~300 MB at 2048 tokens for SmolLM2's shape), or items
// over (sequence, KV head) only (3 items for one SmolLM2 sequence: no use for 16 threads). Two passes
// recompute the logits and dP once more (7 instead of 5 hd-long products per visible pair), but
// every output has one writer, results are bit-identical for any thread count and schedule, and
// the scratch is one float per row.
#pragma once

#include <cstddef>
#include <cstdint>

#include "recurformer/ops/attention.hpp"

namespace recurformer {

template <class T>  // storage dtype of q, k, v, out, dout (as the forward's); gradients are fp32
struct AttentionBackwardParams {
  AttentionParams<T> fwd;  // the forward call's params, unchanged: q, k, v, cu_seqlens, kv_slots, kv_lens,
                           // q_positions, k_positions, scale, sink, window; out = what it wrote (read here);
                           // lse [tokens, n_q] required = what it wrote (run the forward with lse set)
  View<const T, 3> dout;   // [tokens, n_q, hd] dL/d out, unit stride in hd
  View<float, 3> dq;       // [tokens, n_q, hd] optional: dL/d q, overwritten
  View<float, 4> dk, dv;   // [slots, n_kv, capacity, hd] optional: dL/d k, dL/d v (the k/v views' shape),
                           // overwritten whole (0 where no query reads)
};

/// Throws Error naming the argument unless the forward's params pass its check and dout, dq, dk,
/// dv and lse have the shapes above. The gradients must not overlap the inputs or each other.
template <class T>
void check(const AttentionBackwardParams<T>& p) {
  const char* op = "attention_backward";
  detail::check_attention(op, p.fwd, detail::IndexMemory::host);
  RF_CHECK(!p.fwd.page_table.present(), op, ": paged K/V (page_table) is not supported; training reads contiguous K/V");
  const int64_t tokens = p.fwd.q.shape[0], n_q = p.fwd.q.shape[1], hd = p.fwd.q.shape[2];
  const int64_t slots = p.fwd.k.shape[0], n_kv = p.fwd.k.shape[1], cap = p.fwd.k.shape[2];
  RF_CHECK(p.fwd.lse.present(), op, ": lse is required (the forward's, from a call with lse set)");
  detail::check_shape(op, "dout", p.dout, {tokens, n_q, hd});
  detail::check_inner_contiguous(op, "dout", p.dout);
  detail::check_optional_shape(op, "dq", p.dq, {tokens, n_q, hd});
  detail::check_optional_shape(op, "dk", p.dk, {slots, n_kv, cap, hd});
  detail::check_optional_shape(op, "dv", p.dv, {slots, n_kv, cap, hd});
  detail::check_inner_contiguous(op, "dq", p.dq);
  detail::check_inner_contiguous(op, "dk", p.dk);
  detail::check_inner_contiguous(op, "dv", p.dv);
}

}  // namespace recurformer
