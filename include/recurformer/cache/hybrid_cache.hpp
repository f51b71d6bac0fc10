// recurformer/cache/hybrid_cache.hpp: the per-sequence memory of a hybrid (RecurFormer) Llama.
//
// Spec section 6. Per layer and sequence slot the cache holds only what the layer's head layout
// needs: K and V of the attention groups (growing with the context), an fp32 SSM state and a conv
// state per recurrent group (constant), and sink + window ring buffers of K and V per streaming
// group (bounded); a windowed group keeps both a state and a ring. Memory is allocated once, at construction, for `slots` sequences of up to
// `capacity` tokens; nothing is allocated later (except by snapshot() into its caller's Snapshot).
//
// Layouts, chosen so the kernels read the cache directly through views:
//   keys(l), values(l)          [slots, n_attn(l), capacity, hd]   T      (attention op's k / v)
//   ssm_states(l)               [slots, n_rec(l), hd, N]          float  (per group: scan's state)
//   conv_states(l)              [slots, n_rec(l), Kc-1, hd]       T      (per group: conv's conv_state)
//   stream_keys(l), stream_values(l) [slots, n_stream(l), ring, hd] T    ring = min(capacity, sink+window)
// n_rec counts the layer's recurrent and windowed groups (LayerLayout::state_groups, in KV-group order),
// n_stream its streaming and windowed groups (LayerLayout::ring_groups).
// Streaming ring: a token at position p < sink sits in entry p; p >= sink in entry
// sink + (p - sink) % window, which overwrites exactly the key the window has just forgotten.
// Key positions are a function of the slot's length (stream_positions), so nothing but K and V is
// stored and the byte report equals the spec formula exactly.
//
// Memory: HostMemory (default) or DeviceMemory (cuda/memory.cuh, a cudaStream_t): the same cache
// over device memory, whose views the CUDA ops take and whose reset/copy/snapshot/restore are
// asynchronous on that stream. Lengths and epochs live on the host in both: they are the
// scheduler's metadata, and a device layer uploads what its kernels need with each call.
//
// layer_view(l) hands out one layer's memory as plain views (HybridLayerView), which is what the
// layer core (layers/hybrid_attention_core.hpp) reads and writes; an engine with its own memory
// builds the same views over its own buffers, with the attention groups' K/V paged if it likes.
//
// Paged K/V (config.page_size > 0, vLLM's block tables): the attention groups' K/V of every layer is
// a pool of kv_pages pages [kv_pages, n_attn(l), page_size, hd], and each slot holds a row of page
// indices (page i of a slot covers its positions [i page_size, (i+1) page_size); the same index in
// every layer). Pages are taken from a free list when a step is reserved and returned by reset();
// copy() makes the destination share the source's pages instead of copying them, and the first
// append into a shared page copies it first (copy-on-write), so forks of a long prompt cost one
// page each. The states and rings stay per slot. The bookkeeping is on the host and sized at
// construction: reserving, sharing and freeing allocate nothing.
//
// Appending is three-phase, because every layer of a forward pass writes at the same positions:
// the caller reserves the step (reserve(): checks every slot's capacity and, paged, takes the pages
// the new tokens need; throws before anything changes), each layer checks (check_append) and writes
// its K/V/states at positions [length, length + n), and after the last layer the caller commits the
// new lengths with advance(). With contiguous K/V, reserve() only checks.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"
#include "recurformer/core/head_layout.hpp"
#include "recurformer/core/memory.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

/// What a HybridCache holds: model shape, head layout and how many sequences of how many tokens.
struct HybridCacheConfig {
  int n_layers = 0;
  int n_kv = 0;                 ///< KV groups per layer
  int head_dim = 0;             ///< hd
  HeadLayout layout;            ///< n_layers x n_kv kinds
  RecurrentConfig recurrent;    ///< d_state (N) and conv_kernel (Kc) are used here
  StreamingConfig streaming;    ///< sink and window
  int slots = 1;                ///< sequences held at once
  int64_t capacity = 0;         ///< tokens per slot
  int64_t page_size = 0;        ///< paged K/V: tokens per page (0: one contiguous region per slot)
  int64_t kv_pages = 0;         ///< paged K/V: pages in the pool (0: slots x pages_per_slot(), never short)

  /// Pages one slot's capacity spans (paged), or 0.
  int64_t pages_per_slot() const { return page_size > 0 ? (capacity + page_size - 1) / page_size : 0; }

