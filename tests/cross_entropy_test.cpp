// The fused lm_head + cross-entropy (+ KL to a teacher) forward and backward (ops/cross_entropy.hpp).
//
// Against a double-precision reference written here: the losses (ce, kl, loss, per-token nll) and
// central finite differences of the loss itself for dh (every element) and dweight (every element
// when vocab x d <= 300, else 48 sampled ones plus the first target's row), at tokens 1, 3, 17,
// widths 5, 13, 37, vocab 1, 7, 1000, with chunks smaller than the token count, ignored targets,
// teachers of another width, grad_scale and accumulate, for every lm_head dtype (float, half,
// bfloat16; the reference reads the same rounded weights) and every CPU ISA. Also: the gradients
// do not depend on the thread count, the forward-only call gives the same losses, a gradient 0.1%
// off (or without the KL term) fails the check, bad input throws naming the argument and writes
// nothing, and fp32 results match PyTorch autograd (F.cross_entropy + F.kl_div) fixtures.
//
// Tolerances. Losses: 1e-5 relative + 1e-5 absolute (fp32 logits summed over d <= 37 products
// carry ~1e-6 absolute error into a log-sum-exp of size ~10). Gradients: 1e-4 |want| + 1e-5 max|want|:
// dh = s * sum_v (ps[v] - [v = y]) W[v] cancels to about |W| / N while the softmax probabilities
// carry the logits' ~1e-6 relative error summed over up to 1000 terms, so a few 1e-6 of max|want|
// is the fp32 error; finite differences of the double reference are exact to ~1e-9.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "recurformer/cpu/cross_entropy.hpp"
#include "support/grad_check.hpp"

using namespace recurformer;
using rftest::pool;

namespace {

constexpr double kLossRel = 1e-5, kLossAbs = 1e-5;
constexpr double kGradRel = 1e-4, kGradAbsOfMax = 1e-5;

/// Inputs of one case in double (the rounded values the op reads).
struct CeRef {
  int64_t tokens = 0, d = 0, vocab = 0, dt = 0;
  std::vector<double> h, w, th, tw;
  std::vector<int32_t> targets;
  double lam = 0;

  int64_t count() const {
    int64_t n = 0;
    for (int32_t y : targets) n += y >= 0;
    return n;
  }
  // ce_t and kl_t of token t.
  void token(int64_t t, double& ce, double& kl) const {
    ce = kl = 0;
    if (targets[size_t(t)] < 0) return;
    std::vector<double> z(static_cast<size_t>(vocab)), zt(static_cast<size_t>(dt ? vocab : 0));
    auto logits = [&](const std::vector<double>& x, const std::vector<double>& m, int64_t k, std::vector<double>& out) {
      for (int64_t v = 0; v < vocab; ++v) {
        double s = 0;
        for (int64_t i = 0; i < k; ++i) s += x[size_t(t * k + i)] * m[size_t(v * k + i)];
        out[size_t(v)] = s;
      }
    };
    auto lse = [&](const std::vector<double>& a) {
      const double mx = *std::max_element(a.begin(), a.end());
      double s = 0;
      for (double x : a) s += std::exp(x - mx);
      return mx + std::log(s);
    };
    logits(h, w, d, z);
    const double l = lse(z);
    ce = l - z[size_t(targets[size_t(t)])];
    if (!dt) return;
    logits(th, tw, dt, zt);
    const double lt = lse(zt);
    for (int64_t v = 0; v < vocab; ++v) {
      const double lpt = zt[size_t(v)] - lt, lps = z[size_t(v)] - l;
      kl += std::exp(lpt) * (lpt - lps);
    }
  }
  double token_loss(int64_t t) const {
    double ce, kl;
    token(t, ce, kl);
    return ce + lam * kl;
  }
  double loss() const {
    const int64_t n = count();
    double l = 0;
    for (int64_t t = 0; t < tokens; ++t) l += token_loss(t);
    return n ? l / double(n) : 0.0;
  }
};

struct CeCase {
  int64_t tokens, d, vocab, dt, chunk;
  double lam;
  std::vector<int64_t> ignored;
  bool accumulate = false;
  float grad_scale = 1.f;
};

template <class TW>
void run_cross_entropy(const CeCase& c) {
  INFO("tokens " << c.tokens << ", d " << c.d << ", vocab " << c.vocab << ", teacher d " << c.dt << ", chunk "
                 << c.chunk << ", kl_weight " << c.lam << ", accumulate " << c.accumulate << ", grad_scale "
                 << c.grad_scale);
  const int64_t T = c.tokens, d = c.d, V = c.vocab, dt = c.dt;
  const int64_t ldh = d + 3;  // strided hidden states
  const auto h = rftest::random_vector<float>(size_t(T * ldh));
  const auto w = rftest::random_vector<TW>(size_t(V * d), -2.0, 2.0);  // logits spread over several units
  const auto th = rftest::random_vector<float>(size_t(T * dt));
  const auto tw = rftest::random_vector<TW>(size_t(V * dt), -2.0, 2.0);
  std::vector<int32_t> targets(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) targets[size_t(t)] = int32_t((t * 7919 + 13) % V);
  for (int64_t t : c.ignored) targets[size_t(t)] = -1 - int32_t(t);  // any negative id is ignored
  const auto dw0 = rftest::random_vector<float>(size_t(V * d));

  CeRef ref;
  ref.tokens = T, ref.d = d, ref.vocab = V, ref.dt = dt, ref.lam = c.lam, ref.targets = targets;
  ref.h.resize(size_t(T * d));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < d; ++i) ref.h[size_t(t * d + i)] = h[size_t(t * ldh + i)];
  ref.w = rftest::to_double(w), ref.th = rftest::to_double(th), ref.tw = rftest::to_double(tw);
  const int64_t N = ref.count();
  const double gs = c.grad_scale;

