// recurformer/model/distill.hpp: attention transfer (LoLCATs' first stage; "The Mamba in the Llama"'s
// initialisation + layer-wise distillation) for a converted RecurFormer.
//
// The teacher (the original model) runs once over the calibration text (record_fit_data, with the
// layer inputs). Every recurrent group of every layer is then trained on its own, since with the
// teacher's inputs x the layers are independent: the group's recurrent tensors (dt_down, dt_up,
// dt_bias, A_log, D, conv1d weight and bias) and its own rows of Wq, Wk, Wv (and their biases) learn to
// reproduce the teacher's attention output of the group's g query heads:
//
//   P = x [Wq_j; Wk_j; Wv_j; dt_down]^T (+ b)            one GEMM for the four projections
//   u = conv(v), Δ = softplus(dt_up z + dt_bias), A = -exp(A_log), B = k, C = q / sqrt(hd)
//   y = scan(u, Δ, A, B, C, D)                            [T, g, hd]   (spec section 3)
//   loss = Σ (y - y_attn)² / Σ y_attn²                    over a minibatch of sequences
//
// A windowed group outputs y_stream + alpha_h y_h, where y_stream is its streaming attention (sink +
// window mask) over the same q, k, v rows:
//   loss = Σ (y_stream + alpha y - y_attn)² / Σ y_attn²
// With lr_projection > 0 the rows train, so y_stream is recomputed every step from them (RoPE with
// the student's table and layout, the attention op with the lse it saves) and its gradient runs
// through attention_backward and rope_backward into the same rows the scan's B, C and u reach.
// With lr_projection = 0 they stay frozen and y_stream is the teacher's, recorded once
// (FitSequence::y_stream): the recurrent tensors and alpha then learn only what the window misses.
//
// The gradient runs the ops' backward passes in reverse (selective_scan_backward, causal_conv1d_backward,
// linear_backward); AdamW (train/adamw.hpp) with warmup + cosine and global-norm clipping updates one
// flat fp32 buffer holding all of the group's parameters. Only this group reads its rows of Wq, Wk and
// Wv, so the trained rows are written back in place and the checkpoint format does not change. The
// error reported is sqrt(loss) on sequences held out from training (the last `holdout` fraction of the
// recording), before and after.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "recurformer/core/exec.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/fit_init.hpp"
#include "recurformer/ops/attention.hpp"
#include "recurformer/ops/causal_conv1d.hpp"
#include "recurformer/ops/rope.hpp"
#include "recurformer/ops/selective_scan.hpp"

namespace recurformer {

struct DistillOptions {
  int steps = 100;                 ///< optimiser steps per group
  int batch = 4;                   ///< sequences per step
  float lr = 3e-2f;                ///< peak learning rate of the recurrent tensors
  float lr_projection = 1e-2f;     ///< peak learning rate of the group's Wq/Wk/Wv rows (0: frozen; a
                                   ///< windowed group then reads its recorded streaming output)
  float weight_decay = 0.f;        ///< decoupled, on the weight matrices only
  double warmup = 0.1;             ///< fraction of the steps
  double clip = 1.0;               ///< global gradient-norm clip (0: none)
  double holdout = 0.1;            ///< fraction of the recorded sequences kept out of training (at least one)
  uint64_t seed = 1;
  /// (groups done, groups) after each group, and (step, steps, loss) inside a group.
  std::function<void(int64_t, int64_t)> progress;
  std::function<void(int64_t, int64_t, double)> step_progress;
};

/// The outcome for one group: errors ||y - y_attn|| / ||y_attn|| on the held-out and training sequences.
struct DistillGroupResult {
  int layer = 0, group = 0;
  double heldout_before = 0, heldout_after = 0, train_before = 0, train_after = 0;
  double seconds = 0;
};

namespace detail {

/// Sizes of one recurrent group and where its tensors lie in the flat parameter vector.
struct DistillLayout {
  int64_t d, hd, g, r, N, K;
  bool bias;
  int64_t rows, W, b, dt_up, dt_bias, A_log, D, conv_w, conv_b, total;  // offsets; total = size
  bool windowed = false;
  int64_t alpha = -1;  // windowed: [g] at the end
  DistillLayout(int64_t d_, int64_t hd_, int64_t g_, int64_t r_, int64_t N_, int64_t K_, bool bias_);
  int64_t q_col() const { return 0; }
  int64_t k_col() const { return g * hd; }
  int64_t v_col() const { return (g + 1) * hd; }
  int64_t z_col() const { return (g + 2) * hd; }
  /// The layout of a windowed group: the same plus alpha.
  DistillLayout windowed_group() const;
};

/// What a windowed group's streaming attention needs when it is recomputed from trained rows: the
/// student's RoPE table and layout, and its sink and window.
struct DistillAttention {
  std::vector<float> inv_freq;  ///< [hd / 2]
  RopeLayout layout = RopeLayout::rotate_half;
  int sink = 0, window = 0;
};

/// Forward and backward of one group over a minibatch of recorded sequences. Buffers are kept
/// between calls, so steady-state steps allocate nothing once the largest batch has been seen.
/// `attention` (windowed groups only): recompute the streaming output from the rows (they train)
/// instead of reading the recorded one.
class DistillGroupModel {
 public:
  DistillGroupModel(const DistillLayout& L, const LayerInputs& in, const FitGroupData& data, CpuExec exec,
                    const DistillAttention* attention = nullptr);

