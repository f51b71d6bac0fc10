// src/model/calibrate.cpp: measuring which KV groups are recency-aware (see recurformer/model/calibrate.hpp).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "recurformer/model/calibrate.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/recency_score.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/model/detail/json_util.hpp"
#include "recurformer/ops/recency_score.hpp"

namespace recurformer {

/// [layers][n_kv] group mean scores (select_head_layout's input).
std::vector<std::vector<double>> CalibrationResult::group_scores() const {
  std::vector<std::vector<double>> r;
  for (int l = 0; l < n_layers; ++l) r.push_back(groups(l).mean);
  return r;
}

namespace detail {
namespace {

template <class TW>
struct CalibrationProjections {
  std::vector<View<const TW, 2>> wq, wk;  // per layer
  std::vector<View<const TW, 1>> bq, bk;
};

}  // namespace
}  // namespace detail

/// Runs the calibration over `tokens` (one long tokenized text). progress(done, total) after each
/// sequence.
CalibrationResult calibrate(const LlamaModel& model, const std::vector<int32_t>& tokens, const CalibrationOptions& opt,
                            CpuExec exec, const std::function<void(int64_t, int64_t)>& progress) {
  const ModelConfig& c = model.config();
  RF_CHECK(opt.window >= 1, "calibrate: window must be >= 1");
  RF_CHECK(opt.seq_len > opt.window, "calibrate: sequence length ", opt.seq_len, " must exceed the window ",
           opt.window);
  CalibrationResult r;
  r.window = opt.window, r.sink_tokens = opt.sink_tokens;
  r.n_layers = c.n_layers, r.n_q = c.n_q, r.n_kv = c.n_kv;
  r.heads.assign(size_t(c.n_layers), std::vector<RecencyHeadStats>(size_t(c.n_q)));
  std::vector<std::pair<int64_t, int64_t>> seqs;  // [begin, length)
  for (int64_t b = 0; b < int64_t(tokens.size()); b += opt.seq_len) {
    const int64_t n = std::min<int64_t>(opt.seq_len, int64_t(tokens.size()) - b);
    if (n > opt.window) seqs.push_back({b, n});
    if (opt.max_sequences > 0 && int64_t(seqs.size()) >= opt.max_sequences) break;
  }
  RF_CHECK(!seqs.empty(), "calibrate: the text has ", tokens.size(), " tokens; more than the window (", opt.window,
           ") are needed");
  const Checkpoint& ck = model.checkpoint();
  const std::vector<float> inv_freq = ck.rope_inv_freq();  // rope_freqs.weight included
  const int64_t hd = c.head_dim, nq = c.n_q, nkv = c.n_kv;
  std::vector<float> q, k;
  std::vector<int32_t> pos;
  std::vector<unsigned char> lin_ws;
  dispatch_dtype("calibrate: q_proj dtype", ck.tensor("model.layers.0.self_attn.q_proj.weight").dtype, [&](auto tag) {
    using TW = typename decltype(tag)::type;
    detail::CalibrationProjections<TW> w;
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
      w.wq.push_back(ck.tensor(p + "q_proj.weight").template view<TW, 2>());
      w.wk.push_back(ck.tensor(p + "k_proj.weight").template view<TW, 2>());
      w.bq.push_back(c.attention_bias ? ck.tensor(p + "q_proj.bias").template view<TW, 1>() : View<const TW, 1>{});
      w.bk.push_back(c.attention_bias ? ck.tensor(p + "k_proj.bias").template view<TW, 1>() : View<const TW, 1>{});
    }
    LlamaSession session(model, 1, opt.seq_len, exec, opt.seq_len);
    LayerInputHook hook = [&](int l, View<const float, 2> x, const LlamaBatch&) {
      const int64_t T = x.shape[0];
      q.resize(size_t(T * nq * hd));
      k.resize(size_t(T * nkv * hd));
      pos.resize(size_t(T));
      for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = int32_t(t);  // each sequence is one chunk from 0
      LinearParams<float, TW> lq{x, w.wq[size_t(l)], w.bq[size_t(l)], make_view(q.data(), {T, nq * hd})};
      LinearParams<float, TW> lk{x, w.wk[size_t(l)], w.bk[size_t(l)], make_view(k.data(), {T, nkv * hd})};
      const size_t need = std::max(linear_workspace_bytes(lq, exec), linear_workspace_bytes(lk, exec));
      if (lin_ws.size() < need) lin_ws.resize(need);
      linear(lq, exec, lin_ws.data(), lin_ws.size());
      linear(lk, exec, lin_ws.data(), lin_ws.size());
      const auto pv = make_view<const int32_t>(pos.data(), {T});
      const auto fv = make_view<const float>(inv_freq.data(), {int64_t(inv_freq.size())});
      auto q3 = make_view(q.data(), {T, nq, hd});
      auto k3 = make_view(k.data(), {T, nkv, hd});
      rope(RopeParams<float>{q3, pv, fv, c.rope_layout}, exec);
      rope(RopeParams<float>{k3, pv, fv, c.rope_layout}, exec);
      RecencyScoreParams<float> rp;
      rp.q = q3;
      rp.k = k3;
      rp.stats = make_view(r.heads[size_t(l)].data(), {nq});
      rp.window = opt.window;
      rp.sink_tokens = opt.sink_tokens;
      recency_score(rp, exec);
    };
    for (size_t s = 0; s < seqs.size(); ++s) {
      session.cache().reset(0);
      session.prefill(0, tokens.data() + seqs[s].first, seqs[s].second, nullptr, hook);
      r.sequences++;
      r.tokens += seqs[s].second;
      if (progress) progress(int64_t(s) + 1, int64_t(seqs.size()));
    }
  });
  return r;
}

