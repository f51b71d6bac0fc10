// recurformer/layers/detail/hybrid_head_attention_run.hpp: the orchestration of the layer core
// (layers/hybrid_attention_core.hpp) and of the layer around it (layers/hybrid_head_attention.hpp),
// written once for every exec.
//
// The layer projects q, k, v (and dt_down x for the recurrent groups) into its workspace, runs the
// core over the cache's layer view, then projects the head outputs with Wo. One core call runs in
// stages, each an op over the whole batch (the ops parallelise inside):
//   1. gather the projected heads by kind into packed T buffers [tokens, groups_of_kind (* g), hd]
//      (what each kind's op reads), scaling recurrent q by 1/sqrt(hd) on the way (C of the scan);
//   2. attention groups: RoPE, append K/V to the slot (or its pages), attention over them;
//   3. streaming groups: RoPE, copy the ring's live entries and the chunk's keys into scratch
//      (with their positions), attention with the sink/window mask, then write the chunk into the ring;
//   4. recurrent groups: conv over v_j, Δ = dt_up dt_low, scan over the slot's state;
//   5. scatter the head outputs back to head order (fp32).
// A windowed group is gathered into both the streaming and the recurrent buffers (stages 3 and 4
// run it as one of each), and stage 5 adds its streaming output and alpha_h times its recurrent one.
// The ops (linear, rope, attention, causal_conv1d, selective_scan) are found by overload on the
// exec; the data movement between them (gather, append, ring copies, scatter) and the op checks
// are the exec's HybridBackend<Exec> (CPU: cpu/hybrid_head_attention.hpp, CUDA:
// cuda/hybrid_head_attention.cuh).
//
// A step is planned once (plan_step): all index metadata (positions, offsets, slots, key counts,
// ring sources and destinations) is computed on the host from the step's host-side lengths,
// checked, and handed to the backend, which uploads it when the exec's memory is not the host's;
// the scratch is laid out for the largest layer of the step's shape. Each layer call (core_call
// with a plan) checks its views against the plan, then runs its stages "dry" (every inner op's
// params built and checked, host arithmetic only) and then for real, so an error leaves the cache
// and out untouched. The one-shot core_call plans a step for one layer in its own workspace.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/layers/hybrid_head_attention_params.hpp"
#include "recurformer/ops/attention.hpp"
#include "recurformer/ops/causal_conv1d.hpp"
#include "recurformer/ops/linear.hpp"
#include "recurformer/ops/rope.hpp"
#include "recurformer/ops/selective_scan.hpp"

namespace recurformer {
namespace detail {
namespace hybrid {

constexpr const char* kOp = "hybrid_head_attention";
constexpr const char* kCoreOp = "hybrid_attention_core";
constexpr size_t kAlign = 64;

/// The exec's data movement and op checks (specialised next to each exec's ops).
template <class Exec>
struct HybridBackend;

inline size_t align_up(size_t b) { return (b + kAlign - 1) / kAlign * kAlign; }
inline unsigned char* align_ptr(void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<unsigned char*>((a + kAlign - 1) / kAlign * kAlign);
}

// Whether a group of kind k is served by the op of kind slot `slot` (a windowed group by two).
inline bool uses_slot(HeadKind k, int slot) {
  return slot == kAttn ? k == HeadKind::attention : slot == kRec ? has_recurrent_state(k) : has_stream_ring(k);
}

/// A non-null pointer for params whose data a size query or check never reads.
template <class U>
U* placeholder() {
  alignas(kAlign) static U u{};  // aligned: the CUDA checks look at K/V alignment
  return &u;
}

/// Host bytes a query's dry run builds views over (aligned like a workspace) and never reads or
/// writes: an uninitialised block, so a large one costs address space, not memory.
class QueryScratch {
 public:
  explicit QueryScratch(size_t bytes) : block_(new (std::nothrow) unsigned char[bytes + kAlign]) {
    RF_CHECK(block_ != nullptr, kCoreOp, ": cannot reserve ", bytes, " bytes of host address space to check the call");
  }
  unsigned char* get() const { return align_ptr(block_.get()); }