  struct Sums {
    double sse = 0, energy = 0;  ///< Σ (y - y_attn)², Σ y_attn²
    double error() const { return energy > 0 ? std::sqrt(sse / energy) : std::sqrt(sse); }
  };

  /// Runs the group on sequences `seqs` with parameters `theta`; with `grad`, writes
  /// d(sse / energy)/d(theta) into it (overwritten).
  Sums run(const std::vector<float>& theta, const std::vector<int>& seqs, std::vector<float>* grad);

 private:
  template <class T>
  static void ensure(std::vector<T>& v, int64_t n);
  // Element i of what is compared with target_: the scan's y; for a windowed group alpha_h y, plus
  // the streaming output when it is recomputed (else target_ is y_attn - the recorded y_stream).
  double output(const std::vector<float>& th, int64_t i) const;
  template <class P>
  void with_workspace(size_t need, P&& call);

  void pack(const std::vector<int>& seqs);

  // Views of the packed batch.
  View<const float, 2> xv() const { return make_view<const float>(x_.data(), {Tb_, L_.d}); }
  View<const float, 2> cols(const std::vector<float>& P, int64_t col, int64_t width) const {
    return make_strided_view<const float>(P.data() + col, {Tb_, width}, {L_.rows, 1});
  }
  View<const float, 2> W(const std::vector<float>& th) const { return make_view<const float>(th.data() + L_.W, {L_.rows, L_.d}); }
  View<const float, 2> up(const std::vector<float>& th) const { return make_view<const float>(th.data() + L_.dt_up, {L_.hd, L_.r}); }

  SelectiveScanParams<float> scan_params(const std::vector<float>& th);
  CausalConv1dParams<float> conv_params(const std::vector<float>& th);

  void forward(const std::vector<float>& th);

  // The windowed group's streaming attention from the projected rows: q and k rotated copies (the
  // scan reads them unrotated), keys and values in per-sequence slots [S, 1, cap, hd].
  View<const int32_t, 1> positions() const { return make_view<const int32_t>(pos_.data(), {Tb_}); }
  View<const float, 1> inv_freq() const {
    return make_view<const float>(att_->inv_freq.data(), {int64_t(att_->inv_freq.size())});
  }
  AttentionParams<float> stream_params();
  void stream_forward();
  // Adds the streaming attention's gradients (dout_) to dP's q, k and v columns.
  void stream_backward();

  void backward(const std::vector<float>& th, std::vector<float>& grad);

  DistillLayout L_;
  const LayerInputs* in_;
  const FitGroupData* data_;
  CpuExec exec_;
  const DistillAttention* att_;
  int64_t Tb_ = 0, S_ = 0, cap_ = 0;
  std::vector<int32_t> cu_, pos_, kv_lens_;
  std::vector<double> dalpha_;
  std::vector<float> x_, target_, attn_, P_, delta_, u_, C_, y_, A_, state_, dy_, dP_, du_, ddelta_, dA_, dC_;
  std::vector<float> qr_, kr_, Kb_, Vb_, ys_, lse_, dout_, dq_, dkr_, dK_, dV_;  // windowed, recomputed attention
  std::vector<unsigned char> ws_;
};

/// The group's parameters, read from the student checkpoint in the flat layout.
std::vector<float> distill_initial(const Checkpoint& ck, const DistillLayout& L, int layer, int group);

}  // namespace detail

/// Trains one group (see the top of this file) from `theta` in place; `train` and `heldout` index
/// the recorded sequences.
/// `attention`: a windowed group's (see DistillGroupModel), used when its rows train (lr_projection > 0).
DistillGroupResult distill_group(const detail::DistillLayout& L, const LayerInputs& in, const FitGroupData& data,
                                 std::vector<float>& theta, const std::vector<int>& train,
                                 const std::vector<int>& heldout, const DistillOptions& o, CpuExec exec,
                                 const detail::DistillAttention* attention = nullptr);

std::string distill_report_json(const std::vector<DistillGroupResult>& res, const DistillOptions& o, int64_t sequences,
                                int64_t heldout, int64_t tokens);

/// Distils every recurrent group of the RecurFormer checkpoint `student` (a HF directory written by
/// convert) with the teacher's recording (record_fit_data over the same layout, with inputs), and
/// writes the trained checkpoint to `final_dir` (complete or not at all; a non-empty one is refused
/// unless `replace`), with distill_report.json beside it. Returns the per-group results.
std::vector<DistillGroupResult> distill_to_recurformer(const Checkpoint& student, const std::vector<FitGroupData>& data,
                                                       const std::vector<LayerInputs>& inputs, const DistillOptions& o,
                                                       const std::string& final_dir, bool replace, CpuExec exec = {});

}  // namespace recurformer
