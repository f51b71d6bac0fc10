// Backward passes of the Llama blocks: rmsnorm, rope, swiglu, embedding (one executable to keep
// compile time down; the fused cross-entropy has its own, tests/cross_entropy_test.cpp).
//
// Each backward is checked against central finite differences of a double-precision reference
// forward written here, with L = sum(dy * y) for a random dy, on random inputs at awkward shapes
// (1 token, odd widths that are not multiples of any vector width), strided views, in-place and
// accumulate variants, in every storage dtype the forward takes and under every CPU ISA; a wrong
// gradient is shown to fail the same check; bad input throws naming the argument and writes
// nothing; results do not depend on the thread count; and the fp32 gradients match PyTorch
// autograd fixtures (tests/data/golden_grads/, tools/make_golden_grads_blocks.py).
//
// Tolerances (support/grad_check.hpp): |got - want| <= 2e-5 |want| + 2e-6 * S with S the size of
// the terms the gradient sums (max|want|, or for rmsnorm's dx the larger of its two terms). The
// kernels accumulate in fp32 over at most 37 terms: a few ulps (6e-8) per term, well inside 2e-5;
// the finite differences of the double reference are exact to ~1e-10.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "recurformer/cpu/embedding.hpp"
#include "recurformer/cpu/rmsnorm.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/swiglu.hpp"
#include "support/grad_check.hpp"

using namespace recurformer;
using rftest::pool;