  double want_ce = 0, want_kl = 0;
  std::vector<double> want_nll(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    double ce, kl;
    ref.token(t, ce, kl);
    want_nll[size_t(t)] = ce;
    want_ce += ce / double(N);
    want_kl += kl / double(N);
  }
  const double want_loss = want_ce + c.lam * want_kl;
  // dh: h[t, i] moves only token t's term.
  std::vector<double> want_dh = rftest::fd_gradient(ref.h, [&](size_t i) { return ref.token_loss(int64_t(i) / d); });
  for (double& g : want_dh) g *= gs / double(N);
  // dweight at every element or a sample.
  std::vector<size_t> idx;
  if (V * d <= 300) {
    for (size_t i = 0; i < size_t(V * d); ++i) idx.push_back(i);
  } else {
    for (int64_t i = 0; i < d; ++i) idx.push_back(size_t(targets[0] >= 0 ? targets[0] : 0) * size_t(d) + size_t(i));
    for (int k = 0; k < 48; ++k) idx.push_back(size_t((uint64_t(k) * 2654435761u) % uint64_t(V * d)));
  }
  std::vector<double> sel(idx.size());
  for (size_t k = 0; k < idx.size(); ++k) sel[k] = ref.w[idx[k]];
  std::vector<double> want_dw = rftest::fd_gradient(sel, [&](size_t k) {
    const double keep = ref.w[idx[k]];
    ref.w[idx[k]] = sel[k];
    const double l = ref.loss();
    ref.w[idx[k]] = keep;
    return l;
  });
  for (size_t k = 0; k < idx.size(); ++k) want_dw[k] = want_dw[k] * gs + (c.accumulate ? dw0[idx[k]] : 0.0);
  const double dh_abs = kGradAbsOfMax * rftest::max_abs(want_dh), dw_abs = kGradAbsOfMax * rftest::max_abs(want_dw);

  std::vector<float> dh(size_t(T * d)), dw, nll(static_cast<size_t>(T));
  std::vector<float> first_dh, first_dw;
  CrossEntropyBackwardParams<TW> p;
  p.h = make_strided_view(h.data(), {T, d}, {ldh, 1});
  p.weight = make_view(w.data(), {V, d});
  p.targets = make_view<const int32_t>(targets.data(), {T});
  if (dt) {
    p.teacher_h = make_view(th.data(), {T, dt});
    p.teacher_weight = make_view(tw.data(), {V, dt});
  }
  p.kl_weight = float(c.lam);
  p.chunk_tokens = c.chunk;
  p.nll = make_view(nll.data(), {T});
  p.dh = make_view(dh.data(), {T, d});
  p.accumulate = c.accumulate;
  p.grad_scale = c.grad_scale;
  auto run = [&](int threads) {
    const CpuExec exec{&pool(threads)};
    dw = dw0;
    std::fill(dh.begin(), dh.end(), 7.f);
    p.dweight = make_view(dw.data(), {V, d});
    rftest::Workspace ws(cross_entropy_workspace_bytes(p, exec));
    const CrossEntropyResult r = cross_entropy_backward(p, exec, ws.data, ws.size);
    REQUIRE(r.count == N);
    CHECK(std::fabs(r.ce - want_ce) <= kLossRel * std::fabs(want_ce) + kLossAbs);
    CHECK(std::fabs(r.kl - want_kl) <= kLossRel * std::fabs(want_kl) + kLossAbs);
    CHECK(std::fabs(r.loss - want_loss) <= kLossRel * std::fabs(want_loss) + kLossAbs);
    if (!dt) REQUIRE(r.kl == 0);
    rftest::check_grad("nll", nll, want_nll, kLossRel, kLossAbs);
    rftest::check_grad("dh", dh, want_dh, kGradRel, dh_abs);
    std::vector<float> got_dw(idx.size());
    for (size_t k = 0; k < idx.size(); ++k) got_dw[k] = dw[idx[k]];
    rftest::check_grad("dweight", got_dw, want_dw, kGradRel, dw_abs);
    // The forward alone gives the same losses.
    std::fill(nll.begin(), nll.end(), 7.f);
    const CrossEntropyParams<TW>& fp = p;
    const CrossEntropyResult f = cross_entropy(fp, exec, ws.data, ws.size);
    REQUIRE(f.count == r.count);
    REQUIRE(f.loss == r.loss);
    REQUIRE(f.ce == r.ce);
    rftest::check_grad("nll (forward)", nll, want_nll, kLossRel, kLossAbs);
  };
  rftest::for_each_isa([&] {
    run(1);
    first_dh = dh, first_dw = dw;
    run(3);
    REQUIRE(std::memcmp(dh.data(), first_dh.data(), dh.size() * sizeof(float)) == 0);
    REQUIRE(std::memcmp(dw.data(), first_dw.data(), dw.size() * sizeof(float)) == 0);
  });

