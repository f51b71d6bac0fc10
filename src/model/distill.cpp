// src/model/distill.cpp: attention transfer for a converted RecurFormer (see recurformer/model/distill.hpp).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "recurformer/model/distill.hpp"
#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/attention_backward.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/selective_scan.hpp"
#include "recurformer/model/convert.hpp"
#include "model/detail/llama_weights.hpp"
#include "recurformer/model/fit_init.hpp"
#include "recurformer/model/random_model.hpp"
#include "recurformer/model/safetensors.hpp"
#include "recurformer/train/adamw.hpp"

namespace recurformer {
namespace detail {

DistillLayout::DistillLayout(int64_t d_, int64_t hd_, int64_t g_, int64_t r_, int64_t N_, int64_t K_, bool bias_)
    : d(d_), hd(hd_), g(g_), r(r_), N(N_), K(K_), bias(bias_) {
  rows = (g + 2) * hd + r;  // q (g heads), k, v, dt_down
  W = 0;
  b = W + rows * d;
  dt_up = b + (bias ? rows : 0);
  dt_bias = dt_up + hd * r;
  A_log = dt_bias + hd;
  D = A_log + hd * N;
  conv_w = D + hd;
  conv_b = conv_w + hd * K;
  total = conv_b + hd;
}

/// The layout of a windowed group: the same plus alpha.
DistillLayout DistillLayout::windowed_group() const {
  DistillLayout w = *this;
  w.windowed = true;
  w.alpha = total;
  w.total = total + g;
  return w;
}

DistillGroupModel::DistillGroupModel(const DistillLayout& L, const LayerInputs& in, const FitGroupData& data,
                                     CpuExec exec, const DistillAttention* attention)
    : L_(L), in_(&in), data_(&data), exec_(exec), att_(L.windowed ? attention : nullptr) {
  if (att_)
    RF_CHECK(int64_t(att_->inv_freq.size()) * 2 == L.hd && att_->window > 0, "distill: the streaming attention needs ",
             L.hd / 2, " RoPE frequencies and a window > 0 (got ", att_->inv_freq.size(), ", window ", att_->window, ")");
  RF_CHECK(in.x.size() == data.sequences.size(), "distill: layer ", data.layer, " has ", in.x.size(),
           " recorded inputs but group ", data.group, " has ", data.sequences.size(), " sequences");
  for (size_t s = 0; s < in.x.size(); ++s)
    RF_CHECK(int64_t(in.x[s].size()) == data.sequences[s].tokens * L.d, "distill: layer ", data.layer,
             " sequence ", s, ": input of ", in.x[s].size(), " values for ", data.sequences[s].tokens, " tokens of ",
             L.d);
  if (L.windowed && !att_)
    for (const FitSequence& fs : data.sequences)
      RF_CHECK(fs.y_stream.size() == fs.y_attn.size(), "distill: windowed group ", data.group, " of layer ", data.layer,
               " was recorded without its streaming output (record_fit_data over a layout where it is windowed)");
}

/// Runs the group on sequences `seqs` with parameters `theta`; with `grad`, writes
/// d(sse / energy)/d(theta) into it (overwritten).
DistillGroupModel::Sums DistillGroupModel::run(const std::vector<float>& theta, const std::vector<int>& seqs,
                                               std::vector<float>* grad) {
  pack(seqs);
  forward(theta);
  Sums s;
  const int64_t n = Tb_ * L_.g * L_.hd;
  const std::vector<float>& attn = L_.windowed ? attn_ : target_;
  for (int64_t i = 0; i < n; ++i) {
    const double e = output(theta, i) - double(target_[size_t(i)]);
    s.sse += e * e;
    s.energy += double(attn[size_t(i)]) * attn[size_t(i)];
  }
  if (grad) {
    const double k = 2.0 / (s.energy > 0 ? s.energy : 1.0);
    dy_.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) dy_[size_t(i)] = float(k * (output(theta, i) - double(target_[size_t(i)])));
    std::vector<double>& dalpha = dalpha_;  // kept: no allocation per step
    dalpha.assign(size_t(L_.windowed ? L_.g : 0), 0.0);
    if (att_) dout_.assign(dy_.begin(), dy_.begin() + n);  // the streaming attention's, unweighted
    if (L_.windowed)  // d/dalpha_h = Σ dout y_h; the scan sees dy_h = alpha_h dout
      for (int64_t i = 0; i < n; ++i) {
        const int64_t h = (i / L_.hd) % L_.g;
        dalpha[size_t(h)] += double(dy_[size_t(i)]) * y_[size_t(i)];
        dy_[size_t(i)] *= theta[size_t(L_.alpha + h)];
      }
    backward(theta, *grad);
    if (L_.windowed)
      for (int64_t h = 0; h < L_.g; ++h) (*grad)[size_t(L_.alpha + h)] = float(dalpha[size_t(h)]);
  }
  return s;
}

template <class T>
void DistillGroupModel::ensure(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}

// Element i of what is compared with target_: the scan's y; for a windowed group alpha_h y, plus
// the streaming output when it is recomputed (else target_ is y_attn - the recorded y_stream).
double DistillGroupModel::output(const std::vector<float>& th, int64_t i) const {
  const double y = y_[size_t(i)];
  if (!L_.windowed) return y;
  return double(th[size_t(L_.alpha + (i / L_.hd) % L_.g)]) * y + (att_ ? double(ys_[size_t(i)]) : 0.0);
}

template <class P>
void DistillGroupModel::with_workspace(size_t need, P&& call) {
  if (ws_.size() < need) ws_.resize(need);
  call(ws_.data(), ws_.size());
}

void DistillGroupModel::pack(const std::vector<int>& seqs) {
  Tb_ = 0;
  cu_.assign(1, 0);
  for (int s : seqs) Tb_ += data_->sequences[size_t(s)].tokens, cu_.push_back(int32_t(Tb_));
  const int64_t gh = L_.g * L_.hd;
  ensure(x_, Tb_ * L_.d);
  ensure(target_, Tb_ * gh);
  if (L_.windowed) ensure(attn_, Tb_ * gh);
  int64_t t = 0;
  for (int s : seqs) {
    const FitSequence& fs = data_->sequences[size_t(s)];
    std::copy(in_->x[size_t(s)].begin(), in_->x[size_t(s)].end(), x_.begin() + t * L_.d);
    std::copy(fs.y_attn.begin(), fs.y_attn.end(), target_.begin() + t * gh);
    if (L_.windowed) {
      std::copy(fs.y_attn.begin(), fs.y_attn.end(), attn_.begin() + t * gh);
      if (!att_)
        for (int64_t i = 0; i < fs.tokens * gh; ++i) target_[size_t(t * gh + i)] -= fs.y_stream[size_t(i)];
    }
    t += fs.tokens;
  }
  S_ = int64_t(seqs.size());
  if (!att_) return;
  // the streaming attention's index arrays: positions from 0 in every sequence (as recorded)
  pos_.resize(size_t(Tb_));
  kv_lens_.resize(size_t(S_));
  cap_ = 0;
  for (int64_t q = 0; q < S_; ++q) {
    kv_lens_[size_t(q)] = cu_[size_t(q + 1)] - cu_[size_t(q)];
    cap_ = std::max<int64_t>(cap_, kv_lens_[size_t(q)]);
    for (int32_t i = cu_[size_t(q)]; i < cu_[size_t(q + 1)]; ++i) pos_[size_t(i)] = i - cu_[size_t(q)];
  }
}

SelectiveScanParams<float> DistillGroupModel::scan_params(const std::vector<float>& th) {
  SelectiveScanParams<float> p;
  const int64_t hd = L_.hd;
  p.u = make_view<const float>(u_.data(), {Tb_, hd});
  p.delta = make_view<const float>(delta_.data(), {Tb_, hd});
  p.A = make_view<const float>(A_.data(), {hd, L_.N});
  p.B = make_strided_view<const float>(P_.data() + L_.k_col(), {Tb_, 1, L_.N}, {L_.rows, L_.N, 1});
  p.C = make_view<const float>(C_.data(), {Tb_, 1, L_.g, L_.N});
  p.D = make_view<const float>(th.data() + L_.D, {hd});
  p.delta_bias = make_view<const float>(th.data() + L_.dt_bias, {hd});
  p.y = make_view(y_.data(), {Tb_, L_.g, hd});
  p.state = make_view(state_.data(), {S_, hd, L_.N});
  p.cu_seqlens = make_view<const int32_t>(cu_.data(), {S_ + 1});
  p.delta_activation = DeltaActivation::softplus;
  p.use_initial_state = false;
  return p;
}

CausalConv1dParams<float> DistillGroupModel::conv_params(const std::vector<float>& th) {
  CausalConv1dParams<float> p;
  p.x = cols(P_, L_.v_col(), L_.hd);
  p.weight = make_view<const float>(th.data() + L_.conv_w, {L_.hd, L_.K});
  p.bias = make_view<const float>(th.data() + L_.conv_b, {L_.hd});
  p.y = make_view(u_.data(), {Tb_, L_.hd});
  p.cu_seqlens = make_view<const int32_t>(cu_.data(), {S_ + 1});
  p.use_initial_state = false;
  return p;
}

void DistillGroupModel::forward(const std::vector<float>& th) {
  const int64_t hd = L_.hd, g = L_.g, N = L_.N;
  ensure(P_, Tb_ * L_.rows);
  ensure(delta_, Tb_ * hd);
  ensure(u_, Tb_ * hd);
  ensure(C_, Tb_ * g * N);
  ensure(y_, Tb_ * g * hd);
  ensure(A_, hd * N);
  ensure(state_, S_ * hd * N);
  LinearParams<float, float> proj{xv(), W(th), {}, make_view(P_.data(), {Tb_, L_.rows})};
  if (L_.bias) proj.bias = make_view<const float>(th.data() + L_.b, {L_.rows});
  with_workspace(linear_workspace_bytes(proj, exec_), [&](void* w, size_t n) { linear(proj, exec_, w, n); });
  LinearParams<float, float> dt{cols(P_, L_.z_col(), L_.r), up(th), {}, make_view(delta_.data(), {Tb_, hd})};
  with_workspace(linear_workspace_bytes(dt, exec_), [&](void* w, size_t n) { linear(dt, exec_, w, n); });
  causal_conv1d(conv_params(th), exec_);
  const float inv = float(1.0 / std::sqrt(double(hd)));
  for (int64_t t = 0; t < Tb_; ++t)
    for (int64_t i = 0; i < g * N; ++i) C_[size_t(t * g * N + i)] = P_[size_t(t * L_.rows + L_.q_col() + i)] * inv;
  for (int64_t i = 0; i < hd * N; ++i) A_[size_t(i)] = -std::exp(th[size_t(L_.A_log + i)]);
  selective_scan(scan_params(th), exec_);
  if (att_) stream_forward();
}

AttentionParams<float> DistillGroupModel::stream_params() {
  AttentionParams<float> ap;
  ap.q = make_view<const float>(qr_.data(), {Tb_, L_.g, L_.hd});
  ap.k = make_view<const float>(Kb_.data(), {S_, int64_t(1), cap_, L_.hd});
  ap.v = make_view<const float>(Vb_.data(), {S_, int64_t(1), cap_, L_.hd});
  ap.out = make_view(ys_.data(), {Tb_, L_.g, L_.hd});
  ap.cu_seqlens = make_view<const int32_t>(cu_.data(), {S_ + 1});
  ap.kv_lens = make_view<const int32_t>(kv_lens_.data(), {S_});
  ap.q_positions = positions();
  ap.sink = att_->sink, ap.window = att_->window;
  ap.lse = make_view(lse_.data(), {Tb_, L_.g});
  return ap;
}

void DistillGroupModel::stream_forward() {
  const int64_t hd = L_.hd, gh = L_.g * hd;
  ensure(qr_, Tb_ * gh);
  ensure(kr_, Tb_ * hd);
  ensure(Kb_, S_ * cap_ * hd);
  ensure(Vb_, S_ * cap_ * hd);
  ensure(ys_, Tb_ * gh);
  ensure(lse_, Tb_ * L_.g);
  for (int64_t t = 0; t < Tb_; ++t) {
    const float* row = P_.data() + t * L_.rows;
    std::copy_n(row + L_.q_col(), gh, qr_.data() + t * gh);
    std::copy_n(row + L_.k_col(), hd, kr_.data() + t * hd);
  }
  rope(RopeParams<float>{make_view(qr_.data(), {Tb_, L_.g, hd}), positions(), inv_freq(), att_->layout}, exec_);
  rope(RopeParams<float>{make_view(kr_.data(), {Tb_, int64_t(1), hd}), positions(), inv_freq(), att_->layout}, exec_);
  for (int64_t q = 0; q < S_; ++q)
    for (int32_t t = cu_[size_t(q)]; t < cu_[size_t(q + 1)]; ++t) {
      const int64_t e = (q * cap_ + (t - cu_[size_t(q)])) * hd;
      std::copy_n(kr_.data() + t * hd, hd, Kb_.data() + e);
      std::copy_n(P_.data() + t * L_.rows + L_.v_col(), hd, Vb_.data() + e);
    }
  const AttentionParams<float> ap = stream_params();
  with_workspace(attention_workspace_bytes(ap, exec_), [&](void* w, size_t n) { attention(ap, exec_, w, n); });
}

// Adds the streaming attention's gradients (dout_) to dP's q, k and v columns.
void DistillGroupModel::stream_backward() {
  const int64_t hd = L_.hd, gh = L_.g * hd;
  ensure(dq_, Tb_ * gh);
  ensure(dkr_, Tb_ * hd);
  ensure(dK_, S_ * cap_ * hd);
  ensure(dV_, S_ * cap_ * hd);
  AttentionBackwardParams<float> ab;
  ab.fwd = stream_params();
  ab.dout = make_view<const float>(dout_.data(), {Tb_, L_.g, hd});
  ab.dq = make_view(dq_.data(), {Tb_, L_.g, hd});
  ab.dk = make_view(dK_.data(), {S_, int64_t(1), cap_, hd});
  ab.dv = make_view(dV_.data(), {S_, int64_t(1), cap_, hd});
  with_workspace(attention_backward_workspace_bytes(ab, exec_),
                 [&](void* w, size_t n) { attention_backward(ab, exec_, w, n); });
  for (int64_t q = 0; q < S_; ++q)
    for (int32_t t = cu_[size_t(q)]; t < cu_[size_t(q + 1)]; ++t)
      std::copy_n(dK_.data() + (q * cap_ + (t - cu_[size_t(q)])) * hd, hd, dkr_.data() + t * hd);
  rope_backward(RopeBackwardParams{make_view(dq_.data(), {Tb_, L_.g, hd}), positions(), inv_freq(), att_->layout}, exec_);
  rope_backward(RopeBackwardParams{make_view(dkr_.data(), {Tb_, int64_t(1), hd}), positions(), inv_freq(), att_->layout},
                exec_);
  for (int64_t q = 0; q < S_; ++q)
    for (int32_t t = cu_[size_t(q)]; t < cu_[size_t(q + 1)]; ++t) {
      float* row = dP_.data() + t * L_.rows;
      const float* dv = dV_.data() + (q * cap_ + (t - cu_[size_t(q)])) * hd;
      for (int64_t i = 0; i < gh; ++i) row[L_.q_col() + i] += dq_[size_t(t * gh + i)];
      for (int64_t i = 0; i < hd; ++i) row[L_.k_col() + i] += dkr_[size_t(t * hd + i)], row[L_.v_col() + i] += dv[i];
    }
}

void DistillGroupModel::backward(const std::vector<float>& th, std::vector<float>& grad) {
  const int64_t hd = L_.hd, g = L_.g, N = L_.N, rows = L_.rows;
  grad.assign(size_t(L_.total), 0.f);
  ensure(dP_, Tb_ * rows);
  ensure(du_, Tb_ * hd);
  ensure(ddelta_, Tb_ * hd);
  ensure(dA_, hd * N);
  ensure(dC_, Tb_ * g * N);
  // scan: everything but the state's gradient; dB lands straight in dP's k columns
  SelectiveScanBackwardParams<float> sb;
  sb.fwd = scan_params(th);
  sb.dy = make_view<const float>(dy_.data(), {Tb_, g, hd});
  sb.du = make_view(du_.data(), {Tb_, hd});
  sb.ddelta = make_view(ddelta_.data(), {Tb_, hd});
  sb.dA = make_view(dA_.data(), {hd, N});
  sb.dB = make_strided_view(dP_.data() + L_.k_col(), {Tb_, 1, N}, {rows, N, 1});
  sb.dC = make_view(dC_.data(), {Tb_, 1, g, N});
  sb.dD = make_view(grad.data() + L_.D, {hd});
  sb.ddelta_bias = make_view(grad.data() + L_.dt_bias, {hd});
  with_workspace(selective_scan_backward_workspace_bytes(sb, exec_),
                 [&](void* w, size_t n) { selective_scan_backward(sb, exec_, w, n); });
  for (int64_t i = 0; i < hd * N; ++i) grad[size_t(L_.A_log + i)] = dA_[size_t(i)] * A_[size_t(i)];  // dA/dA_log = A
  const float inv = float(1.0 / std::sqrt(double(hd)));
  for (int64_t t = 0; t < Tb_; ++t)
    for (int64_t i = 0; i < g * N; ++i) dP_[size_t(t * rows + L_.q_col() + i)] = dC_[size_t(t * g * N + i)] * inv;
  // conv: dv into dP's v columns
  CausalConv1dBackwardParams<float> cb;
  cb.fwd = conv_params(th);
  cb.dy = make_view<const float>(du_.data(), {Tb_, hd});
  cb.dx = make_strided_view(dP_.data() + L_.v_col(), {Tb_, hd}, {rows, 1});
  cb.dweight = make_view(grad.data() + L_.conv_w, {hd, L_.K});
  cb.dbias = make_view(grad.data() + L_.conv_b, {hd});
  causal_conv1d_backward(cb, exec_);
  // Δ's low-rank path: dz into dP's z columns, then the four projections at once
  LinearBackwardParams<float, float> ub;
  ub.x = cols(P_, L_.z_col(), L_.r);
  ub.weight = up(th);
  ub.dy = make_view<const float>(ddelta_.data(), {Tb_, hd});
  ub.dx = make_strided_view(dP_.data() + L_.z_col(), {Tb_, L_.r}, {rows, 1});
  ub.dweight = make_view(grad.data() + L_.dt_up, {hd, L_.r});
  with_workspace(linear_backward_workspace_bytes(ub, exec_), [&](void* w, size_t n) { linear_backward(ub, exec_, w, n); });
  if (att_) stream_backward();  // the scan, conv and Δ path have written dP; the attention adds to it
  LinearBackwardParams<float, float> pb;
  pb.x = xv();
  pb.weight = W(th);
  pb.dy = make_view<const float>(dP_.data(), {Tb_, rows});
  pb.dweight = make_view(grad.data() + L_.W, {rows, L_.d});
  if (L_.bias) {
    pb.dbias = make_view(grad.data() + L_.b, {rows});
  }
  with_workspace(linear_backward_workspace_bytes(pb, exec_), [&](void* w, size_t n) { linear_backward(pb, exec_, w, n); });
  if (L_.bias) std::fill_n(grad.data() + L_.b + L_.z_col(), L_.r, 0.f);  // dt_down has no bias
}

namespace {

/// The names of the tensors a group's parameters come from.
std::string distill_prefix(int layer) { return "model.layers." + std::to_string(layer) + ".self_attn."; }
std::string distill_recurrent(int layer, int group, const char* name) {
  return distill_prefix(layer) + "recurrent." + std::to_string(group) + "." + name;
}

/// Reads `count` rows of `width` values starting at row `row0` of tensor `t` (any float dtype) into dst.
void read_rows(const TensorRef& t, int64_t row0, int64_t count, int64_t width, float* dst) {
  const size_t es = dtype_size(t.dtype);
  detail::convert_values(static_cast<const char*>(t.data) + size_t(row0 * width) * es, t.dtype, count * width, dst);
}

}  // namespace

/// The group's parameters, read from the student checkpoint in the flat layout.
std::vector<float> distill_initial(const Checkpoint& ck, const DistillLayout& L, int layer, int group) {
  std::vector<float> th(size_t(L.total), 0.f);
  const std::string p = distill_prefix(layer);
  const int64_t gh = L.g * L.hd, d = L.d;
  auto w = [&](const char* n, int64_t rows) { return ck.tensor(p + n, {rows, d}); };
  const int64_t nq = gh * ck.config().n_kv, nkv = L.hd * ck.config().n_kv;
  read_rows(w("q_proj.weight", nq), group * gh, gh, d, th.data() + L.W);
  read_rows(w("k_proj.weight", nkv), group * L.hd, L.hd, d, th.data() + L.W + L.k_col() * d);
  read_rows(w("v_proj.weight", nkv), group * L.hd, L.hd, d, th.data() + L.W + L.v_col() * d);
  read_rows(ck.tensor(distill_recurrent(layer, group, "dt_down.weight"), {L.r, d}), 0, L.r, d,
            th.data() + L.W + L.z_col() * d);
  if (L.bias) {
    read_rows(ck.tensor(p + "q_proj.bias", {nq}), group * gh, gh, 1, th.data() + L.b);
    read_rows(ck.tensor(p + "k_proj.bias", {nkv}), group * L.hd, L.hd, 1, th.data() + L.b + L.k_col());
    read_rows(ck.tensor(p + "v_proj.bias", {nkv}), group * L.hd, L.hd, 1, th.data() + L.b + L.v_col());
  }
  struct Part { const char* name; int64_t off; std::vector<int64_t> shape; };
  const Part parts[] = {{"dt_up.weight", L.dt_up, {L.hd, L.r}}, {"dt_bias", L.dt_bias, {L.hd}},
                        {"A_log", L.A_log, {L.hd, L.N}},          {"D", L.D, {L.hd}},
                        {"conv1d.weight", L.conv_w, {L.hd, L.K}}, {"conv1d.bias", L.conv_b, {L.hd}}};
  for (const Part& pt : parts) {
    const TensorRef& t = ck.tensor(distill_recurrent(layer, group, pt.name), pt.shape);
    read_rows(t, 0, 1, t.numel(), th.data() + pt.off);
  }
  if (L.windowed) read_rows(ck.tensor(distill_recurrent(layer, group, "alpha"), {L.g}), 0, 1, L.g, th.data() + L.alpha);
  return th;
}

}  // namespace detail