namespace {

constexpr double kRel = 2e-5, kAbsOfScale = 2e-6;

/// Expects fn() to throw an Error whose message starts with "op: " and contains `what`.
template <class F>
void expect_error(const char* op, const char* what, F&& fn) {
  INFO(what);
  try {
    fn();
    FAIL("no throw");
  } catch (const Error& e) {
    const std::string msg = e.what();
    INFO(msg);
    REQUIRE(msg.rfind(std::string(op) + ": ", 0) == 0);
    REQUIRE(msg.find(what) != std::string::npos);
  }
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// ================================================================================================
// rmsnorm

// L_t = sum_i dy[i] * x[i] * r * w[i] for one row, r = 1 / sqrt(mean(x^2) + eps).
double rmsnorm_row_loss(const double* x, const double* w, const double* dy, int64_t d, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const double r = 1.0 / std::sqrt(ss / double(d) + eps);
  double l = 0;
  for (int64_t i = 0; i < d; ++i) l += dy[i] * x[i] * r * w[i];
  return l;
}

struct RmsCase {
  bool strided = false, in_place = false, accumulate = false;
};

template <class T, class TW>
void run_rmsnorm_backward(int64_t tokens, int64_t d, float eps, RmsCase c) {
  INFO("tokens " << tokens << ", d " << d << ", strided " << c.strided << ", in place " << c.in_place
                 << ", accumulate " << c.accumulate);
  const int64_t ldx = d + (c.strided ? 3 : 0), ldg = d + (c.strided ? 5 : 0);
  const int64_t ldo = c.in_place ? ldg : d + (c.strided ? 2 : 0);
  const auto x = rftest::random_vector<T>(size_t(tokens * ldx), -3.0, 3.0);
  const auto w = rftest::random_vector<TW>(size_t(d), 0.5, 1.5);
  const auto dy0 = rftest::random_vector<float>(size_t(tokens * ldg));
  const auto dw0 = rftest::random_vector<float>(size_t(d));

  // Double reference at the rounded inputs.
  std::vector<double> xd(size_t(tokens * d)), dyd(size_t(tokens * d)), wd = rftest::to_double(w);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < d; ++i) {
      xd[size_t(t * d + i)] = double(float(x[size_t(t * ldx + i)]));
      dyd[size_t(t * d + i)] = dy0[size_t(t * ldg + i)];
    }
  const double deps = double(eps);
  auto row_loss = [&](int64_t t) {
    return rmsnorm_row_loss(&xd[size_t(t * d)], wd.data(), &dyd[size_t(t * d)], d, deps);
  };
  const std::vector<double> want_dx = rftest::fd_gradient(xd, [&](size_t i) { return row_loss(int64_t(i) / d); });
  std::vector<double> want_dw = rftest::fd_gradient(wd, [&](size_t) {
    double l = 0;
    for (int64_t t = 0; t < tokens; ++t) l += row_loss(t);
    return l;
  });
  if (c.accumulate)
    for (int64_t i = 0; i < d; ++i) want_dw[size_t(i)] += dw0[size_t(i)];
  // dx = r dy w - c x: the floor follows the larger term, whose rounding sets the error.
  double dx_scale = rftest::max_abs(want_dx), naive_max = 0;
  std::vector<float> naive(want_dx.size());  // r dy w alone: what forgetting d r / d x gives
  for (int64_t t = 0; t < tokens; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += xd[size_t(t * d + i)] * xd[size_t(t * d + i)];
    const double r = 1.0 / std::sqrt(ss / double(d) + deps);
    for (int64_t i = 0; i < d; ++i) {
      naive[size_t(t * d + i)] = float(r * dyd[size_t(t * d + i)] * wd[size_t(i)]);
      naive_max = std::max(naive_max, std::fabs(double(naive[size_t(t * d + i)])));
    }
  }
  dx_scale = std::max(dx_scale, naive_max);
  const double dx_abs = kAbsOfScale * dx_scale, dw_abs = kAbsOfScale * rftest::max_abs(want_dw);
  REQUIRE_FALSE(rftest::grad_matches(naive, want_dx, kRel, dx_abs));

  std::vector<float> out(size_t(tokens * ldo)), dy, dw;
  std::vector<float> first_dw;
  auto run = [&](int threads) {
    dy = dy0;
    std::fill(out.begin(), out.end(), 7.f);
    dw = dw0;
    float* dx = c.in_place ? dy.data() : out.data();
    RmsNormBackwardParams<T, TW> p;
    p.x = make_strided_view<const T>(x.data(), {tokens, d}, {ldx, 1});
    p.weight = make_view(w.data(), {d});
    p.dy = make_strided_view<const float>(dy.data(), {tokens, d}, {ldg, 1});
    p.dx = make_strided_view(dx, {tokens, d}, {ldo, 1});
    p.dweight = make_view(dw.data(), {d});
    p.eps = eps;
    p.accumulate = c.accumulate;
    rftest::Workspace ws(rmsnorm_backward_workspace_bytes(p));
    rmsnorm_backward(p, CpuExec{&pool(threads)}, ws.data, ws.size);
    std::vector<float> got(size_t(tokens * d));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < d; ++i) got[size_t(t * d + i)] = dx[t * ldo + i];
    rftest::check_grad("rmsnorm dx", got, want_dx, kRel, dx_abs);
    rftest::check_grad("rmsnorm dweight", dw, want_dw, kRel, dw_abs);
    if (!c.in_place)  // the row padding of a strided dx is never written
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = d; i < ldo; ++i) REQUIRE(out[size_t(t * ldo + i)] == 7.f);
  };
  rftest::for_each_isa([&] {
    run(1);
    first_dw = dw;
    run(3);
    REQUIRE(same_bits(dw, first_dw));  // dweight sums tokens in order whatever the thread count
  });
}

TEMPLATE_LIST_TEST_CASE("rmsnorm_backward matches finite differences", "[rmsnorm][backward]",
                        rftest::StorageTypes) {
  using T = TestType;
  for (int64_t d : {5, 13, 37})
    for (int64_t tokens : {1, 3, 17}) {
      run_rmsnorm_backward<T, T>(tokens, d, 1e-5f, {});
      run_rmsnorm_backward<T, float>(tokens, d, 1e-5f, {});  // fp32 weights on any activation dtype
    }
  run_rmsnorm_backward<T, T>(3, 13, 1e-5f, {true, false, false});
  run_rmsnorm_backward<T, T>(17, 37, 1e-5f, {true, true, true});
  run_rmsnorm_backward<T, T>(3, 1, 0.25f, {false, true, false});  // d = 1 (eps large: no cancellation)
}

