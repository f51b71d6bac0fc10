// recurformer/ops/recency_score.hpp: RecencyScore (spec section 5) and the head-layout selection.
//
// For query head h of one calibration sequence of T tokens (positions 0..T-1), with causal
// attention probabilities P[i, j] = softmax_{j <= i}(scale * <q[i,h], k[j,h/g]>):
//   r_i        = sum_{j = i-w+1 .. i} P[i, j]           mass on the w most recent keys (itself included)
//   sink_i     = sum_{j < sink_tokens, j <= i} P[i, j]  mass on the first tokens
//   distance_i = sum_j P[i, j] (i - j)                  mean attention distance
// over the scored queries i in [w, T). recency_score() ADDS, per head, the sums of r_i, sink_i and
// distance_i and the number of scored queries to `stats`, so calling it once per calibration
// sequence accumulates the spec's average weighted by scored queries. Nothing T x T is stored: a
// flash-style pass over tiles of keys gives each row's log-sum-exp (and the distance), then the w
// window logits are normalised by it.
//
// Then, per layer: head_recency() gives the per-head means, group_recency() the per-KV-group mean
// and min of its g query heads' scores, and select_head_layout() turns the group scores of all
// layers into a HeadLayout. CPU implementation of recency_score: cpu/recency_score.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "recurformer/core/error.hpp"
#include "recurformer/core/head_layout.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/ops/attention.hpp"

namespace recurformer {

/// Running sums for one query head over the scored queries of every sequence added so far.
struct RecencyHeadStats {
  double recency_sum = 0;   ///< sum of r_i
  double sink_sum = 0;      ///< sum of sink_i
  double distance_sum = 0;  ///< sum of distance_i
  int64_t queries = 0;      ///< number of scored queries

