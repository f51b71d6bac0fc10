// recurformer/layers/hybrid_head_attention_params.hpp: the parameters of the hybrid head attention
// layer (layers/hybrid_head_attention.hpp documents the layer; its CPU entry points are in
// cpu/hybrid_head_attention.hpp, its CUDA ones in cuda/hybrid_head_attention.cuh). This header has no implementation, so both a host
// and a CUDA translation unit can take it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "recurformer/cache/hybrid_cache.hpp"
#include "recurformer/core/exec.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/layers/detail/hybrid_plan.hpp"
#include "recurformer/ops/linear.hpp"
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
  View<const float, 1> alpha;        // [g] windowed groups only: weight of each query head's recurrent output
};

/// One layer's attention weights in the weight dtype TW (any the linear op takes with fp32 x).
template <class TW>
struct HybridAttentionWeights {
  View<const TW, 2> wq;  // [n_q * hd, d_model]
  View<const TW, 2> wk;  // [n_kv * hd, d_model]
  View<const TW, 2> wv;  // [n_kv * hd, d_model]
  View<const TW, 2> wo;  // [d_model, n_q * hd]
  View<const TW, 1> bq, bk, bv;  // [n_q * hd], [n_kv * hd], [n_kv * hd] optional (Qwen2)
  /// CPU only, optional: the GGUF blocks the projections above were decoded from, multiplied by
  /// instead of them (the views still give the shapes; the recurrent groups' rows are the same).
  BlockWeight wq_blocks, wk_blocks, wv_blocks, wo_blocks;
  /// [n_recurrent] one entry per recurrent or windowed group of the layer (LayerLayout::state_groups),
  /// in KV-group order (caller-owned).
  const RecurrentGroupWeights<TW>* recurrent = nullptr;
  int n_recurrent = 0;
};

/// The batch of one forward step, shared by every layer of it (layers/hybrid_attention_core.hpp).
/// Host arrays: the step plan (or a one-shot call) is computed from them.
struct HybridStep {
  View<const int32_t, 1> cu_seqlens;  // [S+1] optional: sequence s = tokens [cu[s], cu[s+1]) (absent: one)
  View<const int32_t, 1> slots;       // [S] optional: slot of sequence s in the states, rings and contiguous K/V (absent: s)
  View<const int32_t, 1> lengths;     // [slots] tokens each slot held before this step (positions continue from there)
  View<const int32_t, 2> page_table;  // [S, max_pages] optional: paged K/V of the attention groups (ops/attention.hpp)
};

/// What every layer of a model shares, which a step plan is sized for (hybrid_step_shape()
/// gives a HybridCache's; an engine over its own pools fills it from its allocation).
struct HybridStepShape {
  int64_t n_q = 0, n_kv = 0, head_dim = 0;
  /// The most KV groups of each kind any layer has: attention; recurrent + windowed (a state);
  /// streaming + windowed (a ring). They size the per-layer scratch.
  int64_t max_attention_groups = 0, max_state_groups = 0, max_ring_groups = 0;
  int64_t max_dt_rank = 0;  // the widest dt_up of any state group (sizes its linear's scratch)
  int64_t kv_keys = 0;      // attention K/V rows per slot (contiguous), or per page (paged)
  int64_t kv_pages = 0;     // pages in the K/V pool when the step has a page table, else 0
  int64_t ring = 0;         // entries of a streaming ring (0: no layer streams)
  int sink = 0, window = 0; // the streaming mask
};

/// Where plan_hybrid_step writes the step's index metadata: `metadata` in the exec's memory
/// (host for CpuExec, device for CudaExec), at least hybrid_step_metadata_bytes(). On CUDA it is
/// filled in `host_staging` (host memory, page-locked for an asynchronous copy) and uploaded on the
/// stream; the staging must not be rewritten before that copy has run. The CPU takes no staging.
struct HybridPlanBuffers {
  void* metadata = nullptr;
  void* host_staging = nullptr;
  size_t bytes = 0;
};