  /// Throws Error naming the field unless the config is consistent.
  void check() const {
    RF_CHECK(n_layers >= 1, "HybridCache: n_layers is ", n_layers, ", expected >= 1");
    RF_CHECK(n_kv >= 1, "HybridCache: n_kv is ", n_kv, ", expected >= 1");
    RF_CHECK(head_dim >= 1, "HybridCache: head_dim is ", head_dim, ", expected >= 1");
    RF_CHECK(slots >= 1, "HybridCache: slots is ", slots, ", expected >= 1");
    RF_CHECK(capacity >= 1 && capacity <= INT32_MAX, "HybridCache: capacity is ", capacity,
             ", expected 1..2^31-1 tokens");
    RF_CHECK(page_size >= 0 && page_size <= capacity, "HybridCache: page_size is ", page_size,
             ", expected 0 (contiguous) or 1..capacity (", capacity, ")");
    RF_CHECK(kv_pages >= 0 && (page_size > 0 || kv_pages == 0) && kv_pages <= INT32_MAX, "HybridCache: kv_pages is ",
             kv_pages, ", expected 0, or with page_size > 0 at most 2^31-1 pages");
    layout.check(n_layers, n_kv);
    if (layout.count_state_groups() > 0) {
      RF_CHECK(recurrent.d_state >= 1, "HybridCache: recurrent.d_state is ", recurrent.d_state,
               ", expected >= 1");
      RF_CHECK(recurrent.conv_kernel >= 1, "HybridCache: recurrent.conv_kernel is ",
               recurrent.conv_kernel, ", expected >= 1");
    }
    if (layout.count_ring_groups() > 0) {
      RF_CHECK(streaming.sink >= 0, "HybridCache: streaming.sink is ", streaming.sink, ", expected >= 0");
      RF_CHECK(streaming.window >= 1, "HybridCache: streaming.window is ", streaming.window,
               ", expected >= 1");
    }
  }
};

/// Bytes by kind of head. total = attention + recurrent + streaming + windowed.
struct CacheBytes {
  int64_t attention = 0, recurrent = 0, streaming = 0, windowed = 0, total = 0;
  CacheBytes& operator+=(const CacheBytes& o) {
    attention += o.attention, recurrent += o.recurrent, streaming += o.streaming, windowed += o.windowed;
    total += o.total;
    return *this;
  }
};
inline bool operator==(const CacheBytes& a, const CacheBytes& b) {
  return a.attention == b.attention && a.recurrent == b.recurrent && a.streaming == b.streaming &&
         a.windowed == b.windowed && a.total == b.total;
}

/// The byte report: for the tokens the slots hold now, and for what was allocated.
struct CacheReport {
  CacheBytes held;      ///< sum over non-empty slots of the spec formula at that slot's length
                        ///< (paged: as if no page were shared; pages_used() counts what is)
  CacheBytes capacity;  ///< the bytes allocated: slots x the spec formula at `capacity` tokens, the
                        ///< attention part being the page pool when paged
};

/// Spec section 6, for one sequence of `context` tokens with elements of `elem_bytes` bytes:
/// sum over layers of (n_kv - r - s - w) 2 hd T b + r (hd N 4 + (Kc-1) hd b) + s 2 hd min(T, sink+window) b
/// + w (hd N 4 + (Kc-1) hd b + 2 hd min(T, sink+window) b).
inline CacheBytes hybrid_cache_spec_bytes(const HybridCacheConfig& c, int64_t context, int64_t elem_bytes) {
  CacheBytes r;
  const int64_t hd = c.head_dim, N = c.recurrent.d_state, Kc = c.recurrent.conv_kernel;
  const int64_t ring = std::min<int64_t>(context, int64_t(c.streaming.sink) + c.streaming.window);
  const int64_t state = hd * N * 4 + (Kc - 1) * hd * elem_bytes, ring_bytes = 2 * hd * ring * elem_bytes;
  for (const LayerLayout& l : c.layout.layers) {
    r.attention += int64_t(l.count(HeadKind::attention)) * 2 * hd * context * elem_bytes;
    r.recurrent += int64_t(l.count(HeadKind::recurrent)) * state;
    r.streaming += int64_t(l.count(HeadKind::streaming)) * ring_bytes;
    r.windowed += int64_t(l.count(HeadKind::windowed)) * (state + ring_bytes);
  }
  r.total = r.attention + r.recurrent + r.streaming + r.windowed;
  return r;
}

/// The streaming window whose ring (sink + window tokens of K and V) takes as many bytes as one
/// recurrent group's state (spec section 6), at most: the "same cache" streaming baseline of a
/// conversion. Throws when the state is too small to hold the sink and one window token.
inline int streaming_window_matching_recurrent(int64_t head_dim, const RecurrentConfig& rc, int sink,
                                               int64_t elem_bytes) {
  RF_CHECK(head_dim >= 1 && rc.d_state >= 1 && rc.conv_kernel >= 1 && elem_bytes >= 1 && sink >= 0,
           "streaming_window_matching_recurrent: head_dim ", head_dim, ", d_state ", rc.d_state, ", conv_kernel ",
           rc.conv_kernel, ", sink ", sink, ", element bytes ", elem_bytes, " (expected all >= 1, sink >= 0)");
  const int64_t state = head_dim * rc.d_state * 4 + (rc.conv_kernel - 1) * head_dim * elem_bytes;
  const int64_t ring = state / (2 * head_dim * elem_bytes);
  RF_CHECK(ring > sink, "streaming_window_matching_recurrent: a recurrent state of ", state, " bytes holds ", ring,
           " tokens of K and V, not more than the sink of ", sink);
  return int(ring - sink);
}