TEST_CASE("rmsnorm_backward matches PyTorch autograd", "[rmsnorm][backward][golden]") {
  const std::string c = "rmsnorm_backward";
  const auto x = rftest::golden_grads(c, "x"), w = rftest::golden_grads(c, "weight");
  const auto dy = rftest::golden_grads(c, "dy");
  const int64_t tokens = x.shape[0], d = x.shape[1];
  const auto xv = x.as<float>(), wv = w.as<float>(), dyv = dy.as<float>();
  std::vector<float> dx(size_t(tokens * d)), dw(static_cast<size_t>(d));
  RmsNormBackwardParams<float, float> p{make_view(xv.data(), {tokens, d}), make_view(wv.data(), {d}),
                                        make_view(dyv.data(), {tokens, d}), make_view(dx.data(), {tokens, d}),
                                        make_view(dw.data(), {d}), 1e-5f, false};
  rftest::for_each_isa([&] {
    rftest::Workspace ws(rmsnorm_backward_workspace_bytes(p));
    rmsnorm_backward(p, CpuExec{&pool()}, ws.data, ws.size);
    const auto want_dx = rftest::as_double(rftest::golden_grads(c, "dx"));
    const auto want_dw = rftest::as_double(rftest::golden_grads(c, "dweight"));
    rftest::check_grad("dx", dx, want_dx, rftest::kGoldenGradRel, rftest::kGoldenGradAbsOfMax * rftest::max_abs(want_dx));
    rftest::check_grad("dweight", dw, want_dw, rftest::kGoldenGradRel, rftest::kGoldenGradAbsOfMax * rftest::max_abs(want_dw));
  });
}

TEST_CASE("rmsnorm_backward rejects bad input and writes nothing", "[rmsnorm][backward]") {
  const int64_t tokens = 3, d = 10;
  const auto x = rftest::random_vector<half>(size_t(tokens * d));
  const auto w = rftest::random_vector<half>(size_t(d));
  const auto dy = rftest::random_vector<float>(size_t(tokens * d));
  std::vector<float> dx(size_t(tokens * d), 7.f), dw(size_t(d), 7.f);
  std::vector<float> ws(64);
  auto good = [&] {
    RmsNormBackwardParams<half, half> p;
    p.x = make_view(x.data(), {tokens, d});
    p.weight = make_view(w.data(), {d});
    p.dy = make_view(dy.data(), {tokens, d});
    p.dx = make_view(dx.data(), {tokens, d});
    p.dweight = make_view(dw.data(), {d});
    return p;
  };
  auto expect = [&](const RmsNormBackwardParams<half, half>& p, const char* what, size_t bytes = 256) {
    expect_error("rmsnorm_backward", what, [&] { rmsnorm_backward(p, CpuExec{&pool()}, ws.data(), bytes); });
    for (float v : dx) REQUIRE(v == 7.f);
    for (float v : dw) REQUIRE(v == 7.f);
  };
  auto p = good();
  p.dy = make_view(dy.data(), {tokens, d - 1});
  expect(p, "dy has shape");
  p = good();
  p.dx = make_view(dx.data(), {tokens + 1, d});
  expect(p, "dx has shape");
  p = good();
  p.dweight = make_view(dw.data(), {d + 1});
  expect(p, "dweight has shape");
  p = good();
  p.weight.data = nullptr;
  expect(p, "weight is required");
  p = good();
  p.dx = make_strided_view(dx.data(), {tokens, d}, {d, 2});
  expect(p, "unit stride");
  p = good();
  p.eps = NAN;
  expect(p, "eps");
  expect(good(), "workspace", 8);  // 3 tokens need 24 bytes
  // dweight is optional
  p = good();
  p.dweight = {};
  rmsnorm_backward(p, CpuExec{&pool()}, ws.data(), 256);
  REQUIRE(dx[0] != 7.f);
}

// ================================================================================================
// rope