/// The scores file `convert` reads.
std::string calibration_to_json(const CalibrationResult& r, const std::string& model_path) {
  nlohmann::ordered_json o;
  o["model"] = model_path;
  o["window"] = r.window;
  o["sink_tokens"] = r.sink_tokens;
  o["sequences"] = r.sequences;
  o["tokens"] = r.tokens;
  o["n_layers"] = r.n_layers;
  o["n_q"] = r.n_q;
  o["n_kv"] = r.n_kv;
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  const int g = r.n_q / r.n_kv;
  for (int l = 0; l < r.n_layers; ++l) {
    const GroupRecency gr = r.groups(l);
    nlohmann::ordered_json groups = nlohmann::ordered_json::array(), heads = nlohmann::ordered_json::array();
    for (int j = 0; j < r.n_kv; ++j) {
      double sink = 0, dist = 0;
      for (int i = 0; i < g; ++i) {
        sink += r.heads[size_t(l)][size_t(j * g + i)].sink_mass() / g;
        dist += r.heads[size_t(l)][size_t(j * g + i)].mean_distance() / g;
      }
      groups.push_back({{"group", j}, {"mean", gr.mean[size_t(j)]}, {"min", gr.min[size_t(j)]},
                        {"sink_mass", sink}, {"mean_distance", dist}});
    }
    for (int h = 0; h < r.n_q; ++h) {
      const RecencyHeadStats& s = r.heads[size_t(l)][size_t(h)];
      heads.push_back({{"head", h}, {"score", s.score()}, {"sink_mass", s.sink_mass()},
                       {"mean_distance", s.mean_distance()}, {"queries", s.queries}});
    }
    layers.push_back({{"layer", l}, {"groups", groups}, {"heads", heads}});
  }
  o["layers"] = layers;
  return o.dump(2) + "\n";
}

