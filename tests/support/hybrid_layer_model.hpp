// tests/support/hybrid_layer_model.hpp: the small random hybrid attention layer the layer tests
// share (CPU: hybrid_head_attention_test.cpp, CUDA: hybrid_head_attention_test.cu): its weights,
// a plain double-precision reference of the layer over a whole sequence from position 0 (Llama
// attention with GQA and rotate_half RoPE, spec section 3's recurrent group, the streaming
// sink/window mask), and the batch schedules every implementation must agree on.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "recurformer/cache/hybrid_cache.hpp"
#include "recurformer/layers/hybrid_head_attention_params.hpp"
#include "support/test_util.hpp"

namespace rftest {
namespace hybrid_layer {

using namespace recurformer;
using K = HeadKind;
constexpr int kHd = 64, kDModel = 96, kNq = 6, kRank = 4, kConv = 4, kSink = 2, kWindow = 5;

template <class TW>
struct Model {
  int n_kv = 3;
  LayerLayout layout;
  bool biases = true;
  std::vector<TW> wq, wk, wv, wo, bq, bk, bv;
  struct Rec {
    std::vector<TW> dt_down, dt_up;
    std::vector<float> dt_bias, A, D, conv_w, conv_b, alpha;  // alpha: windowed groups only
  };
  std::vector<Rec> rec;
  std::vector<RecurrentGroupWeights<TW>> rec_views;
  std::vector<float> inv_freq = rope_inv_freq(kHd, 10000.f);

