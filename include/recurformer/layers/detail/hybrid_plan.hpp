// recurformer/layers/detail/hybrid_plan.hpp: the sizes and buffer offsets of one step of the layer
// core (layers/hybrid_attention_core.hpp), shared by the step plan (HybridStepPlan) and the
// orchestration (hybrid_head_attention_run.hpp). Plain data, so a CUDA kernel takes it by value.
#pragma once

#include <cstddef>
#include <cstdint>

namespace recurformer {
namespace detail {
namespace hybrid {

constexpr int kAttn = 0, kRec = 1, kStream = 2;  // kind slots in the per-kind arrays
/// KV groups a layer may have: the group map travels by value with every launch (int8 per kind).
constexpr int kMaxKvGroups = 128;

/// Sizes of one step and the byte offsets of its buffers: the int32 index metadata (from the
/// metadata base, filled once per step) and the per-layer scratch (from the workspace base).
/// A step plan lays the scratch out for the largest layer (groups = the shape's maxima); each layer
/// call copies it and sets groups to its own counts, which index a prefix of every buffer.
struct Plan {
  int64_t n = 0, S = 0, n_q = 0, n_kv = 0, hd = 0, g = 0;
  int64_t groups[3] = {0, 0, 0};  // KV groups per kind slot
  int64_t ring = 0, sink = 0, window = 0, max_len = 0, stream_cap = 0;
  bool decode = false;
  int64_t q_ld = 0, k_ld = 0, v_ld = 0, out_ld = 0;  // row strides of the projected inputs and of out (per layer)
  int64_t page_ld = 0, page_size = 0;  // pages per sequence in the metadata's table (0: contiguous K/V), keys per page
  // int32 metadata, from the metadata base (meta_end bytes in all)
  size_t pos = 0, cu = 0, slots = 0, counts = 0, kv_lens = 0, s_kv_lens = 0, s_kpos = 0, tok_seq = 0;
  size_t s_src = 0, ring_dst = 0, page_table = 0, meta_end = 0;  // page_table: [S, page_ld], the step's rows
  // scratch, from the workspace base. T per kind: q heads, k, v, head outputs
  size_t q[3] = {}, k[3] = {}, v[3] = {}, o[3] = {};
  size_t stream_k = 0, stream_v = 0;                       // [S, n_stream, stream_cap, hd] T
  size_t u = 0, delta_f = 0, delta_t = 0;                  // recurrent scratch, per group
  size_t alpha = 0;                                        // [groups[kRec], g] fp32 (windowed groups' alpha)
  size_t lin = 0, lin_bytes = 0, attn = 0, attn_bytes = 0;
  size_t rec_lin = 0, rec_lin_bytes = 0;                   // per-thread dt_up scratch (CPU decode)
  size_t total = 0;                                        // scratch bytes, alignment slack included
  int threads = 1;  // the CPU threads the scratch was sized for (split-KV partials, per-thread dt_up)
};

}  // namespace hybrid
}  // namespace detail
}  // namespace recurformer