// The forward in double with the fp32 angle float(pos) * inv_freq, as the op and transformers.
void rope_ref(std::vector<double>& y, const std::vector<double>& x, int64_t tokens, int64_t heads,
              int64_t hd, const std::vector<int32_t>& pos, const std::vector<float>& inv, RopeLayout layout) {
  const int64_t nf = hd / 2;
  y.assign(x.size(), 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < nf; ++i) {
        const double ang = double(float(pos[size_t(t)]) * inv[size_t(i)]);
        const double c = std::cos(ang), s = std::sin(ang);
        const int64_t base = (t * heads + h) * hd;
        const int64_t ia = layout == RopeLayout::interleaved ? base + 2 * i : base + i;
        const int64_t ib = layout == RopeLayout::interleaved ? base + 2 * i + 1 : base + i + nf;
        const double a = x[size_t(ia)], b = x[size_t(ib)];
        y[size_t(ia)] = a * c - b * s;
        y[size_t(ib)] = b * c + a * s;
      }
}

void run_rope_backward(int64_t tokens, int64_t heads, int64_t hd, RopeLayout layout, bool strided) {
  INFO("tokens " << tokens << ", heads " << heads << ", hd " << hd << ", interleaved "
                 << (layout == RopeLayout::interleaved) << ", strided " << strided);
  const int64_t hs = hd + (strided ? 3 : 0), ts = heads * hs + (strided ? 5 : 0);
  std::vector<int32_t> pos(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) pos[size_t(t)] = int32_t((t * 977 + 3) % 6000);  // up to 6000
  const auto inv = rope_inv_freq(int(hd), 10000.f);
  const size_t n = size_t(tokens * heads * hd);
  std::vector<double> xd = rftest::to_double(rftest::random_vector<float>(n));
  const std::vector<double> dyd = rftest::to_double(rftest::random_vector<float>(n));
  std::vector<double> y;
  const std::vector<double> want = rftest::fd_gradient(xd, [&](size_t) {
    rope_ref(y, xd, tokens, heads, hd, pos, inv, layout);
    double l = 0;
    for (size_t i = 0; i < n; ++i) l += dyd[i] * y[i];
    return l;
  });
  const double abs = kAbsOfScale * rftest::max_abs(want);
  std::vector<float> buf(size_t(tokens * ts), 7.f);
  auto load_dy = [&] {
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < hd; ++i) buf[size_t(t * ts + h * hs + i)] = float(dyd[size_t((t * heads + h) * hd + i)]);
  };
  auto view = [&] { return make_strided_view(buf.data(), {tokens, heads, hd}, {ts, hs, 1}); };
  auto read = [&] {
    std::vector<float> got(n);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < hd; ++i) got[size_t((t * heads + h) * hd + i)] = buf[size_t(t * ts + h * hs + i)];
    return got;
  };
  RopeBackwardParams p;
  p.positions = make_view<const int32_t>(pos.data(), {tokens});
  p.inv_freq = make_view<const float>(inv.data(), {hd / 2});
  p.layout = layout;
  rftest::for_each_isa([&] {
    load_dy();
    p.dx = view();
    rope_backward(p, CpuExec{&pool()});
    rftest::check_grad("rope dx", read(), want, kRel, abs);
    for (size_t k = 0; k < buf.size(); ++k) {  // nothing outside the view is written
      const int64_t rem = int64_t(k) % ts;
      if (rem / hs >= heads || rem % hs >= hd) REQUIRE(buf[k] == 7.f);
    }
    // The forward rotation in its place (a sign error) fails the same check.
    load_dy();
    RopeParams<float> fp{view(), p.positions, p.inv_freq, layout};
    rope(fp, CpuExec{&pool()});
    REQUIRE_FALSE(rftest::grad_matches(read(), want, kRel, abs));
    // rope_backward undoes rope (fp32 rotations: ~1e-6 of the values).
    std::vector<double> orig(n);
    for (size_t i = 0; i < n; ++i) orig[i] = dyd[i];
    rope_backward(p, CpuExec{&pool()});
    rftest::check_grad("rope_backward(rope(x)) = x", read(), orig, 1e-5, 4e-6);
  });
}

