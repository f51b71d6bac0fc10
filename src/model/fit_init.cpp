// src/model/fit_init.cpp: the `fit` initialisation of a converted recurrent group (see
// recurformer/model/fit_init.hpp): recording the original model's attention, and the least-squares fit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "recurformer/model/fit_init.hpp"
#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/selective_scan.hpp"
#include "recurformer/model/checkpoint.hpp"

namespace recurformer {

namespace detail {
/// Δ -> the bias whose softplus is Δ (also the `default` init's, model/convert.hpp).
double softplus_inverse(double y) { return y + std::log(-std::expm1(-y)); }

FitScan::FitScan(const FitSequence& s, int64_t hd_, int64_t g_, const std::vector<float>& A_log)
    : T(s.tokens), hd(hd_), g(g_), A(A_log.size()), C(s.q.size()), zero(size_t(T * hd), 0.f),
      state(size_t(hd * hd)) {
  for (size_t i = 0; i < A.size(); ++i) A[i] = -std::exp(A_log[i]);
  const float inv = float(1.0 / std::sqrt(double(hd)));
  for (size_t i = 0; i < C.size(); ++i) C[i] = s.q[i] * inv;
}

/// y [T, g, hd] = scan(u) with the given dt_bias and D (D empty: none).
void FitScan::run(const FitSequence& s, const float* u, const std::vector<float>& dt_bias, const std::vector<float>& D,
                  float* y, CpuExec exec) {
  SelectiveScanParams<float> p;
  p.u = make_view<const float>(u, {T, hd});
  p.delta = make_view<const float>(zero.data(), {T, hd});
  p.A = make_view<const float>(A.data(), {hd, hd});
  p.B = make_view<const float>(s.k.data(), {T, 1, hd});
  p.C = make_view<const float>(C.data(), {T, 1, g, hd});
  if (!D.empty()) p.D = make_view<const float>(D.data(), {hd});
  p.delta_bias = make_view<const float>(dt_bias.data(), {hd});
  p.y = make_view(y, {T, g, hd});
  p.state = make_view(state.data(), {1, hd, hd});
  p.use_initial_state = false;
  selective_scan(p, exec);
}

namespace {

/// Cholesky solve of the SPD system M x = b (n x n, row-major), in place into b.
void fit_cholesky_solve(std::vector<double>& M, std::vector<double>& b, int n) {
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) {
      double s = M[size_t(i * n + j)];
      for (int k = 0; k < j; ++k) s -= M[size_t(i * n + k)] * M[size_t(j * n + k)];
      if (i == j) {
        RF_CHECK(s > 0, "fit_init: the normal equations are not positive definite (no calibration signal?)");
        M[size_t(i * n + i)] = std::sqrt(s);
      } else {
        M[size_t(i * n + j)] = s / M[size_t(j * n + j)];
      }
    }
  }
  for (int i = 0; i < n; ++i) {
    for (int k = 0; k < i; ++k) b[size_t(i)] -= M[size_t(i * n + k)] * b[size_t(k)];
    b[size_t(i)] /= M[size_t(i * n + i)];
  }
  for (int i = n - 1; i >= 0; --i) {
    for (int k = i + 1; k < n; ++k) b[size_t(i)] -= M[size_t(k * n + i)] * b[size_t(k)];
    b[size_t(i)] /= M[size_t(i * n + i)];
  }
}

}  // namespace
}  // namespace detail