/// Where a streaming ring keeps the token at position p: entry p inside the sink, then the window's
/// entries in turn (ring = min(capacity, sink + window) entries).
inline int64_t stream_ring_entry(int64_t p, int64_t sink, int64_t ring) {
  return p < sink ? p : sink + (p - sink) % (ring - sink);
}
/// The position entry e of a ring holds after `len` tokens, or -1 when it holds none yet.
inline int64_t stream_ring_position(int64_t e, int64_t len, int64_t sink, int64_t ring) {
  if (e >= len) return -1;
  if (e < sink) return e;
  const int64_t last = len - 1;
  return last - (last - e) % (ring - sink);
}

/// One group's [slots, ...] slice of a per-layer state view [slots, groups, a, b].
template <class E>
View<E, 3> group_slice(const View<E, 4>& all, int64_t i) {
  return make_strided_view(all.data + i * all.stride[1], {all.shape[0], all.shape[2], all.shape[3]},
                           {all.stride[0], all.stride[2], all.stride[3]});
}

/// One layer's cache memory as plain views: what the layer core (layers/hybrid_attention_core.hpp)
/// reads and writes. HybridCache::layer_view hands it out; an engine may build it over its own pools
/// (the attention groups' K/V then usually paged, see HybridStep::page_table).
template <class T>
struct HybridLayerView {
  View<const HeadKind, 1> kinds;  // [n_kv] the kind of each KV group
  View<T, 4> k, v;                // attention groups: [slots, n_attn, capacity, hd], or a page pool
                                  // [pages, n_attn, page_size, hd] (the step then has a page table)
  View<float, 4> ssm_states;      // [slots, n_state, hd, N]   recurrent and windowed groups, KV-group order
  View<T, 4> conv_states;         // [slots, n_state, Kc-1, hd]
  View<T, 4> ring_k, ring_v;      // [slots, n_ring, ring, hd] streaming and windowed groups
  int sink = 0, window = 0;       // the streaming mask; ring entries as stream_ring_entry
};

/// The cache. T = storage type of K, V and conv state (float, half, bfloat16); SSM state is fp32.
/// Memory = HostMemory or DeviceMemory (where K, V, states and snapshots live).
template <class T, class Memory = HostMemory>
class HybridCache {
 public:
  template <class E>
  using Buffer = typename Memory::template Buffer<E>;

  /// Everything a slot holds besides its attention K/V (those are append-only, so rolling back only
  /// needs the length): recurrent and conv states and streaming rings, per layer, plus the length.
  struct Snapshot {
    int slot = -1;
    int64_t length = -1;
    uint64_t epoch = 0;
    Buffer<float> ssm;  // per layer: [n_rec, hd, N]
    Buffer<T> small;    // per layer: conv [n_rec, Kc-1, hd], ring K, ring V [n_stream, ring, hd]
  };

