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
//   windowed group   j: the streaming group's output + alpha_h x the recurrent group's output, per
//                       query head h (alpha in the group's recurrent weights; spec section 2)
//   out = concat over heads (each head's output where its attention output stood) Wo^T
//
// Input: RMS-normalised hidden states of a batch of packed sequences (cu_seqlens), one cache slot
// per sequence; positions continue from each slot's length. The layer writes its K/V, states and
// rings at positions [length, length + n) but does not advance the cache: the caller does, with
// cache.advance(slots, counts), after the last layer (every layer writes the same positions).
// Before the first layer the caller reserves the step, cache.reserve(slots, counts): a paged cache
// (HybridCacheConfig::page_size) then gives the slots the pages the new tokens go to.
// A batch whose sequences all have exactly one token is decoded with the one-token state-update
// ops; any other batch is a (chunked) prefill.
//
// Precision: projections accumulate in fp32 and give fp32; q, k, v are then rounded once to the
// cache's storage type T, in which RoPE, attention, the conv and the scan read and write them
// (the SSM state is fp32 whatever T); head outputs are widened back to fp32 for Wo.
//
// The layer is the core of layers/hybrid_attention_core.hpp (everything between the projections, over
// the cache's layer view) with the q/k/v, dt_down and Wo projections around it.
//
// Where it runs: cpu/hybrid_head_attention.hpp is the CPU layer (CpuExec, HybridCache<T>);
// cuda/hybrid_head_attention.cuh is the same call with CudaExec over a HybridCache<T, DeviceMemory>.
// Both are one orchestration (layers/detail/hybrid_head_attention_run.hpp); the params are in
// hybrid_head_attention_params.hpp.
//
// Memory: nothing is allocated per call. hybrid_head_attention_workspace_bytes() sizes the
// caller's scratch for a call's shapes (tokens, sequences, cache lengths, threads). Every check,
// including the cache's capacity check and every inner op's check, runs before the first write to
// the cache or to out: a call that throws leaves both as they were.
#pragma once

#include "recurformer/layers/hybrid_attention_core.hpp"