TEST_CASE("rope_backward matches finite differences", "[rope][backward]") {
  // The gradient is fp32 whatever the forward's storage dtype: the rotation's Jacobian does not
  // depend on x, so one set of checks covers every dtype the forward takes.
  for (RopeLayout layout : {RopeLayout::rotate_half, RopeLayout::interleaved})
    for (int64_t tokens : {1, 3, 17})
      for (int64_t hd : {2, 14, 38}) {
        run_rope_backward(tokens, 1, hd, layout, false);
        run_rope_backward(tokens, 3, hd, layout, true);
      }
  run_rope_backward(2, 2, 2 * 150, RopeLayout::rotate_half, false);  // more than one kRopeChunk
}

TEST_CASE("rope_backward matches PyTorch autograd", "[rope][backward][golden]") {
  for (const char* c : {"rope_rotate_half_backward", "rope_interleaved_backward"}) {
    INFO(c);
    const auto dy = rftest::golden_grads(c, "dy");
    const auto pos = rftest::golden_grads(c, "positions").as<int32_t>();
    const auto inv = rftest::golden_grads(c, "inv_freq").as<float>();
    const auto want = rftest::as_double(rftest::golden_grads(c, "dx"));
    const int64_t tokens = dy.shape[0], heads = dy.shape[1], hd = dy.shape[2];
    // our rope_inv_freq gives the same table
    const auto ours = rope_inv_freq(int(hd), 10000.f);
    REQUIRE(std::memcmp(ours.data(), inv.data(), inv.size() * sizeof(float)) == 0);
    rftest::for_each_isa([&] {
      std::vector<float> g = dy.as<float>();
      RopeBackwardParams p{make_view(g.data(), {tokens, heads, hd}), make_view(pos.data(), {tokens}),
                           make_view(inv.data(), {hd / 2}),
                           std::string(c).find("interleaved") != std::string::npos ? RopeLayout::interleaved
                                                                                  : RopeLayout::rotate_half};
      rope_backward(p, CpuExec{&pool()});
      rftest::check_grad("dx", g, want, rftest::kGoldenGradRel, rftest::kGoldenGradAbsOfMax * rftest::max_abs(want));
    });
  }
}

TEST_CASE("rope_backward rejects bad input and writes nothing", "[rope][backward]") {
  const int64_t tokens = 2, heads = 2, hd = 8;
  std::vector<float> g(size_t(tokens * heads * hd), 7.f);
  std::vector<int32_t> pos = {0, 1};
  const auto inv = rope_inv_freq(int(hd), 10000.f);
  auto good = [&] {
    return RopeBackwardParams{make_view(g.data(), {tokens, heads, hd}), make_view<const int32_t>(pos.data(), {tokens}),
                              make_view(inv.data(), {hd / 2}), RopeLayout::rotate_half};
  };
  auto expect = [&](const RopeBackwardParams& p, const char* what) {
    expect_error("rope_backward", what, [&] { rope_backward(p, CpuExec{&pool()}); });
    for (float v : g) REQUIRE(v == 7.f);
  };
  auto p = good();
  p.inv_freq = make_view(inv.data(), {hd / 2 - 1});
  expect(p, "inv_freq has shape");
  p = good();
  p.positions = make_view<const int32_t>(pos.data(), {tokens - 1});
  expect(p, "positions has shape");
  p = good();
  p.dx = make_view(g.data(), {tokens, heads, int64_t(7)});
  expect(p, "dx head_dim must be positive and even");
  pos[1] = -4;
  expect(good(), "positions[1] = -4");
}

// ================================================================================================
// swiglu

