// recurformer/layers/hybrid_attention_core.hpp: the layer core an inference engine embeds: the part of
// a hybrid attention layer between its projections, over one layer's cache views.
//
//   in:  q [tokens, n_q hd], k, v [tokens, n_kv hd] already projected (fused, quantised or sharded
//        as the engine likes; biases added, no RoPE), dt_low = dt_down x of each recurrent or
//        windowed group (columns one group after the other)
//   out: [tokens, n_q hd] the head outputs in head order, fp32: what the engine's Wo multiplies
//
// Memory is the caller's, as views (HybridLayerView, cache/hybrid_cache.hpp): the attention groups'
// K/V as contiguous slots or as a pool of pages read through the step's page table (vLLM's block
// tables), the SSM and conv states and the streaming rings per slot. The step (HybridStep: packed
// sequences, their slots, the slots' lengths, the page table) is the same for every layer of a
// forward pass. The core writes K/V, states and rings at positions [length, length + n) and does not
// advance the lengths: the caller does, after the last layer. hybrid_head_attention is this core with
// its projections around it, over a HybridCache.
//
// Every check (shapes, slots, capacity or pages, every inner op) runs before the first write: a call
// that throws leaves the memory and out as they were. Nothing is allocated per call;
// hybrid_attention_core_workspace_bytes sizes the caller's scratch for a step's shapes and lengths.
#pragma once

#include <cstddef>

#include "recurformer/layers/hybrid_head_attention_params.hpp"

namespace recurformer {

/// Scratch bytes hybrid_attention_core needs for this call (tokens, sequences, lengths, threads).
template <class T, class TW>
size_t hybrid_attention_core_workspace_bytes(const HybridAttentionCoreParams<T, TW>& p, CpuExec exec);

/// Runs the core on the CPU (see the top of this file); cuda/hybrid_head_attention.cuh has the
/// same call with CudaExec over device views.
template <class T, class TW>
void hybrid_attention_core(const HybridAttentionCoreParams<T, TW>& p, CpuExec exec, void* workspace,
                           size_t workspace_bytes);

}  // namespace recurformer

#include "recurformer/layers/detail/hybrid_head_attention_impl.hpp"