/// Fits one recurrent group (see the top of this file). `default_dt_bias` [hd] is the `default`
/// initialisation's, for the error reported beside the fit's.
FitResult fit_recurrent_group(const FitGroupData& data, int64_t hd, int64_t g,
                              const std::vector<float>& default_dt_bias, const FitOptions& o, CpuExec exec) {
  const std::string who = "fit_init: layer " + std::to_string(data.layer) + " group " + std::to_string(data.group);
  const int K = o.conv_kernel, P = K + 1;
  RF_CHECK(hd >= 1 && g >= 1, who, ": head_dim and group size must be >= 1");
  RF_CHECK(K >= 2 && K <= 8, who, ": conv_kernel must be in 2..8, got ", K);
  RF_CHECK(o.window >= 1, who, ": window must be >= 1, got ", o.window);
  RF_CHECK(!data.sequences.empty(), who, ": no calibration sequences recorded");
  RF_CHECK(int64_t(default_dt_bias.size()) == hd, who, ": default dt_bias has ", default_dt_bias.size(),
           " values, head_dim is ", hd);
  for (const FitSequence& s : data.sequences) {
    const size_t th = size_t(s.tokens * hd), tgh = size_t(s.tokens * g * hd);
    RF_CHECK(s.tokens >= 1 && s.v.size() == th && s.k.size() == th && s.q.size() == tgh && s.y_attn.size() == tgh,
             who, ": a sequence of ", s.tokens, " tokens needs v, k of ", th, " values and q, y_attn of ", tgh,
             " (got ", s.v.size(), ", ", s.k.size(), ", ", s.q.size(), ", ", s.y_attn.size(), ")");
    RF_CHECK(s.y_stream.empty() || s.y_stream.size() == tgh, who, ": y_stream has ", s.y_stream.size(),
             " values, a sequence of ", s.tokens, " tokens needs ", tgh);
  }
  // what the scan output should be: y_attn, less the streaming output for a windowed group
  const auto target = [](const FitSequence& s, size_t i) {
    return s.y_stream.empty() ? double(s.y_attn[i]) : double(s.y_attn[i]) - double(s.y_stream[i]);
  };
  FitResult r;
  r.A_log.resize(size_t(hd * hd));
  for (int64_t c = 0; c < hd; ++c)
    for (int64_t n = 0; n < hd; ++n) r.A_log[size_t(c * hd + n)] = float(std::log(double(n + 1)));
  r.dt_bias.resize(size_t(hd));
  for (int64_t c = 0; c < hd; ++c) {
    double slowest = INFINITY;
    for (int64_t n = 0; n < hd; ++n) slowest = std::min(slowest, std::exp(double(r.A_log[size_t(c * hd + n)])));
    r.dt_bias[size_t(c)] = float(detail::softplus_inverse(1.0 / (double(o.window) * slowest)));
  }
  r.D.assign(size_t(hd), 1.f);

  // Normal equations per channel: M[c] (P x P) and rhs[c] (P), P = Kc taps + bias.
  std::vector<double> M(size_t(hd * P * P), 0.0), rhs(size_t(hd * P), 0.0);
  double attn2 = 0, def2 = 0;
  for (const FitSequence& s : data.sequences) {
    const int64_t T = s.tokens, TG = T * g;
    detail::FitScan scan(s, hd, g, r.A_log);
    std::vector<float> u(size_t(T * hd)), Y(size_t(P * TG * hd));
    for (int i = 0; i < P; ++i) {
      const int64_t shift = K - 1 - i;  // i == K: the bias column, u = 1
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < hd; ++c)
          u[size_t(t * hd + c)] = i == K ? 1.f : t >= shift ? s.v[size_t((t - shift) * hd + c)] : 0.f;
      scan.run(s, u.data(), r.dt_bias, r.D, Y.data() + size_t(i) * size_t(TG * hd), exec);
    }
    for (int64_t row = 0; row < TG; ++row)
      for (int64_t c = 0; c < hd; ++c) {
        const double ya = target(s, size_t(row * hd + c));
        double* Mc = M.data() + size_t(c * P * P);
        for (int a = 0; a < P; ++a) {
          const double Ya = Y[size_t(a * TG * hd + row * hd + c)];
          rhs[size_t(c * P + a)] += Ya * ya;
          for (int b = 0; b <= a; ++b) Mc[a * P + b] += Ya * double(Y[size_t(b * TG * hd + row * hd + c)]);
        }
      }
    // the default initialisation: u = v, D = 0
    std::vector<float> yd(size_t(TG * hd));
    scan.run(s, s.v.data(), default_dt_bias, {}, yd.data(), exec);
    for (size_t i = 0; i < yd.size(); ++i) {
      const double e = double(yd[i]) - target(s, i);
      def2 += e * e;
      attn2 += double(s.y_attn[i]) * s.y_attn[i];
    }
  }
  r.conv_weight.resize(size_t(hd * K));
  r.conv_bias.resize(size_t(hd));
  for (int64_t c = 0; c < hd; ++c) {
    std::vector<double> Mc(M.begin() + c * P * P, M.begin() + (c + 1) * P * P), x(rhs.begin() + c * P, rhs.begin() + (c + 1) * P);
    double trace = 0;
    for (int a = 0; a < P; ++a) {
      for (int b = 0; b < a; ++b) Mc[size_t(b * P + a)] = Mc[size_t(a * P + b)];
      trace += Mc[size_t(a * P + a)];
    }
    const double ridge = trace > 0 ? 1e-6 * trace / P : 1.0;  // a silent channel: taps 0
    for (int a = 0; a < P; ++a) Mc[size_t(a * P + a)] += ridge;
    detail::fit_cholesky_solve(Mc, x, P);
    for (int i = 0; i < K; ++i) r.conv_weight[size_t(c * K + i)] = float(x[size_t(i)]);
    r.conv_bias[size_t(c)] = float(x[size_t(K)]);
  }
  // The fit's error through the ops the model runs (conv, then the scan with D).
  double fit2 = 0;
  for (const FitSequence& s : data.sequences) {
    const int64_t T = s.tokens;
    detail::FitScan scan(s, hd, g, r.A_log);
    std::vector<float> u(size_t(T * hd)), y(size_t(T * g * hd));
    CausalConv1dParams<float> cp;
    cp.x = make_view<const float>(s.v.data(), {T, hd});
    cp.weight = make_view<const float>(r.conv_weight.data(), {hd, int64_t(K)});
    cp.bias = make_view<const float>(r.conv_bias.data(), {hd});
    cp.y = make_view(u.data(), {T, hd});
    causal_conv1d(cp, exec);
    scan.run(s, u.data(), r.dt_bias, r.D, y.data(), exec);
    for (size_t i = 0; i < y.size(); ++i) {
      const double e = double(y[i]) - target(s, i);
      fit2 += e * e;
    }
  }
  const double norm = std::sqrt(attn2);
  r.fit_error = norm > 0 ? std::sqrt(fit2) / norm : std::sqrt(fit2);
  r.default_error = norm > 0 ? std::sqrt(def2) / norm : std::sqrt(def2);
  return r;
}