template <class T>
void run_swiglu_backward(int64_t tokens, int64_t d, int alias) {  // alias: 0 none, 1 dgate = dout, 2 dup = dout
  INFO("tokens " << tokens << ", d " << d << ", alias " << alias);
  const int64_t ld = d + 3;  // strided rows everywhere
  const size_t n = size_t(tokens * ld);
  const auto gate = rftest::random_vector<T>(n, -12.0, 12.0);  // both saturated ends of silu
  const auto up = rftest::random_vector<T>(n, -2.0, 2.0);
  const auto dout0 = rftest::random_vector<float>(n);
  std::vector<double> gd(size_t(tokens * d)), ud(size_t(tokens * d)), od(size_t(tokens * d));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < d; ++i) {
      gd[size_t(t * d + i)] = double(float(gate[size_t(t * ld + i)]));
      ud[size_t(t * d + i)] = double(float(up[size_t(t * ld + i)]));
      od[size_t(t * d + i)] = dout0[size_t(t * ld + i)];
    }
  // L = sum dout * silu(g) * u is a sum of per-element terms: element i's term is all that moves.
  auto term = [&](size_t i) { return od[i] * gd[i] / (1.0 + std::exp(-gd[i])) * ud[i]; };
  const auto want_dg = rftest::fd_gradient(gd, term);
  const auto want_du = rftest::fd_gradient(ud, term);
  const double abs_g = kAbsOfScale * rftest::max_abs(want_dg), abs_u = kAbsOfScale * rftest::max_abs(want_du);
  {  // dropping the second factor of silu' (sigma only) is caught
    std::vector<float> wrong(gd.size());
    for (size_t i = 0; i < gd.size(); ++i) wrong[i] = float(od[i] * ud[i] / (1.0 + std::exp(-gd[i])));
    REQUIRE_FALSE(rftest::grad_matches(wrong, want_dg, kRel, abs_g));
  }
  std::vector<float> dout, bg(n, 7.f), bu(n, 7.f);
  rftest::for_each_isa([&] {
    dout = dout0;
    std::fill(bg.begin(), bg.end(), 7.f);
    std::fill(bu.begin(), bu.end(), 7.f);
    float* dg = alias == 1 ? dout.data() : bg.data();
    float* du = alias == 2 ? dout.data() : bu.data();
    SwigluBackwardParams<T> p;
    p.gate = make_strided_view(gate.data(), {tokens, d}, {ld, 1});
    p.up = make_strided_view(up.data(), {tokens, d}, {ld, 1});
    p.dout = make_strided_view<const float>(dout.data(), {tokens, d}, {ld, 1});
    p.dgate = make_strided_view(dg, {tokens, d}, {ld, 1});
    p.dup = make_strided_view(du, {tokens, d}, {ld, 1});
    swiglu_backward(p, CpuExec{&pool()});
    std::vector<float> got_g(gd.size()), got_u(gd.size());
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < d; ++i) {
        got_g[size_t(t * d + i)] = dg[t * ld + i];
        got_u[size_t(t * d + i)] = du[t * ld + i];
      }
    rftest::check_grad("swiglu dgate", got_g, want_dg, kRel, abs_g);
    rftest::check_grad("swiglu dup", got_u, want_du, kRel, abs_u);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = d; i < ld; ++i) {
        if (alias != 1) REQUIRE(bg[size_t(t * ld + i)] == 7.f);
        if (alias != 2) REQUIRE(bu[size_t(t * ld + i)] == 7.f);
      }
  });
}

TEMPLATE_LIST_TEST_CASE("swiglu_backward matches finite differences", "[swiglu][backward]",
                        rftest::StorageTypes) {
  for (int64_t d : {1, 5, 13, 37})
    for (int64_t tokens : {1, 3, 17}) run_swiglu_backward<TestType>(tokens, d, 0);
  run_swiglu_backward<TestType>(3, 37, 1);
  run_swiglu_backward<TestType>(3, 37, 2);
}

TEST_CASE("swiglu_backward matches PyTorch autograd", "[swiglu][backward][golden]") {
  const std::string c = "swiglu_backward";
  const auto g = rftest::golden_grads(c, "gate").as<float>(), u = rftest::golden_grads(c, "up").as<float>();
  const auto dout = rftest::golden_grads(c, "dout");
  const auto o = dout.as<float>();
  const int64_t tokens = dout.shape[0], d = dout.shape[1];
  const auto want_g = rftest::as_double(rftest::golden_grads(c, "dgate"));
  const auto want_u = rftest::as_double(rftest::golden_grads(c, "dup"));
  rftest::for_each_isa([&] {
    std::vector<float> dg(o.size()), du(o.size());
    SwigluBackwardParams<float> p{make_view(g.data(), {tokens, d}), make_view(u.data(), {tokens, d}),
                                  make_view(o.data(), {tokens, d}), make_view(dg.data(), {tokens, d}),
                                  make_view(du.data(), {tokens, d})};
    swiglu_backward(p, CpuExec{&pool()});
    rftest::check_grad("dgate", dg, want_g, rftest::kGoldenGradRel, rftest::kGoldenGradAbsOfMax * rftest::max_abs(want_g));
    rftest::check_grad("dup", du, want_u, rftest::kGoldenGradRel, rftest::kGoldenGradAbsOfMax * rftest::max_abs(want_u));
  });
}

