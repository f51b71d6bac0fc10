// recurformer/layers/hybrid_head_attention.hpp: one Llama attention layer for any head layout
// (spec sections 2, 3 and 7): all attention, mixed, all recurrent, with streaming groups.
//
//   q = x Wq^T (+bq), k = x Wk^T (+bk), v = x Wv^T (+bv)              (linear op, fp32 out)
//   attention group  j: RoPE on q_j heads and k_j, append k_j, v_j to the cache, causal softmax
//                       attention over the slot's K/V (attention op)
//   streaming group  j: the same over the sink + window ring buffer, with the streaming mask
//   recurrent group  j: u = conv_j(v_j); Δ = softplus(dt_up (dt_down x) + dt_bias); B = k_j;
//                       C = q heads of j / sqrt(hd); selective scan (G = 1, R = g readers, D)
//                       over the slot's fp32 state (causal_conv1d + selective_scan ops)
//   out = concat over heads (each head's output where its attention output stood) Wo^T
//
// Input: RMS-normalised hidden states of a batch of packed sequences (cu_seqlens), one cache slot
// per sequence; positions continue from each slot's length. The layer writes its K/V, states and
// rings at positions [length, length + n) but does not advance the cache: the caller does, with
// cache.advance(slots, counts), after the last layer (every layer writes the same positions).
// A batch whose sequences all have exactly one token is decoded with the one-token state-update
// ops; any other batch is a (chunked) prefill.
//
// Precision: projections accumulate in fp32 and give fp32; q, k, v are then rounded once to the
// cache's storage type T, in which RoPE, attention, the conv and the scan read and write them
// (the SSM state is fp32 whatever T); head outputs are widened back to fp32 for Wo.
//
// Memory: nothing is allocated per call. hybrid_head_attention_workspace_bytes() sizes the
// caller's scratch for a call's shapes (tokens, sequences, cache lengths, threads). Every check,
// including the cache's capacity check and every inner op's check, runs before the first write to
// the cache or to out: a call that throws leaves both as they were.
#pragma once

#include <cstddef>
#include <cstdint>

#include "recurformer/cache/hybrid_cache.hpp"
#include "recurformer/core/exec.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/ops/rope.hpp"

namespace recurformer {

/// The new tensors of one recurrent group (spec section 7), as the kernels take them.
template <class TW>
struct RecurrentGroupWeights {
  View<const TW, 2> dt_down;         // [dt_rank, d_model]
  View<const TW, 2> dt_up;           // [hd, dt_rank]
  View<const float, 1> dt_bias;      // [hd]
  View<const float, 2> A;            // [hd, N] = -exp(A_log), precomputed in fp32
  View<const float, 1> D;            // [hd] optional skip
  View<const float, 2> conv_weight;  // [hd, Kc]
  View<const float, 1> conv_bias;    // [hd] optional
};

/// One layer's attention weights in the weight dtype TW (any the linear op takes with fp32 x).
template <class TW>
struct HybridAttentionWeights {
  View<const TW, 2> wq;  // [n_q * hd, d_model]
  View<const TW, 2> wk;  // [n_kv * hd, d_model]
  View<const TW, 2> wv;  // [n_kv * hd, d_model]
  View<const TW, 2> wo;  // [d_model, n_q * hd]
  View<const TW, 1> bq, bk, bv;  // [n_q * hd], [n_kv * hd], [n_kv * hd] optional (Qwen2)
  /// [n_recurrent] one entry per recurrent group of the layer, in KV-group order (caller-owned).
  const RecurrentGroupWeights<TW>* recurrent = nullptr;
  int n_recurrent = 0;
};

/// T: cache storage type; TW: weight type; Memory: where the cache, weights, x, out and the
/// workspace live (HostMemory for CpuExec, DeviceMemory for CudaExec: cuda/hybrid_head_attention.cuh).
/// cu_seqlens and slots are host arrays in both: the layer plans the call from them and the
/// cache's host-side lengths.
template <class T, class TW, class Memory = HostMemory>
struct HybridHeadAttentionParams {
  View<const float, 2> x;              // [tokens, d_model] RMS-normalised input
  View<float, 2> out;                  // [tokens, d_model] (may alias x)
  HybridAttentionWeights<TW> weights;
  HybridCache<T, Memory>* cache = nullptr;  // read, and written at positions [length, length + n)
  int layer = 0;                       // layer index in the cache (its head layout)
  int n_q = 0;                         // query heads (n_kv, head_dim come from the cache)
  View<const int32_t, 1> cu_seqlens;   // [S+1] optional: sequence s = tokens [cu[s], cu[s+1]) (absent: one)
  View<const int32_t, 1> slots;        // [S] optional: cache slot of sequence s (absent: s)
  View<const float, 1> inv_freq;       // [hd/2] RoPE table (rope_inv_freq)
  RopeLayout rope_layout = RopeLayout::rotate_half;
};

/// Throws Error naming the argument unless the shapes, weights and layout are consistent (the
/// capacity and the inner ops are checked by hybrid_head_attention itself, before any write).
template <class T, class TW, class Memory>
void check(const HybridHeadAttentionParams<T, TW, Memory>& p);

/// Scratch bytes hybrid_head_attention needs for this call (it depends on the tokens, sequences,
/// the cache lengths and the thread count).
template <class T, class TW>
size_t hybrid_head_attention_workspace_bytes(const HybridHeadAttentionParams<T, TW>& p, CpuExec exec);

/// Runs the layer (see the top of this file).
template <class T, class TW>
void hybrid_head_attention(const HybridHeadAttentionParams<T, TW>& p, CpuExec exec, void* workspace,
                           size_t workspace_bytes);

}  // namespace recurformer

#include "recurformer/layers/detail/hybrid_head_attention_impl.hpp"
