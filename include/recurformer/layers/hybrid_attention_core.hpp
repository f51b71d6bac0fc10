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
// Plan once per step (FlashInfer's plan/run): the step's index metadata (positions, key counts,
// ring entries, slots) is the same for every layer, so plan_hybrid_step computes and checks it once,
// into buffers the caller provides (on CUDA: filled in page-locked host staging and uploaded once),
// and each layer's hybrid_attention_core(p, plan, ...) then only launches its ops: no allocation, no
// synchronisation, no upload (a CUDA step is graph-capturable). The plan is sized for a
// HybridStepShape, what every layer shares (the most groups of each kind any layer has), and holds
// views of the step's arrays: keep them alive and unchanged for the step.
//
//   HybridStepShape shape = ...;                     // hybrid_step_shape(cache, n_q, max_dt_rank)
//   HybridStep step{cu_seqlens, slots, lengths, page_table};
//   buffers.bytes = hybrid_step_metadata_bytes(shape, step, tokens);   // + metadata (+ staging)
//   auto plan = plan_hybrid_step<T, TW>(shape, step, tokens, exec, buffers);
//   for each layer: hybrid_attention_core(p_layer, plan, exec, ws, plan.workspace_bytes);  // p.step empty
//   then advance the lengths
//
// The one-shot hybrid_attention_core(p, exec, ws, bytes) plans a step for its one layer from p.step.
//
// Every check (shapes, slots, capacity or pages, every inner op) runs before the first write: a call
// that throws leaves the memory and out as they were. The step's checks run once, in the plan; a
// layer call checks its own views and weights against the plan, and its inner ops' params (host
// arithmetic, no allocation). Nothing is allocated per call.
#pragma once

// The entry points are per backend, like every op's: cpu/hybrid_head_attention.hpp (CpuExec) and
// cuda/hybrid_head_attention.cuh (CudaExec). This header and the orchestration they share hold the
// params, the plan types and the queries that need no backend (hybrid_step_metadata_bytes).
#include "recurformer/layers/detail/hybrid_head_attention_run.hpp"
#include "recurformer/layers/hybrid_head_attention_params.hpp"