/// One step's plan (plan_hybrid_step): every layer of the step runs from it. It holds views, not
/// copies: the step's arrays and the metadata buffer must outlive the step.
template <class T, class TW>
struct HybridStepPlan {
  HybridStepShape shape;
  HybridStep step;
  detail::hybrid::Plan layout;          // sizes, metadata offsets, scratch for the largest layer
  const unsigned char* metadata = nullptr;  // the step's int32 index metadata, in the exec's memory
  size_t workspace_bytes = 0;           // scratch each layer's hybrid_attention_core call needs
};

/// The layer core: everything of the layer between the projections (spec section 2), over one
/// layer's cache views. q, k, v come projected (biases added, no RoPE), and dt_low holds dt_down x
/// of every recurrent and windowed group, the groups' columns one after the other in KV-group order.
template <class T, class TW>
struct HybridAttentionCoreParams {
  View<const float, 2> q;        // [tokens, n_q * hd] unit stride in columns (rows may be strided)
  View<const float, 2> k, v;     // [tokens, n_kv * hd]
  View<const float, 2> dt_low;   // [tokens, sum of dt ranks]; absent when the layer keeps no state
  View<float, 2> out;            // [tokens, n_q * hd] head outputs in head order (what Wo multiplies); may alias q
  const RecurrentGroupWeights<TW>* recurrent = nullptr;  // [n_recurrent] (dt_down unread: the caller applied it)
  int n_recurrent = 0;
  HybridLayerView<T> cache;      // read, and written at positions [length, length + n)
  HybridStep step;
  int n_q = 0, head_dim = 0;     // n_kv = cache.kinds.shape[0]
  View<const float, 1> inv_freq; // [hd/2] RoPE table (rope_inv_freq)
  RopeLayout rope_layout = RopeLayout::rotate_half;
};

/// Throws Error naming the argument unless the core's shapes, views and step are consistent (the
/// inner ops are checked by the core itself, before any write).
template <class T, class TW>
void check(const HybridAttentionCoreParams<T, TW>& p);

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

/// The step shape of a HybridCache's layers; n_q and the widest dt rank are the model's.
template <class T, class M>
HybridStepShape hybrid_step_shape(const HybridCache<T, M>& cache, int64_t n_q, int64_t max_dt_rank) {
  HybridStepShape sh;
  sh.n_q = n_q;
  sh.n_kv = cache.config().n_kv;
  sh.head_dim = cache.head_dim();
  for (int l = 0; l < cache.n_layers(); ++l) {
    const LayerLayout& ll = cache.layer_layout(l);
    sh.max_attention_groups = std::max<int64_t>(sh.max_attention_groups, ll.count(HeadKind::attention));
    sh.max_state_groups = std::max<int64_t>(sh.max_state_groups, ll.count_state_groups());
    sh.max_ring_groups = std::max<int64_t>(sh.max_ring_groups, ll.count_ring_groups());
  }
  sh.max_dt_rank = max_dt_rank;
  sh.kv_keys = cache.kv_keys();
  sh.kv_pages = cache.paged() ? cache.kv_rows() : 0;
  sh.ring = sh.max_ring_groups ? cache.ring_size() : 0;
  sh.sink = cache.sink();
  sh.window = cache.window();
  return sh;
}

/// A step over a HybridCache's slots: positions continue from the cache's lengths; a paged cache
/// adds its page table for the step's slots (HybridCache::page_table, valid until the next one, so
/// reserve() the step first).
template <class T, class M>
HybridStep hybrid_step(const HybridCache<T, M>& cache, View<const int32_t, 1> cu_seqlens,
                       View<const int32_t, 1> slots) {
  HybridStep st{cu_seqlens, slots, cache.lengths(), {}};
  if (cache.paged()) st.page_table = cache.page_table(slots, cu_seqlens.present() ? cu_seqlens.shape[0] - 1 : 1);
  return st;
}

/// Throws Error naming the argument unless the shapes, weights and layout are consistent (the
/// capacity and the inner ops are checked by hybrid_head_attention itself, before any write).
template <class T, class TW, class Memory>
void check(const HybridHeadAttentionParams<T, TW, Memory>& p);

}  // namespace recurformer
