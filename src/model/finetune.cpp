// src/model/finetune.cpp: the training forward and backward of a whole Llama / RecurFormer over packed
// sequences (see recurformer/model/finetune.hpp): FinetuneImpl<TW>, its weight dtype TW chosen once
// through dispatch_dtype (FinetuneModel's constructor), and FinetuneModel's members.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "recurformer/model/finetune.hpp"
#include "recurformer/core/dispatch.hpp"
#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/attention_backward.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/cross_entropy.hpp"
#include "recurformer/cpu/embedding.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/rmsnorm.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/selective_scan.hpp"
#include "recurformer/cpu/swiglu.hpp"
#include "model/detail/llama_weights.hpp"

namespace recurformer {

namespace detail {

class FinetuneImplBase {
 public:
  virtual ~FinetuneImplBase() = default;
  virtual std::vector<float>& theta() = 0;
  virtual const std::vector<FinetuneParam>& params() const = 0;
  virtual void sync() = 0;
  virtual void hidden(const FinetuneBatch& b, View<float, 2> h, CpuExec exec) = 0;
  virtual void logits(const FinetuneBatch& b, View<float, 2> out, CpuExec exec) = 0;
  virtual void set_teacher_head(const TensorRef& t) = 0;
  virtual CrossEntropyResult loss(const FinetuneBatch& b, View<const int32_t, 1> targets, View<const float, 2> teacher_h,
                                  float kl_weight, std::vector<float>* grad, float grad_scale, CpuExec exec) = 0;
};

template <class TW>
class FinetuneImpl final : public FinetuneImplBase {
 public:
  FinetuneImpl(const Checkpoint& ck, FinetuneTrain train) : ck_(ck), c_(ck.config()) {
    std::vector<FinetuneParam>& params = params_;
    const ModelConfig& c = c_;
    d_ = c.d_model, hd_ = c.head_dim, nq_ = c.n_q, nkv_ = c.n_kv, g_ = nq_ / nkv_, F_ = c.ffn, V_ = c.vocab_size;
    layout_ = c.head_layout();
    if (c.recurformer) {
      r_ = c.recurformer->recurrent.dt_rank, N_ = c.recurformer->recurrent.d_state;
      K_ = c.recurformer->recurrent.conv_kernel;
      sink_ = c.recurformer->streaming.sink, window_ = c.recurformer->streaming.window;
    }
    inv_freq_ = ck.rope_inv_freq();
    const bool all = train == FinetuneTrain::all;
    embed_ = add("model.embed_tokens.weight", V_, d_, all);
    tied_ = c.tie_word_embeddings || !ck.has("lm_head.weight");
    lm_head_ = tied_ ? embed_ : add("lm_head.weight", V_, d_, all);
    final_norm_ = add("model.norm.weight", d_, 1, all, true);
    layers_.resize(size_t(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Layer& L = layers_[size_t(l)];
      L.attn_norm = add(p + "input_layernorm.weight", d_, 1, all, true);
      L.mlp_norm = add(p + "post_attention_layernorm.weight", d_, 1, all, true);
      const std::vector<HeadKind>& kinds = layout_.layers[size_t(l)].groups;
      const bool converted = std::any_of(kinds.begin(), kinds.end(), [](HeadKind k) { return k != HeadKind::attention; });
      const bool proj = all || (train == FinetuneTrain::recurrent && converted);
      L.wq = add(p + "self_attn.q_proj.weight", nq_ * hd_, d_, all, false, proj);
      L.wk = add(p + "self_attn.k_proj.weight", nkv_ * hd_, d_, all, false, proj);
      L.wv = add(p + "self_attn.v_proj.weight", nkv_ * hd_, d_, all, false, proj);
      if (c.attention_bias) {
        L.bq = add(p + "self_attn.q_proj.bias", nq_ * hd_, 1, all, true, proj);
        L.bk = add(p + "self_attn.k_proj.bias", nkv_ * hd_, 1, all, true, proj);
        L.bv = add(p + "self_attn.v_proj.bias", nkv_ * hd_, 1, all, true, proj);
      }
      L.wo = add(p + "self_attn.o_proj.weight", d_, nq_ * hd_, all);
      L.gate = add(p + "mlp.gate_proj.weight", F_, d_, all);
      L.up = add(p + "mlp.up_proj.weight", F_, d_, all);
      L.down = add(p + "mlp.down_proj.weight", d_, F_, all);
      for (int j = 0; j < nkv_; ++j) {
        const HeadKind k = layout_.layers[size_t(l)].groups[size_t(j)];
        L.kind.push_back(k);
        if (k == HeadKind::attention) continue;
        const bool tr = train != FinetuneTrain::none;
        if (tr) {  // the converted group's own rows of the projections
          for (int t : {L.wq, L.bq}) if (t >= 0 && !all) range(t, j * g_ * hd_, g_ * hd_);
          for (int t : {L.wk, L.bk, L.wv, L.bv}) if (t >= 0 && !all) range(t, j * hd_, hd_);
        }
        if (!has_recurrent_state(k)) continue;
        const std::string q = p + "self_attn.recurrent." + std::to_string(j) + ".";
        Rec R;
        R.j = j;
        R.dt_down = add(q + "dt_down.weight", r_, d_, tr, true);
        R.dt_up = add(q + "dt_up.weight", hd_, r_, tr, true);
        R.dt_bias = add(q + "dt_bias", hd_, 1, tr, true);
        R.A_log = add(q + "A_log", hd_, N_, tr, true);
        R.D = add(q + "D", hd_, 1, tr, true);
        R.conv_w = add(q + "conv1d.weight", hd_, K_, tr, true);
        R.conv_b = add(q + "conv1d.bias", hd_, 1, tr, true);
        if (k == HeadKind::windowed) R.alpha = add(q + "alpha", g_, 1, tr, true);
        L.rec.push_back(R);
      }
      if (!L.rec.empty()) RF_CHECK(N_ == hd_, "finetune: d_state (", N_, ") must equal head_dim (", hd_, ")");
    }
    // the flat layout, in tensor order
    int64_t off = 0;
    for (Tensor& t : tensors_)
      for (const auto& rg : t.ranges) {
        FinetuneParam fp;
        fp.name = t.name, fp.row0 = rg.first, fp.rows = rg.second, fp.cols = t.cols, fp.offset = off;
        fp.matrix = !t.vector;
        t.param_index.push_back(int(params.size()));
        params.push_back(fp);
        off += rg.second * t.cols;
      }
    theta_.assign(size_t(off), 0.f);
    for (const Tensor& t : tensors_)
      for (size_t i = 0; i < t.ranges.size(); ++i) {
        const FinetuneParam& fp = params[size_t(t.param_index[i])];
        std::copy(t.f.begin() + fp.row0 * t.cols, t.f.begin() + (fp.row0 + fp.rows) * t.cols, theta_.begin() + fp.offset);
      }
    sync();
  }

  std::vector<float>& theta() override { return theta_; }
  const std::vector<FinetuneParam>& params() const override { return params_; }

  void sync() override {
    for (Tensor& t : tensors_)
      for (size_t i = 0; i < t.ranges.size(); ++i) {
        const FinetuneParam& fp = params_[size_t(t.param_index[i])];
        std::copy(theta_.begin() + fp.offset, theta_.begin() + fp.offset + fp.rows * t.cols, t.f.begin() + fp.row0 * t.cols);
      }
    for (Layer& L : layers_)
      for (Rec& R : L.rec) {  // A = -exp(A_log), as the model binds it
        R.A.resize(size_t(hd_ * N_));
        const float* al = tensors_[size_t(R.A_log)].f.data();
        for (int64_t i = 0; i < hd_ * N_; ++i) R.A[size_t(i)] = -std::exp(al[i]);
      }
  }

  void set_teacher_head(const TensorRef& t) override {
    RF_CHECK(t.shape.size() == 2 && t.shape[0] == V_, "finetune: the teacher's lm_head has shape ", t.shape_str(),
             ", expected [", V_, ", d] (the student's vocabulary)");
    teacher_dt_ = t.shape[1];
    const Tensor& lm = tensors_[size_t(lm_head_)];
    if (lm.f32) {
      teacher_f_.resize(size_t(t.numel()));
      convert_values(t.data, t.dtype, t.numel(), teacher_f_.data());
    } else {
      teacher_tw_.resize(size_t(t.numel()));
      convert_values(t.data, t.dtype, t.numel(), teacher_tw_.data());
    }
  }

  void hidden(const FinetuneBatch& b, View<float, 2> h, CpuExec exec) override {
    forward(b, exec);
    detail::check_shape("finetune hidden", "h", h, {T_, d_});
    rmsnorm(RmsNormParams<float, float>{xs(c_.n_layers), vec(final_norm_), h, c_.rms_eps}, exec);
  }

  void logits(const FinetuneBatch& b, View<float, 2> out, CpuExec exec) override {
    forward(b, exec);
    detail::check_shape("finetune logits", "out", out, {T_, V_});
    ensure(hf_, T_ * d_);
    auto hf = make_view(hf_.data(), {T_, d_});
    rmsnorm(RmsNormParams<float, float>{xs(c_.n_layers), vec(final_norm_), hf, c_.rms_eps}, exec);
    lin(hf, lm_head_, out, exec);
  }

  CrossEntropyResult loss(const FinetuneBatch& b, View<const int32_t, 1> targets, View<const float, 2> teacher_h,
                          float kl_weight, std::vector<float>* grad, float grad_scale, CpuExec exec) override {
    if (teacher_h.present())
      RF_CHECK(!teacher_f_.empty() || !teacher_tw_.empty(), "finetune: teacher hidden states without the teacher's lm_head");
    forward(b, exec);
    ensure(hf_, T_ * d_);
    auto hf = make_view(hf_.data(), {T_, d_});
    rmsnorm(RmsNormParams<float, float>{xs(c_.n_layers), vec(final_norm_), hf, c_.rms_eps}, exec);
    const Tensor& lm = tensors_[size_t(lm_head_)];
    if (grad)
      RF_CHECK(int64_t(grad->size()) == int64_t(theta_.size()), "finetune: gradient of ", grad->size(), " values, ",
               theta_.size(), " parameters");
    CrossEntropyResult res;
    if (lm.f32) {
      View<const float, 2> tw;
      if (teacher_h.present()) tw = make_view<const float>(teacher_f_.data(), {V_, teacher_dt_});
      res = ce<float>(make_view<const float>(lm.f.data(), {V_, d_}), tw, targets, teacher_h, kl_weight, grad, grad_scale, exec);
    } else {
      View<const TW, 2> tw;
      if (teacher_h.present()) tw = make_view<const TW>(teacher_tw_.data(), {V_, teacher_dt_});
      res = ce<TW>(stored(lm), tw, targets, teacher_h, kl_weight, grad, grad_scale, exec);
    }
    if (grad) backward(b, *grad, exec);
    return res;
  }

 private:
  /// The cross-entropy (and its backward into dh_ and the lm_head's gradient) on hf_.
  template <class W>
  CrossEntropyResult ce(View<const W, 2> w, View<const W, 2> tw, View<const int32_t, 1> targets,
                        View<const float, 2> teacher_h, float kl_weight, std::vector<float>* grad, float grad_scale,
                        CpuExec exec) {
    CrossEntropyBackwardParams<W> p;
    p.h = make_view<const float>(hf_.data(), {T_, d_});
    p.weight = w;
    p.targets = targets;
    if (teacher_h.present()) p.teacher_h = teacher_h, p.teacher_weight = tw;
    p.kl_weight = kl_weight;
    CrossEntropyResult res;
    const CrossEntropyParams<W>& fp = p;
    if (!grad) {
      with_ws(cross_entropy_workspace_bytes(fp, exec), [&](void* ws, size_t n) { res = cross_entropy(fp, exec, ws, n); });
      return res;
    }
    ensure(dh_, T_ * d_);
    p.dh = make_view(dh_.data(), {T_, d_});
    const Tensor& lm = tensors_[size_t(lm_head_)];
    if (!lm.ranges.empty()) p.dweight = make_view(grad->data() + param(lm, 0).offset, {V_, d_});
    p.accumulate = true;
    p.grad_scale = grad_scale;
    with_ws(cross_entropy_workspace_bytes(fp, exec), [&](void* ws, size_t n) { res = cross_entropy_backward(p, exec, ws, n); });
    return res;
  }
  struct Tensor {
    std::string name;
    int64_t rows = 0, cols = 1;
    bool vector = false;
    const TensorRef* ref = nullptr;
    std::vector<TW> tw;    // a stored matrix converted to TW (when stored in another dtype)
    bool f32 = false;      // used in fp32 (f) rather than as stored
    std::vector<float> f;  // fp32 values (vectors always; matrices when any row trains)
    std::vector<std::pair<int64_t, int64_t>> ranges;  // trained (row0, rows)
    std::vector<int> param_index;
  };
  struct Rec {
    int j = 0;
    int dt_down = -1, dt_up = -1, dt_bias = -1, A_log = -1, D = -1, conv_w = -1, conv_b = -1;
    int alpha = -1;        // windowed groups: [g] weight of each query head's recurrent output
    std::vector<float> A;  // [hd, N] = -exp(A_log)
    bool windowed() const { return alpha >= 0; }
  };
  struct Layer {
    int attn_norm = -1, mlp_norm = -1, wq = -1, wk = -1, wv = -1, bq = -1, bk = -1, bv = -1, wo = -1;
    int gate = -1, up = -1, down = -1;
    std::vector<HeadKind> kind;
    std::vector<Rec> rec;
  };

  /// Registers a tensor: `train` = all its rows train; `fp32` = held in fp32 (vectors, recurrent
  /// tensors); `fp32_only` = in fp32 without training (some rows will be added by range()).
  int add(const std::string& name, int64_t rows, int64_t cols, bool train, bool fp32 = false, bool fp32_only = false) {
    RF_CHECK(ck_.has(name), "finetune: tensor ", name, " is missing from the checkpoint");
    const TensorRef& t = ck_.tensor(name);
    const bool vector = cols == 1 && t.shape.size() == 1;
    const std::vector<int64_t> want = vector ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, cols};
    RF_CHECK(t.shape == want, "finetune: tensor ", name, " has shape ", t.shape_str(), ", expected ",
             vector ? "[" + std::to_string(rows) + "]" : "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
    Tensor x;
    x.name = name, x.rows = rows, x.cols = cols, x.vector = vector, x.ref = &t;
    x.f32 = fp32 || fp32_only || train;
    if (x.f32) {
      x.f.resize(size_t(rows * cols));
      convert_values(t.data, t.dtype, rows * cols, x.f.data());
    } else if (t.dtype != dtype_of<TW>()) {
      x.tw.resize(size_t(rows * cols));
      convert_values(t.data, t.dtype, rows * cols, x.tw.data());
    }
    if (train) x.ranges.push_back({0, rows});
    tensors_.push_back(std::move(x));
    return int(tensors_.size()) - 1;
  }
  void range(int t, int64_t row0, int64_t rows) { tensors_[size_t(t)].ranges.push_back({row0, rows}); }
  const FinetuneParam& param(const Tensor& t, size_t i) const { return params_[size_t(t.param_index[i])]; }

  View<const TW, 2> stored(const Tensor& t) const {
    const TW* p = t.tw.empty() ? static_cast<const TW*>(t.ref->data) : t.tw.data();
    return make_view(p, {t.rows, t.cols});
  }
  View<const float, 1> vec(int i) const {
    const Tensor& t = tensors_[size_t(i)];
    return make_view<const float>(t.f.data(), {t.rows * t.cols});
  }
  View<const float, 2> mat_f(int i) const {
    const Tensor& t = tensors_[size_t(i)];
    return make_view<const float>(t.f.data(), {t.rows, t.cols});
  }

  template <class V>
  static void ensure(std::vector<V>& v, int64_t n) {
    if (int64_t(v.size()) < n) v.resize(size_t(n));
  }
  template <class Fn>
  void with_ws(size_t need, Fn&& f) {
    if (ws_.size() < need) ws_.resize(need);
    f(ws_.data(), ws_.size());
  }

  /// y = x W^T (+ b) with tensor w (bias tensor b, or -1) in its fp32 or stored form.
  void lin(View<const float, 2> x, int w, View<float, 2> y, CpuExec exec, int b = -1) {
    const Tensor& t = tensors_[size_t(w)];
    if (t.f32) {
      LinearParams<float, float> p{x, mat_f(w), {}, y};
      if (b >= 0) p.bias = vec(b);
      with_ws(linear_workspace_bytes(p, exec), [&](void* ws, size_t n) { linear(p, exec, ws, n); });
    } else {
      LinearParams<float, TW> p{x, stored(t), {}, y};
      std::vector<TW>& bt = bias_tw_;
      if (b >= 0) {  // a frozen bias used as stored (LlamaModel converts it to TW)
        const Tensor& tb = tensors_[size_t(b)];
        bt.resize(size_t(tb.rows));
        convert_values(tb.f.data(), DType::f32, tb.rows, bt.data());
        p.bias = make_view<const TW>(bt.data(), {tb.rows});
      }
      with_ws(linear_workspace_bytes(p, exec), [&](void* ws, size_t n) { linear(p, exec, ws, n); });
    }
  }

  /// The backward of lin: dx (+)= dy W (when dx is given), and for every trained row range of w
  /// (and of b) dW += dy[:, rows]^T x, db += column sums, into grad.
  void lin_backward(View<const float, 2> x, int w, View<const float, 2> dy, View<float, 2> dx, bool accumulate_dx,
                    std::vector<float>& grad, CpuExec exec, int b = -1) {
    const Tensor& t = tensors_[size_t(w)];
    if (dx.present()) {
      if (t.f32) {
        LinearBackwardParams<float, float> p;
        p.x = x, p.weight = mat_f(w), p.dy = dy, p.dx = dx, p.accumulate = accumulate_dx;
        with_ws(linear_backward_workspace_bytes(p, exec), [&](void* ws, size_t n) { linear_backward(p, exec, ws, n); });
      } else {
        LinearBackwardParams<float, TW> p;
        p.x = x, p.weight = stored(t), p.dy = dy, p.dx = dx, p.accumulate = accumulate_dx;
        with_ws(linear_backward_workspace_bytes(p, exec), [&](void* ws, size_t n) { linear_backward(p, exec, ws, n); });
      }
    }
    for (size_t i = 0; i < t.ranges.size(); ++i) {
      const FinetuneParam& fp = param(t, i);
      LinearBackwardParams<float, float> p;
      p.x = x;
      p.weight = make_view<const float>(t.f.data() + fp.row0 * t.cols, {fp.rows, t.cols});
      p.dy = make_strided_view(dy.data + fp.row0, {dy.shape[0], fp.rows}, {dy.stride[0], int64_t(1)});
      p.dweight = make_view(grad.data() + fp.offset, {fp.rows, t.cols});
      p.accumulate = true;
      if (b >= 0) {
        const Tensor& tb = tensors_[size_t(b)];
        RF_CHECK(tb.ranges.size() == t.ranges.size(), "finetune: internal: bias and weight train different rows");
        p.dbias = make_view(grad.data() + param(tb, i).offset, {fp.rows});
      }
      with_ws(linear_backward_workspace_bytes(p, exec), [&](void* ws, size_t n) { linear_backward(p, exec, ws, n); });
    }
  }

  /// dst[range] += src[range rows] for every trained range of vector/small tensor i (src: the full
  /// tensor's gradient).
  void add_grad(int i, const float* src, std::vector<float>& grad) const {
    const Tensor& t = tensors_[size_t(i)];
    for (size_t k = 0; k < t.ranges.size(); ++k) {
      const FinetuneParam& fp = param(t, k);
      float* d = grad.data() + fp.offset;
      const float* s = src + fp.row0 * t.cols;
      for (int64_t e = 0; e < fp.rows * t.cols; ++e) d[e] += s[e];
    }
  }
  float* grad_of(int i, std::vector<float>& grad) const {  // a tensor trained whole, or null
    const Tensor& t = tensors_[size_t(i)];
    return t.ranges.empty() ? nullptr : grad.data() + param(t, 0).offset;
  }

  View<float, 2> xs(int l) { return make_view(xs_.data() + int64_t(l) * T_ * d_, {T_, d_}); }

  // ---- forward --------------------------------------------------------------------------------

  void prepare(const FinetuneBatch& b) {
    const char* op = "finetune forward";
    detail::check_shape(op, "tokens", b.tokens, {-1});
    detail::check_shape(op, "cu_seqlens", b.cu_seqlens, {-1});
    T_ = b.tokens.shape[0];
    S_ = b.cu_seqlens.shape[0] - 1;
    RF_CHECK(S_ >= 1 && T_ >= 1, op, ": empty batch");
    RF_CHECK(b.cu_seqlens(0) == 0 && b.cu_seqlens(S_) == T_, op, ": cu_seqlens must start at 0 and end at ", T_);
    cu_.resize(size_t(S_ + 1));
    pos_.resize(size_t(T_));
    kv_lens_.resize(size_t(S_));
    cap_ = 0;
    for (int64_t s = 0; s < S_; ++s) {
      const int32_t a = b.cu_seqlens(s), e = b.cu_seqlens(s + 1);
      RF_CHECK(e > a, op, ": sequence ", s, " is empty");
      cu_[size_t(s)] = a, cu_[size_t(s + 1)] = e;
      kv_lens_[size_t(s)] = e - a;
      cap_ = std::max<int64_t>(cap_, e - a);
      for (int32_t t = a; t < e; ++t) pos_[size_t(t)] = t - a;
    }
    for (int64_t t = 0; t < T_; ++t)
      RF_CHECK(b.tokens(t) >= 0 && b.tokens(t) < V_, op, ": token id ", b.tokens(t), " at ", t,
               " is outside the vocabulary [0, ", V_, ")");
    const int64_t Q = nq_ * hd_, KV = nkv_ * hd_;
    ensure(xs_, int64_t(c_.n_layers + 1) * T_ * d_);
    ensure(xn_, T_ * d_), ensure(qf_, T_ * Q), ensure(kf_, T_ * KV), ensure(vf_, T_ * KV), ensure(oc_, T_ * Q);
    ensure(tmp_, T_ * d_), ensure(xmid_, T_ * d_), ensure(xn2_, T_ * d_);
    ensure(gate_, T_ * F_), ensure(up_, T_ * F_), ensure(h_, T_ * F_);
    ensure(Kb_, nkv_ * S_ * cap_ * hd_), ensure(Vb_, nkv_ * S_ * cap_ * hd_), ensure(lse_, nkv_ * T_ * g_);
    ensure(state_, S_ * hd_ * std::max<int64_t>(N_, 1));
    const int64_t nrec = int64_t(layout_.count_state_groups()) > 0 ? nkv_ : 0;
    const int64_t nwin = int64_t(layout_.count(HeadKind::windowed)) > 0 ? nkv_ : 0;
    ensure(u_, nrec * T_ * hd_), ensure(dtl_, nrec * T_ * r_), ensure(delta_, nrec * T_ * hd_), ensure(C_, nrec * T_ * g_ * hd_);
    ensure(Bw_, nwin * T_ * hd_), ensure(yw_, nwin * T_ * g_ * hd_), ensure(aw_, nwin * T_ * g_ * hd_);
  }
  View<const int32_t, 1> cu() const { return make_view<const int32_t>(cu_.data(), {S_ + 1}); }
  View<const int32_t, 1> pos() const { return make_view<const int32_t>(pos_.data(), {T_}); }

  // Views of group j's columns in the [T, heads * hd] projections.
  View<float, 3> qcols(float* base, int j) const {
    return make_strided_view(base + j * g_ * hd_, {T_, g_, hd_}, {nq_ * hd_, hd_, int64_t(1)});
  }
  View<float, 3> kcols(float* base, int j) const {
    return make_strided_view(base + j * hd_, {T_, int64_t(1), hd_}, {nkv_ * hd_, hd_, int64_t(1)});
  }
  View<float, 2> kcols2(float* base, int j) const {
    return make_strided_view(base + j * hd_, {T_, hd_}, {nkv_ * hd_, int64_t(1)});
  }

  // kind: streaming and windowed groups mask with sink/window; a windowed group's attention output
  // goes to its own buffer (aw_), since the backward needs it unmixed (D_i = rowsum(dO o O)).
  AttentionParams<float> attn_params(int j, HeadKind kind) {
    const bool streaming = has_stream_ring(kind);
    AttentionParams<float> ap;
    const int64_t kvn = S_ * cap_ * hd_;
    ap.q = qcols(qf_.data(), j);
    ap.k = make_view<const float>(Kb_.data() + j * kvn, {S_, int64_t(1), cap_, hd_});
    ap.v = make_view<const float>(Vb_.data() + j * kvn, {S_, int64_t(1), cap_, hd_});
    ap.out = kind == HeadKind::windowed ? make_view(aw_.data() + j * T_ * g_ * hd_, {T_, g_, hd_}) : qcols(oc_.data(), j);
    ap.cu_seqlens = cu();
    ap.kv_lens = make_view<const int32_t>(kv_lens_.data(), {S_});
    ap.q_positions = pos();
    if (streaming) ap.sink = sink_, ap.window = window_;
    ap.lse = make_view(lse_.data() + j * T_ * g_, {T_, g_});
    return ap;
  }

  SelectiveScanParams<float> scan_params(const Rec& R) {
    const int j = R.j;
    SelectiveScanParams<float> sp;
    sp.u = make_view<const float>(u_.data() + j * T_ * hd_, {T_, hd_});
    sp.delta = make_view<const float>(delta_.data() + j * T_ * hd_, {T_, hd_});
    sp.A = make_view<const float>(R.A.data(), {hd_, N_});
    // a windowed group's k columns are rotated for its attention, so its scan reads a copy taken before
    sp.B = R.windowed() ? make_view<const float>(Bw_.data() + j * T_ * hd_, {T_, int64_t(1), N_})
                        : make_strided_view<const float>(kf_.data() + j * hd_, {T_, int64_t(1), N_}, {nkv_ * hd_, N_, int64_t(1)});
    sp.C = make_view<const float>(C_.data() + j * T_ * g_ * hd_, {T_, int64_t(1), g_, N_});
    sp.D = vec(R.D);
    sp.delta_bias = vec(R.dt_bias);
    sp.y = R.windowed() ? make_view(yw_.data() + j * T_ * g_ * hd_, {T_, g_, hd_}) : qcols(oc_.data(), j);
    sp.state = make_view(state_.data(), {S_, hd_, N_});
    sp.cu_seqlens = cu();
    sp.delta_activation = DeltaActivation::softplus;
    sp.use_initial_state = false;
    return sp;
  }
  CausalConv1dParams<float> conv_params(const Rec& R) {
    CausalConv1dParams<float> cp;
    cp.x = kcols2(vf_.data(), R.j);
    cp.weight = mat_f(R.conv_w);
    cp.bias = vec(R.conv_b);
    cp.y = make_view(u_.data() + R.j * T_ * hd_, {T_, hd_});
    cp.cu_seqlens = cu();
    cp.use_initial_state = false;
    return cp;
  }

  void forward(const FinetuneBatch& b, CpuExec exec) {
    prepare(b);
    const Tensor& e = tensors_[size_t(embed_)];
    if (e.f32) embedding(EmbeddingParams<float, float>{mat_f(embed_), b.tokens, xs(0)}, exec);
    else embedding(EmbeddingParams<float, TW>{stored(e), b.tokens, xs(0)}, exec);
    for (int l = 0; l < c_.n_layers; ++l) {
      layer_forward(l, exec);
      std::copy(xmid_.begin(), xmid_.begin() + T_ * d_, xs(l + 1).data);
      add_inplace(xs(l + 1), make_view<const float>(tmp_.data(), {T_, d_}), exec);
    }
  }

  /// Layer l from xs(l): leaves xn (attention input), q/k/v (RoPE'd for attention groups), oc, the
  /// recurrent scratch, xmid (= x + attention), xn2, gate, up, h and the MLP output in tmp.
  void layer_forward(int l, CpuExec exec) {
    Layer& L = layers_[size_t(l)];
    auto x = xs(l);
    auto xn = make_view(xn_.data(), {T_, d_});
    rmsnorm(RmsNormParams<float, float>{x, vec(L.attn_norm), xn, c_.rms_eps}, exec);
    lin(xn, L.wq, make_view(qf_.data(), {T_, nq_ * hd_}), exec, L.bq);
    lin(xn, L.wk, make_view(kf_.data(), {T_, nkv_ * hd_}), exec, L.bk);
    lin(xn, L.wv, make_view(vf_.data(), {T_, nkv_ * hd_}), exec, L.bv);
    // recurrent groups first: they read q and k before RoPE (their columns are never rotated anyway)
    const float inv = float(1.0 / std::sqrt(double(hd_)));
    for (Rec& R : L.rec) {
      const int j = R.j;
      causal_conv1d(conv_params(R), exec);
      auto dtl = make_view(dtl_.data() + j * T_ * r_, {T_, r_});
      lin(xn, R.dt_down, dtl, exec);
      lin(dtl, R.dt_up, make_view(delta_.data() + j * T_ * hd_, {T_, hd_}), exec);
      float* C = C_.data() + j * T_ * g_ * hd_;
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t i = 0; i < g_ * hd_; ++i) C[t * g_ * hd_ + i] = qf_[size_t(t * nq_ * hd_ + j * g_ * hd_ + i)] * inv;
      if (R.windowed())
        for (int64_t t = 0; t < T_; ++t)
          std::memcpy(Bw_.data() + (j * T_ + t) * hd_, kf_.data() + t * nkv_ * hd_ + j * hd_, size_t(hd_) * 4);
      selective_scan(scan_params(R), exec);
    }
    for (int j = 0; j < nkv_; ++j) {
      if (L.kind[size_t(j)] == HeadKind::recurrent) continue;
      rope(RopeParams<float>{qcols(qf_.data(), j), pos(), inv_freq(), c_.rope_layout}, exec);
      rope(RopeParams<float>{kcols(kf_.data(), j), pos(), inv_freq(), c_.rope_layout}, exec);
      // keys and values into the group's slot-major buffers [S, 1, cap, hd]
      float* K = Kb_.data() + j * S_ * cap_ * hd_;
      float* Vv = Vb_.data() + j * S_ * cap_ * hd_;
      for (int64_t s = 0; s < S_; ++s)
        for (int32_t t = cu_[size_t(s)]; t < cu_[size_t(s + 1)]; ++t) {
          const int64_t e = (s * cap_ + (t - cu_[size_t(s)])) * hd_;
          std::memcpy(K + e, kf_.data() + t * nkv_ * hd_ + j * hd_, size_t(hd_) * 4);
          std::memcpy(Vv + e, vf_.data() + t * nkv_ * hd_ + j * hd_, size_t(hd_) * 4);
        }
      const AttentionParams<float> ap = attn_params(j, L.kind[size_t(j)]);
      with_ws(attention_workspace_bytes(ap, exec), [&](void* ws, size_t n) { attention(ap, exec, ws, n); });
    }
    for (const Rec& R : L.rec) {  // windowed: oc_h = attention_h + alpha_h y_h
      if (!R.windowed()) continue;
      const float* alpha = tensors_[size_t(R.alpha)].f.data();
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t r = 0; r < g_; ++r) {
          float* o = oc_.data() + t * nq_ * hd_ + (R.j * g_ + r) * hd_;
          const int64_t at = ((R.j * T_ + t) * g_ + r) * hd_;
          for (int64_t c = 0; c < hd_; ++c) o[c] = aw_[size_t(at + c)] + alpha[r] * yw_[size_t(at + c)];
        }
    }
    auto xmid = make_view(xmid_.data(), {T_, d_});
    lin(make_view<const float>(oc_.data(), {T_, nq_ * hd_}), L.wo, xmid, exec);
    add_inplace(xmid, x, exec);
    auto xn2 = make_view(xn2_.data(), {T_, d_});
    rmsnorm(RmsNormParams<float, float>{xmid, vec(L.mlp_norm), xn2, c_.rms_eps}, exec);
    lin(xn2, L.gate, make_view(gate_.data(), {T_, F_}), exec);
    lin(xn2, L.up, make_view(up_.data(), {T_, F_}), exec);
    swiglu(SwigluParams<float>{make_view<const float>(gate_.data(), {T_, F_}), make_view<const float>(up_.data(), {T_, F_}),
                               make_view(h_.data(), {T_, F_})},
           exec);
    lin(make_view<const float>(h_.data(), {T_, F_}), L.down, make_view(tmp_.data(), {T_, d_}), exec);
  }
  View<const float, 1> inv_freq() const { return make_view<const float>(inv_freq_.data(), {int64_t(inv_freq_.size())}); }