  Model(LayerLayout l, bool with_biases) : n_kv(l.n_groups()), layout(std::move(l)), biases(with_biases) {
    const double a = 1.0 / std::sqrt(double(kDModel)), ao = 1.0 / std::sqrt(double(kNq * kHd));
    wq = rftest::random_vector<TW>(size_t(kNq * kHd * kDModel), -2 * a, 2 * a);
    wk = rftest::random_vector<TW>(size_t(n_kv * kHd * kDModel), -2 * a, 2 * a);
    wv = rftest::random_vector<TW>(size_t(n_kv * kHd * kDModel), -2 * a, 2 * a);
    wo = rftest::random_vector<TW>(size_t(kDModel * kNq * kHd), -2 * ao, 2 * ao);
    if (biases) {
      bq = rftest::random_vector<TW>(size_t(kNq * kHd), -0.2, 0.2);
      bk = rftest::random_vector<TW>(size_t(n_kv * kHd), -0.2, 0.2);
      bv = rftest::random_vector<TW>(size_t(n_kv * kHd), -0.2, 0.2);
    }
    for (int j : layout.state_groups()) {
      Rec r;
      if (layout.groups[size_t(j)] == K::windowed) r.alpha = rftest::random_vector<float>(size_t(kNq / n_kv), -1.0, 1.0);
      r.dt_down = rftest::random_vector<TW>(size_t(kRank * kDModel), -a, a);
      r.dt_up = rftest::random_vector<TW>(size_t(kHd * kRank), -0.5, 0.5);
      r.dt_bias = rftest::random_vector<float>(size_t(kHd), -4.0, -1.0);   // Δ ~ 0.02 .. 0.3
      r.A = rftest::random_vector<float>(size_t(kHd * kHd), -2.0, -0.05);  // -exp(A_log)
      r.D = rftest::random_vector<float>(size_t(kHd), -1.0, 1.0);
      r.conv_w = rftest::random_vector<float>(size_t(kHd * kConv), -0.7, 0.7);
      r.conv_b = rftest::random_vector<float>(size_t(kHd), -0.2, 0.2);
      rec.push_back(std::move(r));
    }
    for (Rec& r : rec) {
      RecurrentGroupWeights<TW> v;
      v.dt_down = make_view(const_cast<const TW*>(r.dt_down.data()), {kRank, kDModel});
      v.dt_up = make_view(const_cast<const TW*>(r.dt_up.data()), {kHd, kRank});
      v.dt_bias = make_view(const_cast<const float*>(r.dt_bias.data()), {kHd});
      v.A = make_view(const_cast<const float*>(r.A.data()), {kHd, kHd});
      v.D = make_view(const_cast<const float*>(r.D.data()), {kHd});
      v.conv_weight = make_view(const_cast<const float*>(r.conv_w.data()), {kHd, kConv});
      v.conv_bias = make_view(const_cast<const float*>(r.conv_b.data()), {kHd});
      if (!r.alpha.empty()) v.alpha = make_view(const_cast<const float*>(r.alpha.data()), {int64_t(r.alpha.size())});
      rec_views.push_back(v);
    }
  }
  HybridAttentionWeights<TW> weights() const {
    HybridAttentionWeights<TW> w;
    w.wq = make_view(wq.data(), {int64_t(kNq * kHd), kDModel});
    w.wk = make_view(wk.data(), {int64_t(n_kv * kHd), kDModel});
    w.wv = make_view(wv.data(), {int64_t(n_kv * kHd), kDModel});
    w.wo = make_view(wo.data(), {kDModel, int64_t(kNq * kHd)});
    if (biases) {
      w.bq = make_view(bq.data(), {int64_t(kNq * kHd)});
      w.bk = make_view(bk.data(), {int64_t(n_kv * kHd)});
      w.bv = make_view(bv.data(), {int64_t(n_kv * kHd)});
    }
    w.recurrent = rec_views.data();
    w.n_recurrent = int(rec_views.size());
    return w;
  }
  HybridCacheConfig cache_config(int slots, int64_t capacity, int64_t page_size = 0) const {
    HybridCacheConfig c;
    c.n_layers = 1;
    c.n_kv = n_kv;
    c.head_dim = kHd;
    c.layout.layers = {layout};
    c.recurrent.d_state = kHd;
    c.recurrent.dt_rank = kRank;
    c.recurrent.conv_kernel = kConv;
    c.streaming.sink = kSink;
    c.streaming.window = kWindow;
    c.slots = slots;
    c.capacity = capacity;
    c.page_size = page_size;
    return c;
  }
};

template <class U>
double dbl(U x) {
  return double(float(x));
}

// The layer over one whole sequence x [L, d_model], in double, from the spec's formulas.
template <class TW>
std::vector<double> reference(const Model<TW>& m, const std::vector<float>& x, int64_t L) {
  const int n_kv = m.n_kv, g = kNq / n_kv, half_hd = kHd / 2;
  auto proj = [&](const std::vector<TW>& w, const std::vector<TW>& b, int64_t rows, const float* xt,
                  int64_t in) {
    std::vector<double> y(static_cast<size_t>(rows));
    for (int64_t o = 0; o < rows; ++o) {
      double s = b.empty() ? 0.0 : dbl(b[size_t(o)]);
      for (int64_t i = 0; i < in; ++i) s += dbl(w[size_t(o * in + i)]) * double(xt[i]);
      y[size_t(o)] = s;
    }
    return y;
  };
  const size_t nL = static_cast<size_t>(L);
  std::vector<std::vector<double>> q(nL), k(nL), v(nL), qr(nL), kr(nL);
  for (int64_t t = 0; t < L; ++t) {
    const float* xt = x.data() + t * kDModel;
    q[size_t(t)] = proj(m.wq, m.bq, kNq * kHd, xt, kDModel);
    k[size_t(t)] = proj(m.wk, m.bk, n_kv * kHd, xt, kDModel);
    v[size_t(t)] = proj(m.wv, m.bv, n_kv * kHd, xt, kDModel);
    // RoPE (rotate_half) at position t, for the attention and streaming groups.
    qr[size_t(t)] = q[size_t(t)];
    kr[size_t(t)] = k[size_t(t)];
    auto rot = [&](double* h) {
      for (int i = 0; i < half_hd; ++i) {
        const double ang = double(float(float(t) * m.inv_freq[size_t(i)]));
        const double c = std::cos(ang), s = std::sin(ang), a = h[i], b = h[i + half_hd];
        h[i] = a * c - b * s;
        h[i + half_hd] = b * c + a * s;
      }
    };
    for (int h = 0; h < kNq; ++h) rot(qr[size_t(t)].data() + h * kHd);
    for (int j = 0; j < n_kv; ++j) rot(kr[size_t(t)].data() + j * kHd);
  }
  std::vector<double> concat(size_t(L * kNq * kHd), 0.0);
  int rec_i = 0;
  for (int j = 0; j < n_kv; ++j) {
    const K kind = m.layout.groups[size_t(j)];
    if (kind != K::recurrent) {  // softmax attention (attention, streaming, windowed)
      for (int64_t t = 0; t < L; ++t)
        for (int r = 0; r < g; ++r) {
          const int h = j * g + r;
          std::vector<double> s;
          std::vector<int64_t> keys;
          for (int64_t p = 0; p <= t; ++p) {
            if (has_stream_ring(kind) && !(p < kSink || p > t - kWindow)) continue;
            double d = 0;
            for (int c = 0; c < kHd; ++c) d += qr[size_t(t)][size_t(h * kHd + c)] * kr[size_t(p)][size_t(j * kHd + c)];
            s.push_back(d / std::sqrt(double(kHd)));
            keys.push_back(p);
          }
          double mx = -1e300, sum = 0;
          for (double e : s) mx = std::max(mx, e);
          for (double& e : s) sum += (e = std::exp(e - mx));
          for (int c = 0; c < kHd; ++c) {
            double o = 0;
            for (size_t i = 0; i < keys.size(); ++i) o += s[i] / sum * v[size_t(keys[i])][size_t(j * kHd + c)];
            concat[size_t((t * kNq + h) * kHd + c)] = o;
          }
        }
    }
    if (has_recurrent_state(kind)) {  // recurrent, and a windowed group's alpha-weighted term
      const auto& rw = m.rec[size_t(rec_i++)];
      std::vector<double> hstate(size_t(kHd * kHd), 0.0);
      for (int64_t t = 0; t < L; ++t) {
        const float* xt = x.data() + t * kDModel;
        const std::vector<double> low = proj(rw.dt_down, {}, kRank, xt, kDModel);
        for (int c = 0; c < kHd; ++c) {
          double u = rw.conv_b[size_t(c)];
          for (int i = 0; i < kConv; ++i) {
            const int64_t src = t - kConv + 1 + i;
            if (src >= 0) u += double(rw.conv_w[size_t(c * kConv + i)]) * v[size_t(src)][size_t(j * kHd + c)];
          }
          double dt = rw.dt_bias[size_t(c)];
          for (int i = 0; i < kRank; ++i) dt += dbl(rw.dt_up[size_t(c * kRank + i)]) * low[size_t(i)];
          dt = dt > 20 ? dt : std::log1p(std::exp(dt));
          for (int nn = 0; nn < kHd; ++nn) {
            double& hs = hstate[size_t(c * kHd + nn)];
            hs = std::exp(dt * rw.A[size_t(c * kHd + nn)]) * hs + dt * k[size_t(t)][size_t(j * kHd + nn)] * u;
          }
          for (int r = 0; r < g; ++r) {
            const int h = j * g + r;
            double y = double(rw.D[size_t(c)]) * u;
            for (int nn = 0; nn < kHd; ++nn)
              y += hstate[size_t(c * kHd + nn)] * q[size_t(t)][size_t(h * kHd + nn)] / std::sqrt(double(kHd));
            concat[size_t((t * kNq + h) * kHd + c)] += (rw.alpha.empty() ? 1.0 : double(rw.alpha[size_t(r)])) * y;
          }
        }
      }
    }
  }
  std::vector<double> out(size_t(L * kDModel));
  for (int64_t t = 0; t < L; ++t)
    for (int o = 0; o < kDModel; ++o) {
      double s = 0;
      for (int i = 0; i < kNq * kHd; ++i) s += dbl(m.wo[size_t(o * kNq * kHd + i)]) * concat[size_t((t * kNq + i / kHd) * kHd + i % kHd)];
      out[size_t(t * kDModel + o)] = s;
    }
  return out;
}

// A schedule is a list of batches, each a list of (sequence, tokens).
struct Step {
  int seq;
  int count;
};
// Schedules over two sequences of 20 and 13 tokens (20 > sink + window = 7).
const std::vector<int64_t> kLens = {20, 13};
inline std::vector<std::vector<Step>> one_prefill() { return {{{0, 20}, {1, 13}}}; }
inline std::vector<std::vector<Step>> chunked() { return {{{0, 6}, {1, 1}}, {{1, 12}}, {{0, 1}}, {{0, 13}}}; }
inline std::vector<std::vector<Step>> prefill_then_decode() {
  std::vector<std::vector<Step>> s = {{{0, 9}, {1, 3}}};
  for (int i = 0; i < 10; ++i) s.push_back({{1, 1}, {0, 1}});
  s.push_back({{0, 1}});
  return s;
}
inline std::vector<std::vector<Step>> alone() {  // each sequence in its own calls: same as batched
  return {{{0, 20}}, {{1, 5}}, {{1, 8}}};
}

/// One batch of a schedule, packed: the tokens of each step's sequence from its next unprocessed
/// token (done[seq]), its offsets, cache slots and counts.
struct PackedBatch {
  std::vector<float> x;
  std::vector<int32_t> cu = {0}, slots, counts;