 private:
  std::unique_ptr<unsigned char[]> block_;
};

/// One layer call's buffers, resolved from the plan, the step's metadata and the workspace (in the
/// exec's memory). The backends' data movement reads and writes only these.
template <class T>
struct CallBuffers {
  const int32_t *pos, *cu, *slots, *tok_seq;  // [n], [S+1], [S], [n] (sequence of each token)
  const int32_t *s_src;     // [S, stream_cap] ring entry (>= 0) or -(chunk token + 1) of each key
  const int32_t *s_kv_lens; // [S] keys of each sequence in the streaming scratch
  const int32_t *ring_dst;  // [n] ring entry a token is written to, -1 when a later token takes it
  const int32_t *page_table;  // [S, page_ld] paged K/V, or null
  const float *qf, *kf, *vf;  // the projected inputs (rows at q_ld, k_ld, v_ld)
  float* heads;               // out: head outputs in head order (rows at out_ld)
  float* alpha;  // [groups[kRec], g]: the weight of state group i's reader r in a windowed group
  T *q[3], *k[3], *v[3], *o[3];
  // [n_kv, 3] index of group j among each kind slot's groups, -1 if not served by it. By value: it
  // is the layer's, and the step's metadata is shared by every layer.
  int8_t group_local[kMaxKvGroups * 3];
};

/// Where token t's K/V row goes: (slot, position), or (page, row in the page) when paged.
struct KvRow {
  int64_t page, row;
};
template <class T>
RF_HOST_DEVICE inline KvRow kv_row(const Plan& pl, const CallBuffers<T>& b, int64_t t) {
  const int64_t s = b.tok_seq[t], pos = b.pos[t];
  if (!b.page_table) return {b.slots[s], pos};
  return {b.page_table[s * pl.page_ld + pos / pl.page_size], pos % pl.page_size};
}

/// The step's page table as the plan's metadata holds it: [S, page_ld] (plan_layout).
inline View<const int32_t, 2> page_table_view(const Plan& pl, const unsigned char* meta) {
  return make_view(reinterpret_cast<const int32_t*>(meta + pl.page_table), {pl.S, pl.page_ld});
}

inline int64_t num_sequences(View<const int32_t, 1> cu_seqlens) {
  return cu_seqlens.present() ? cu_seqlens.shape[0] - 1 : 1;
}

/// dt_low's first column of state group i (the groups' dt ranks one after the other).
template <class TW>
int64_t dt_column(const RecurrentGroupWeights<TW>* rw, int64_t i) {
  int64_t c = 0;
  for (int64_t k = 0; k < i; ++k) c += rw[k].dt_up.shape[1];
  return c;
}

/// KV groups of each kind slot in a layer (kinds: host view).
inline void count_groups(View<const HeadKind, 1> kinds, int64_t (&groups)[3]) {
  groups[0] = groups[1] = groups[2] = 0;
  for (int64_t j = 0; j < kinds.shape[0]; ++j)
    for (int slot : {kAttn, kRec, kStream}) groups[slot] += uses_slot(kinds(j), slot);
}

// ---- the step: checked, planned and its metadata filled once, for every layer -------------------

/// Throws unless the shape is coherent and the step's views fit it and `tokens`.
inline void check_step_views(const HybridStepShape& sh, const HybridStep& st, int64_t tokens) {
  RF_CHECK(sh.n_kv >= 1 && sh.n_kv <= kMaxKvGroups && sh.head_dim >= 1, kCoreOp, ": ", sh.n_kv,
           " KV groups and head_dim ", sh.head_dim, ": expected 1..", kMaxKvGroups, " groups and head_dim >= 1");
  RF_CHECK(sh.n_q >= 1 && sh.n_q % sh.n_kv == 0, kCoreOp, ": n_q (", sh.n_q,
           ") must be a positive multiple of n_kv (", sh.n_kv, ")");
  for (int64_t m : {sh.max_attention_groups, sh.max_state_groups, sh.max_ring_groups})
    RF_CHECK(m >= 0 && m <= sh.n_kv, kCoreOp, ": a layer's groups of one kind (", m, ") must be in 0..n_kv (",
             sh.n_kv, ")");
  RF_CHECK(!sh.max_state_groups || sh.max_dt_rank >= 1, kCoreOp, ": max_dt_rank is ", sh.max_dt_rank,
           ": a layer with state groups needs it >= 1");
  RF_CHECK(!sh.max_ring_groups || (sh.sink >= 0 && sh.window >= 1 && sh.ring > sh.sink), kCoreOp, ": the rings hold ",
           sh.ring, " entries: expected more than the sink (", sh.sink, "), and window >= 1 (got ", sh.window, ")");
  RF_CHECK(tokens >= 0, kCoreOp, ": ", tokens, " tokens");
  detail::check_shape(kCoreOp, "step.lengths", st.lengths, {-1});
  int64_t S = 1;
  if (st.cu_seqlens.present()) {
    S = st.cu_seqlens.shape[0] - 1;
    RF_CHECK(S >= 1, kCoreOp, ": step.cu_seqlens needs at least 2 entries");
    RF_CHECK(st.cu_seqlens(0) == 0 && st.cu_seqlens(S) == tokens, kCoreOp,
             ": step.cu_seqlens must start at 0 and end at ", tokens, " (got ", st.cu_seqlens(0), " .. ",
             st.cu_seqlens(S), ")");
    for (int64_t s = 0; s < S; ++s)
      RF_CHECK(st.cu_seqlens(s) <= st.cu_seqlens(s + 1), kCoreOp, ": step.cu_seqlens must be non-decreasing (at ", s,
               ")");
  }
  detail::check_optional_shape(kCoreOp, "step.slots", st.slots, {S});
  const bool paged = st.page_table.present();
  if (paged) detail::check_shape(kCoreOp, "step.page_table", st.page_table, {S, -1});
  if (sh.max_attention_groups) {
    RF_CHECK(sh.kv_keys >= 1, kCoreOp, ": kv_keys is ", sh.kv_keys, ", expected >= 1 (K/V rows per slot or page)");
    RF_CHECK(paged == (sh.kv_pages > 0), kCoreOp,
             paged ? ": the step has a page table but the shape's kv_pages is 0"
                   : ": the shape has a page pool (kv_pages) but the step has no page table");
  }
}

// The step's layout for a shape: the metadata offsets, and the scratch of the largest layer.
template <class T>
Plan plan_layout(const HybridStepShape& sh, const HybridStep& st, int64_t n) {
  Plan pl;
  pl.n = n;
  pl.S = num_sequences(st.cu_seqlens);
  pl.n_q = sh.n_q;
  pl.n_kv = sh.n_kv;
  pl.hd = sh.head_dim;
  pl.g = pl.n_q / pl.n_kv;
  pl.groups[kAttn] = sh.max_attention_groups;
  pl.groups[kRec] = sh.max_state_groups;
  pl.groups[kStream] = sh.max_ring_groups;
  pl.ring = pl.groups[kStream] ? sh.ring : 0;
  pl.sink = sh.sink;
  pl.window = pl.ring - pl.sink;
  bool all_one = true;
  for (int64_t s = 0; s < pl.S; ++s) {
    const int64_t len = st.cu_seqlens.present() ? st.cu_seqlens(s + 1) - st.cu_seqlens(s) : pl.n;
    pl.max_len = std::max(pl.max_len, len);
    all_one = all_one && len == 1;
  }
  pl.decode = all_one && pl.S == pl.n;
  pl.stream_cap = pl.groups[kStream] ? pl.ring + pl.max_len : 0;
  // The step's page rows are copied into the metadata (dense, page_ld per sequence), so the plan
  // holds them where the exec reads them: on CUDA they travel with the one upload.
  pl.page_ld = st.page_table.present() ? st.page_table.shape[1] : 0;
  pl.page_size = sh.kv_keys;

  size_t off = 0;
  auto take = [&](size_t& at, int64_t count, size_t elem) {
    at = off;
    off += align_up(size_t(std::max<int64_t>(count, 0)) * elem);
  };
  take(pl.pos, pl.n, 4);
  take(pl.cu, pl.S + 1, 4);
  take(pl.slots, pl.S, 4);
  take(pl.counts, pl.S, 4);
  take(pl.kv_lens, pl.S, 4);
  take(pl.s_kv_lens, pl.S, 4);
  take(pl.s_kpos, pl.S * pl.stream_cap, 4);
  take(pl.tok_seq, pl.n, 4);
  take(pl.s_src, pl.S * pl.stream_cap, 4);
  take(pl.ring_dst, pl.groups[kStream] ? pl.n : 0, 4);
  take(pl.page_table, pl.S * pl.page_ld, 4);
  pl.meta_end = off;
  off = 0;  // the scratch, from the workspace base
  for (int k = 0; k < 3; ++k) {
    take(pl.q[k], pl.n * pl.groups[k] * pl.g * pl.hd, sizeof(T));
    take(pl.k[k], pl.n * pl.groups[k] * pl.hd, sizeof(T));
    take(pl.v[k], pl.n * pl.groups[k] * pl.hd, sizeof(T));
    take(pl.o[k], pl.n * pl.groups[k] * pl.g * pl.hd, sizeof(T));
  }
  take(pl.stream_k, pl.S * pl.groups[kStream] * pl.stream_cap * pl.hd, sizeof(T));
  take(pl.stream_v, pl.S * pl.groups[kStream] * pl.stream_cap * pl.hd, sizeof(T));
  const int64_t rec = pl.groups[kRec] * pl.n;
  take(pl.u, rec * pl.hd, sizeof(T));
  take(pl.delta_f, rec * pl.hd, 4);
  take(pl.delta_t, rec * pl.hd, sizeof(T));
  take(pl.alpha, pl.groups[kRec] * pl.g, 4);
  pl.lin = off;
  return pl;
}

// Fills the int32 metadata into `meta` (host memory laid out as the plan's metadata).
inline void fill_metadata(const HybridStep& st, const Plan& pl, unsigned char* meta) {
  auto ints = [&](size_t off) { return reinterpret_cast<int32_t*>(meta + off); };
  int32_t *pos = ints(pl.pos), *cu = ints(pl.cu), *slots = ints(pl.slots), *counts = ints(pl.counts);
  int32_t *kv_lens = ints(pl.kv_lens), *s_kv_lens = ints(pl.s_kv_lens), *s_kpos = ints(pl.s_kpos);
  int32_t *tok_seq = ints(pl.tok_seq), *s_src = ints(pl.s_src), *ring_dst = ints(pl.ring_dst);
  int32_t* pages = ints(pl.page_table);
  for (int64_t s = 0; s < pl.S; ++s)
    for (int64_t i = 0; i < pl.page_ld; ++i) pages[s * pl.page_ld + i] = st.page_table(s, i);
  cu[0] = 0;
  for (int64_t s = 0; s < pl.S; ++s) {
    cu[s + 1] = st.cu_seqlens.present() ? st.cu_seqlens(s + 1) : int32_t(pl.n);
    slots[s] = st.slots.present() ? st.slots(s) : int32_t(s);
    counts[s] = cu[s + 1] - cu[s];
  }
  for (int64_t s = 0; s < pl.S; ++s) {
    // Slot validity is check_step's; read lengths only for valid slots.
    const bool ok = slots[s] >= 0 && slots[s] < st.lengths.shape[0];
    const int64_t len = ok ? st.lengths(slots[s]) : 0;
    const int64_t last = len + counts[s] - 1;  // position of the sequence's last token
    kv_lens[s] = int32_t(std::min<int64_t>(len + counts[s], INT32_MAX));
    for (int32_t t = cu[s]; t < cu[s + 1]; ++t) {
      pos[t] = int32_t(len + (t - cu[s]));
      tok_seq[t] = int32_t(s);
      // A streaming token keeps its ring entry unless a later token of the chunk lands there,
      // so every entry is written once and the writes need no order.
      if (pl.groups[kStream])
        ring_dst[t] = pos[t] < pl.sink || pos[t] + pl.window > last
                          ? int32_t(stream_ring_entry(pos[t], pl.sink, pl.ring))
                          : -1;
    }
    s_kv_lens[s] = 0;
    if (!pl.stream_cap) continue;
    // The ring's live entries (in entry order), then the chunk's tokens.
    int32_t* kp = s_kpos + s * pl.stream_cap;
    int32_t* src = s_src + s * pl.stream_cap;
    int64_t m = 0;
    for (int64_t e = 0; e < pl.ring; ++e) {
      const int64_t rp = stream_ring_position(e, len, pl.sink, pl.ring);
      if (rp >= 0) kp[m] = int32_t(rp), src[m++] = int32_t(e);
    }
    for (int32_t t = 0; t < counts[s]; ++t) kp[m] = int32_t(len + t), src[m++] = -(cu[s] + t + 1);
    s_kv_lens[s] = int32_t(m);
    for (int64_t r = m; r < pl.stream_cap; ++r) kp[r] = 0, src[r] = 0;  // never read: past the key count
  }
}

/// Throws (before anything is written) unless every sequence's slot is valid and distinct and its
/// tokens fit the attention groups' K/V (the slot's capacity, or its page table's pages, each in the pool).
inline void check_step(const HybridStepShape& sh, const HybridStep& st, const Plan& pl, const unsigned char* meta) {
  auto ints = [&](size_t off) { return reinterpret_cast<const int32_t*>(meta + off); };
  const int32_t *slots = ints(pl.slots), *counts = ints(pl.counts);
  const int64_t n_slots = st.lengths.shape[0];
  const int64_t keys = pl.page_ld ? st.page_table.shape[1] * pl.page_size : pl.page_size;
  for (int64_t s = 0; s < pl.S; ++s) {
    RF_CHECK(slots[s] >= 0 && slots[s] < n_slots, kCoreOp, ": sequence ", s, " has slot ", slots[s],
             ", expected 0..", n_slots - 1);
    for (int64_t o = 0; o < s; ++o)
      RF_CHECK(slots[o] != slots[s], kCoreOp, ": slot ", slots[s], " appears twice (sequences ", o, " and ", s, ")");
    const int64_t len = st.lengths(slots[s]);
    RF_CHECK(len >= 0, kCoreOp, ": lengths[", slots[s], "] is ", len, ", expected >= 0");
    if (!pl.groups[kAttn]) continue;
    RF_CHECK(len + counts[s] <= keys, kCoreOp, ": sequence ", s, " holds ", len, " tokens and cannot take ",
             counts[s], " more: its K/V hold ", keys, pl.page_ld ? " (page_table pages x page size)" : " (capacity)");
    if (!pl.page_ld) continue;
    // The pages the step reads or writes must lie in the pool: the append writes through them.
    for (int64_t i = 0; i * pl.page_size < len + counts[s]; ++i) {
      const int32_t page = st.page_table(s, i);
      RF_CHECK(page >= 0 && page < sh.kv_pages, kCoreOp, ": step.page_table[", s, ", ", i, "] is ", page,
               ", outside the pool of ", sh.kv_pages, " pages");
    }
  }
}

// What linear(x [tokens, in] W^T) needs of scratch on `exec`.
template <class TW, class Exec>
size_t linear_scratch(int64_t tokens, View<const TW, 2> w, Exec exec) {
  LinearParams<float, TW> lp;
  lp.x = make_view(const_cast<const float*>(placeholder<float>()), {tokens, w.shape[1]});
  lp.weight = w;
  lp.y = make_view(placeholder<float>(), {tokens, w.shape[0]});
  return linear_workspace_bytes(lp, exec);
}

// The scratch of the layers' linear and attention ops for this step (metadata filled, on the host,
// at `meta`), after the layout's: any layer of the shape fits it.
template <class Exec, class T, class TW>
void plan_scratch(const HybridStepShape& sh, const HybridStep& st, Plan& pl, Exec exec, const unsigned char* meta) {
  const int64_t n = pl.n, hd = pl.hd, g = pl.g;
  // The widest dt_up [hd, max_dt_rank] (a linear's scratch grows with its input width).
  const View<const TW, 2> dt_up = make_view(const_cast<const TW*>(placeholder<TW>()), {hd, sh.max_dt_rank});
  const size_t lin = pl.groups[kRec] ? linear_scratch(n, dt_up, exec) : 0;
  auto ints = [&](size_t off, int64_t count) { return make_view(reinterpret_cast<const int32_t*>(meta + off), {count}); };
  size_t attn = 0;
  for (int kind : {kAttn, kStream}) {
    // A layer has 1..max groups of the kind; the attention scratch is not monotone in heads (its
    // split count adapts), so every count is asked.
    for (int64_t nk = 1; nk <= pl.groups[kind]; ++nk) {
      AttentionParams<T> ap;
      ap.q = make_view(const_cast<const T*>(placeholder<T>()), {n, nk * g, hd});
      ap.out = make_view(placeholder<T>(), {n, nk * g, hd});
      ap.cu_seqlens = ints(pl.cu, pl.S + 1);
      ap.q_positions = ints(pl.pos, n);
      if (kind == kAttn) {
        const int64_t rows = pl.page_ld ? sh.kv_pages : st.lengths.shape[0];
        ap.k = make_view(const_cast<const T*>(placeholder<T>()), {rows, nk, sh.kv_keys, hd});
        if (pl.page_ld)
          ap.page_table = page_table_view(pl, meta);
        else
          ap.kv_slots = ints(pl.slots, pl.S);
        ap.kv_lens = ints(pl.kv_lens, pl.S);
      } else {
        ap.k = make_view(const_cast<const T*>(placeholder<T>()), {pl.S, nk, pl.stream_cap, hd});
        ap.kv_lens = ints(pl.s_kv_lens, pl.S);
      }
      ap.v = ap.k;
      attn = std::max(attn, attention_workspace_bytes(ap, exec));  // after check_step: the indices are valid
    }
  }
  size_t rec_lin = 0;
  int threads = 1;
  if constexpr (std::is_same_v<Exec, CpuExec>) {  // CPU decode runs each group's dt_up on one thread
    threads = exec.threads();
    if (pl.decode && pl.groups[kRec]) rec_lin = linear_scratch(n, dt_up, CpuExec{});
  }
  pl.threads = threads;
  size_t off = pl.lin;
  pl.lin_bytes = lin;
  off += align_up(lin);
  pl.rec_lin = off;
  pl.rec_lin_bytes = rec_lin;
  off += align_up(rec_lin) * size_t(threads);
  pl.attn = off;
  pl.attn_bytes = attn;
  off += align_up(attn);
  pl.total = off + kAlign;  // + alignment slack for the caller's pointer
}

/// The step plan, its metadata filled at `host_meta` (host memory of metadata_bytes); the caller
/// sets plan.metadata to where the exec reads it.
template <class Exec, class T, class TW>
HybridStepPlan<T, TW> make_step_plan(const HybridStepShape& sh, const HybridStep& st, int64_t tokens, Exec exec,
                                     unsigned char* host_meta) {
  check_step_views(sh, st, tokens);
  HybridStepPlan<T, TW> plan;
  plan.shape = sh;
  plan.step = st;
  plan.layout = plan_layout<T>(sh, st, tokens);
  fill_metadata(st, plan.layout, host_meta);
  check_step(sh, st, plan.layout, host_meta);
  plan_scratch<Exec, T, TW>(sh, st, plan.layout, exec, host_meta);
  plan.workspace_bytes = plan.layout.total;
  return plan;
}

/// The step shape of one core call (the one-shot path plans a step for a single layer).
template <class T, class TW>
HybridStepShape shape_of(const HybridAttentionCoreParams<T, TW>& p) {
  HybridStepShape sh;
  const HybridLayerView<T>& c = p.cache;
  int64_t groups[3];
  count_groups(c.kinds, groups);
  sh.n_q = p.n_q;
  sh.n_kv = c.kinds.shape[0];
  sh.head_dim = p.head_dim;
  sh.max_attention_groups = groups[kAttn];
  sh.max_state_groups = groups[kRec];
  sh.max_ring_groups = groups[kStream];
  for (int i = 0; i < p.n_recurrent; ++i) sh.max_dt_rank = std::max(sh.max_dt_rank, p.recurrent[i].dt_up.shape[1]);
  if (groups[kAttn]) {
    sh.kv_keys = c.k.shape[2];
    sh.kv_pages = p.step.page_table.present() ? c.k.shape[0] : 0;
  }
  if (groups[kStream]) sh.ring = c.ring_k.shape[2];
  sh.sink = c.sink;
  sh.window = c.window;
  return sh;
}

// ---- one layer over a step's plan -------------------------------------------------------------------

template <class T, class TW>
void check_layer(const HybridAttentionCoreParams<T, TW>& p, int64_t slots, bool paged);

/// The layer's plan: the step's, with this layer's group counts and input strides, after checking
/// the layer's views against the plan's shape.
template <class T, class TW>
Plan layer_plan(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan) {
  const HybridStepShape& sh = plan.shape;
  const HybridLayerView<T>& c = p.cache;
  const bool paged = plan.layout.page_ld != 0;
  check_layer(p, plan.step.lengths.shape[0], paged);
  RF_CHECK(p.q.shape[0] == plan.layout.n, kCoreOp, ": q has ", p.q.shape[0], " tokens but the plan is for ",
           plan.layout.n);
  RF_CHECK(p.n_q == sh.n_q && c.kinds.shape[0] == sh.n_kv && p.head_dim == sh.head_dim, kCoreOp,
           ": the layer has n_q ", p.n_q, ", n_kv ", c.kinds.shape[0], ", head_dim ", p.head_dim,
           "; the plan's shape has ", sh.n_q, ", ", sh.n_kv, ", ", sh.head_dim);
  Plan pl = plan.layout;
  count_groups(c.kinds, pl.groups);
  const char* kind_name[3] = {"attention", "state (recurrent or windowed)", "ring (streaming or windowed)"};
  for (int k : {kAttn, kRec, kStream})
    RF_CHECK(pl.groups[k] <= plan.layout.groups[k], kCoreOp, ": the layer has ", pl.groups[k], " ", kind_name[k],
             " groups, more than the plan's shape allows (", plan.layout.groups[k], ")");
  if (pl.groups[kAttn]) {
    RF_CHECK(c.k.shape[2] == sh.kv_keys, kCoreOp, ": cache.k has ", c.k.shape[2],
             " rows per slot or page; the plan's shape has kv_keys ", sh.kv_keys);
    RF_CHECK(!paged || c.k.shape[0] == sh.kv_pages, kCoreOp, ": cache.k is a pool of ", c.k.shape[0],
             " pages; the plan's shape has kv_pages ", sh.kv_pages);
  }
  if (pl.groups[kStream])
    RF_CHECK(c.ring_k.shape[2] == sh.ring && c.sink == sh.sink && c.window == sh.window, kCoreOp,
             ": the layer's rings (", c.ring_k.shape[2], " entries, sink ", c.sink, ", window ", c.window,
             ") are not the plan's (", sh.ring, ", ", sh.sink, ", ", sh.window, ")");
  for (int i = 0; i < p.n_recurrent; ++i)
    RF_CHECK(p.recurrent[i].dt_up.shape[1] <= sh.max_dt_rank, kCoreOp, ": recurrent[", i, "].dt_up has rank ",
             p.recurrent[i].dt_up.shape[1], ", more than the plan's max_dt_rank ", sh.max_dt_rank);
  pl.q_ld = p.q.stride[0], pl.k_ld = p.k.stride[0], pl.v_ld = p.v.stride[0], pl.out_ld = p.out.stride[0];
  return pl;
}

inline View<const int32_t, 1> meta_ints(const unsigned char* meta, size_t off, int64_t n) {
  return make_view(reinterpret_cast<const int32_t*>(meta + off), {n});
}

template <class T, class TW>
CallBuffers<T> call_buffers(const HybridAttentionCoreParams<T, TW>& p, const Plan& pl, const unsigned char* meta,
                            unsigned char* ws) {
  auto ints = [&](size_t off) { return reinterpret_cast<const int32_t*>(meta + off); };
  CallBuffers<T> b;
  b.pos = ints(pl.pos), b.cu = ints(pl.cu), b.slots = ints(pl.slots), b.tok_seq = ints(pl.tok_seq);
  b.alpha = reinterpret_cast<float*>(ws + pl.alpha);
  b.s_src = ints(pl.s_src), b.s_kv_lens = ints(pl.s_kv_lens), b.ring_dst = ints(pl.ring_dst);
  b.page_table = pl.page_ld ? ints(pl.page_table) : nullptr;
  b.qf = p.q.data, b.kf = p.k.data, b.vf = p.v.data, b.heads = p.out.data;
  for (int k = 0; k < 3; ++k) {
    b.q[k] = reinterpret_cast<T*>(ws + pl.q[k]);
    b.k[k] = reinterpret_cast<T*>(ws + pl.k[k]);
    b.v[k] = reinterpret_cast<T*>(ws + pl.v[k]);
    b.o[k] = reinterpret_cast<T*>(ws + pl.o[k]);
  }
  int8_t local[3] = {0, 0, 0};
  for (int64_t j = 0; j < pl.n_kv; ++j)
    for (int slot : {kAttn, kRec, kStream})
      b.group_local[j * 3 + slot] = uses_slot(p.cache.kinds(j), slot) ? local[slot]++ : int8_t(-1);
  return b;
}

template <class Exec>
constexpr bool is_cpu_exec = std::is_same_v<Exec, CpuExec>;

// One recurrent group i (KV group j): u = conv(v_j), Δ = dt_up dt_low_i rounded to T, scan.
// Its scratch (u, Δ) is the group's own, so groups may run concurrently (CPU decode).
template <bool Execute, class Exec, class T, class TW>
void recurrent_group(const HybridAttentionCoreParams<T, TW>& p, const Plan& pl, int64_t i, Exec exec,
                     const unsigned char* meta, unsigned char* ws, void* lin_ws, size_t lin_bytes) {
  using B = HybridBackend<Exec>;
  const int64_t n = pl.n, hd = pl.hd, g = pl.g, nR = pl.groups[kRec];
  const View<const int32_t, 1> cu = meta_ints(meta, pl.cu, pl.S + 1), slots = meta_ints(meta, pl.slots, pl.S);
  const T* qr = reinterpret_cast<const T*>(ws + pl.q[kRec]);
  const T* kr = reinterpret_cast<const T*>(ws + pl.k[kRec]);
  const T* vr = reinterpret_cast<const T*>(ws + pl.v[kRec]);
  T* yr = reinterpret_cast<T*>(ws + pl.o[kRec]);
  const RecurrentGroupWeights<TW>& rw = p.recurrent[i];
  const int64_t r = rw.dt_up.shape[1];
  T* u = reinterpret_cast<T*>(ws + pl.u) + i * n * hd;
  float* delta_f = reinterpret_cast<float*>(ws + pl.delta_f) + i * n * hd;
  T* delta_t = reinterpret_cast<T*>(ws + pl.delta_t) + i * n * hd;
  CausalConv1dParams<T> cp;
  cp.x = make_strided_view(vr + i * hd, {n, hd}, {nR * hd, 1});
  cp.weight = rw.conv_weight;
  cp.bias = rw.conv_bias;
  cp.y = make_view(u, {n, hd});
  cp.conv_state = group_slice(p.cache.conv_states, i);
  cp.state_slots = slots;
  if (!pl.decode) cp.cu_seqlens = cu;
  SelectiveScanParams<T> sp;
  sp.u = make_view(const_cast<const T*>(u), {n, hd});
  sp.delta = make_view(const_cast<const T*>(delta_t), {n, hd});
  sp.A = rw.A;
  sp.B = make_strided_view(kr + i * hd, {n, int64_t(1), hd}, {nR * hd, hd, 1});
  sp.C = make_strided_view(qr + i * g * hd, {n, int64_t(1), g, hd}, {nR * g * hd, g * hd, hd, 1});
  sp.D = rw.D;
  sp.delta_bias = rw.dt_bias;
  sp.y = make_strided_view(yr + i * g * hd, {n, g, hd}, {nR * g * hd, hd, 1});
  sp.state = group_slice(p.cache.ssm_states, i);
  sp.state_slots = slots;
  if (!pl.decode) sp.cu_seqlens = cu;
  sp.delta_activation = DeltaActivation::softplus;
  LinearParams<float, TW> lp{
      make_strided_view(p.dt_low.data + dt_column(p.recurrent, i), {n, r}, {p.dt_low.stride[0], int64_t(1)}),
      rw.dt_up, View<const TW, 1>{}, make_view(delta_f, {n, hd})};
  if constexpr (Execute) {
    if (pl.decode) causal_conv1d_update(cp, exec); else causal_conv1d(cp, exec);
    linear(lp, exec, lin_ws, lin_bytes);
    B::to_storage(delta_t, delta_f, n * hd, exec);
    if (pl.decode) selective_state_update(sp, exec); else selective_scan(sp, exec);
  } else {
    B::check_conv(cp, pl.decode);
    check(lp);
    RF_CHECK(linear_workspace_bytes(lp, exec) <= lin_bytes, kCoreOp, ": internal: linear scratch too small");
    B::check_scan(sp, pl.decode);
  }
}

// The core's inner ops, built from the plan. Execute = false only builds and checks each op's
// params (and the scratch each needs); true runs them.
template <bool Execute, class Exec, class T, class TW>
void run(const HybridAttentionCoreParams<T, TW>& p, const Plan& pl, const HybridStep& st, Exec exec,
         const unsigned char* meta, unsigned char* ws) {
  using B = HybridBackend<Exec>;
  const int64_t n = pl.n, hd = pl.hd, g = pl.g;
  void* attn_ws = ws + pl.attn;
  const CallBuffers<T> b = call_buffers(p, pl, meta, ws);
  const View<const int32_t, 1> pos = meta_ints(meta, pl.pos, n), cu = meta_ints(meta, pl.cu, pl.S + 1),
                               slots = meta_ints(meta, pl.slots, pl.S), kv_lens = meta_ints(meta, pl.kv_lens, pl.S);

  auto do_attention = [&](const AttentionParams<T>& ap) {
    if constexpr (Execute) {
      attention(ap, exec, attn_ws, pl.attn_bytes);
    } else {
      B::check_attention(ap);
      RF_CHECK(attention_workspace_bytes(ap, exec) <= pl.attn_bytes, kCoreOp,
               ": internal: attention scratch too small");
    }
  };
  auto do_rope = [&](T* x, int64_t heads) {
    RopeParams<T> rp{make_view(x, {n, heads, hd}), pos, p.inv_freq, p.rope_layout};
    if constexpr (Execute) rope(rp, exec); else check(rp, B::kIndex);
  };

  // 1. the gather by kind.
  if constexpr (Execute) B::gather_heads(pl, b, float(1.0 / std::sqrt(double(hd))), exec);

  // 2. attention groups (contiguous slots, or pages).
  const int64_t nA = pl.groups[kAttn];
  if (nA) {
    do_rope(b.q[kAttn], nA * g);
    do_rope(b.k[kAttn], nA);
    const View<T, 4> K = p.cache.k, V = p.cache.v;
    if constexpr (Execute) B::append_kv(pl, b, K, V, exec);
    AttentionParams<T> ap;
    ap.q = make_view(const_cast<const T*>(b.q[kAttn]), {n, nA * g, hd});
    ap.k = K;
    ap.v = V;
    ap.out = make_view(b.o[kAttn], {n, nA * g, hd});
    ap.cu_seqlens = cu;
    if (pl.page_ld)
      ap.page_table = page_table_view(pl, meta);
    else
      ap.kv_slots = slots;
    ap.kv_lens = kv_lens;
    ap.q_positions = pos;
    do_attention(ap);
  }

  // 3. streaming groups: attention over [ring's live entries, chunk] gathered into scratch.
  const int64_t nS = pl.groups[kStream];
  if (nS) {
    do_rope(b.q[kStream], nS * g);
    do_rope(b.k[kStream], nS);
    const View<T, 4> RK = p.cache.ring_k, RV = p.cache.ring_v;
    const int64_t cap = pl.stream_cap;
    View<T, 4> SK = make_view(reinterpret_cast<T*>(ws + pl.stream_k), {pl.S, nS, cap, hd});
    View<T, 4> SV = make_view(reinterpret_cast<T*>(ws + pl.stream_v), {pl.S, nS, cap, hd});
    if constexpr (Execute) B::stream_gather(pl, b, RK, RV, SK, SV, exec);
    AttentionParams<T> ap;
    ap.q = make_view(const_cast<const T*>(b.q[kStream]), {n, nS * g, hd});
    ap.k = SK;
    ap.v = SV;
    ap.out = make_view(b.o[kStream], {n, nS * g, hd});
    ap.cu_seqlens = cu;
    ap.kv_lens = meta_ints(meta, pl.s_kv_lens, pl.S);
    ap.q_positions = pos;
    ap.k_positions = make_view(reinterpret_cast<const int32_t*>(meta + pl.s_kpos), {pl.S, cap});
    ap.sink = p.cache.sink;
    ap.window = p.cache.window;
    do_attention(ap);
    if constexpr (Execute) B::ring_write(pl, b, RK, RV, exec);  // after the attention read the ring
  }

  // 4. recurrent groups (G = 1 group of hd channels, R = g readers).
  const int64_t nR = pl.groups[kRec];
  if constexpr (is_cpu_exec<Exec>) {
    // Decode (tiny ops) runs the groups in parallel, each on one thread with its own scratch, so a
    // step costs one fork-join, not ~4 per group.
    if (!Execute || !pl.decode) {
      for (int64_t i = 0; i < nR; ++i) recurrent_group<Execute>(p, pl, i, exec, meta, ws, ws + pl.lin, pl.lin_bytes);
      if (!Execute && pl.decode)  // the decode path's per-thread scratch, on one thread
        for (int64_t i = 0; i < nR; ++i)
          recurrent_group<false>(p, pl, i, CpuExec{}, meta, ws, ws + pl.rec_lin, pl.rec_lin_bytes);
    } else {
      exec.for_each(nR, [&](int64_t i, int thread) {
        recurrent_group<true>(p, pl, i, CpuExec{}, meta, ws,
                              ws + pl.rec_lin + size_t(thread) * align_up(pl.rec_lin_bytes), pl.rec_lin_bytes);
      });
    }
  } else {
    for (int64_t i = 0; i < nR; ++i) recurrent_group<Execute>(p, pl, i, exec, meta, ws, ws + pl.lin, pl.lin_bytes);
  }

  // 5. head outputs back to head order in fp32, windowed groups mixed with alpha.
  if constexpr (Execute) {
    for (int64_t i = 0; i < nR; ++i)
      if (p.recurrent[i].alpha.present()) B::copy_floats(b.alpha + i * g, p.recurrent[i].alpha.data, g, exec);
    B::scatter_heads(pl, b, exec);
  }
}

/// Checks one layer against the plan (its views, then every inner op's params: a dry run of the
/// stages, host-only), so a call that throws writes nothing; returns the layer's plan.
template <class Exec, class T, class TW>
Plan prepare_layer(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan, Exec exec,
                   unsigned char* ws) {
  const Plan pl = layer_plan(p, plan);
  if constexpr (is_cpu_exec<Exec>)
    RF_CHECK(exec.threads() <= pl.threads, kCoreOp, ": the call runs on ", exec.threads(),
             " threads but the plan's scratch was sized for ", pl.threads, " (plan with the same exec)");
  if (pl.n) run<false>(p, pl, plan.step, exec, plan.metadata, ws);
  return pl;
}

/// The step plan on `exec` into the caller's buffers (plan_hybrid_step).
template <class Exec, class T, class TW>
HybridStepPlan<T, TW> plan_step(const HybridStepShape& sh, const HybridStep& st, int64_t tokens, Exec exec,
                                const HybridPlanBuffers& buf) {
  using B = HybridBackend<Exec>;
  check_step_views(sh, st, tokens);
  const size_t need = plan_layout<T>(sh, st, tokens).meta_end + kAlign;
  RF_CHECK(buf.metadata != nullptr && buf.bytes >= need, kCoreOp, ": the plan's metadata buffer has ", buf.bytes,
           " bytes, expected at least ", need, " (hybrid_step_metadata_bytes)");
  unsigned char* meta = align_ptr(buf.metadata);
  unsigned char* host = B::plan_staging(meta, buf);
  HybridStepPlan<T, TW> plan = make_step_plan<Exec, T, TW>(sh, st, tokens, exec, host);
  B::upload_plan(meta, host, plan.layout.meta_end, exec);
  plan.metadata = meta;
  return plan;
}

template <class T, class TW>
void check_core_plan_args(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan) {
  RF_CHECK(plan.metadata != nullptr, kCoreOp, ": the plan is empty (make it with plan_hybrid_step)");
  RF_CHECK(!p.step.cu_seqlens.present() && !p.step.slots.present() && !p.step.lengths.present() &&
               !p.step.page_table.present(),
           kCoreOp, ": p.step is given beside a plan: the plan holds the step, leave p.step empty");
}

/// One layer over the step's plan: no allocation, no synchronisation, no metadata upload.
template <class Exec, class T, class TW>
void core_call(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan, Exec exec,
               void* workspace, size_t workspace_bytes) {
  check_core_plan_args(p, plan);
  RF_CHECK(workspace != nullptr && workspace_bytes >= plan.workspace_bytes, kCoreOp, ": workspace has ",
           workspace_bytes, " bytes, expected at least ", plan.workspace_bytes, " (plan.workspace_bytes)");
  unsigned char* ws = align_ptr(workspace);
  const Plan pl = prepare_layer(p, plan, exec, ws);
  if (pl.n) run<true>(p, pl, plan.step, exec, plan.metadata, ws);
}

/// Every check core_call(p, plan, exec, ...) makes but the workspace's size (the caller's to
/// choose), nothing run or written: what supports(p, plan, exec) answers. The dry run reads the
/// plan's metadata where the plan put it (host memory on the CPU; CUDA's checks read no index array).
template <class Exec, class T, class TW>
void check_core_plan_call(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan, Exec exec) {
  check_core_plan_args(p, plan);
  const QueryScratch ws(plan.workspace_bytes);  // allocated, never touched (as in check_core_call)
  prepare_layer(p, plan, exec, ws.get());
}

// The one-shot call plans a step for this layer alone, its metadata at the head of the workspace.
template <class Exec, class T, class TW>
size_t core_workspace_bytes(const HybridAttentionCoreParams<T, TW>& p, Exec exec) {
  check(p);
  const HybridStepShape sh = shape_of(p);
  const int64_t n = p.q.shape[0];
  std::vector<unsigned char> meta(plan_layout<T>(sh, p.step, n).meta_end + kAlign);  // a size query may allocate
  const HybridStepPlan<T, TW> plan = make_step_plan<Exec, T, TW>(sh, p.step, n, exec, align_ptr(meta.data()));
  return align_up(plan.layout.meta_end) + plan.workspace_bytes;
}

template <class Exec, class T, class TW>
void core_call(const HybridAttentionCoreParams<T, TW>& p, Exec exec, void* workspace, size_t workspace_bytes) {
  using B = HybridBackend<Exec>;
  check(p);
  const HybridStepShape sh = shape_of(p);
  const int64_t n = p.q.shape[0];
  const size_t meta_bytes = align_up(plan_layout<T>(sh, p.step, n).meta_end);
  RF_CHECK(workspace != nullptr && workspace_bytes >= meta_bytes + kAlign, kCoreOp, ": workspace has ",
           workspace_bytes, " bytes, expected at least hybrid_attention_core_workspace_bytes()");
  unsigned char* meta = align_ptr(workspace);
  unsigned char* host = B::metadata_buffer(meta, meta_bytes, exec);
  HybridStepPlan<T, TW> plan = make_step_plan<Exec, T, TW>(sh, p.step, n, exec, host);
  plan.metadata = meta;
  RF_CHECK(workspace_bytes >= meta_bytes + plan.workspace_bytes, kCoreOp, ": workspace has ", workspace_bytes,
           " bytes, expected at least ", meta_bytes + plan.workspace_bytes, " (hybrid_attention_core_workspace_bytes)");
  HybridAttentionCoreParams<T, TW> lp = p;
  lp.step = HybridStep{};  // the plan holds it
  unsigned char* ws = meta + meta_bytes;
  const Plan pl = prepare_layer(lp, plan, exec, ws);
  if (pl.n == 0) return;
  B::upload_metadata(meta, host, plan.layout.meta_end, exec);
  run<true>(lp, pl, plan.step, exec, meta, ws);
}

/// Every check core_call(p, exec, ...) makes, in its order, with nothing run or written: what
/// supports(p, exec) answers for the core. The plan's metadata goes to a host buffer (a query may
/// allocate on the host): the CPU's checks read it there, and CUDA's read no index array.
template <class Exec, class T, class TW>
void check_core_call(const HybridAttentionCoreParams<T, TW>& p, Exec exec) {
  check(p);
  const HybridStepShape sh = shape_of(p);
  const int64_t n = p.q.shape[0];
  std::vector<unsigned char> meta(plan_layout<T>(sh, p.step, n).meta_end + kAlign);
  HybridStepPlan<T, TW> plan = make_step_plan<Exec, T, TW>(sh, p.step, n, exec, align_ptr(meta.data()));
  plan.metadata = align_ptr(meta.data());
  HybridAttentionCoreParams<T, TW> lp = p;
  lp.step = HybridStep{};
  // The dry run builds views at workspace offsets and reads none; they need a base object that
  // spans the offsets. Allocated, never touched: its pages are not faulted in.
  const QueryScratch ws(plan.workspace_bytes);
  prepare_layer(lp, plan, exec, ws.get());
}

// ---- the layer: projections around the core ------------------------------------------------------

/// Where the layer keeps its projections in the workspace, ahead of the core's scratch.
struct LayerPlan {
  size_t qf = 0, kf = 0, vf = 0, dt_low = 0, lin = 0, lin_bytes = 0, core = 0;
  int64_t dt_cols = 0;
};

template <class T, class TW, class M>
LayerPlan plan_layer(const HybridHeadAttentionParams<T, TW, M>& p) {
  LayerPlan lp;
  const int64_t n = p.x.shape[0], hd = p.cache->head_dim(), n_kv = p.cache->config().n_kv;
  const HybridAttentionWeights<TW>& w = p.weights;
  for (int i = 0; i < w.n_recurrent; ++i) lp.dt_cols += w.recurrent[i].dt_up.shape[1];
  size_t off = 0;
  auto take = [&](size_t& at, int64_t count) {
    at = off;
    off += align_up(size_t(count) * sizeof(float));
  };
  take(lp.qf, n * p.n_q * hd);  // doubles as the core's out (the head concat Wo reads)
  take(lp.kf, n * n_kv * hd);
  take(lp.vf, n * n_kv * hd);
  take(lp.dt_low, n * lp.dt_cols);
  lp.lin = off;
  return lp;
}

/// The layer's core params, over the workspace at `ws` (null: placeholders, for checks and sizes);
/// with_step = false leaves the step to a plan.
template <class T, class TW, class M>
HybridAttentionCoreParams<T, TW> core_params(const HybridHeadAttentionParams<T, TW, M>& p, const LayerPlan& lp,
                                             unsigned char* ws, bool with_step = true) {
  HybridCache<T, M>& c = *p.cache;
  const int64_t n = p.x.shape[0], hd = c.head_dim(), n_kv = c.config().n_kv;
  auto f = [&](size_t off) { return ws ? reinterpret_cast<float*>(ws + off) : placeholder<float>(); };
  HybridAttentionCoreParams<T, TW> cp;
  cp.q = make_view(const_cast<const float*>(f(lp.qf)), {n, p.n_q * hd});
  cp.k = make_view(const_cast<const float*>(f(lp.kf)), {n, n_kv * hd});
  cp.v = make_view(const_cast<const float*>(f(lp.vf)), {n, n_kv * hd});
  if (lp.dt_cols) cp.dt_low = make_view(const_cast<const float*>(f(lp.dt_low)), {n, lp.dt_cols});
  cp.out = make_view(f(lp.qf), {n, p.n_q * hd});
  cp.recurrent = p.weights.recurrent;
  cp.n_recurrent = p.weights.n_recurrent;
  cp.cache = c.layer_view(p.layer);
  if (with_step) cp.step = hybrid_step(c, p.cu_seqlens, p.slots);
  cp.n_q = p.n_q;
  cp.head_dim = int(hd);
  cp.inv_freq = p.inv_freq;
  cp.rope_layout = p.rope_layout;
  return cp;
}

// The layer's linears, into and out of the core's views cp: the inputs (q, k, v, dt_low) or Wo.
// Execute = false checks them and their scratch.
template <bool Execute, class Exec, class T, class TW, class M>
void project(const HybridHeadAttentionParams<T, TW, M>& p, const HybridAttentionCoreParams<T, TW>& cp,
             const LayerPlan& lp, Exec exec, unsigned char* ws, size_t lin_bytes, bool inputs) {
  const HybridAttentionWeights<TW>& w = p.weights;
  auto do_linear = [&](View<const float, 2> x, View<const TW, 2> wt, BlockWeight blocks, View<const TW, 1> bias,
                       View<float, 2> y, auto lin_exec) {
    LinearParams<float, TW> prm{x, wt, bias, y};
    if constexpr (Execute) {
      if constexpr (is_cpu_exec<Exec>)
        linear(prm, blocks, lin_exec, ws + lp.lin, lin_bytes);
      else
        linear(prm, lin_exec, ws + lp.lin, lin_bytes);  // check(p) refused blocks off the CPU
    } else {
      check(prm, blocks);
      RF_CHECK(linear_workspace_bytes(prm, lin_exec) <= lin_bytes, kOp, ": internal: linear scratch too small");
    }
  };
  auto mut = [](View<const float, 2> v) { return make_strided_view(const_cast<float*>(v.data), v.shape, v.stride); };
  if (!inputs) {  // Wo over the head outputs
    do_linear(cp.out, w.wo, w.wo_blocks, View<const TW, 1>{}, p.out, exec);
    return;
  }
  do_linear(p.x, w.wq, w.wq_blocks, w.bq, mut(cp.q), exec);
  do_linear(p.x, w.wk, w.wk_blocks, w.bk, mut(cp.k), exec);
  do_linear(p.x, w.wv, w.wv_blocks, w.bv, mut(cp.v), exec);
  // dt_down x per state group into its columns; a decode step's are tiny, so on the calling thread.
  const int64_t n = p.x.shape[0];
  for (int i = 0; i < w.n_recurrent; ++i) {
    const View<const TW, 2> dd = w.recurrent[i].dt_down;
    View<float, 2> y = make_strided_view(const_cast<float*>(cp.dt_low.data) + dt_column(w.recurrent, i),
                                         {n, dd.shape[0]}, {cp.dt_low.stride[0], int64_t(1)});
    if constexpr (is_cpu_exec<Exec>) {
      if (n == 1) {
        do_linear(p.x, dd, BlockWeight{}, View<const TW, 1>{}, y, CpuExec{});
        continue;
      }
    }
    do_linear(p.x, dd, BlockWeight{}, View<const TW, 1>{}, y, exec);
  }
}

template <class Exec, class T, class TW, class M>
size_t layer_lin_bytes(const HybridHeadAttentionParams<T, TW, M>& p, Exec exec) {
  const int64_t n = p.x.shape[0];
  const HybridAttentionWeights<TW>& w = p.weights;
  size_t lin = std::max({linear_scratch(n, w.wq, exec), linear_scratch(n, w.wk, exec), linear_scratch(n, w.wv, exec),
                         linear_scratch(n, w.wo, exec)});
  for (int i = 0; i < w.n_recurrent; ++i) {
    lin = std::max(lin, linear_scratch(n, w.recurrent[i].dt_down, exec));
    if constexpr (is_cpu_exec<Exec>) lin = std::max(lin, linear_scratch(n, w.recurrent[i].dt_down, CpuExec{}));
  }
  return lin;
}

template <class T, class TW, class M>
void check_layer_params(const HybridHeadAttentionParams<T, TW, M>& p);

template <class Exec, class T, class TW, class M>
size_t workspace_bytes(const HybridHeadAttentionParams<T, TW, M>& p, Exec exec) {
  check(p);
  const LayerPlan lp = plan_layer(p);
  return kAlign + lp.lin + align_up(layer_lin_bytes(p, exec)) +
         core_workspace_bytes(core_params(p, lp, nullptr), exec);
}

// The cache's own capacity check, before the core's: it speaks of slots and capacity, which the
// caller chose.
template <class T, class TW, class M>
void check_capacity(const HybridHeadAttentionParams<T, TW, M>& p) {
  const int64_t S = num_sequences(p.cu_seqlens);
  p.cache->check_append(S, [&](int64_t s) {
    const int64_t cnt = p.cu_seqlens.present() ? p.cu_seqlens(s + 1) - p.cu_seqlens(s) : p.x.shape[0];
    return std::pair<int32_t, int64_t>{p.slots.present() ? p.slots(s) : int32_t(s), cnt};
  });
}

/// Every check call(p, exec, ...) makes, with nothing run or written (supports(p, exec) of the layer).
template <class Exec, class T, class TW, class M>
void check_layer_call(const HybridHeadAttentionParams<T, TW, M>& p, Exec exec) {
  check(p);
  check_capacity(p);
  const LayerPlan lp = plan_layer(p);
  const size_t lin_bytes = layer_lin_bytes(p, exec);
  const QueryScratch ws(lp.lin);  // the projections' views, as in check_core_call
  const HybridAttentionCoreParams<T, TW> cp = core_params(p, lp, ws.get());
  project<false>(p, cp, lp, exec, ws.get(), lin_bytes, true);
  project<false>(p, cp, lp, exec, ws.get(), lin_bytes, false);
  if (p.x.shape[0] > 0) check_core_call(cp, exec);
}

template <class Exec, class T, class TW, class M>
void call(const HybridHeadAttentionParams<T, TW, M>& p, Exec exec, void* workspace, size_t workspace_bytes) {
  check(p);
  const LayerPlan lp = plan_layer(p);
  const size_t lin_bytes = layer_lin_bytes(p, exec), core_at = lp.lin + align_up(lin_bytes) + kAlign;
  RF_CHECK(workspace != nullptr && workspace_bytes >= core_at, kOp, ": workspace has ", workspace_bytes,
           " bytes, expected at least hybrid_head_attention_workspace_bytes()");
  unsigned char* ws = align_ptr(workspace);
  check_capacity(p);
  const HybridAttentionCoreParams<T, TW> cp = core_params(p, lp, ws);
  project<false>(p, cp, lp, exec, ws, lin_bytes, true);
  project<false>(p, cp, lp, exec, ws, lin_bytes, false);  // Wo checked before the core writes the cache
  if (p.x.shape[0] == 0) return;
  project<true>(p, cp, lp, exec, ws, lin_bytes, true);  // into the workspace only
  unsigned char* core_ws = ws + lp.lin + align_up(lin_bytes);
  core_call(cp, exec, core_ws, workspace_bytes - size_t(core_ws - static_cast<unsigned char*>(workspace)));
  project<true>(p, cp, lp, exec, ws, lin_bytes, false);
}


// The layer over a step's plan (hybrid_step gives the step over the cache): the core runs from the
// plan's metadata; the capacity and slots were checked when the plan was made.
template <class T, class TW, class M>
void check_plan_for(const HybridHeadAttentionParams<T, TW, M>& p, const HybridStepPlan<T, TW>& plan) {
  check_layer_params(p);
  RF_CHECK(!p.cu_seqlens.present() && !p.slots.present(), kOp,
           ": cu_seqlens and slots are given beside a plan: the plan holds the step, leave them empty");
  RF_CHECK(plan.metadata != nullptr, kOp, ": the plan is empty (make it with plan_hybrid_step)");
  RF_CHECK(plan.step.lengths.data == p.cache->lengths().data, kOp,
           ": the plan was made over another cache's lengths (plan the step with hybrid_step(cache, ...))");
}

// A planned layer's workspace: its projections, their linears' scratch, then the core's.
struct PlannedLayer {
  LayerPlan lp;
  size_t lin_bytes = 0, core_off = 0, bytes = 0;  // bytes: all of it, from an aligned base
};

template <class Exec, class T, class TW, class M>
PlannedLayer planned_layer(const HybridHeadAttentionParams<T, TW, M>& p, const HybridStepPlan<T, TW>& plan,
                           Exec exec) {
  check_plan_for(p, plan);
  PlannedLayer r;
  r.lp = plan_layer(p);
  r.lin_bytes = layer_lin_bytes(p, exec);
  r.core_off = r.lp.lin + align_up(r.lin_bytes);
  r.bytes = r.core_off + plan.workspace_bytes;
  return r;
}

// Every check of the planned layer over the workspace at ws (aligned), nothing written: the
// projections' params, then the core's dry run. Returns the core's views and the layer plan.
template <class Exec, class T, class TW, class M>
std::pair<HybridAttentionCoreParams<T, TW>, Plan> check_planned_layer(const HybridHeadAttentionParams<T, TW, M>& p,
                                                                      const HybridStepPlan<T, TW>& plan,
                                                                      const PlannedLayer& pd, Exec exec,
                                                                      unsigned char* ws) {
  const HybridAttentionCoreParams<T, TW> cp = core_params(p, pd.lp, ws, false);
  project<false>(p, cp, pd.lp, exec, ws, pd.lin_bytes, true);
  project<false>(p, cp, pd.lp, exec, ws, pd.lin_bytes, false);
  return {cp, prepare_layer(cp, plan, exec, ws + pd.core_off)};
}

template <class Exec, class T, class TW, class M>
size_t workspace_bytes(const HybridHeadAttentionParams<T, TW, M>& p, const HybridStepPlan<T, TW>& plan, Exec exec) {
  return kAlign + planned_layer(p, plan, exec).bytes;
}

/// Every check call(p, plan, exec, ...) makes but the workspace's size: supports(p, plan, exec).
template <class Exec, class T, class TW, class M>
void check_layer_plan_call(const HybridHeadAttentionParams<T, TW, M>& p, const HybridStepPlan<T, TW>& plan,
                           Exec exec) {
  const PlannedLayer pd = planned_layer(p, plan, exec);
  const QueryScratch ws(pd.bytes);  // allocated, never touched (as in check_core_call)
  check_planned_layer(p, plan, pd, exec, ws.get());
}

template <class Exec, class T, class TW, class M>
void call(const HybridHeadAttentionParams<T, TW, M>& p, const HybridStepPlan<T, TW>& plan, Exec exec,
          void* workspace, size_t workspace_bytes) {
  const PlannedLayer pd = planned_layer(p, plan, exec);
  RF_CHECK(workspace != nullptr && workspace_bytes >= kAlign + pd.bytes, kOp, ": workspace has ", workspace_bytes,
           " bytes, expected at least ", kAlign + pd.bytes, " (hybrid_head_attention_workspace_bytes(p, plan, exec))");
  unsigned char* ws = align_ptr(workspace);
  const auto [cp, pl] = check_planned_layer(p, plan, pd, exec, ws);  // every check before the first write
  if (pl.n == 0) return;
  project<true>(p, cp, pd.lp, exec, ws, pd.lin_bytes, true);
  run<true>(cp, pl, plan.step, exec, plan.metadata, ws + pd.core_off);
  project<true>(p, cp, pd.lp, exec, ws, pd.lin_bytes, false);
}

/// The core's views and weights, for a step over `slots` slots (paged: K/V a pool of pages).
template <class T, class TW>
void check_layer(const HybridAttentionCoreParams<T, TW>& p, int64_t slots, bool paged) {
  const HybridLayerView<T>& c = p.cache;
  detail::check_shape(kCoreOp, "cache.kinds", c.kinds, {-1});
  const int64_t n_kv = c.kinds.shape[0], hd = p.head_dim;
  RF_CHECK(n_kv >= 1 && hd >= 1, kCoreOp, ": cache.kinds (", n_kv, " KV groups) and head_dim (", hd,
           ") must be positive");
  RF_CHECK(p.n_q >= 1 && p.n_q % n_kv == 0, kCoreOp, ": n_q (", p.n_q, ") must be a positive multiple of n_kv (",
           n_kv, ")");
  const int64_t n_q = p.n_q;
  detail::check_shape(kCoreOp, "q", p.q, {-1, n_q * hd});
  const int64_t tokens = p.q.shape[0];
  detail::check_shape(kCoreOp, "k", p.k, {tokens, n_kv * hd});
  detail::check_shape(kCoreOp, "v", p.v, {tokens, n_kv * hd});
  detail::check_shape(kCoreOp, "out", p.out, {tokens, n_q * hd});
  detail::check_inner_contiguous(kCoreOp, "q", p.q);
  detail::check_inner_contiguous(kCoreOp, "k", p.k);
  detail::check_inner_contiguous(kCoreOp, "v", p.v);
  detail::check_inner_contiguous(kCoreOp, "out", p.out);
  int64_t groups[3];
  count_groups(c.kinds, groups);
  const int64_t nA = groups[kAttn], nState = groups[kRec], nRing = groups[kStream];
  if (nA) {
    detail::check_shape(kCoreOp, "cache.k", c.k, {paged ? -1 : slots, nA, -1, hd});
    detail::check_shape(kCoreOp, "cache.v", c.v, {c.k.shape[0], nA, c.k.shape[2], hd});
  }
  if (nRing) {
    detail::check_shape(kCoreOp, "cache.ring_k", c.ring_k, {slots, nRing, -1, hd});
    detail::check_shape(kCoreOp, "cache.ring_v", c.ring_v, {slots, nRing, c.ring_k.shape[2], hd});
    RF_CHECK(c.sink >= 0 && c.window >= 1 && c.ring_k.shape[2] > c.sink, kCoreOp, ": the rings hold ",
             c.ring_k.shape[2], " entries: expected more than the sink (", c.sink, "), and window >= 1 (got ",
             c.window, ")");
  }
  RF_CHECK(p.n_recurrent == nState && (nState == 0 || p.recurrent != nullptr), kCoreOp, ": ", nState,
           " recurrent and windowed groups but recurrent has ", p.n_recurrent, " entries");
  if (nState) {
    detail::check_shape(kCoreOp, "cache.ssm_states", c.ssm_states, {slots, nState, hd, hd});
    detail::check_shape(kCoreOp, "cache.conv_states", c.conv_states, {slots, nState, -1, hd});
    const int64_t Kc = c.conv_states.shape[2] + 1;
    int64_t cols = 0;
    for (int64_t j = 0, i = 0; j < n_kv; ++j) {
      if (!has_recurrent_state(c.kinds(j))) continue;
      const RecurrentGroupWeights<TW>& r = p.recurrent[i];
      char name[64];  // no allocation on the hot path: the names are formatted into a stack buffer
      auto nm = [&](const char* field) {
        std::snprintf(name, sizeof name, "recurrent[%d].%s", int(i), field);
        return name;
      };
      detail::check_shape(kCoreOp, nm("dt_up"), r.dt_up, {hd, -1});
      RF_CHECK(r.dt_up.shape[1] >= 1, kCoreOp, ": ", nm("dt_up"), " must have at least one column (dt_rank)");
      cols += r.dt_up.shape[1];
      detail::check_shape(kCoreOp, nm("dt_bias"), r.dt_bias, {hd});
      detail::check_shape(kCoreOp, nm("A"), r.A, {hd, hd});
      detail::check_optional_shape(kCoreOp, nm("D"), r.D, {hd});
      detail::check_shape(kCoreOp, nm("conv_weight"), r.conv_weight, {hd, Kc});
      detail::check_optional_shape(kCoreOp, nm("conv_bias"), r.conv_bias, {hd});
      const bool windowed = c.kinds(j) == HeadKind::windowed;
      RF_CHECK(windowed == r.alpha.present(), kCoreOp, ": ", nm("alpha"),
               windowed ? " is missing: KV group " : " is given: KV group ", j,
               windowed ? " is windowed" : " is recurrent, not windowed");
      if (windowed) detail::check_shape(kCoreOp, nm("alpha"), r.alpha, {n_q / n_kv});
      ++i;
    }
    detail::check_shape(kCoreOp, "dt_low", p.dt_low, {tokens, cols});
    detail::check_inner_contiguous(kCoreOp, "dt_low", p.dt_low);
  }
  if (nA + nRing > 0) {  // some group runs softmax attention
    dispatch_value("hybrid_attention_core: head_dim of attention groups", AttentionHeadDims{}, hd, [](auto) {});
    recurformer::detail::check_shape(kCoreOp, "inv_freq", p.inv_freq, {hd / 2});
  }
}

}  // namespace hybrid
}  // namespace detail

/// Bytes of the plan's metadata buffer (and, on CUDA, of its host staging) for a step of `tokens`.
inline size_t hybrid_step_metadata_bytes(const HybridStepShape& shape, const HybridStep& step, int64_t tokens) {
  detail::hybrid::check_step_views(shape, step, tokens);
  return detail::hybrid::plan_layout<float>(shape, step, tokens).meta_end + detail::hybrid::kAlign;
}

template <class T, class TW>
void check(const HybridAttentionCoreParams<T, TW>& p) {
  using namespace detail::hybrid;
  recurformer::detail::check_shape(kCoreOp, "step.lengths", p.step.lengths, {-1});
  check_layer(p, p.step.lengths.shape[0], p.step.page_table.present());
  check_step_views(shape_of(p), p.step, p.q.shape[0]);
}

namespace detail {
namespace hybrid {

template <class T, class TW, class M>
void check_layer_params(const HybridHeadAttentionParams<T, TW, M>& p) {
  RF_CHECK(p.cache != nullptr, kOp, ": cache is null");
  const HybridCache<T, M>& c = *p.cache;
  RF_CHECK(p.layer >= 0 && p.layer < c.n_layers(), kOp, ": layer ", p.layer, " out of range [0, ",
           c.n_layers(), ")");
  const int64_t n_kv = c.config().n_kv, hd = c.head_dim();
  RF_CHECK(p.n_q >= 1 && p.n_q % n_kv == 0, kOp, ": n_q (", p.n_q, ") must be a positive multiple of n_kv (",
           n_kv, ")");
  const int64_t n_q = p.n_q;
  detail::check_shape(kOp, "x", p.x, {-1, -1});
  const int64_t tokens = p.x.shape[0], d_model = p.x.shape[1];
  RF_CHECK(d_model >= 1, kOp, ": x must have at least one column (d_model)");
  detail::check_shape(kOp, "out", p.out, {tokens, d_model});
  const HybridAttentionWeights<TW>& w = p.weights;
  detail::check_shape(kOp, "weights.wq", w.wq, {n_q * hd, d_model});
  detail::check_shape(kOp, "weights.wk", w.wk, {n_kv * hd, d_model});
  detail::check_shape(kOp, "weights.wv", w.wv, {n_kv * hd, d_model});
  detail::check_shape(kOp, "weights.wo", w.wo, {d_model, n_q * hd});
  detail::check_optional_shape(kOp, "weights.bq", w.bq, {n_q * hd});
  detail::check_optional_shape(kOp, "weights.bk", w.bk, {n_kv * hd});
  detail::check_optional_shape(kOp, "weights.bv", w.bv, {n_kv * hd});
  RF_CHECK((std::is_same_v<M, HostMemory>) ||
               !(w.wq_blocks.present() || w.wk_blocks.present() || w.wv_blocks.present() || w.wo_blocks.present()),
           kOp, ": GGUF block weights (weights.w*_blocks) are served on the CPU only");
  const LayerLayout& ll = c.layer_layout(p.layer);
  const int n_rec = ll.count_state_groups();
  RF_CHECK(w.n_recurrent == n_rec && (n_rec == 0 || w.recurrent != nullptr), kOp, ": layer ", p.layer,
           " has ", n_rec, " recurrent and windowed groups but weights.recurrent has ", w.n_recurrent, " entries");
  if (n_rec > 0)
    RF_CHECK(c.d_state() == hd, kOp, ": d_state (", c.d_state(), ") must equal head_dim (", hd,
             ") for recurrent groups (B = k, C = q)");
  for (int i = 0; i < n_rec; ++i) {
    const RecurrentGroupWeights<TW>& r = w.recurrent[i];
    char name[64];
    std::snprintf(name, sizeof name, "weights.recurrent[%d].dt_down", i);
    detail::check_shape(kOp, name, r.dt_down, {r.dt_up.present() ? r.dt_up.shape[1] : -1, d_model});
  }
}

}  // namespace hybrid
}  // namespace detail

template <class T, class TW, class M>
void check(const HybridHeadAttentionParams<T, TW, M>& p) {
  detail::hybrid::check_layer_params(p);
  // The rest (cu_seqlens, slots, recurrent weights, the cache's views, head_dim, inv_freq) is the core's check.
  check(detail::hybrid::core_params(p, detail::hybrid::plan_layer(p), nullptr));
}

}  // namespace recurformer