  // ---- backward -------------------------------------------------------------------------------

  /// From dh_ (dL/dh_final, left by the cross-entropy backward) down to the embedding.
  void backward(const FinetuneBatch& b, std::vector<float>& grad, CpuExec exec) {
    ensure(dx_, T_ * d_), ensure(dtmp_, T_ * d_), ensure(dxn_, T_ * d_), ensure(dh2_, T_ * F_), ensure(dgate_, T_ * F_);
    ensure(doc_, T_ * nq_ * hd_), ensure(dqf_, T_ * nq_ * hd_), ensure(dkf_, T_ * nkv_ * hd_), ensure(dvf_, T_ * nkv_ * hd_);
    ensure(dK_, S_ * cap_ * hd_), ensure(dV_, S_ * cap_ * hd_), ensure(dnorm_, d_);
    auto dx = make_view(dx_.data(), {T_, d_});
    rms_backward(xs(c_.n_layers), final_norm_, make_view<const float>(dh_.data(), {T_, d_}), dx, grad, exec);
    for (int l = c_.n_layers - 1; l >= 0; --l) {
      layer_forward(l, exec);  // recompute
      layer_backward(l, grad, exec);
    }
    const Tensor& e = tensors_[size_t(embed_)];
    if (!e.ranges.empty())
      embedding_backward(EmbeddingBackwardParams{b.tokens, dx, make_view(grad.data() + param(e, 0).offset, {V_, d_}), true},
                         exec);
  }