TEST_CASE("swiglu_backward rejects bad input and writes nothing", "[swiglu][backward]") {
  const int64_t tokens = 2, d = 9;
  const auto g = rftest::random_vector<bfloat16>(size_t(tokens * d)), u = rftest::random_vector<bfloat16>(size_t(tokens * d));
  std::vector<float> o(size_t(tokens * d), 1.f), dg(size_t(tokens * d), 7.f), du(size_t(tokens * d), 7.f);
  auto good = [&] {
    return SwigluBackwardParams<bfloat16>{make_view(g.data(), {tokens, d}), make_view(u.data(), {tokens, d}),
                                          make_view<const float>(o.data(), {tokens, d}),
                                          make_view(dg.data(), {tokens, d}), make_view(du.data(), {tokens, d})};
  };
  auto expect = [&](const SwigluBackwardParams<bfloat16>& p, const char* what) {
    expect_error("swiglu_backward", what, [&] { swiglu_backward(p, CpuExec{&pool()}); });
    for (float v : dg) REQUIRE(v == 7.f);
    for (float v : du) REQUIRE(v == 7.f);
    for (float v : o) REQUIRE(v == 1.f);
  };
  auto p = good();
  p.up = make_view(u.data(), {tokens, d - 1});
  expect(p, "up has shape");
  p = good();
  p.dout.data = nullptr;
  expect(p, "dout is required");
  p = good();
  p.dup = p.dgate;
  expect(p, "dgate and dup must not be the same memory");
  p = good();
  p.dgate = make_strided_view(o.data(), {tokens, d - 1}, {d - 1, 1});  // dout's memory, another row stride
  p.dgate.shape[1] = d;
  expect(p, "dgate may equal dout only with the same row stride");
}

// ================================================================================================
// embedding

void run_embedding_backward(int64_t tokens, int64_t vocab, int64_t d, bool accumulate) {
  INFO("tokens " << tokens << ", vocab " << vocab << ", d " << d << ", accumulate " << accumulate);
  const int64_t ldo = d + 2, ldt = d + 3;
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) ids[size_t(t)] = int32_t((t * 5 + t * t) % vocab);  // repeats
  const auto dout = rftest::random_vector<float>(size_t(tokens * ldo));
  const auto table0 = rftest::random_vector<float>(size_t(vocab * ldt));
  // L = sum_t sum_i dout[t, i] table[ids[t], i]
  std::vector<double> tab(size_t(vocab * d), 0.0);
  for (int64_t v = 0; v < vocab; ++v)
    for (int64_t i = 0; i < d; ++i) tab[size_t(v * d + i)] = double(rftest::random_vector<float>(1)[0]);
  std::vector<double> want = rftest::fd_gradient(tab, [&](size_t) {
    double l = 0;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < d; ++i) l += double(dout[size_t(t * ldo + i)]) * tab[size_t(ids[size_t(t)] * d + i)];
    return l;
  });
  if (accumulate)
    for (int64_t v = 0; v < vocab; ++v)
      for (int64_t i = 0; i < d; ++i) want[size_t(v * d + i)] += table0[size_t(v * ldt + i)];
  const double abs = kAbsOfScale * std::max(1.0, rftest::max_abs(want));
  {  // the last token's row instead of the sum (a scatter without accumulation) is caught
    std::vector<float> wrong(want.size(), 0.f);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < d; ++i) wrong[size_t(ids[size_t(t)] * d + i)] = dout[size_t(t * ldo + i)];
    if (accumulate)
      for (int64_t v = 0; v < vocab; ++v)
        for (int64_t i = 0; i < d; ++i) wrong[size_t(v * d + i)] += table0[size_t(v * ldt + i)];
    if (tokens > 1 && vocab < tokens) REQUIRE_FALSE(rftest::grad_matches(wrong, want, kRel, abs));
  }
  std::vector<float> tbl, first;
  auto run = [&](int threads) {
    tbl = table0;
    EmbeddingBackwardParams p;
    p.ids = make_view<const int32_t>(ids.data(), {tokens});
    p.dout = make_strided_view(dout.data(), {tokens, d}, {ldo, 1});
    p.dtable = make_strided_view(tbl.data(), {vocab, d}, {ldt, 1});
    p.accumulate = accumulate;
    embedding_backward(p, CpuExec{&pool(threads)});
    std::vector<float> got(size_t(vocab * d));
    for (int64_t v = 0; v < vocab; ++v)
      for (int64_t i = 0; i < d; ++i) got[size_t(v * d + i)] = tbl[size_t(v * ldt + i)];
    rftest::check_grad("embedding dtable", got, want, kRel, abs);
    for (int64_t v = 0; v < vocab; ++v)
      for (int64_t i = d; i < ldt; ++i) REQUIRE(tbl[size_t(v * ldt + i)] == table0[size_t(v * ldt + i)]);
  };
  rftest::for_each_isa([&] {
    run(1);
    first = tbl;
    run(3);
    REQUIRE(same_bits(tbl, first));  // every row sums its tokens in order whatever the thread count
  });
}