  explicit HybridCache(HybridCacheConfig cfg, Memory memory = {}) : cfg_(std::move(cfg)), mem_(memory) {
    cfg_.check();
    if (cfg_.page_size > 0 && cfg_.kv_pages == 0) cfg_.kv_pages = int64_t(cfg_.slots) * cfg_.pages_per_slot();
    const int64_t S = cfg_.slots, hd = cfg_.head_dim;
    ring_ = std::min<int64_t>(cfg_.capacity, int64_t(cfg_.streaming.sink) + cfg_.streaming.window);
    layers_.resize(size_t(cfg_.n_layers));
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const LayerLayout& ll = cfg_.layout.layers[size_t(l)];
      Layer& L = layers_[size_t(l)];
      L.n_attn = ll.count(HeadKind::attention);
      L.n_rec = ll.count_state_groups();
      L.n_stream = ll.count_ring_groups();
      L.k = Memory::template zeros<T>(kv_rows() * L.n_attn * kv_keys() * hd);
      L.v = Memory::template zeros<T>(kv_rows() * L.n_attn * kv_keys() * hd);
      L.ssm = Memory::template zeros<float>(S * L.n_rec * hd * d_state());
      L.conv = Memory::template zeros<T>(S * L.n_rec * (conv_kernel() - 1) * hd);
      L.ring_k = Memory::template zeros<T>(S * L.n_stream * ring_ * hd);
      L.ring_v = Memory::template zeros<T>(S * L.n_stream * ring_ * hd);
    }
    lengths_.assign(size_t(S), 0);
    epochs_.assign(size_t(S), 0);
    if (paged()) {
      table_.assign(size_t(S * pages_per_slot()), -1);
      step_table_.assign(table_.size(), -1);
      refs_.assign(size_t(cfg_.kv_pages), 0);
      free_.reserve(size_t(cfg_.kv_pages));
      for (int64_t i = cfg_.kv_pages - 1; i >= 0; --i) free_.push_back(int32_t(i));  // page 0 handed out first
    }
  }
  HybridCache(const HybridCache&) = delete;
  HybridCache& operator=(const HybridCache&) = delete;
  HybridCache(HybridCache&&) noexcept = default;
  HybridCache& operator=(HybridCache&&) noexcept = default;

  const HybridCacheConfig& config() const { return cfg_; }
  const Memory& memory() const { return mem_; }
  int n_layers() const { return cfg_.n_layers; }
  int slots() const { return cfg_.slots; }
  int64_t capacity() const { return cfg_.capacity; }
  int head_dim() const { return cfg_.head_dim; }
  int d_state() const { return cfg_.recurrent.d_state; }
  int conv_kernel() const { return cfg_.recurrent.conv_kernel; }
  int sink() const { return cfg_.streaming.sink; }
  int window() const { return cfg_.streaming.window; }
  /// Entries of a streaming ring: min(capacity, sink + window).
  int64_t ring_size() const { return ring_; }
  /// Whether the attention groups' K/V is a page pool (config.page_size > 0).
  bool paged() const { return cfg_.page_size > 0; }
  /// K/V rows per slot (contiguous: capacity) or per page (paged: page_size): the step shape's kv_keys.
  int64_t kv_keys() const { return paged() ? cfg_.page_size : cfg_.capacity; }
  /// The first dimension of keys() and values(): slots, or the pool's pages.
  int64_t kv_rows() const { return paged() ? cfg_.kv_pages : int64_t(cfg_.slots); }
  /// Paged: page indices per slot (ceil(capacity / page_size)); 0 when contiguous.
  int64_t pages_per_slot() const { return cfg_.pages_per_slot(); }
  /// Paged: pages no slot holds, and pages some slot holds (a shared page counts once).
  int64_t free_pages() const { return int64_t(free_.size()); }
  int64_t pages_used() const { return cfg_.kv_pages - free_pages(); }
  /// Paged: how many slots hold `page` (0: it is free).
  int page_refs(int32_t page) const {
    RF_CHECK(page >= 0 && page < cfg_.kv_pages, "HybridCache: page ", page, " out of range [0, ", cfg_.kv_pages, ")");
    return refs_[size_t(page)];
  }
  /// Paged: the page that holds position `pos` of `slot`, or -1 when the slot has none there.
  int32_t page_of(int slot, int64_t pos) const {
    checked_slot("page_of", slot);
    RF_CHECK(paged(), "HybridCache::page_of: the cache is not paged (config.page_size is 0)");
    RF_CHECK(pos >= 0 && pos < cfg_.capacity, "HybridCache::page_of: position ", pos, " out of range [0, ",
             cfg_.capacity, ")");
    return table_[size_t(slot * pages_per_slot() + pos / cfg_.page_size)];
  }
  const LayerLayout& layer_layout(int layer) const { return cfg_.layout.layers[size_t(layer)]; }

  /// Tokens held by a slot.
  int64_t length(int slot) const { return lengths_[size_t(checked_slot("length", slot))]; }
  /// [slots] tokens held by each slot (the attention op's kv_lens before an append).
  View<const int32_t, 1> lengths() const { return make_view(lengths_.data(), {int64_t(cfg_.slots)}); }

  // --- views for the kernels (layer must be in range; the views alias the cache's memory) -------
  /// [slots, n_attn, capacity, hd] keys / values of the layer's attention groups, in group order;
  /// paged: the pool [kv_pages, n_attn, page_size, hd].
  View<T, 4> keys(int layer) { return kv_view(lay(layer).k, kv_rows(), lay(layer).n_attn, kv_keys()); }
  View<T, 4> values(int layer) { return kv_view(lay(layer).v, kv_rows(), lay(layer).n_attn, kv_keys()); }
  /// Paged: [S, pages_per_slot] the page rows of slots[s] (absent slots: slot s), a step's
  /// page_table (HybridStep). Gathered into the cache's own buffer, which the next call overwrites;
  /// a slot's pages beyond what it holds are -1.
  View<const int32_t, 2> page_table(View<const int32_t, 1> slots, int64_t S) const {
    RF_CHECK(paged(), "HybridCache::page_table: the cache is not paged (config.page_size is 0)");
    RF_CHECK(S >= 1 && S <= cfg_.slots && (!slots.present() || slots.shape[0] == S), "HybridCache::page_table: ",
             S, " sequences, expected 1..", cfg_.slots, slots.present() ? ", one slot each" : "");
    const int64_t P = pages_per_slot();
    for (int64_t s = 0; s < S; ++s) {
      const int slot = checked_slot("page_table", slots.present() ? slots(s) : int32_t(s));
      std::copy_n(table_.begin() + slot * P, P, step_table_.begin() + s * P);
    }
    return make_view(const_cast<const int32_t*>(step_table_.data()), {S, P});
  }
  /// [slots, n_rec, hd, N] fp32 SSM states of the layer's recurrent and windowed groups.
  View<float, 4> ssm_states(int layer) {
    Layer& L = lay(layer);
    return make_view(L.ssm.data(), {int64_t(cfg_.slots), int64_t(L.n_rec), int64_t(cfg_.head_dim),
                                    int64_t(d_state())});
  }
  /// [slots, hd, N] SSM state of the i-th group with a state (recurrent or windowed) of the layer.
  View<float, 3> ssm_state(int layer, int i) {
    View<float, 4> all = ssm_states(layer);
    RF_CHECK(i >= 0 && i < all.shape[1], "HybridCache: recurrent group ", i, " out of range [0, ",
             all.shape[1], ") in layer ", layer);
    return group_slice(all, i);
  }
  /// [slots, n_rec, Kc-1, hd] conv states (the last Kc-1 conv inputs, oldest first).
  View<T, 4> conv_states(int layer) {
    Layer& L = lay(layer);
    return make_view(L.conv.data(), {int64_t(cfg_.slots), int64_t(L.n_rec), int64_t(conv_kernel() - 1),
                                     int64_t(cfg_.head_dim)});
  }
  /// [slots, Kc-1, hd] conv state of the i-th recurrent group (causal_conv1d's conv_state).
  View<T, 3> conv_state(int layer, int i) {
    View<T, 4> all = conv_states(layer);
    RF_CHECK(i >= 0 && i < all.shape[1], "HybridCache: recurrent group ", i, " out of range [0, ",
             all.shape[1], ") in layer ", layer);
    return group_slice(all, i);
  }
  /// [slots, n_stream, ring, hd] ring buffers of the layer's streaming and windowed groups.
  View<T, 4> stream_keys(int layer) { return kv_view(lay(layer).ring_k, cfg_.slots, lay(layer).n_stream, ring_); }
  View<T, 4> stream_values(int layer) { return kv_view(lay(layer).ring_v, cfg_.slots, lay(layer).n_stream, ring_); }

  /// Ring entry of the token at position p.
  int64_t ring_entry(int64_t p) const { return stream_ring_entry(p, cfg_.streaming.sink, ring_); }
  /// Position of the token in ring entry e of a slot holding `len` tokens, or -1 if it holds none.
  int64_t ring_position(int64_t e, int64_t len) const {
    return stream_ring_position(e, len, cfg_.streaming.sink, ring_);
  }

  /// Layer `layer`'s memory as views (the layer core's input; lengths() gives the slots' lengths).
  HybridLayerView<T> layer_view(int layer) {
    lay(layer);  // range check
    HybridLayerView<T> v;
    const LayerLayout& ll = layer_layout(layer);
    v.kinds = make_view(ll.groups.data(), {int64_t(ll.n_groups())});
    v.k = keys(layer), v.v = values(layer);
    v.ssm_states = ssm_states(layer), v.conv_states = conv_states(layer);
    v.ring_k = stream_keys(layer), v.ring_v = stream_values(layer);
    v.sink = sink(), v.window = window();
    return v;
  }

  // --- appending --------------------------------------------------------------------------------
  /// Prepares a step before its layers run. Checks what check_append checks, except that the pages
  /// need not be held yet; paged, then makes every page the new tokens go to one the slot holds
  /// alone: a missing page is taken from the free list, a shared one is replaced by a copy of its
  /// rows below the slot's length (every layer). Throws, changing nothing, when a check fails or the
  /// pool has too few free pages (a page shared by several slots of the step counts once per slot).
  /// Pages taken for a step whose layers then fail stay with their slots: the next append uses
  /// them, reset() frees them.
  void reserve(View<const int32_t, 1> slots, View<const int32_t, 1> counts) {
    check_counts(slots, counts);
    if (!paged()) return;
    int64_t need = 0;
    for_new_pages(slots, counts, [&](int, int64_t, int32_t) { ++need; });
    RF_CHECK(need <= free_pages(), "HybridCache::reserve: the step needs ", need, " new pages of ", cfg_.page_size,
             " tokens; ", free_pages(), " of the pool's ", cfg_.kv_pages, " are free");
    for_new_pages(slots, counts, [&](int slot, int64_t i, int32_t old) {
      const int32_t page = free_.back();
      free_.pop_back();
      refs_[size_t(page)] = 1;
      if (old >= 0) {  // copy-on-write: the other holders keep the old page
        const int64_t rows = std::min<int64_t>(lengths_[size_t(slot)] - i * cfg_.page_size, cfg_.page_size);
        if (rows > 0) copy_page_rows(old, page, rows);
        --refs_[size_t(old)];
      }
      table_[size_t(slot * pages_per_slot() + i)] = page;
    });
  }
  /// Throws (changing nothing) unless slots[s] are distinct valid slots, each can take counts[s]
  /// more tokens and, paged, holds the pages for them alone (reserve() gives it them). counts[s] >= 0.
  void check_append(View<const int32_t, 1> slots, View<const int32_t, 1> counts) const {
    check_append(checked_arrays(slots, counts),
                 [&](int64_t s) { return std::pair<int32_t, int64_t>{slots(s), counts(s)}; });
  }
  /// The same for n sequences whose (slot, count) slot_count(s) gives (no arrays to build).
  template <class F>
  void check_append(int64_t n, F&& slot_count) const {
    check_counts(n, slot_count);
    if (!paged()) return;
    for (int64_t s = 0; s < n; ++s) {
      const auto [slot, cnt] = slot_count(s);
      const int64_t len = lengths_[size_t(slot)];
      for (int64_t i = len / cfg_.page_size; i * cfg_.page_size < len + cnt; ++i) {
        const int32_t page = table_[size_t(slot * pages_per_slot() + i)];
        RF_CHECK(page >= 0 && refs_[size_t(page)] == 1, "HybridCache::append: slot ", slot, " has ",
                 page < 0 ? "no page" : "only a shared page", " for positions [", i * cfg_.page_size, ", ",
                 (i + 1) * cfg_.page_size, "): reserve(slots, counts) the step before its layers run");
      }
    }
  }
  /// Commits an append after every layer has written its tokens: length[slots[s]] += counts[s].
  void advance(View<const int32_t, 1> slots, View<const int32_t, 1> counts) {
    check_append(slots, counts);
    for (int64_t s = 0; s < slots.shape[0]; ++s) lengths_[size_t(slots(s))] += counts(s);
  }

  // --- slot management --------------------------------------------------------------------------
  /// Empties a slot: length 0 and zero states (a new sequence starts from h = 0).
  void reset(int slot) {
    checked_slot("reset", slot);
    release_pages(slot);
    lengths_[size_t(slot)] = 0;
    ++epochs_[size_t(slot)];
    for (int l = 0; l < cfg_.n_layers; ++l) {
      for_slot_state(l, slot, [&](auto* p, int64_t n, auto) { mem_.zero(p, n); });
    }
  }
  /// Forks: dst becomes an exact copy of src (its K/V up to src's length, states, rings, length).
  /// Paged, dst shares src's pages up to that length instead (copied on dst's or src's next write).
  void copy(int src, int dst) {
    checked_slot("copy (src)", src);
    checked_slot("copy (dst)", dst);
    if (src == dst) return;
    const int64_t len = lengths_[size_t(src)], hd = cfg_.head_dim;
    if (paged()) {
      release_pages(dst);
      for (int64_t i = 0; i * cfg_.page_size < len; ++i) {
        const int32_t page = table_[size_t(src * pages_per_slot() + i)];
        table_[size_t(dst * pages_per_slot() + i)] = page;
        ++refs_[size_t(page)];
      }
    }
    for (int l = 0; l < cfg_.n_layers; ++l) {
      Layer& L = layers_[size_t(l)];
      for (Buffer<T>* kv : {&L.k, &L.v}) {
        for (int g = 0; g < L.n_attn && !paged(); ++g) {
          const int64_t base_s = (int64_t(src) * L.n_attn + g) * cfg_.capacity * hd;
          const int64_t base_d = (int64_t(dst) * L.n_attn + g) * cfg_.capacity * hd;
          mem_.copy(kv->data() + base_d, kv->data() + base_s, len * hd);
        }
      }
      // The rest of a slot's per-layer memory is contiguous per kind.
      auto copy_slot = [&](auto& buf) {
        const int64_t per = int64_t(buf.size()) / cfg_.slots;
        mem_.copy(buf.data() + dst * per, buf.data() + src * per, per);
      };
      copy_slot(L.ssm), copy_slot(L.conv), copy_slot(L.ring_k), copy_slot(L.ring_v);
    }
    lengths_[size_t(dst)] = int32_t(len);
    ++epochs_[size_t(dst)];
  }
  /// Saves what a rollback of `slot` needs into `snap` (reusing its buffers).
  void snapshot(int slot, Snapshot& snap) const {
    checked_slot("snapshot", slot);
    snap.slot = slot;
    snap.length = lengths_[size_t(slot)];
    snap.epoch = epochs_[size_t(slot)];
    const auto [n_ssm, n_small] = slot_state_sizes();
    if (int64_t(snap.ssm.size()) != n_ssm) snap.ssm.resize(size_t(n_ssm));
    if (int64_t(snap.small.size()) != n_small) snap.small.resize(size_t(n_small));
    float* ps = snap.ssm.data();
    T* pt = snap.small.data();
    for (int l = 0; l < cfg_.n_layers; ++l)
      const_cast<HybridCache*>(this)->for_slot_state(l, slot, [&](auto* p, int64_t n, auto is_ssm) {
        if constexpr (decltype(is_ssm)::value)
          mem_.copy(ps, p, n), ps += n;
        else
          mem_.copy(pt, p, n), pt += n;
      });
  }
  Snapshot snapshot(int slot) const {
    Snapshot s;
    snapshot(slot, s);
    return s;
  }
  /// Rolls `slot` back to `snap`. The snapshot must come from the same slot, and the slot must not
  /// have been reset or copied onto since (both checked: Error); its attention keys below
  /// snap.length must not have been rewritten since (not checked: true when only appends and
  /// rollbacks to this snapshot or a later one happened, the speculative-decoding pattern).
  void restore(int slot, const Snapshot& snap) {
    checked_slot("restore", slot);
    RF_CHECK(snap.slot == slot, "HybridCache::restore: the snapshot was taken from slot ", snap.slot,
             ", not slot ", slot);
    RF_CHECK(snap.epoch == epochs_[size_t(slot)], "HybridCache::restore: slot ", slot,
             " was reset or copied onto since the snapshot was taken");
    const auto [n_ssm, n_small] = slot_state_sizes();
    RF_CHECK(int64_t(snap.ssm.size()) == n_ssm && int64_t(snap.small.size()) == n_small,
             "HybridCache::restore: the snapshot does not match this cache's shape");
    const float* ps = snap.ssm.data();
    const T* pt = snap.small.data();
    for (int l = 0; l < cfg_.n_layers; ++l)
      for_slot_state(l, slot, [&](auto* p, int64_t n, auto is_ssm) {
        if constexpr (decltype(is_ssm)::value)
          mem_.copy(p, ps, n), ps += n;
        else
          mem_.copy(p, pt, n), pt += n;
      });
    lengths_[size_t(slot)] = int32_t(snap.length);
  }

  // --- bytes ------------------------------------------------------------------------------------
  /// The exact byte report: held (non-empty slots at their lengths) and capacity (allocated).
  CacheReport bytes() const {
    CacheReport r;
    for (int s = 0; s < cfg_.slots; ++s)
      if (lengths_[size_t(s)] > 0) r.held += spec_bytes(cfg_, lengths_[size_t(s)]);
    CacheBytes one = spec_bytes(cfg_, cfg_.capacity);
    for (int s = 0; s < cfg_.slots; ++s) r.capacity += one;
    if (paged()) {  // the pool instead of every slot's capacity
      r.capacity.total -= r.capacity.attention;
      r.capacity.attention = 0;
      for (const Layer& L : layers_) r.capacity.attention += int64_t(L.k.size() + L.v.size()) * int64_t(sizeof(T));
      r.capacity.total += r.capacity.attention;
    }
    return r;
  }
  /// Spec section 6 formula for one sequence of `context` tokens in this storage type.
  static CacheBytes spec_bytes(const HybridCacheConfig& c, int64_t context) {
    return hybrid_cache_spec_bytes(c, context, int64_t(sizeof(T)));
  }
  /// Bytes actually allocated for K, V and states (equals bytes().capacity.total).
  int64_t allocated_bytes() const {
    int64_t b = 0;
    for (const Layer& L : layers_)
      b += int64_t(L.k.size() + L.v.size() + L.conv.size() + L.ring_k.size() + L.ring_v.size()) *
               int64_t(sizeof(T)) +
           int64_t(L.ssm.size()) * 4;
    return b;
  }

 private:
  struct Layer {
    int n_attn = 0, n_rec = 0, n_stream = 0;
    Buffer<T> k, v;            // [slots, n_attn, capacity, hd]
    Buffer<float> ssm;         // [slots, n_rec, hd, N]
    Buffer<T> conv;            // [slots, n_rec, Kc-1, hd]
    Buffer<T> ring_k, ring_v;  // [slots, n_stream, ring, hd]
  };

  // Both arrays given, of one length (returned).
  int64_t checked_arrays(View<const int32_t, 1> slots, View<const int32_t, 1> counts) const {
    RF_CHECK(slots.present() && counts.present() && slots.shape[0] == counts.shape[0],
             "HybridCache::append: slots and counts must both be given with the same length (got ",
             slots.shape[0], " and ", counts.shape[0], ")");
    return slots.shape[0];
  }
  // The same, then every sequence's slot and count (check_counts below).
  void check_counts(View<const int32_t, 1> slots, View<const int32_t, 1> counts) const {
    check_counts(checked_arrays(slots, counts),
                 [&](int64_t s) { return std::pair<int32_t, int64_t>{slots(s), counts(s)}; });
  }
  // Distinct valid slots, counts >= 0, each within its capacity.
  template <class F>
  void check_counts(int64_t n, F&& slot_count) const {
    for (int64_t s = 0; s < n; ++s) {
      const auto [slot, cnt] = slot_count(s);
      RF_CHECK(slot >= 0 && slot < cfg_.slots, "HybridCache::append: sequence ", s, " has slot ", slot,
               ", expected 0..", cfg_.slots - 1);
      RF_CHECK(cnt >= 0, "HybridCache::append: sequence ", s, " appends ", cnt, " tokens, expected >= 0");
      for (int64_t o = 0; o < s; ++o)
        RF_CHECK(slot_count(o).first != slot, "HybridCache::append: slot ", slot, " appears twice (sequences ", o,
                 " and ", s, ")");
      RF_CHECK(int64_t(lengths_[size_t(slot)]) + cnt <= cfg_.capacity, "HybridCache::append: slot ", slot,
               " holds ", lengths_[size_t(slot)], " tokens and cannot take ", cnt, " more (capacity ",
               cfg_.capacity, ")");
    }
  }
  int checked_slot(const char* op, int slot) const {
    RF_CHECK(slot >= 0 && slot < cfg_.slots, "HybridCache::", op, ": slot ", slot, " out of range [0, ",
             cfg_.slots, ")");
    return slot;
  }
  Layer& lay(int layer) {
    RF_CHECK(layer >= 0 && layer < cfg_.n_layers, "HybridCache: layer ", layer, " out of range [0, ",
             cfg_.n_layers, ")");
    return layers_[size_t(layer)];
  }
  View<T, 4> kv_view(Buffer<T>& buf, int64_t rows, int groups, int64_t tokens) {
    return make_view(buf.data(), {rows, int64_t(groups), tokens, int64_t(cfg_.head_dim)});
  }
  // Paged: fn(slot, i, old) for each page index i of a step's slot that its new tokens write and
  // that is not the slot's own yet: old = -1 (no page) or the shared page (to be copied on write).
  template <class F>
  void for_new_pages(View<const int32_t, 1> slots, View<const int32_t, 1> counts, F&& fn) const {
    for (int64_t s = 0; s < slots.shape[0]; ++s) {
      const int slot = slots(s);
      const int64_t len = lengths_[size_t(slot)];
      for (int64_t i = len / cfg_.page_size; i * cfg_.page_size < len + counts(s); ++i) {
        const int32_t page = table_[size_t(slot * pages_per_slot() + i)];
        if (page < 0 || refs_[size_t(page)] > 1) fn(slot, i, page);
      }
    }
  }
  // Rows [0, rows) of page src into page dst, in every layer's K and V (all attention groups).
  void copy_page_rows(int32_t src, int32_t dst, int64_t rows) {
    const int64_t hd = cfg_.head_dim, P = cfg_.page_size;
    for (Layer& L : layers_)
      for (Buffer<T>* kv : {&L.k, &L.v})
        for (int g = 0; g < L.n_attn; ++g)
          mem_.copy(kv->data() + ((int64_t(dst) * L.n_attn + g) * P) * hd,
                    kv->data() + ((int64_t(src) * L.n_attn + g) * P) * hd, rows * hd);
  }
  // Paged: the slot lets go of its pages; a page no slot holds goes back to the free list.
  void release_pages(int slot) {
    if (!paged()) return;
    for (int64_t i = 0; i < pages_per_slot(); ++i) {
      int32_t& page = table_[size_t(slot * pages_per_slot() + i)];
      if (page >= 0 && --refs_[size_t(page)] == 0) free_.push_back(page);  // capacity kv_pages: no allocation
      page = -1;
    }
  }
  // fn(pointer, count, is_ssm) for each contiguous block of a slot's state in one layer, in a fixed
  // order: ssm (float, std::true_type), conv, ring K, ring V (T, std::false_type).
  template <class F>
  void for_slot_state(int l, int slot, F&& fn) {
    Layer& L = layers_[size_t(l)];
    const int64_t S = cfg_.slots;
    if (!L.ssm.empty())
      fn(L.ssm.data() + slot * (int64_t(L.ssm.size()) / S), int64_t(L.ssm.size()) / S, std::true_type{});
    for (Buffer<T>* b : {&L.conv, &L.ring_k, &L.ring_v})
      if (!b->empty()) fn(b->data() + slot * (int64_t(b->size()) / S), int64_t(b->size()) / S, std::false_type{});
  }
  // Elements of one slot's state over all layers: {fp32 SSM, T conv + rings} (a snapshot's sizes).
  std::pair<int64_t, int64_t> slot_state_sizes() const {
    int64_t n_ssm = 0, n_small = 0;
    for (const Layer& L : layers_) {
      n_ssm += int64_t(L.ssm.size()) / cfg_.slots;
      n_small += int64_t(L.conv.size() + L.ring_k.size() + L.ring_v.size()) / cfg_.slots;
    }
    return {n_ssm, n_small};
  }

  HybridCacheConfig cfg_;
  Memory mem_;
  int64_t ring_ = 0;
  std::vector<Layer> layers_;
  std::vector<int32_t> lengths_;
  std::vector<uint64_t> epochs_;
  // Paged K/V, all on the host: [slots, pages_per_slot] page of each slot's page index (-1: none),
  // the step table page_table() gathers into, holders of each page, the free pages (a stack).
  std::vector<int32_t> table_;
  mutable std::vector<int32_t> step_table_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;
};

}  // namespace recurformer