  /// dst = dL/dx of y = rmsnorm(x) * w, from dy; dw into grad when w trains.
  void rms_backward(View<const float, 2> x, int w, View<const float, 2> dy, View<float, 2> dst, std::vector<float>& grad,
                    CpuExec exec) {
    RmsNormBackwardParams<float, float> p;
    p.x = x, p.weight = vec(w), p.dy = dy, p.dx = dst, p.eps = c_.rms_eps;
    if (float* gw = grad_of(w, grad)) p.dweight = make_view(gw, {d_}), p.accumulate = true;
    with_ws(rmsnorm_backward_workspace_bytes(p), [&](void* ws, size_t n) { rmsnorm_backward(p, exec, ws, n); });
  }

  /// dx_ holds dL/d(layer output); leaves dL/d(layer input) there.
  void layer_backward(int l, std::vector<float>& grad, CpuExec exec) {
    Layer& L = layers_[size_t(l)];
    auto dx = make_view(dx_.data(), {T_, d_});
    auto dtmp = make_view(dtmp_.data(), {T_, d_});
    const auto cf = [](std::vector<float>& v, int64_t r, int64_t c) { return make_view<const float>(v.data(), {r, c}); };
    // MLP: out = down(h), h = swiglu(gate, up), gate/up = xn2 W^T, xn2 = rmsnorm(xmid)
    auto dh = make_view(dh2_.data(), {T_, F_});
    lin_backward(cf(h_, T_, F_), L.down, dx, dh, false, grad, exec);
    auto dgate = make_view(dgate_.data(), {T_, F_});
    swiglu_backward(SwigluBackwardParams<float>{cf(gate_, T_, F_), cf(up_, T_, F_), dh, dgate, dh}, exec);  // dup in dh
    auto dxn = make_view(dxn_.data(), {T_, d_});
    lin_backward(cf(xn2_, T_, d_), L.gate, dgate, dxn, false, grad, exec);
    lin_backward(cf(xn2_, T_, d_), L.up, dh, dxn, true, grad, exec);
    rms_backward(cf(xmid_, T_, d_), L.mlp_norm, dxn, dtmp, grad, exec);
    add_inplace(dx, dtmp, exec);  // dx = dL/dxmid
    // attention block: xmid = x + Wo oc
    const int64_t Q = nq_ * hd_, KV = nkv_ * hd_;
    auto doc = make_view(doc_.data(), {T_, Q});
    lin_backward(cf(oc_, T_, Q), L.wo, dx, doc, false, grad, exec);
    const float inv = float(1.0 / std::sqrt(double(hd_)));
    for (int j = 0; j < nkv_; ++j) {
      if (L.kind[size_t(j)] == HeadKind::recurrent) continue;
      AttentionBackwardParams<float> ab;
      ab.fwd = attn_params(j, L.kind[size_t(j)]);
      ab.dout = qcols(doc_.data(), j);
      ab.dq = qcols(dqf_.data(), j);
      ab.dk = make_view(dK_.data(), {S_, int64_t(1), cap_, hd_});
      ab.dv = make_view(dV_.data(), {S_, int64_t(1), cap_, hd_});
      with_ws(attention_backward_workspace_bytes(ab, exec), [&](void* ws, size_t n) { attention_backward(ab, exec, ws, n); });
      for (int64_t s = 0; s < S_; ++s)
        for (int32_t t = cu_[size_t(s)]; t < cu_[size_t(s + 1)]; ++t) {
          const int64_t e = (s * cap_ + (t - cu_[size_t(s)])) * hd_;
          std::memcpy(dkf_.data() + t * KV + j * hd_, dK_.data() + e, size_t(hd_) * 4);
          std::memcpy(dvf_.data() + t * KV + j * hd_, dV_.data() + e, size_t(hd_) * 4);
        }
      rope_backward(RopeBackwardParams{qcols(dqf_.data(), j), pos(), inv_freq(), c_.rope_layout}, exec);
      rope_backward(RopeBackwardParams{kcols(dkf_.data(), j), pos(), inv_freq(), c_.rope_layout}, exec);
    }
    ensure(dA_, hd_ * N_), ensure(dD_, hd_), ensure(ddb_, hd_), ensure(dcw_, hd_ * K_), ensure(dcb_, hd_);
    ensure(du_, T_ * hd_), ensure(dC_, T_ * g_ * hd_), ensure(ddtl_, nkv_ * T_ * r_), ensure(ddelta_, nkv_ * T_ * hd_);
    for (Rec& R : L.rec) {
      const int j = R.j;
      SelectiveScanBackwardParams<float> sb;
      sb.fwd = scan_params(R);
      sb.dy = qcols(doc_.data(), j);
      // A windowed group's attention backward above has written its dq, dk, dv: the scan's and the
      // conv's gradients go to scratch and are added. Its scan output is weighted: dy_h = alpha_h dout_h.
      if (R.windowed()) {
        ensure(dyw_, T_ * g_ * hd_), ensure(dBw_, T_ * hd_), ensure(dvw_, T_ * hd_), ensure(dalpha_, g_);
        const float* alpha = tensors_[size_t(R.alpha)].f.data();
        std::fill(dalpha_.begin(), dalpha_.end(), 0.f);
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t r = 0; r < g_; ++r) {
            const float* dout = doc_.data() + t * Q + (j * g_ + r) * hd_;
            const float* y = yw_.data() + ((j * T_ + t) * g_ + r) * hd_;
            float* dy = dyw_.data() + (t * g_ + r) * hd_;
            double dot = 0;
            for (int64_t c = 0; c < hd_; ++c) dy[c] = alpha[r] * dout[c], dot += double(dout[c]) * y[c];
            dalpha_[size_t(r)] += float(dot);
          }
        add_grad(R.alpha, dalpha_.data(), grad);
        sb.dy = make_view<const float>(dyw_.data(), {T_, g_, hd_});
      }
      sb.du = make_view(du_.data(), {T_, hd_});
      float* ddelta = ddelta_.data() + j * T_ * hd_;
      sb.ddelta = make_view(ddelta, {T_, hd_});
      sb.dA = make_view(dA_.data(), {hd_, N_});
      sb.dB = R.windowed() ? make_view(dBw_.data(), {T_, int64_t(1), N_})
                           : make_strided_view(dkf_.data() + j * hd_, {T_, int64_t(1), N_}, {KV, N_, int64_t(1)});
      sb.dC = make_view(dC_.data(), {T_, int64_t(1), g_, N_});
      sb.dD = make_view(dD_.data(), {hd_});
      sb.ddelta_bias = make_view(ddb_.data(), {hd_});
      with_ws(selective_scan_backward_workspace_bytes(sb, exec),
              [&](void* ws, size_t n) { selective_scan_backward(sb, exec, ws, n); });
      for (int64_t i = 0; i < hd_ * N_; ++i) dA_[size_t(i)] *= R.A[size_t(i)];  // dA/dA_log = A
      add_grad(R.A_log, dA_.data(), grad);
      add_grad(R.D, dD_.data(), grad);
      add_grad(R.dt_bias, ddb_.data(), grad);
      const bool add = R.windowed();
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t i = 0; i < g_ * hd_; ++i) {
          float& dq = dqf_[size_t(t * Q + j * g_ * hd_ + i)];
          dq = (add ? dq : 0.f) + dC_[size_t(t * g_ * hd_ + i)] * inv;
        }
      CausalConv1dBackwardParams<float> cb;
      cb.fwd = conv_params(R);
      cb.dy = make_view<const float>(du_.data(), {T_, hd_});
      cb.dx = add ? make_view(dvw_.data(), {T_, hd_}) : kcols2(dvf_.data(), j);
      cb.dweight = make_view(dcw_.data(), {hd_, K_});
      cb.dbias = make_view(dcb_.data(), {hd_});
      causal_conv1d_backward(cb, exec);
      if (add)
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t c = 0; c < hd_; ++c) {
            dkf_[size_t(t * KV + j * hd_ + c)] += dBw_[size_t(t * hd_ + c)];
            dvf_[size_t(t * KV + j * hd_ + c)] += dvw_[size_t(t * hd_ + c)];
          }
      add_grad(R.conv_w, dcw_.data(), grad);
      add_grad(R.conv_b, dcb_.data(), grad);
      // Δ = dt_up (dt_down xn): d(dt_low) kept for after the q/k/v backward (it adds into dxn)
      lin_backward(make_view<const float>(dtl_.data() + j * T_ * r_, {T_, r_}), R.dt_up,
                   make_view<const float>(ddelta, {T_, hd_}), make_view(ddtl_.data() + j * T_ * r_, {T_, r_}), false,
                   grad, exec);
    }
    auto xn = cf(xn_, T_, d_);
    lin_backward(xn, L.wq, cf(dqf_, T_, Q), dxn, false, grad, exec, L.bq);
    lin_backward(xn, L.wk, cf(dkf_, T_, KV), dxn, true, grad, exec, L.bk);
    lin_backward(xn, L.wv, cf(dvf_, T_, KV), dxn, true, grad, exec, L.bv);
    for (Rec& R : L.rec)
      lin_backward(xn, R.dt_down, make_view<const float>(ddtl_.data() + R.j * T_ * r_, {T_, r_}), dxn, true, grad, exec);
    rms_backward(xs(l), L.attn_norm, dxn, dtmp, grad, exec);
    add_inplace(dx, dtmp, exec);
  }

  const Checkpoint& ck_;
  ModelConfig c_;
  HeadLayout layout_;
  int64_t d_ = 0, hd_ = 0, nq_ = 0, nkv_ = 0, g_ = 0, F_ = 0, V_ = 0, r_ = 1, N_ = 0, K_ = 2;
  int sink_ = 0, window_ = 0;
  std::vector<float> inv_freq_;
  std::vector<Tensor> tensors_;
  std::vector<Layer> layers_;
  int embed_ = -1, lm_head_ = -1, final_norm_ = -1;
  bool tied_ = false;
  std::vector<FinetuneParam> params_;
  std::vector<float> theta_;
  std::vector<float> teacher_f_;
  std::vector<TW> teacher_tw_, bias_tw_;
  int64_t teacher_dt_ = 0;
  // the batch
  int64_t T_ = 0, S_ = 0, cap_ = 0;
  std::vector<int32_t> cu_, pos_, kv_lens_;
  // activations (xs_: every layer's input; the rest: one layer, recomputed in the backward)
  std::vector<float> xs_, xn_, qf_, kf_, vf_, oc_, tmp_, xmid_, xn2_, gate_, up_, h_, Kb_, Vb_, lse_, state_;
  std::vector<float> u_, dtl_, delta_, C_, hf_, Bw_, yw_, aw_;
  // gradients of activations
  std::vector<float> dh_, dx_, dtmp_, dxn_, dh2_, dgate_, doc_, dqf_, dkf_, dvf_, dK_, dV_, dnorm_;
  std::vector<float> dA_, dD_, ddb_, dcw_, dcb_, du_, dC_, ddtl_, ddelta_, dyw_, dBw_, dvw_, dalpha_;
  std::vector<unsigned char> ws_;
};

}  // namespace detail
FinetuneModel::FinetuneModel(std::shared_ptr<const Checkpoint> ck, FinetuneTrain train) : ck_(std::move(ck)) {
  RF_CHECK(ck_, "finetune: null checkpoint");
  const std::string q0 = "model.layers.0.self_attn.q_proj.weight";
  RF_CHECK(ck_->config().n_layers >= 1 && ck_->has(q0), "finetune: ", ck_->path().string(), " has no layers (", q0,
           " is missing)");
  dispatch_dtype("finetune weights", ck_->tensor(q0).dtype, [&](auto tag) {
    using TW = typename decltype(tag)::type;
    impl_ = std::make_unique<detail::FinetuneImpl<TW>>(*ck_, train);
  });
}
FinetuneModel::~FinetuneModel() = default;
FinetuneModel::FinetuneModel(FinetuneModel&&) noexcept = default;
FinetuneModel& FinetuneModel::operator=(FinetuneModel&&) noexcept = default;
const std::vector<FinetuneParam>& FinetuneModel::params() const { return impl_->params(); }
int64_t FinetuneModel::num_params() const { return int64_t(impl_->theta().size()); }
std::vector<float>& FinetuneModel::theta() { return impl_->theta(); }
void FinetuneModel::sync() { impl_->sync(); }

