// recurformer/model/fit_init.hpp: the `fit` initialisation of a converted recurrent group (spec section 3).
//
// Recording (record_fit_data): the original all-attention model runs over the calibration text cut
// into sequences of seq_len tokens (as calibrate does); at every layer the input hook recomputes q, k,
// v from the normalised input and, per recurrent group, keeps v, k and its g query heads' q before
// RoPE (what the recurrent head reads) and the original attention output of those heads (q, k with
// RoPE through the attention op, i.e. what the model computed; the slot o_proj projects).
// The layer input x itself is not kept: the fit sets dt_up = 0, so Δ does not depend on x.
//
// Fit (fit_recurrent_group), per group:
//   A_log[c, n] = log(n + 1), dt_up = 0, D = 1, and a constant step Δ_c = 1 / (w · min_n exp(A_log[c, n]))
//   (dt_bias = softplus^-1(Δ_c)): the slowest state of channel c decays to 1/e over the recency
//   window w of the scores file (w = 16 by default, so Δ = 1/16).
//   With Δ, B, C, D fixed the scan is linear in u = conv(v), so channel c's output is
//   y[t,q,c] = Σ_i w[c,i] Y_i[t,q,c] + bias[c] Y_b[t,q,c], Y_i = scan of v shifted by Kc-1-i tokens,
//   Y_b = scan of u = 1 (Kc + 1 selective_scan runs per sequence, fp32). The (Kc+1)² normal equations
//   are summed per channel in double over all (token, query head) pairs of all sequences and solved by
//   Cholesky with a ridge of 1e-6 · trace / (Kc+1): Y_b and slow-varying Y_i are nearly collinear, and
//   this bounds the condition number near 1e6 while moving the solution by ~1e-6 relative, below the
//   fp32 rounding the Y's already carry.
//   Errors: ||y - y_attn|| / ||y_attn|| over the group's heads, tokens and channels, with y recomputed
//   through causal_conv1d + selective_scan from the fitted tensors, and the same for the `default`
//   tensors (conv identity, D = 0, the default's dt_bias).
//   A windowed group (FitSequence::y_stream recorded) is fitted to what its window misses,
//   y_attn - y_stream: the recurrent term is then the part its output lacks at alpha = 0, and
//   distillation starts from it rather than from a copy of the whole attention. Its errors are those
//   of y_stream + y at alpha = 1, still relative to ||y_attn||.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "recurformer/core/exec.hpp"
#include "recurformer/model/llama.hpp"

namespace recurformer {

/// One calibration sequence of one recurrent group, fp32, row-major.
struct FitSequence {
  int64_t tokens = 0;
  std::vector<float> v;       ///< [T, hd]
  std::vector<float> k;       ///< [T, hd] no RoPE (the scan's B)
  std::vector<float> q;       ///< [T, g, hd] no RoPE, unscaled
  std::vector<float> y_attn;  ///< [T, g, hd] original attention output of the g query heads
  std::vector<float> y_stream;  ///< [T, g, hd] windowed groups: the same heads' streaming attention (sink +
                                ///< window mask), what the group outputs at alpha = 0; empty otherwise
};

/// What record_fit_data keeps for recurrent group `group` of layer `layer`.
struct FitGroupData {
  int layer = 0, group = 0;
  std::vector<FitSequence> sequences;
};

/// The RMS-normalised input of one layer's attention block (what Wq, Wk, Wv and dt_down read) on
/// every recorded sequence, fp32 [T, d_model] each: record_fit_data's optional output, which the
/// attention transfer (model/distill.hpp) trains the group's projections on.
struct LayerInputs {
  int layer = 0;
  std::vector<std::vector<float>> x;
};

struct FitOptions {
  int conv_kernel = 4;  ///< Kc
  int window = 16;      ///< recency window w: the slowest state decays to 1/e over w tokens
};

/// The fitted tensors of one group (spec section 7 shapes; dt_down / dt_up are the caller's) and the errors.
struct FitResult {
  std::vector<float> dt_bias, A_log, D, conv_weight, conv_bias;  ///< [hd], [hd, hd], [hd], [hd, Kc], [hd]
  double fit_error = 0, default_error = 0;                       ///< relative to ||y_attn||
};

namespace detail {
/// Δ -> the bias whose softplus is Δ (also the `default` init's, model/convert.hpp).
double softplus_inverse(double y);

/// The fixed parts of the group's scan on one sequence: B = k, C = q / sqrt(hd), delta = 0 (Δ comes
/// from delta_bias, as in the model with dt_up = 0).
struct FitScan {
  int64_t T, hd, g;
  std::vector<float> A, C, zero, state;
  FitScan(const FitSequence& s, int64_t hd_, int64_t g_, const std::vector<float>& A_log);
  /// y [T, g, hd] = scan(u) with the given dt_bias and D (D empty: none).
  void run(const FitSequence& s, const float* u, const std::vector<float>& dt_bias, const std::vector<float>& D,
           float* y, CpuExec exec);
};
}  // namespace detail

/// Fits one recurrent group (see the top of this file). `default_dt_bias` [hd] is the `default`
/// initialisation's, for the error reported beside the fit's.
FitResult fit_recurrent_group(const FitGroupData& data, int64_t hd, int64_t g,
                              const std::vector<float>& default_dt_bias, const FitOptions& o, CpuExec exec);

/// Runs the original model over `tokens` in sequences of seq_len tokens (a tail of fewer than Kc
/// tokens is dropped) and records every recurrent and windowed group of `layout` (layer, then group
/// order). With `inputs`, also the input x of every layer that has such a group (layer order).
/// A windowed group's record also holds its streaming output under `streaming`'s sink and window
/// (the converted model's: a required argument, since a default window would record silently wrong
/// targets for a model converted with another).
std::vector<FitGroupData> record_fit_data(const LlamaModel& model, const std::vector<int32_t>& tokens, int seq_len,
                                          const HeadLayout& layout, const StreamingConfig& streaming, int conv_kernel,
                                          CpuExec exec, const std::function<void(int64_t, int64_t)>& progress = {},
                                          std::vector<LayerInputs>* inputs = nullptr);

}  // namespace recurformer