namespace detail {
namespace {

template <class TW>
struct FitProjections {
  View<const TW, 2> wq, wk, wv;
  View<const TW, 1> bq, bk, bv;
};

}  // namespace
}  // namespace detail

/// Runs the original model over `tokens` in sequences of seq_len tokens (a tail of fewer than Kc
/// tokens is dropped) and records every recurrent and windowed group of `layout` (layer, then group
/// order). With `inputs`, also the input x of every layer that has such a group (layer order).
/// A windowed group's record also holds its streaming output under `streaming`'s sink and window
/// (the converted model's: a required argument, since a default window would record silently wrong
/// targets for a model converted with another).
std::vector<FitGroupData> record_fit_data(const LlamaModel& model, const std::vector<int32_t>& tokens, int seq_len,
                                          const HeadLayout& layout, const StreamingConfig& streaming, int conv_kernel,
                                          CpuExec exec, const std::function<void(int64_t, int64_t)>& progress,
                                          std::vector<LayerInputs>* inputs) {
  const ModelConfig& c = model.config();
  RF_CHECK(seq_len >= 2, "fit_init: sequence length must be >= 2, got ", seq_len);
  layout.check(c.n_layers, c.n_kv);
  std::vector<std::pair<int64_t, int64_t>> seqs;  // [begin, length)
  for (int64_t b = 0; b < int64_t(tokens.size()); b += seq_len) {
    const int64_t n = std::min<int64_t>(seq_len, int64_t(tokens.size()) - b);
    if (n >= conv_kernel) seqs.push_back({b, n});
  }
  RF_CHECK(!seqs.empty(), "fit_init: the calibration text has ", tokens.size(), " tokens; at least ", conv_kernel,
           " are needed");
  std::vector<FitGroupData> out;
  std::vector<std::vector<int>> slot(size_t(c.n_layers));  // [layer] -> index in out per recurrent group
  std::vector<int> input_slot(size_t(c.n_layers), -1);     // [layer] -> index in *inputs
  if (inputs) inputs->clear();
  for (int l = 0; l < c.n_layers; ++l)
    for (int j : layout.layers[size_t(l)].state_groups()) {  // recurrent and windowed
      slot[size_t(l)].push_back(int(out.size()));
      out.push_back({l, j, {}});
      if (inputs && input_slot[size_t(l)] < 0) {
        input_slot[size_t(l)] = int(inputs->size());
        inputs->push_back({l, {}});
      }
    }
  if (out.empty()) return out;
  const Checkpoint& ck = model.checkpoint();
  const std::vector<float> inv_freq = ck.rope_inv_freq();  // rope_freqs.weight included
  const int64_t hd = c.head_dim, nq = c.n_q, nkv = c.n_kv, g = nq / nkv;
  std::vector<float> q, k, v, kc, vc, att;
  std::vector<int32_t> pos;
  std::vector<unsigned char> ws;
  dispatch_dtype("fit_init: q_proj dtype", ck.tensor("model.layers.0.self_attn.q_proj.weight").dtype, [&](auto tag) {
    using TW = typename decltype(tag)::type;
    std::vector<detail::FitProjections<TW>> w;
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
      auto bias = [&](const char* n) {
        return c.attention_bias ? ck.tensor(p + n + ".bias").template view<TW, 1>() : View<const TW, 1>{};
      };
      w.push_back({ck.tensor(p + "q_proj.weight").template view<TW, 2>(), ck.tensor(p + "k_proj.weight").template view<TW, 2>(),
                   ck.tensor(p + "v_proj.weight").template view<TW, 2>(), bias("q_proj"), bias("k_proj"), bias("v_proj")});
    }
    LlamaSession session(model, 1, seq_len, exec, seq_len);
    LayerInputHook hook = [&](int l, View<const float, 2> x, const LlamaBatch&) {
      if (slot[size_t(l)].empty()) return;
      const int64_t T = x.shape[0];
      if (inputs) {
        std::vector<float>& xs = (*inputs)[size_t(input_slot[size_t(l)])].x.emplace_back(size_t(T * c.d_model));
        for (int64_t t = 0; t < T; ++t) std::copy_n(&x(t, 0), c.d_model, xs.data() + t * c.d_model);
      }
      q.resize(size_t(T * nq * hd));
      k.resize(size_t(T * nkv * hd));
      v.resize(size_t(T * nkv * hd));
      const detail::FitProjections<TW>& W = w[size_t(l)];
      LinearParams<float, TW> lin[3] = {{x, W.wq, W.bq, make_view(q.data(), {T, nq * hd})},
                                        {x, W.wk, W.bk, make_view(k.data(), {T, nkv * hd})},
                                        {x, W.wv, W.bv, make_view(v.data(), {T, nkv * hd})}};
      for (const auto& lp : lin) {
        const size_t need = linear_workspace_bytes(lp, exec);
        if (ws.size() < need) ws.resize(need);
        linear(lp, exec, ws.data(), ws.size());
      }
      // what the recurrent heads read: before RoPE
      const std::vector<int>& mine = slot[size_t(l)];
      for (int gi : mine) {
        const int64_t j = out[size_t(gi)].group;
        FitSequence s;
        s.tokens = T;
        s.v.resize(size_t(T * hd));
        s.k.resize(size_t(T * hd));
        s.q.resize(size_t(T * g * hd));
        s.y_attn.resize(size_t(T * g * hd));
        for (int64_t t = 0; t < T; ++t) {
          std::copy_n(v.data() + (t * nkv + j) * hd, hd, s.v.data() + t * hd);
          std::copy_n(k.data() + (t * nkv + j) * hd, hd, s.k.data() + t * hd);
          std::copy_n(q.data() + (t * nq + j * g) * hd, g * hd, s.q.data() + t * g * hd);
        }
        if (c.rope_layout == RopeLayout::interleaved) {
          // llama GGUF rows: keep B and C in the HF order the converted checkpoint is written in,
          // so each state dimension meets the A_log row it will have there.
          std::vector<float> stored;
          for (std::vector<float>* a : {&s.k, &s.q}) {
            stored = *a;
            const int64_t heads = a == &s.k ? 1 : g;
            for (int64_t t = 0; t < T; ++t)
              detail::unpermute_interleaved_heads(stored.data() + t * heads * hd, a->data() + t * heads * hd, heads,
                                                  hd, sizeof(float));
          }
        }
        out[size_t(gi)].sequences.push_back(std::move(s));
      }
      // the original attention output: RoPE at positions 0..T-1, keys and values in a one-slot cache
      pos.resize(size_t(T));
      for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = int32_t(t);
      const auto pv = make_view<const int32_t>(pos.data(), {T});
      const auto fv = make_view<const float>(inv_freq.data(), {int64_t(inv_freq.size())});
      rope(RopeParams<float>{make_view(q.data(), {T, nq, hd}), pv, fv, c.rope_layout}, exec);
      rope(RopeParams<float>{make_view(k.data(), {T, nkv, hd}), pv, fv, c.rope_layout}, exec);
      kc.resize(k.size());
      vc.resize(v.size());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < nkv; ++h) {
          std::copy_n(k.data() + (t * nkv + h) * hd, hd, kc.data() + (h * T + t) * hd);
          std::copy_n(v.data() + (t * nkv + h) * hd, hd, vc.data() + (h * T + t) * hd);
        }
      att.resize(q.size());
      const int32_t len[1] = {int32_t(T)};
      AttentionParams<float> ap;
      ap.q = make_view<const float>(q.data(), {T, nq, hd});
      ap.k = make_view<const float>(kc.data(), {1, nkv, T, hd});
      ap.v = make_view<const float>(vc.data(), {1, nkv, T, hd});
      ap.out = make_view(att.data(), {T, nq, hd});
      ap.kv_lens = make_view<const int32_t>(len, {1});
      ap.q_positions = pv;
      const size_t need = attention_workspace_bytes(ap, exec);
      if (ws.size() < need) ws.resize(need);
      attention(ap, exec, ws.data(), ws.size());
      for (int gi : mine) {
        const int64_t j = out[size_t(gi)].group;
        FitSequence& s = out[size_t(gi)].sequences.back();
        for (int64_t t = 0; t < T; ++t)
          std::copy_n(att.data() + (t * nq + j * g) * hd, g * hd, s.y_attn.data() + t * g * hd);
        if (layout.layers[size_t(l)].groups[size_t(j)] != HeadKind::windowed) continue;
        s.y_stream.resize(size_t(T * g * hd));
        AttentionParams<float> sp = ap;  // the group's heads alone, with the streaming mask
        sp.q = make_strided_view<const float>(q.data() + j * g * hd, {T, g, hd}, {nq * hd, hd, 1});
        sp.k = make_view<const float>(kc.data() + j * T * hd, {1, 1, T, hd});
        sp.v = make_view<const float>(vc.data() + j * T * hd, {1, 1, T, hd});
        sp.out = make_view(s.y_stream.data(), {T, g, hd});
        sp.sink = streaming.sink, sp.window = streaming.window;
        const size_t need_s = attention_workspace_bytes(sp, exec);
        if (ws.size() < need_s) ws.resize(need_s);
        attention(sp, exec, ws.data(), ws.size());
      }
    };
    for (size_t i = 0; i < seqs.size(); ++i) {
      session.cache().reset(0);
      session.prefill(0, tokens.data() + seqs[i].first, seqs[i].second, nullptr, hook);
      if (progress) progress(int64_t(i) + 1, int64_t(seqs.size()));
    }
  });
  return out;
}

}  // namespace recurformer
