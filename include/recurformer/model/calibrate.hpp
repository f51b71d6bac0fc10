// recurformer/model/calibrate.hpp: measuring which KV groups are recency-aware (spec section 5).
//
// The model runs over calibration text cut into sequences of `seq_len` tokens, each prefilled as
// one chunk from an empty cache; at every layer the hook recomputes the layer's q and k from its
// RMS-normalised input (q/k projections + RoPE at the true positions, exactly what attention
// sees) and feeds them to the recency_score op, which accumulates per-head statistics without a
// T x T matrix. The result is written as JSON (per layer: per KV group mean / min score, sink mass,
// mean distance; per head the same) and drawn as an SVG heatmap (layer x KV group).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "recurformer/core/exec.hpp"
#include "recurformer/model/llama.hpp"
#include "recurformer/ops/recency_score.hpp"

namespace recurformer {

struct CalibrationOptions {
  int seq_len = 512;       ///< tokens per calibration sequence (the tail shorter than 2 windows is dropped)
  int window = 16;         ///< w of spec section 5
  int sink_tokens = 4;     ///< keys counted as sink
  int max_sequences = 0;   ///< 0: all
};

struct CalibrationResult {
  int window = 16, sink_tokens = 4;
  int n_layers = 0, n_q = 0, n_kv = 0;
  int64_t sequences = 0, tokens = 0;
  std::vector<std::vector<RecencyHeadStats>> heads;  ///< [layers][n_q]

  GroupRecency groups(int layer) const { return group_recency(heads[size_t(layer)], n_kv); }
  /// [layers][n_kv] group mean scores (select_head_layout's input).
  std::vector<std::vector<double>> group_scores() const;
};

/// Runs the calibration over `tokens` (one long tokenized text). progress(done, total) after each
/// sequence.
CalibrationResult calibrate(const LlamaModel& model, const std::vector<int32_t>& tokens, const CalibrationOptions& opt,
                            CpuExec exec, const std::function<void(int64_t, int64_t)>& progress = {});

/// The scores file `convert` reads.
std::string calibration_to_json(const CalibrationResult& r, const std::string& model_path);

/// Group mean scores [layers][n_kv] and the window from a scores file's text.
struct CalibrationScores {
  int window = 16;
  std::vector<std::vector<double>> group_mean;
};
CalibrationScores parse_calibration_scores(const std::string& text, const std::string& source);

/// A heatmap (rows: layers, columns: KV groups; colour: group mean score 0..1) with a legend.
std::string calibration_to_svg(const CalibrationResult& r);

}  // namespace recurformer
