// HybridHeadAttention against a plain double-precision reference of one Llama attention layer
// (GQA, rotate_half RoPE, causal softmax), of spec section 3's recurrent group (causal conv, low-rank
// softplus Δ, selective scan with g readers, D) and of the streaming sink/window mask, computed
// over each whole sequence from position 0. Every schedule (one prefill, chunked prefill, prefill +
// token-by-token decode, sequences batched or alone) must reproduce the same reference; plus the
// capacity error (cache and out bit-identical), snapshot/restore and fork. Every storage type, every
// ISA, head_dim 64 (what the attention op is compiled for).
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "recurformer/layers/hybrid_head_attention.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

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
    std::vector<float> dt_bias, A, D, conv_w, conv_b;
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
    for (int j = 0; j < layout.count(K::recurrent); ++j) {
      Rec r;
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
  HybridCacheConfig cache_config(int slots, int64_t capacity) const {
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
    if (kind != K::recurrent) {
      for (int64_t t = 0; t < L; ++t)
        for (int r = 0; r < g; ++r) {
          const int h = j * g + r;
          std::vector<double> s;
          std::vector<int64_t> keys;
          for (int64_t p = 0; p <= t; ++p) {
            if (kind == K::streaming && !(p < kSink || p > t - kWindow)) continue;
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
    } else {
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
            concat[size_t((t * kNq + h) * kHd + c)] = y;
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

// Runs a schedule: a list of batches, each a list of (sequence, tokens); sequence s lives in slot
// slot_of[s] and takes its next tokens from xs[s]. Returns each sequence's outputs [L, d_model].
struct Step {
  int seq;
  int count;
};
template <class T, class TW>
struct Runner {
  const Model<TW>& m;
  HybridCache<T> cache;
  std::vector<int> slot_of;
  std::vector<unsigned char> ws;
  ThreadPool pool{2};
  bool threaded = true;  // false: run on the calling thread (fast on a loaded 2-core CI machine)

  Runner(const Model<TW>& model, int slots, int64_t capacity)
      : m(model), cache(model.cache_config(slots, capacity)) {
    for (int s = 0; s < slots; ++s) slot_of.push_back(s);
  }
  HybridHeadAttentionParams<T, TW> params(const std::vector<float>& x, std::vector<float>& out,
                                          const std::vector<int32_t>& cu, const std::vector<int32_t>& slots) {
    HybridHeadAttentionParams<T, TW> p;
    const int64_t n = int64_t(x.size()) / kDModel;
    p.x = make_view(x.data(), {n, kDModel});
    p.out = make_view(out.data(), {n, kDModel});
    p.weights = m.weights();
    p.cache = &cache;
    p.layer = 0;
    p.n_q = kNq;
    p.cu_seqlens = make_view(cu.data(), {int64_t(cu.size())});
    p.slots = make_view(slots.data(), {int64_t(slots.size())});
    p.inv_freq = make_view(m.inv_freq.data(), {int64_t(m.inv_freq.size())});
    return p;
  }
  // One batch; returns the outputs packed like the input.
  std::vector<float> step(const std::vector<std::vector<float>>& xs, std::vector<int64_t>& done,
                          const std::vector<Step>& batch) {
    std::vector<float> x;
    std::vector<int32_t> cu = {0}, slots, counts;
    for (const Step& b : batch) {
      const float* src = xs[size_t(b.seq)].data() + done[size_t(b.seq)] * kDModel;
      x.insert(x.end(), src, src + int64_t(b.count) * kDModel);
      cu.push_back(cu.back() + b.count);
      slots.push_back(slot_of[size_t(b.seq)]);
      counts.push_back(b.count);
    }
    std::vector<float> out(x.size(), -7.f);
    auto p = params(x, out, cu, slots);
    CpuExec exec{threaded ? &pool : nullptr};
    ws.resize(hybrid_head_attention_workspace_bytes(p, exec));
    hybrid_head_attention(p, exec, ws.data(), ws.size());
    cache.advance(make_view(const_cast<const int32_t*>(slots.data()), {int64_t(slots.size())}),
                  make_view(const_cast<const int32_t*>(counts.data()), {int64_t(counts.size())}));
    for (const Step& b : batch) done[size_t(b.seq)] += b.count;
    return out;
  }
  std::vector<std::vector<float>> run(const std::vector<std::vector<float>>& xs,
                                      const std::vector<std::vector<Step>>& schedule) {
    std::vector<int64_t> done(xs.size(), 0);
    std::vector<std::vector<float>> outs(xs.size());
    for (const auto& batch : schedule) {
      const std::vector<float> out = step(xs, done, batch);
      int64_t off = 0;
      for (const Step& b : batch) {
        outs[size_t(b.seq)].insert(outs[size_t(b.seq)].end(), out.begin() + off,
                                   out.begin() + off + int64_t(b.count) * kDModel);
        off += int64_t(b.count) * kDModel;
      }
    }
    return outs;
  }
};

// Tolerance: the plain per-dtype budget. q, k, v, the head outputs and Δ are each rounded once to
// T, but Wo averages the rounding errors of 384 head outputs, so no extra factor is needed.
template <class T, class TW>
void check_schedule(const Model<TW>& m, const std::vector<int64_t>& lens,
                    const std::vector<std::vector<Step>>& schedule, const char* what) {
  std::vector<std::vector<float>> xs;
  for (int64_t L : lens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  std::vector<std::vector<double>> refs;
  for (size_t s = 0; s < xs.size(); ++s) refs.push_back(reference(m, xs[s], lens[s]));
  rftest::for_each_isa([&] {
    Runner<T, TW> r(m, int(lens.size()) + 1, 40);
    // Two threads under the best ISA; the other ISAs' bodies are the same code on one thread.
    r.threaded = cpu::active_isa() == cpu::detected_isa();
    r.slot_of = {};
    for (size_t s = 0; s < lens.size(); ++s) r.slot_of.push_back(int(lens.size() - s));  // not the identity
    const auto outs = r.run(xs, schedule);
    for (size_t s = 0; s < xs.size(); ++s) {
      REQUIRE(int64_t(outs[s].size()) == lens[s] * kDModel);
      rftest::check_close<T>(std::string(what) + ", sequence " + std::to_string(s), outs[s], refs[s]);
    }
  });
}

// Schedules over two sequences of 20 and 13 tokens (20 > sink + window = 7).
const std::vector<int64_t> kLens = {20, 13};
std::vector<std::vector<Step>> one_prefill() { return {{{0, 20}, {1, 13}}}; }
std::vector<std::vector<Step>> chunked() { return {{{0, 6}, {1, 1}}, {{1, 12}}, {{0, 1}}, {{0, 13}}}; }
std::vector<std::vector<Step>> prefill_then_decode() {
  std::vector<std::vector<Step>> s = {{{0, 9}, {1, 3}}};
  for (int i = 0; i < 10; ++i) s.push_back({{1, 1}, {0, 1}});
  s.push_back({{0, 1}});
  return s;
}
std::vector<std::vector<Step>> alone() {  // each sequence in its own calls: same as batched
  return {{{0, 20}}, {{1, 5}}, {{1, 8}}};
}

template <class T>
void all_schedules(const LayerLayout& layout, bool biases) {
  Model<T> m(layout, biases);
  check_schedule<T>(m, kLens, one_prefill(), "one prefill");
  check_schedule<T>(m, kLens, chunked(), "chunked prefill");
  check_schedule<T>(m, kLens, prefill_then_decode(), "prefill + decode");
  check_schedule<T>(m, kLens, alone(), "sequences alone");
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention all-attention layout == Llama attention reference",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  all_schedules<TestType>({{K::attention, K::attention, K::attention}}, false);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention all-recurrent layout == spec section 3 reference",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  all_schedules<TestType>({{K::recurrent, K::recurrent, K::recurrent}}, true);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention streaming groups == sink/window reference",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  all_schedules<TestType>({{K::streaming, K::attention, K::streaming}}, true);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention mixed layouts == reference", "[hybrid_head_attention]",
                        rftest::StorageTypes) {
  all_schedules<TestType>({{K::recurrent, K::streaming, K::attention}}, true);
  all_schedules<TestType>({{K::recurrent, K::attention}}, true);  // n_kv 2, g 3
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention capacity error leaves cache and out bit-identical",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::attention, K::recurrent, K::streaming}}, true);
  Runner<T, T> r(m, 2, 12);
  std::vector<std::vector<float>> xs = {rftest::random_vector<float>(size_t(20 * kDModel)),
                                        rftest::random_vector<float>(size_t(20 * kDModel))};
  std::vector<int64_t> done = {0, 0};
  r.step(xs, done, {{0, 9}, {1, 4}});
  auto dump = [&] {
    std::vector<unsigned char> b;
    auto add = [&](const auto& v) {
      const auto* p = reinterpret_cast<const unsigned char*>(v.data);
      b.insert(b.end(), p, p + v.numel() * int64_t(sizeof(*v.data)));
    };
    add(r.cache.keys(0)), add(r.cache.values(0)), add(r.cache.ssm_states(0)), add(r.cache.conv_states(0));
    add(r.cache.stream_keys(0)), add(r.cache.stream_values(0)), add(r.cache.lengths());
    return b;
  };
  const auto before = dump();
  // Slot 1 could take 8 more, slot 0 only 3: a batch of (1: 2 tokens, 0: 4 tokens) must not touch
  // slot 1 either.
  std::vector<float> x(size_t(6 * kDModel), 0.5f), out(x.size(), -7.f);
  std::vector<int32_t> cu = {0, 2, 6}, slots = {1, 0};
  auto p = r.params(x, out, cu, slots);
  CpuExec exec{&r.pool};
  std::vector<unsigned char> ws(1 << 22);
  REQUIRE_THROWS_WITH(hybrid_head_attention(p, exec, ws.data(), ws.size()),
                      Catch::Contains("slot 0") && Catch::Contains("capacity 12"));
  REQUIRE(dump() == before);
  for (float o : out) REQUIRE(o == -7.f);
  // Other bad inputs: named, and nothing written.
  std::vector<int32_t> dup = {0, 0};
  auto pd = r.params(x, out, cu, dup);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pd, exec, ws.data(), ws.size()), Catch::Contains("twice"));
  const std::vector<int32_t> bad_cu = {0, 2, 3}, cu2 = {0, 1, 2};
  auto pw = r.params(x, out, bad_cu, slots);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pw, exec, ws.data(), ws.size()), Catch::Contains("cu_seqlens"));
  std::vector<float> x2(size_t(2 * kDModel), 0.5f), out2(x2.size(), -7.f);
  auto pr = r.params(x2, out2, cu2, slots);
  pr.weights.n_recurrent = 0;
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), ws.size()), Catch::Contains("recurrent"));
  pr = r.params(x2, out2, cu2, slots);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), 100), Catch::Contains("workspace"));
  pr.n_q = 4;
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), ws.size()), Catch::Contains("n_q"));
  REQUIRE(dump() == before);
  for (float o : out2) REQUIRE(o == -7.f);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention snapshot/restore and fork reproduce outputs",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::recurrent, K::attention, K::streaming}}, true);
  Runner<T, T> r(m, 3, 30);
  std::vector<std::vector<float>> xs = {rftest::random_vector<float>(size_t(20 * kDModel))};
  std::vector<int64_t> done = {0};
  r.step(xs, done, {{0, 8}});
  // Speculative decoding: snapshot, decode 4 draft tokens, roll back, decode them again.
  auto snap = r.cache.snapshot(0);
  std::vector<float> first;
  for (int i = 0; i < 4; ++i) {
    auto o = r.step(xs, done, {{0, 1}});
    first.insert(first.end(), o.begin(), o.end());
  }
  r.cache.restore(0, snap);
  done[0] = 8;
  std::vector<float> again;
  for (int i = 0; i < 4; ++i) {
    auto o = r.step(xs, done, {{0, 1}});
    again.insert(again.end(), o.begin(), o.end());
  }
  REQUIRE(std::memcmp(first.data(), again.data(), first.size() * 4) == 0);
  // Fork slot 0 (12 tokens) into slot 2; both continue with the same tokens: identical outputs.
  r.cache.copy(0, 2);
  std::vector<std::vector<float>> xs2 = {xs[0], xs[0]};
  std::vector<int64_t> done2 = {12, 12};
  r.slot_of = {0, 2};
  const auto a = r.step(xs2, done2, {{0, 3}});
  const auto b = r.step(xs2, done2, {{1, 3}});
  REQUIRE(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
  REQUIRE(r.cache.length(2) == 15);
}