TEST_CASE("embedding_backward matches finite differences", "[embedding][backward]") {
  for (int64_t d : {5, 13, 37})
    for (int64_t tokens : {1, 3, 17})
      for (int64_t vocab : {1, 7, 50}) {
        run_embedding_backward(tokens, vocab, d, false);
        run_embedding_backward(tokens, vocab, d, true);
      }
}

TEST_CASE("embedding_backward matches PyTorch autograd", "[embedding][backward][golden]") {
  const std::string c = "embedding_backward";
  const auto ids64 = rftest::golden_grads(c, "ids").as<int32_t>();
  const auto dout = rftest::golden_grads(c, "dout");
  const auto o = dout.as<float>();
  const auto want = rftest::as_double(rftest::golden_grads(c, "dtable"));
  const int64_t tokens = dout.shape[0], d = dout.shape[1], vocab = int64_t(want.size()) / d;
  rftest::for_each_isa([&] {
    std::vector<float> dt(want.size(), 3.f);  // overwritten: accumulate = false
    EmbeddingBackwardParams p{make_view(ids64.data(), {tokens}), make_view(o.data(), {tokens, d}),
                              make_view(dt.data(), {vocab, d}), false};
    embedding_backward(p, CpuExec{&pool()});
    rftest::check_grad("dtable", dt, want, rftest::kGoldenGradRel, rftest::kGoldenGradAbsOfMax * rftest::max_abs(want));
  });
}

TEST_CASE("embedding_backward rejects bad input and writes nothing", "[embedding][backward]") {
  const int64_t tokens = 3, vocab = 5, d = 4;
  std::vector<int32_t> ids = {0, 4, 2};
  const auto o = rftest::random_vector<float>(size_t(tokens * d));
  std::vector<float> dt(size_t(vocab * d), 7.f);
  auto good = [&] {
    return EmbeddingBackwardParams{make_view<const int32_t>(ids.data(), {tokens}), make_view(o.data(), {tokens, d}),
                                   make_view(dt.data(), {vocab, d}), false};
  };
  auto expect = [&](const EmbeddingBackwardParams& p, const char* what) {
    expect_error("embedding_backward", what, [&] { embedding_backward(p, CpuExec{&pool()}); });
    for (float v : dt) REQUIRE(v == 7.f);
  };
  auto p = good();
  p.dout = make_view(o.data(), {tokens, d - 1});
  expect(p, "dout has shape");
  p = good();
  p.ids = make_view<const int32_t>(ids.data(), {tokens - 1});
  expect(p, "dout has shape [3, 4], expected [2, 4]");
  ids[2] = 5;
  expect(good(), "ids[2] = 5 is outside the vocabulary [0, 5)");
  ids[2] = -1;
  expect(good(), "ids[2] = -1");
}

}  // namespace