  PackedBatch(const std::vector<std::vector<float>>& xs, const std::vector<int64_t>& done,
              const std::vector<Step>& batch, const std::vector<int>& slot_of) {
    for (const Step& b : batch) {
      const float* src = xs[size_t(b.seq)].data() + done[size_t(b.seq)] * kDModel;
      x.insert(x.end(), src, src + int64_t(b.count) * kDModel);
      cu.push_back(cu.back() + b.count);
      slots.push_back(slot_of[size_t(b.seq)]);
      counts.push_back(b.count);
    }
  }
  /// Commits the batch: the cache's lengths and each sequence's next token.
  template <class Cache>
  void advance(Cache& cache, std::vector<int64_t>& done, const std::vector<Step>& batch) const {
    cache.advance(make_view(slots.data(), {int64_t(slots.size())}), make_view(counts.data(), {int64_t(counts.size())}));
    for (const Step& b : batch) done[size_t(b.seq)] += b.count;
  }
};

/// Runs a schedule on a runner whose step(xs, done, batch) runs one batch and returns its outputs
/// packed like the input; returns each sequence's outputs [L, d_model].
template <class Runner>
std::vector<std::vector<float>> run_schedule(Runner& r, const std::vector<std::vector<float>>& xs,
                                             const std::vector<std::vector<Step>>& schedule) {
  std::vector<int64_t> done(xs.size(), 0);
  std::vector<std::vector<float>> outs(xs.size());
  for (const auto& batch : schedule) {
    const std::vector<float> out = r.step(xs, done, batch);
    int64_t off = 0;
    for (const Step& b : batch) {
      outs[size_t(b.seq)].insert(outs[size_t(b.seq)].end(), out.begin() + off,
                                 out.begin() + off + int64_t(b.count) * kDModel);
      off += int64_t(b.count) * kDModel;
    }
  }
  return outs;
}

/// Two runners fed the same schedule give the same outputs, bit for bit.
template <class RunnerA, class RunnerB>
void require_same_outputs(RunnerA& a, RunnerB& b, const std::vector<std::vector<float>>& xs,
                          const std::vector<std::vector<Step>>& schedule) {
  const auto oa = run_schedule(a, xs, schedule), ob = run_schedule(b, xs, schedule);
  for (size_t s = 0; s < xs.size(); ++s) {
    REQUIRE(oa[s].size() == ob[s].size());
    REQUIRE(std::memcmp(oa[s].data(), ob[s].data(), oa[s].size() * sizeof(float)) == 0);
  }
}

/// Speculative decoding and fork on a runner with 3 slots of >= 15 tokens (step() as above, plus
/// cache and slot_of): snapshot, decode 4 draft tokens, roll back, decode them again: the same bits;
/// fork slot 0 into slot 2 and continue both with the same tokens: the same bits.
template <class Runner>
void check_snapshot_and_fork(Runner& r) {
  std::vector<std::vector<float>> xs = {rftest::random_vector<float>(size_t(20 * kDModel))};
  std::vector<int64_t> done = {0};
  r.step(xs, done, {{0, 8}});
  auto snap = r.cache.snapshot(0);
  std::vector<float> first, again;
  for (int i = 0; i < 4; ++i) {
    auto o = r.step(xs, done, {{0, 1}});
    first.insert(first.end(), o.begin(), o.end());
  }
  r.cache.restore(0, snap);
  done[0] = 8;
  for (int i = 0; i < 4; ++i) {
    auto o = r.step(xs, done, {{0, 1}});
    again.insert(again.end(), o.begin(), o.end());
  }
  REQUIRE(first.size() == again.size());
  REQUIRE(std::memcmp(first.data(), again.data(), first.size() * 4) == 0);
  r.cache.copy(0, 2);
  std::vector<std::vector<float>> xs2 = {xs[0], xs[0]};
  std::vector<int64_t> done2 = {12, 12};
  r.slot_of = {0, 2};
  const auto a = r.step(xs2, done2, {{0, 3}});
  const auto b = r.step(xs2, done2, {{1, 3}});
  REQUIRE(a.size() == b.size());
  REQUIRE(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
  REQUIRE(r.cache.length(2) == 15);
}

}  // namespace hybrid_layer
}  // namespace rftest
