// recurformer/core/head_layout.hpp: which kind of head serves each KV group of each layer.
//
// The unit of replacement is the KV group (spec section 2): a KV head and the query heads that
// read it. A layer's layout lists one HeadKind per KV group; a model's layout lists one per layer.
// A kind is added by extending HeadKind and the places that switch on it (the cache and the layer),
// never by touching the other kinds.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "recurformer/core/error.hpp"

namespace recurformer {

enum class HeadKind : uint8_t {
  attention = 0,  ///< softmax attention over the full KV cache
  recurrent = 1,  ///< selective scan with a fixed fp32 state (the RecurFormer head)
  streaming = 2,  ///< attention over `sink` first and `window` most recent tokens
  windowed = 3,   ///< streaming attention + alpha (per query head) x the recurrent output (spec section 2)
};

inline const char* head_kind_name(HeadKind k) {
  switch (k) {
    case HeadKind::attention: return "attention";
    case HeadKind::recurrent: return "recurrent";
    case HeadKind::streaming: return "streaming";
    case HeadKind::windowed: return "windowed";
  }
  return "unknown";
}

/// Whether a group of this kind keeps a recurrent state (SSM + conv) and has the recurrent tensors.
inline bool has_recurrent_state(HeadKind k) { return k == HeadKind::recurrent || k == HeadKind::windowed; }
/// Whether a group of this kind keeps a sink + window ring of K and V.
inline bool has_stream_ring(HeadKind k) { return k == HeadKind::streaming || k == HeadKind::windowed; }

/// Hyper-parameters of the recurrent and streaming kinds (the "recurformer" config object).
struct RecurrentConfig {
  int d_state = 64;       ///< N; equals head_dim in checkpoint version 1
  int dt_rank = 8;        ///< r, rank of the Δ projection
  int conv_kernel = 4;    ///< Kc, causal conv width
};
struct StreamingConfig {
  int sink = 4;           ///< first tokens always kept
  int window = 32;        ///< most recent tokens kept
};

/// The layout of one layer: one kind per KV group.
struct LayerLayout {
  std::vector<HeadKind> groups;

  int n_groups() const { return int(groups.size()); }
  int count(HeadKind k) const {
    int n = 0;
    for (HeadKind g : groups) n += g == k;
    return n;
  }
  /// KV-group indices of the given kind, ascending.
  std::vector<int> indices(HeadKind k) const {
    std::vector<int> r;
    for (int i = 0; i < n_groups(); ++i)
      if (groups[size_t(i)] == k) r.push_back(i);
    return r;
  }
  /// Groups with a recurrent state (recurrent + windowed) / with a streaming ring (streaming + windowed).
  int count_state_groups() const { return count(HeadKind::recurrent) + count(HeadKind::windowed); }
  int count_ring_groups() const { return count(HeadKind::streaming) + count(HeadKind::windowed); }
  /// KV-group indices of the groups with a recurrent state (recurrent and windowed), ascending: the
  /// order of the cache's states and of the layer's recurrent weights.
  std::vector<int> state_groups() const {
    std::vector<int> r;
    for (int i = 0; i < n_groups(); ++i)
      if (has_recurrent_state(groups[size_t(i)])) r.push_back(i);
    return r;
  }
  /// KV-group indices of the groups with a streaming ring (streaming and windowed), ascending.
  std::vector<int> ring_groups() const {
    std::vector<int> r;
    for (int i = 0; i < n_groups(); ++i)
      if (has_stream_ring(groups[size_t(i)])) r.push_back(i);
    return r;
  }
  static LayerLayout uniform(int n_kv, HeadKind k) { return {std::vector<HeadKind>(size_t(n_kv), k)}; }
};

/// The layout of a model: one LayerLayout per layer, every layer with the same number of groups.
struct HeadLayout {
  std::vector<LayerLayout> layers;

  int n_layers() const { return int(layers.size()); }
  int count(HeadKind k) const {
    int n = 0;
    for (const auto& l : layers) n += l.count(k);
    return n;
  }
  /// Groups with a recurrent state (recurrent + windowed) over all layers.
  int count_state_groups() const { return count(HeadKind::recurrent) + count(HeadKind::windowed); }
  int count_ring_groups() const { return count(HeadKind::streaming) + count(HeadKind::windowed); }
  static HeadLayout uniform(int n_layers, int n_kv, HeadKind k) {
    return {std::vector<LayerLayout>(size_t(n_layers), LayerLayout::uniform(n_kv, k))};
  }
  /// Throws unless there are n_layers layers of n_kv groups each.
  void check(int n_layers, int n_kv) const {
    RF_CHECK(int(layers.size()) == n_layers, "head layout: ", layers.size(), " layers, expected ", n_layers);
    for (int l = 0; l < n_layers; ++l)
      RF_CHECK(layers[size_t(l)].n_groups() == n_kv, "head layout: layer ", l, " has ",
               layers[size_t(l)].n_groups(), " KV groups, expected ", n_kv);
  }
};

}  // namespace recurformer