void FinetuneModel::hidden(const FinetuneBatch& b, View<float, 2> h, CpuExec exec) { impl_->hidden(b, h, exec); }
void FinetuneModel::logits(const FinetuneBatch& b, View<float, 2> out, CpuExec exec) { impl_->logits(b, out, exec); }
void FinetuneModel::set_teacher_head(const TensorRef& lm_head) { impl_->set_teacher_head(lm_head); }
CrossEntropyResult FinetuneModel::loss(const FinetuneBatch& b, View<const int32_t, 1> targets, std::vector<float>* grad,
                                       float grad_scale, CpuExec exec, View<const float, 2> teacher_h, float kl_weight) {
  return impl_->loss(b, targets, teacher_h, kl_weight, grad, grad_scale, exec);
}

/// The teacher's lm_head tensor (the embedding when tied).
const TensorRef& finetune_lm_head(const Checkpoint& ck) {
  const bool tied = ck.config().tie_word_embeddings || !ck.has("lm_head.weight");
  return ck.tensor(tied ? "model.embed_tokens.weight" : "lm_head.weight");
}

/// Next-token targets of packed sequences: targets[t] = tokens[t + 1] inside a sequence, -1 at its end.
void next_token_targets(const FinetuneBatch& b, std::vector<int32_t>& targets) {
  const int64_t T = b.tokens.shape[0], S = b.cu_seqlens.shape[0] - 1;
  targets.assign(size_t(T), -1);
  for (int64_t s = 0; s < S; ++s)
    for (int32_t t = b.cu_seqlens(s); t + 1 < b.cu_seqlens(s + 1); ++t) targets[size_t(t)] = b.tokens(t + 1);
}

}  // namespace recurformer