/// Trains one group (see the top of this file) from `theta` in place; `train` and `heldout` index
/// the recorded sequences.
/// `attention`: a windowed group's (see DistillGroupModel), used when its rows train (lr_projection > 0).
DistillGroupResult distill_group(const detail::DistillLayout& L, const LayerInputs& in, const FitGroupData& data,
                                 std::vector<float>& theta, const std::vector<int>& train,
                                 const std::vector<int>& heldout, const DistillOptions& o, CpuExec exec,
                                 const detail::DistillAttention* attention) {
  RF_CHECK(!train.empty() && !heldout.empty(), "distill: no training or held-out sequences");
  RF_CHECK(o.steps >= 0 && o.batch >= 1, "distill: steps must be >= 0 and batch >= 1");
  RF_CHECK(o.lr > 0 && o.lr_projection >= 0, "distill: lr must be > 0 and lr_projection >= 0");
  const auto t0 = std::chrono::steady_clock::now();
  const bool rows_train = o.lr_projection > 0;
  RF_CHECK(!L.windowed || !rows_train || attention, "distill: training a windowed group's q/k/v rows needs its streaming "
           "attention's RoPE table and window");
  detail::DistillGroupModel model(L, in, data, exec, rows_train ? attention : nullptr);
  DistillGroupResult r;
  r.layer = data.layer, r.group = data.group;
  // errors over whole sets, a few sequences at a time (bounded buffers)
  auto error = [&](const std::vector<int>& set) {
    detail::DistillGroupModel::Sums total;
    for (size_t b = 0; b < set.size(); b += size_t(o.batch)) {
      const std::vector<int> part(set.begin() + int64_t(b), set.begin() + int64_t(std::min(set.size(), b + size_t(o.batch))));
      const auto s = model.run(theta, part, nullptr);
      total.sse += s.sse, total.energy += s.energy;
    }
    return total.error();
  };
  r.heldout_before = error(heldout);
  r.train_before = error(train);
  const int64_t proj = L.z_col() * L.d;  // the q/k/v rows of W
  const float proj_scale = o.lr_projection / o.lr;
  std::vector<AdamWSegment> seg = {{0, proj, proj_scale, o.weight_decay},
                                   {proj, L.b, 1.f, o.weight_decay},
                                   {L.dt_up, L.dt_bias, 1.f, o.weight_decay}};
  if (L.bias) seg.push_back({L.b, L.dt_up, proj_scale, 0.f});
  AdamW opt(L.total, AdamWConfig{o.lr}, seg);
  std::mt19937_64 rng(o.seed ^ (uint64_t(data.layer) << 32) ^ uint64_t(data.group));
  std::vector<int> order = train;
  size_t next = order.size();
  std::vector<int> batch;
  std::vector<float> grad;
  const int64_t warmup = int64_t(o.warmup * o.steps);
  for (int step = 0; step < o.steps; ++step) {
    batch.clear();
    while (int(batch.size()) < std::min<int>(o.batch, int(train.size()))) {
      if (next == order.size()) std::shuffle(order.begin(), order.end(), rng), next = 0;
      batch.push_back(order[next++]);
    }
    const auto s = model.run(theta, batch, &grad);
    clip_grad_norm(grad, o.clip);
    opt.step(theta, grad, warmup_cosine(step, warmup, o.steps), exec);
    if (o.step_progress) o.step_progress(step + 1, o.steps, s.error());
  }
  r.heldout_after = error(heldout);
  r.train_after = error(train);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::string distill_report_json(const std::vector<DistillGroupResult>& res, const DistillOptions& o, int64_t sequences,
                                int64_t heldout, int64_t tokens) {
  nlohmann::ordered_json groups = nlohmann::ordered_json::array();
  for (const DistillGroupResult& g : res)
    groups.push_back({{"layer", g.layer}, {"group", g.group}, {"heldout_before", g.heldout_before},
                      {"heldout_after", g.heldout_after}, {"train_before", g.train_before},
                      {"train_after", g.train_after}, {"seconds", g.seconds}});
  nlohmann::ordered_json r;
  r["method"] = "attention transfer: per recurrent group, its recurrent tensors and its Wq/Wk/Wv rows trained "
                "to reproduce the teacher's attention output (AdamW, warmup + cosine)";
  r["error"] = "||y - y_attn|| / ||y_attn|| over the group's query heads, tokens and channels (y: the group's output; "
               "windowed: its streaming attention + alpha x the scan)";
  r["steps"] = o.steps;
  r["batch"] = o.batch;
  r["lr"] = o.lr;
  r["lr_projection"] = o.lr_projection;
  r["weight_decay"] = o.weight_decay;
  r["sequences"] = sequences;
  r["heldout_sequences"] = heldout;
  r["tokens"] = tokens;
  r["groups"] = groups;
  return r.dump(2) + "\n";
}

/// Distils every recurrent group of the RecurFormer checkpoint `student` (a HF directory written by
/// convert) with the teacher's recording (record_fit_data over the same layout, with inputs), and
/// writes the trained checkpoint to `final_dir` (complete or not at all; a non-empty one is refused
/// unless `replace`), with distill_report.json beside it. Returns the per-group results.
std::vector<DistillGroupResult> distill_to_recurformer(const Checkpoint& student, const std::vector<FitGroupData>& data,
                                                       const std::vector<LayerInputs>& inputs, const DistillOptions& o,
                                                       const std::string& final_dir, bool replace, CpuExec exec) {
  const ModelConfig& c = student.config();
  RF_CHECK(c.recurformer, "distill: ", student.path().string(), " is not a RecurFormer (no recurformer object in its config)");
  RF_CHECK(student.format() == Checkpoint::Format::safetensors, "distill: the student must be the HF directory `convert` wrote, not ",
           student.path().string());
  const RecurFormerConfig& rf = *c.recurformer;
  RF_CHECK(int64_t(data.size()) == rf.layout.count_state_groups(), "distill: the recording has ", data.size(),
           " groups, the student has ", rf.layout.count_state_groups(), " recurrent and windowed groups");
  RF_CHECK(o.holdout > 0 && o.holdout < 1, "distill: holdout must be in (0, 1), got ", o.holdout);
  const detail::DistillLayout L(c.d_model, c.head_dim, c.n_q / c.n_kv, rf.recurrent.dt_rank, rf.recurrent.d_state,
                                rf.recurrent.conv_kernel, c.attention_bias);
  detail::check_output_dir(final_dir, student.path(), replace);
  RF_CHECK(!data.empty(), "distill: the student has no recurrent group to train");
  const detail::DistillAttention attention{student.rope_inv_freq(), c.rope_layout, rf.streaming.sink, rf.streaming.window};
  const int64_t n_seq = int64_t(data.front().sequences.size());
  RF_CHECK(n_seq >= 2, "distill: ", n_seq, " recorded sequence(s); at least 2 are needed (one held out)");
  const int64_t n_hold = std::max<int64_t>(1, int64_t(std::floor(double(n_seq) * o.holdout)));
  std::vector<int> train(static_cast<size_t>(n_seq - n_hold)), held(static_cast<size_t>(n_hold));
  std::iota(train.begin(), train.end(), 0);
  std::iota(held.begin(), held.end(), int(n_seq - n_hold));
  int64_t tokens = 0;
  for (const FitSequence& s : data.front().sequences) tokens += s.tokens;

  // Trained copies of the tensors that change (the layer's q/k/v weights and biases, the group's
  // recurrent tensors), in their stored dtype; std::map nodes do not move.
  std::map<std::string, std::vector<unsigned char>> replaced;
  auto write_rows = [&](const std::string& name, int64_t row0, int64_t count, int64_t width, const float* src) {
    const TensorRef& t = student.tensor(name);
    auto it = replaced.find(name);
    if (it == replaced.end()) {
      const auto* b = static_cast<const unsigned char*>(t.data);
      it = replaced.emplace(name, std::vector<unsigned char>(b, b + t.nbytes())).first;
    }
    std::vector<unsigned char>* bytes = &it->second;
    dispatch_dtype("distill: tensor dtype", t.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      T* dst = reinterpret_cast<T*>(bytes->data()) + row0 * width;
      for (int64_t i = 0; i < count * width; ++i) dst[i] = T(src[i]);
    });
  };
  std::vector<DistillGroupResult> results;
  for (size_t gi = 0; gi < data.size(); ++gi) {
    const FitGroupData& fd = data[gi];
    const auto in = std::find_if(inputs.begin(), inputs.end(), [&](const LayerInputs& x) { return x.layer == fd.layer; });
    RF_CHECK(in != inputs.end(), "distill: no recorded inputs for layer ", fd.layer);
    RF_CHECK(int64_t(fd.sequences.size()) == n_seq, "distill: group ", fd.group, " of layer ", fd.layer, " has ",
             fd.sequences.size(), " sequences, the first group ", n_seq);
    RF_CHECK(fd.layer >= 0 && fd.layer < c.n_layers && fd.group >= 0 && fd.group < c.n_kv &&
                 has_recurrent_state(rf.layout.layers[size_t(fd.layer)].groups[size_t(fd.group)]),
             "distill: the recording's layer ", fd.layer, " group ", fd.group, " is not a recurrent or windowed group of the student");
    const bool windowed = rf.layout.layers[size_t(fd.layer)].groups[size_t(fd.group)] == HeadKind::windowed;
    const detail::DistillLayout Lg = windowed ? L.windowed_group() : L;
    std::vector<float> theta = detail::distill_initial(student, Lg, fd.layer, fd.group);
    results.push_back(distill_group(Lg, *in, fd, theta, train, held, o, exec, &attention));
    const std::string p = detail::distill_prefix(fd.layer);
    const int64_t gh = L.g * L.hd, d = L.d;
    if (windowed) write_rows(detail::distill_recurrent(fd.layer, fd.group, "alpha"), 0, 1, L.g, theta.data() + Lg.alpha);
    const bool rows = o.lr_projection > 0;  // else unchanged: not rewritten
    if (rows) {
      write_rows(p + "q_proj.weight", fd.group * gh, gh, d, theta.data() + L.W);
      write_rows(p + "k_proj.weight", fd.group * L.hd, L.hd, d, theta.data() + L.W + L.k_col() * d);
      write_rows(p + "v_proj.weight", fd.group * L.hd, L.hd, d, theta.data() + L.W + L.v_col() * d);
    }
    if (L.bias && rows) {
      write_rows(p + "q_proj.bias", fd.group * gh, gh, 1, theta.data() + L.b);
      write_rows(p + "k_proj.bias", fd.group * L.hd, L.hd, 1, theta.data() + L.b + L.k_col());
      write_rows(p + "v_proj.bias", fd.group * L.hd, L.hd, 1, theta.data() + L.b + L.v_col());
    }
    auto rec = [&](const char* n, const float* src, int64_t count) {
      write_rows(detail::distill_recurrent(fd.layer, fd.group, n), 0, 1, count, src);
    };
    rec("dt_down.weight", theta.data() + L.W + L.z_col() * d, L.r * d);
    rec("dt_up.weight", theta.data() + L.dt_up, L.hd * L.r);
    rec("dt_bias", theta.data() + L.dt_bias, L.hd);
    rec("A_log", theta.data() + L.A_log, L.hd * L.N);
    rec("D", theta.data() + L.D, L.hd);
    rec("conv1d.weight", theta.data() + L.conv_w, L.hd * L.K);
    rec("conv1d.bias", theta.data() + L.conv_b, L.hd);
    if (o.progress) o.progress(int64_t(gi) + 1, int64_t(data.size()));
  }
  detail::StagingDir staging(final_dir);
  std::vector<TensorRef> tensors;
  for (const std::string& name : student.tensor_names()) {
    TensorRef t = student.tensor(name);
    const auto it = replaced.find(name);
    if (it != replaced.end()) t.data = it->second.data();
    tensors.push_back(t);
  }
  write_safetensors(staging.path() + "/model.safetensors", tensors, {{"format", "pt"}});
  namespace fs = std::filesystem;
  for (const fs::directory_entry& e : fs::directory_iterator(student.path())) {
    const std::string f = e.path().filename().string();
    if (!e.is_regular_file() || f.find(".safetensors") != std::string::npos || f == "distill_report.json") continue;
    detail::copy_file(e.path().string(), staging.path() + "/" + f);
  }
  detail::write_text(staging.path() + "/distill_report.json",
                     distill_report_json(results, o, n_seq, n_hold, tokens));
  staging.commit();
  return results;
}

}  // namespace recurformer