TEST_CASE("HybridHeadAttention without cu_seqlens and slots: one sequence in slot 0",
          "[hybrid_head_attention]") {
  Model<float> m({{K::attention, K::recurrent, K::streaming}}, true);
  const int64_t L = 10;
  const std::vector<float> xs = rftest::random_vector<float>(size_t(L * kDModel));
  const std::vector<double> ref = reference(m, xs, L);
  Runner<float, float> r(m, 1, 16);
  std::vector<float> outs;
  CpuExec exec{&r.pool};
  for (int64_t begin : {int64_t(0), int64_t(9)}) {  // a prefill of 9, then one decode step
    const int64_t n = begin == 0 ? 9 : 1;
    const std::vector<float> x(xs.begin() + begin * kDModel, xs.begin() + (begin + n) * kDModel);
    std::vector<float> out(x.size(), -7.f);
    HybridHeadAttentionParams<float, float> p = r.params(x, out, {}, {});
    p.cu_seqlens = {};
    p.slots = {};
    std::vector<unsigned char> ws(hybrid_head_attention_workspace_bytes(p, exec));
    hybrid_head_attention(p, exec, ws.data(), ws.size());
    const std::vector<int32_t> slot = {0}, count = {int32_t(n)};
    r.cache.advance(make_view(slot.data(), {1}), make_view(count.data(), {1}));
    outs.insert(outs.end(), out.begin(), out.end());
  }
  rftest::check_close<float>("cu_seqlens and slots absent", outs, ref);
}