  // A check that could not tell these from the right gradient would be worthless.
  std::vector<float> off(dh);
  for (float& g : off) g *= 1.001f;
  REQUIRE_FALSE(rftest::grad_matches(off, want_dh, kGradRel, dh_abs));
  if (c.lam > 0) {  // the same loss without its KL term
    CeRef no_kl = ref;
    no_kl.lam = 0;
    std::vector<double> wrong = rftest::fd_gradient(no_kl.h, [&](size_t i) { return no_kl.token_loss(int64_t(i) / d); });
    for (double& g : wrong) g *= gs / double(N);
    REQUIRE_FALSE(rftest::grad_matches(dh, wrong, kGradRel, dh_abs));
  }
}

const std::vector<CeCase>& cases() {
  static const std::vector<CeCase> list = {
      {3, 13, 7, 0, 2, 0.0, {}},
      {17, 37, 1000, 0, 5, 0.0, {2, 16}},                  // 4 chunks, the last one of 2 tokens
      {17, 13, 1000, 7, 4, 0.5, {0}, true},               // teacher of another width, accumulate
      {3, 5, 7, 13, 1, 2.0, {}, false, 0.25f},            // chunk of 1, grad_scale
      {17, 37, 7, 5, 16, 0.3, {3, 4, 5}},
      {1, 37, 1000, 37, 32, 1.0, {}},                     // one token, chunk larger than the tokens
      {17, 5, 1000, 0, 17, 0.0, {}},                      // one chunk through the logits GEMM (> 16 tokens)
  };
  return list;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("cross_entropy and its backward match a double reference and finite differences",
                        "[cross_entropy][backward]", rftest::StorageTypes) {
  for (const CeCase& c : cases()) run_cross_entropy<TestType>(c);
}

TEST_CASE("cross_entropy edge cases: vocab 1, every target ignored, no tokens", "[cross_entropy][backward]") {
  const int64_t T = 3, d = 5;
  const auto h = rftest::random_vector<float>(size_t(T * d)), w1 = rftest::random_vector<float>(size_t(d));
  std::vector<int32_t> targets = {0, 0, -1};
  std::vector<float> dh(size_t(T * d), 7.f), dw(size_t(d), 7.f);
  CrossEntropyBackwardParams<float> p;
  p.h = make_view(h.data(), {T, d});
  p.weight = make_view(w1.data(), {int64_t(1), d});
  p.targets = make_view<const int32_t>(targets.data(), {T});
  p.teacher_h = p.h;
  p.teacher_weight = p.weight;
  p.kl_weight = 1.f;
  p.dh = make_view(dh.data(), {T, d});
  p.dweight = make_view(dw.data(), {int64_t(1), d});
  const CpuExec exec{&pool()};
  rftest::Workspace ws(cross_entropy_workspace_bytes(p, exec));
  // One word: log-softmax is 0 whatever the logit, so loss and gradients are exactly 0.
  CrossEntropyResult r = cross_entropy_backward(p, exec, ws.data, ws.size);
  REQUIRE(r.count == 2);
  REQUIRE(r.loss == 0);
  for (float g : dh) REQUIRE(g == 0.f);
  for (float g : dw) REQUIRE(g == 0.f);
  // Nothing counted: zero loss, zero gradients (PyTorch's mean over nothing would be NaN).
  targets = {-1, -5, -100};
  std::fill(dh.begin(), dh.end(), 7.f);
  std::fill(dw.begin(), dw.end(), 7.f);
  r = cross_entropy_backward(p, exec, ws.data, ws.size);
  REQUIRE(r.count == 0);
  REQUIRE(r.loss == 0);
  for (float g : dh) REQUIRE(g == 0.f);
  for (float g : dw) REQUIRE(g == 0.f);
  // No tokens: no workspace; dweight is still set to 0 unless accumulating.
  p.h = make_view(h.data(), {int64_t(0), d});
  p.teacher_h = p.h;
  p.targets = make_view<const int32_t>(targets.data(), {int64_t(0)});
  p.dh = make_view(dh.data(), {int64_t(0), d});
  p.nll = {};
  REQUIRE(cross_entropy_workspace_bytes(p, exec) == 0);
  std::fill(dw.begin(), dw.end(), 7.f);
  r = cross_entropy_backward(p, exec, nullptr, 0);
  REQUIRE(r.count == 0);
  for (float g : dw) REQUIRE(g == 0.f);
  p.accumulate = true;
  std::fill(dw.begin(), dw.end(), 7.f);
  cross_entropy_backward(p, exec, nullptr, 0);
  for (float g : dw) REQUIRE(g == 7.f);
}

TEST_CASE("cross_entropy_backward matches PyTorch autograd", "[cross_entropy][backward][golden]") {
  for (const char* c : {"cross_entropy_backward", "cross_entropy_kl_backward"}) {
    INFO(c);
    const auto ha = rftest::golden_grads(c, "h"), wa = rftest::golden_grads(c, "weight");
    const auto h = ha.as<float>(), w = wa.as<float>();
    const auto targets = rftest::golden_grads(c, "targets").as<int32_t>();  // -100 = ignored
    const int64_t T = ha.shape[0], d = ha.shape[1], V = wa.shape[0];
    const bool teacher = std::string(c).find("kl") != std::string::npos;
    std::vector<float> th, tw;
    int64_t dt = 0;
    if (teacher) {
      const auto tha = rftest::golden_grads(c, "teacher_h");
      th = tha.as<float>(), tw = rftest::golden_grads(c, "teacher_weight").as<float>();
      dt = tha.shape[1];
    }
    const double want_loss = rftest::golden_grads(c, "loss").as<float>()[0];
    const double want_ce = rftest::golden_grads(c, "ce").as<float>()[0];
    const double want_kl = rftest::golden_grads(c, "kl").as<float>()[0];
    const auto want_dh = rftest::as_double(rftest::golden_grads(c, "dh"));
    const auto want_dw = rftest::as_double(rftest::golden_grads(c, "dweight"));
    rftest::for_each_isa([&] {
      std::vector<float> dh(size_t(T * d)), dw(size_t(V * d));
      CrossEntropyBackwardParams<float> p;
      p.h = make_view(h.data(), {T, d});
      p.weight = make_view(w.data(), {V, d});
      p.targets = make_view(targets.data(), {T});
      if (teacher) {
        p.teacher_h = make_view<const float>(th.data(), {T, dt});
        p.teacher_weight = make_view<const float>(tw.data(), {V, dt});
        p.kl_weight = 0.5f;
      }
      p.chunk_tokens = 3;  // chunks of 3, 3, 1 (or 3, 3, 3)
      p.dh = make_view(dh.data(), {T, d});
      p.dweight = make_view(dw.data(), {V, d});
      const CpuExec exec{&pool()};
      rftest::Workspace ws(cross_entropy_workspace_bytes(p, exec));
      const CrossEntropyResult r = cross_entropy_backward(p, exec, ws.data, ws.size);
      CHECK(std::fabs(r.loss - want_loss) <= 1e-5 * std::fabs(want_loss));
      CHECK(std::fabs(r.ce - want_ce) <= 1e-5 * std::fabs(want_ce));
      CHECK(std::fabs(r.kl - want_kl) <= 1e-5 * std::fabs(want_kl) + (teacher ? 0.0 : 1e-30));
      rftest::check_grad("dh", dh, want_dh, rftest::kGoldenGradRel, rftest::kGoldenGradAbsOfMax * rftest::max_abs(want_dh));
      rftest::check_grad("dweight", dw, want_dw, rftest::kGoldenGradRel,
                         rftest::kGoldenGradAbsOfMax * rftest::max_abs(want_dw));
    });
  }
}

TEST_CASE("cross_entropy rejects bad input and writes nothing", "[cross_entropy][backward]") {
  const int64_t T = 4, d = 6, V = 9, dt = 3;
  const auto h = rftest::random_vector<float>(size_t(T * d)), th = rftest::random_vector<float>(size_t(T * dt));
  const auto w = rftest::random_vector<bfloat16>(size_t(V * d)), tw = rftest::random_vector<bfloat16>(size_t(V * dt));
  std::vector<int32_t> targets = {1, 8, -1, 0};
  std::vector<float> dh(size_t(T * d), 7.f), dw(size_t(V * d), 7.f), nll(size_t(T), 7.f);
  std::vector<unsigned char> ws(1 << 20);
  auto good = [&] {
    CrossEntropyBackwardParams<bfloat16> p;
    p.h = make_view(h.data(), {T, d});
    p.weight = make_view(w.data(), {V, d});
    p.targets = make_view<const int32_t>(targets.data(), {T});
    p.teacher_h = make_view(th.data(), {T, dt});
    p.teacher_weight = make_view(tw.data(), {V, dt});
    p.kl_weight = 0.5f;
    p.nll = make_view(nll.data(), {T});
    p.dh = make_view(dh.data(), {T, d});
    p.dweight = make_view(dw.data(), {V, d});
    return p;
  };
  auto untouched = [&] {
    for (float v : dh) REQUIRE(v == 7.f);
    for (float v : dw) REQUIRE(v == 7.f);
    for (float v : nll) REQUIRE(v == 7.f);
  };
  auto expect = [&](const CrossEntropyBackwardParams<bfloat16>& p, const char* what, size_t bytes = 1 << 20) {
    INFO(what);
    for (int backward = 0; backward < 2; ++backward) {
      const std::string op = backward ? "cross_entropy_backward" : "cross_entropy";
      try {
        if (backward)
          cross_entropy_backward(p, CpuExec{&pool()}, ws.data(), bytes);
        else
          cross_entropy(static_cast<const CrossEntropyParams<bfloat16>&>(p), CpuExec{&pool()}, ws.data(), bytes);
        FAIL("no throw from " << op);
      } catch (const Error& e) {
        const std::string msg = e.what();
        INFO(msg);
        REQUIRE(msg.rfind(op + ": ", 0) == 0);
        REQUIRE(msg.find(what) != std::string::npos);
      }
      untouched();
    }
  };
  auto p = good();
  p.weight = make_view(w.data(), {V, d - 1});
  expect(p, "weight has shape");
  p = good();
  p.targets = make_view<const int32_t>(targets.data(), {T - 1});
  expect(p, "targets has shape");
  p = good();
  p.teacher_weight = {};
  expect(p, "teacher_h and teacher_weight come together");
  p = good();
  p.teacher_weight = make_view(tw.data(), {V - 1, dt});
  expect(p, "teacher_weight has shape");
  p = good();
  p.teacher_h = {}, p.teacher_weight = {};
  expect(p, "kl_weight = 0.5 needs a teacher");
  p = good();
  p.kl_weight = -1.f;
  expect(p, "kl_weight must be finite and >= 0");
  p = good();
  p.chunk_tokens = 0;
  expect(p, "chunk_tokens must be >= 1");
  p = good();
  p.nll = make_view(nll.data(), {T - 1});
  expect(p, "nll has shape");
  expect(good(), "workspace", 100);
  targets[2] = int32_t(V);
  expect(good(), "targets[2] = 9 is outside the vocabulary [0, 9)");
  targets[2] = -1;

  // The backward's own arguments.
  auto expect_bwd = [&](const CrossEntropyBackwardParams<bfloat16>& q, const char* what) {
    INFO(what);
    try {
      cross_entropy_backward(q, CpuExec{&pool()}, ws.data(), ws.size());
      FAIL("no throw");
    } catch (const Error& e) {
      const std::string msg = e.what();
      INFO(msg);
      REQUIRE(msg.rfind("cross_entropy_backward: ", 0) == 0);
      REQUIRE(msg.find(what) != std::string::npos);
    }
    untouched();
  };
  p = good();
  p.dh = make_view(dh.data(), {T, d + 1});
  expect_bwd(p, "dh has shape");
  p = good();
  p.dweight = make_view(dw.data(), {V + 1, d});
  expect_bwd(p, "dweight has shape");
  p = good();
  p.dh = make_view(const_cast<float*>(h.data()), {T, d});
  expect_bwd(p, "dh must not overlap h");
  p = good();
  p.grad_scale = INFINITY;
  expect_bwd(p, "grad_scale must be finite");
}