CalibrationScores parse_calibration_scores(const std::string& text, const std::string& source) {
  nlohmann::json o = detail::parse_json(text.data(), text.data() + text.size(), source, "calibration scores");
  RF_CHECK(o.is_object() && o.contains("layers") && o["layers"].is_array(), source,
           ": expected a calibration scores object with a \"layers\" list (written by `recurformer calibrate`)");
  CalibrationScores s;
  if (const nlohmann::json* w = detail::json_find(o, "window"))
    s.window = int(detail::json_int(*w, source, "window", 1, 1 << 20));
  for (const auto& l : o["layers"]) {
    const size_t layer = s.group_mean.size();
    RF_CHECK(l.is_object() && l.contains("groups") && l["groups"].is_array(), source, ": layer ", layer,
             " needs a \"groups\" list");
    std::vector<double> row;
    for (const auto& g : l["groups"]) {
      RF_CHECK(g.is_object() && g.contains("mean") && g["mean"].is_number(), source, ": layer ", layer, " group ",
               row.size(), " needs a numeric \"mean\"");
      // "group" names the KV group; the list is in group order, so it must equal the position
      if (const nlohmann::json* j = detail::json_find(g, "group"))
        RF_CHECK(detail::json_int(*j, source, "group", 0, 1 << 20) == int64_t(row.size()), source, ": layer ", layer,
                 " lists group ", j->get<int64_t>(), " at position ", row.size(), " (expected groups 0, 1, ... in order)");
      const double mean = g["mean"].get<double>();
      RF_CHECK(mean >= 0 && mean <= 1, source, ": layer ", layer, " group ", row.size(), " has mean ", mean,
               ", a recency score is in [0, 1]");
      row.push_back(mean);
    }
    s.group_mean.push_back(std::move(row));
  }
  return s;
}

/// A heatmap (rows: layers, columns: KV groups; colour: group mean score 0..1) with a legend.
std::string calibration_to_svg(const CalibrationResult& r) {
  const int cell = 28, left = 70, top = 40, legend_w = 200;
  const int W = left + std::max(r.n_kv * cell, 120) + 40 + legend_w, H = top + r.n_layers * cell + 70;
  auto colour = [](double v) {  // 0 = blue (looks far back) .. 1 = red (recency-aware)
    v = std::min(1.0, std::max(0.0, v));
    const int R = int(255 * v), B = int(255 * (1 - v)), G = int(80 + 100 * (1 - std::fabs(2 * v - 1)));
    char buf[16];
    std::snprintf(buf, sizeof buf, "#%02x%02x%02x", R, G, B);
    return std::string(buf);
  };
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  s << "<text x=\"" << left << "\" y=\"18\" font-size=\"13\">Recency score (mass on the last " << r.window
    << " tokens), layer x KV group</text>\n";
  for (int l = 0; l < r.n_layers; ++l) {
    const GroupRecency g = r.groups(l);
    s << "<text x=\"" << left - 8 << "\" y=\"" << top + l * cell + cell / 2 + 4 << "\" text-anchor=\"end\">layer " << l
      << "</text>\n";
    for (int j = 0; j < r.n_kv; ++j) {
      const double v = g.mean[size_t(j)];
      char val[16];
      std::snprintf(val, sizeof val, "%.2f", v);
      s << "<rect x=\"" << left + j * cell << "\" y=\"" << top + l * cell << "\" width=\"" << cell - 1
        << "\" height=\"" << cell - 1 << "\" fill=\"" << colour(v) << "\"><title>layer " << l << " group " << j
        << ": mean " << val << "</title></rect>\n";
    }
  }
  for (int j = 0; j < r.n_kv; ++j)
    s << "<text x=\"" << left + j * cell + cell / 2 << "\" y=\"" << top + r.n_layers * cell + 14
      << "\" text-anchor=\"middle\">" << j << "</text>\n";
  s << "<text x=\"" << left << "\" y=\"" << top + r.n_layers * cell + 30 << "\">KV group</text>\n";
  // legend: a gradient from 0 to 1
  const int lx = left + std::max(r.n_kv * cell, 120) + 40, ly = top;
  s << "<defs><linearGradient id=\"rf\" x1=\"0\" x2=\"1\">";
  for (int i = 0; i <= 10; ++i) s << "<stop offset=\"" << i * 10 << "%\" stop-color=\"" << colour(i / 10.0) << "\"/>";
  s << "</linearGradient></defs>\n";
  s << "<rect x=\"" << lx << "\" y=\"" << ly << "\" width=\"" << legend_w - 20 << "\" height=\"14\" fill=\"url(#rf)\"/>\n";
  s << "<text x=\"" << lx << "\" y=\"" << ly + 28 << "\">0 (looks far back)</text>\n";
  s << "<text x=\"" << lx + legend_w - 20 << "\" y=\"" << ly + 42 << "\" text-anchor=\"end\">1 (recency-aware)</text>\n";
  s << "</svg>\n";
  return s.str();
}

}  // namespace recurformer