  double score() const { return queries ? recency_sum / double(queries) : 0.0; }
  double sink_mass() const { return queries ? sink_sum / double(queries) : 0.0; }
  double mean_distance() const { return queries ? distance_sum / double(queries) : 0.0; }
};

template <class T>  // storage dtype of q and k: float, half or bfloat16
struct RecencyScoreParams {
  View<const T, 3> q;                 // [T, n_q, hd] one calibration sequence, RoPE applied
  View<const T, 3> k;                 // [T, n_kv, hd] its keys, RoPE applied
  View<RecencyHeadStats, 1> stats;    // [n_q] accumulated into (+=)
  float scale = 0;                    // logit scale; 0 means 1/sqrt(hd)
  int window = 16;                    // w
  int sink_tokens = 4;                // keys j < sink_tokens count as sink
};

template <class T>
void check(const RecencyScoreParams<T>& p) {
  const char* op = "recency_score";
  detail::check_shape(op, "q", p.q, {-1, -1, -1});
  const int64_t T_ = p.q.shape[0], n_q = p.q.shape[1], hd = p.q.shape[2];
  detail::check_shape(op, "k", p.k, {T_, -1, hd});
  const int64_t n_kv = p.k.shape[1];
  RF_CHECK(n_kv > 0 && n_q % n_kv == 0, op, ": n_q (", n_q, ") must be a positive multiple of n_kv (", n_kv, ")");
  detail::check_inner_contiguous(op, "q", p.q);
  detail::check_inner_contiguous(op, "k", p.k);
  detail::check_attention_head_dim(op, hd);
  detail::check_shape(op, "stats", p.stats, {n_q});
  RF_CHECK(p.window >= 1, op, ": window must be >= 1 (got ", p.window, ")");
  RF_CHECK(p.sink_tokens >= 0, op, ": sink_tokens must be >= 0 (got ", p.sink_tokens, ")");
  RF_CHECK(std::isfinite(p.scale) && p.scale >= 0, op, ": scale must be finite and >= 0 (got ", p.scale, ")");
}

/// Per-KV-group summary of one layer: mean and min of the g query heads' scores.
struct GroupRecency {
  std::vector<double> mean, min;  // [n_kv]
};

/// Groups the per-head stats of one layer ([n_q] heads, query head h in group h / (n_q / n_kv)).
inline GroupRecency group_recency(const std::vector<RecencyHeadStats>& heads, int n_kv) {
  const int n_q = int(heads.size());
  RF_CHECK(n_kv > 0 && n_q % n_kv == 0, "group_recency: ", n_q, " heads is not a multiple of n_kv ", n_kv);
  const int g = n_q / n_kv;
  GroupRecency r{std::vector<double>(size_t(n_kv), 0.0), std::vector<double>(size_t(n_kv), 0.0)};
  for (int kv = 0; kv < n_kv; ++kv) {
    double sum = 0, mn = INFINITY;
    for (int i = 0; i < g; ++i) {
      const double s = heads[size_t(kv * g + i)].score();
      sum += s;
      mn = std::min(mn, s);
    }
    r.mean[size_t(kv)] = sum / g;
    r.min[size_t(kv)] = mn;
  }
  return r;
}

/// How select_head_layout picks the recurrent groups.
struct HeadSelection {
  enum class Rule { ratio, threshold } rule = Rule::ratio;
  double ratio = 0.5;       ///< Rule::ratio: make floor(ratio * total groups) groups recurrent
  double threshold = 0.9;   ///< Rule::threshold: make every group with score >= threshold recurrent
  int min_attention_per_layer = 0;  ///< keep at least this many attention groups in every layer
};

/// group_scores[l][j]: the score of KV group j of layer l (e.g. GroupRecency::mean). All groups of
/// all layers are ranked by score, highest first, ties by layer then group index (ascending); going
/// down the ranking a group becomes recurrent while the rule allows it, unless that would leave its
/// layer with fewer than min_attention_per_layer attention groups (then it is skipped and the next
/// one is considered, so a ratio is still met when possible). Everything else stays attention.
/// Deterministic; throws on a ragged table, a NaN score, a ratio outside [0, 1] or a minimum
/// outside [0, n_kv].
inline HeadLayout select_head_layout(const std::vector<std::vector<double>>& group_scores,
                                     const HeadSelection& sel = {}) {
  const char* op = "select_head_layout";
  const int L = int(group_scores.size());
  RF_CHECK(L > 0, op, ": no layers");
  const int n_kv = int(group_scores[0].size());
  RF_CHECK(n_kv > 0, op, ": layer 0 has no groups");
  for (int l = 0; l < L; ++l) {
    RF_CHECK(int(group_scores[size_t(l)].size()) == n_kv, op, ": layer ", l, " has ",
             group_scores[size_t(l)].size(), " groups, expected ", n_kv);
    for (int j = 0; j < n_kv; ++j)
      RF_CHECK(!std::isnan(group_scores[size_t(l)][size_t(j)]), op, ": score of layer ", l, " group ", j, " is NaN");
  }
  RF_CHECK(sel.rule != HeadSelection::Rule::ratio || (sel.ratio >= 0 && sel.ratio <= 1), op,
           ": ratio must be in [0, 1] (got ", sel.ratio, ")");
  RF_CHECK(sel.min_attention_per_layer >= 0 && sel.min_attention_per_layer <= n_kv, op,
           ": min_attention_per_layer must be in [0, ", n_kv, "] (got ", sel.min_attention_per_layer, ")");
  struct Entry {
    double score;
    int layer, group;
  };
  std::vector<Entry> order;
  for (int l = 0; l < L; ++l)
    for (int j = 0; j < n_kv; ++j) order.push_back({group_scores[size_t(l)][size_t(j)], l, j});
  std::sort(order.begin(), order.end(), [](const Entry& a, const Entry& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.layer != b.layer) return a.layer < b.layer;
    return a.group < b.group;
  });
  const int64_t total = int64_t(L) * n_kv;
  const int64_t quota = sel.rule == HeadSelection::Rule::ratio
                            ? int64_t(std::floor(sel.ratio * double(total) + 1e-9))
                            : total;
  HeadLayout layout = HeadLayout::uniform(L, n_kv, HeadKind::attention);
  std::vector<int> attention_left(size_t(L), n_kv);
  int64_t chosen = 0;
  for (const Entry& e : order) {
    if (chosen >= quota) break;
    if (sel.rule == HeadSelection::Rule::threshold && !(e.score >= sel.threshold)) break;
    if (attention_left[size_t(e.layer)] - 1 < sel.min_attention_per_layer) continue;
    layout.layers[size_t(e.layer)].groups[size_t(e.group)] = HeadKind::recurrent;
    --attention_left[size_t(e.layer)];
    ++chosen;
  }
  return layout;
}

}  // namespace recurformer
