// causal_conv1d_backward and linear_backward (one executable for both, to save compile time).
//
// Every gradient is checked against central finite differences of L = sum(dy * y), y from a plain
// double-precision forward written here, on random inputs (never zeros) at awkward sizes (tokens 1,
// 3, 17, 33; channels / in / out 1, 13, 37; K 2..8), in every storage dtype and CPU ISA; then
// against PyTorch autograd fixtures (tools/make_golden_grads_conv_linear.py), against the closed
// form at sizes that cross every GEMM block edge, for determinism across thread counts, for each
// optional output alone, and for bad input (throws naming the argument, writes nothing).
//
// Tolerance against finite differences: |got - want| <= 2e-5 |want| + 2e-5 max|want| per array.
// The differences are taken in double on a double forward (step 1e-6: truncation ~1e-12, rounding
// ~1e-9), so the error is the kernels' fp32 rounding: sums of at most 37 products, below
// 37 * 2^-24 ~ 2.2e-6 of the summed magnitudes. The storage dtype does not enter (inputs are
// compared as stored; gradients are fp32). The floor is 2e-5 of the array's largest gradient,
// far below any wrong gradient; the "would be caught" cases show a 0.1% error fails.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/linear.hpp"
#include "support/npy.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

constexpr double kFdRel = 2e-5, kFdAbsOfMax = 2e-5, kFdStep = 1e-6;
constexpr float kSentinel = 7.f;

ThreadPool& pool() {
  static ThreadPool p(3);  // three: the splits do not fall on even halves
  return p;
}

double max_abs(const std::vector<double>& e) {
  double m = 0;
  for (double v : e) m = std::max(m, std::fabs(v));
  return m;
}

/// Elements of got outside |got - want| <= rel |want| + abs_of_max * max|want| (NaN counts).
size_t count_bad(const std::vector<float>& got, const std::vector<double>& want, double rel,
                 double abs_of_max, std::string* worst = nullptr) {
  REQUIRE(got.size() == want.size());
  const double floor = abs_of_max * max_abs(want);
  size_t bad = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]), lim = rel * std::fabs(want[i]) + floor;
    if (!(err <= lim)) {
      ++bad;
      const double excess = std::isnan(err) ? 1e300 : err / lim;
      if (worst && excess > worst_excess) {
        worst_excess = excess;
        *worst = "[" + std::to_string(i) + "]: got " + std::to_string(got[i]) + ", want " +
                 std::to_string(want[i]);
      }
    }
  }
  return bad;
}
void check_grad(const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
                double rel = kFdRel, double abs_of_max = kFdAbsOfMax) {
  std::string worst;
  const size_t bad = count_bad(got, want, rel, abs_of_max, &worst);
  INFO(what << ": " << bad << " of " << got.size() << " out of tolerance; worst " << worst);
  REQUIRE(bad == 0);
}

/// Central differences of f with respect to every element of v (restored after).
std::vector<double> finite_differences(std::vector<double>& v, const std::function<double()>& f) {
  std::vector<double> g(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const double keep = v[i];
    v[i] = keep + kFdStep;
    const double up = f();
    v[i] = keep - kFdStep;
    const double down = f();
    v[i] = keep;
    g[i] = (up - down) / (2 * kFdStep);
  }
  return g;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// Caller-owned scratch (vector storage; the ops align it themselves).
struct Workspace {
  std::vector<unsigned char> bytes;
  explicit Workspace(size_t n) : bytes(n) {}
  void* data() { return bytes.empty() ? nullptr : bytes.data(); }
  size_t size() const { return bytes.size(); }
};

// ================================================================================================
// causal_conv1d_backward
// ================================================================================================
struct ConvOptions {
  bool bias = true, silu = false, state = true, init = true;
};

template <class T>
struct ConvProblem {
  int64_t tokens, dch, k, slots;
  ConvOptions o;
  std::vector<int32_t> cu, state_slots;  // empty: one sequence on slot 0
  std::vector<T> x, conv_state;
  std::vector<float> weight, bias, dy;

  ConvProblem(int64_t tokens_, int64_t dch_, int64_t k_, ConvOptions opt, int64_t slots_ = 1)
      : tokens(tokens_), dch(dch_), k(k_), slots(slots_), o(opt) {
    x = rftest::random_vector<T>(size_t(tokens * dch), -2, 2);
    conv_state = rftest::random_vector<T>(size_t(slots * (k - 1) * dch), -2, 2);
    weight = rftest::random_vector<float>(size_t(dch * k));
    bias = rftest::random_vector<float>(size_t(dch));
    dy = rftest::random_vector<float>(size_t(tokens * dch));
  }

  struct Seq {
    int64_t begin, end, slot;
  };
  std::vector<Seq> sequences() const {
    if (cu.empty()) return {{0, tokens, state_slots.empty() ? 0 : state_slots[0]}};
    std::vector<Seq> s;
    for (size_t q = 0; q + 1 < cu.size(); ++q)
      s.push_back({cu[q], cu[q + 1], state_slots.empty() ? int64_t(q) : state_slots[q]});
    return s;
  }
  bool history() const { return o.state && o.init; }

  CausalConv1dParams<T> fwd() const {
    CausalConv1dParams<T> p;
    p.x = make_view(x.data(), {tokens, dch});
    p.weight = make_view(weight.data(), {dch, k});
    if (o.bias) p.bias = make_view(bias.data(), {dch});
    if (o.state) p.conv_state = make_view(const_cast<T*>(conv_state.data()), {slots, k - 1, dch});
    if (!cu.empty()) p.cu_seqlens = make_view(cu.data(), {int64_t(cu.size())});
    if (!state_slots.empty()) p.state_slots = make_view(state_slots.data(), {int64_t(state_slots.size())});
    p.activation = o.silu ? ConvActivation::silu : ConvActivation::none;
    p.use_initial_state = o.init;
    return p;
  }

  /// L = sum over non-padding rows of dy * y, y from the double forward on these inputs.
  double loss(const std::vector<double>& xd, const std::vector<double>& wd, const std::vector<double>& bd,
              const std::vector<double>& hd) const {
    double L = 0;
    std::vector<double> v;
    for (const Seq& s : sequences()) {
      if (s.slot < 0) continue;
      for (int64_t c = 0; c < dch; ++c) {
        v.assign(size_t(k - 1), 0.0);  // the history, oldest first, then the sequence
        if (history())
          for (int64_t i = 0; i < k - 1; ++i) v[size_t(i)] = hd[size_t((s.slot * (k - 1) + i) * dch + c)];
        for (int64_t t = s.begin; t < s.end; ++t) v.push_back(xd[size_t(t * dch + c)]);
        for (int64_t t = s.begin; t < s.end; ++t) {
          double z = o.bias ? bd[size_t(c)] : 0.0;
          for (int64_t i = 0; i < k; ++i) z += wd[size_t(c * k + i)] * v[size_t(t - s.begin + i)];
          const double y = o.silu ? z / (1.0 + std::exp(-z)) : z;
          L += double(dy[size_t(t * dch + c)]) * y;
        }
      }
    }
    return L;
  }
};

/// The gradients, as the op returns them or as expected.
template <class G>
struct ConvGrads {
  std::vector<G> dx, dweight, dbias, dconv_state;
};

/// Expected gradients by finite differences; slots the op must not write keep the sentinel.
template <class T>
ConvGrads<double> conv_expected(const ConvProblem<T>& pr) {
  auto xd = rftest::to_double(pr.x), hd = rftest::to_double(pr.conv_state);
  std::vector<double> wd(pr.weight.begin(), pr.weight.end()), bd(pr.bias.begin(), pr.bias.end());
  const auto L = [&] { return pr.loss(xd, wd, bd, hd); };
  ConvGrads<double> e;
  e.dx = finite_differences(xd, L);
  e.dweight = finite_differences(wd, L);
  if (pr.o.bias) {
    e.dbias = finite_differences(bd, L);
  } else {  // no bias: dbias is the gradient a zero bias would get
    std::vector<double> zero(bd.size(), 0.0);
    ConvProblem<T> with_bias = pr;
    with_bias.o.bias = true;
    e.dbias = finite_differences(zero, [&] { return with_bias.loss(xd, wd, zero, hd); });
  }
  e.dconv_state.assign(hd.size(), kSentinel);
  if (pr.o.state) {
    const auto dh = finite_differences(hd, L);
    const int64_t per_slot = (pr.k - 1) * pr.dch;
    if (pr.history())
      for (const auto& s : pr.sequences())
        if (s.slot >= 0)
          std::copy(dh.begin() + s.slot * per_slot, dh.begin() + (s.slot + 1) * per_slot,
                    e.dconv_state.begin() + s.slot * per_slot);
  }
  return e;
}

enum ConvOutput : unsigned { kDx = 1, kDweight = 2, kDbias = 4, kDstate = 8, kAllConv = 15 };

/// Runs the backward with the chosen outputs (all start as the sentinel).
template <class T>
ConvGrads<float> conv_run(const ConvProblem<T>& pr, CpuExec exec, unsigned outputs = kAllConv) {
  ConvGrads<float> g;
  g.dx.assign(size_t(pr.tokens * pr.dch), kSentinel);
  g.dweight.assign(size_t(pr.dch * pr.k), kSentinel);
  g.dbias.assign(size_t(pr.dch), kSentinel);
  g.dconv_state.assign(pr.conv_state.size(), kSentinel);
  CausalConv1dBackwardParams<T> p;
  p.fwd = pr.fwd();
  p.dy = make_view(pr.dy.data(), {pr.tokens, pr.dch});
  if (outputs & kDx) p.dx = make_view(g.dx.data(), {pr.tokens, pr.dch});
  if (outputs & kDweight) p.dweight = make_view(g.dweight.data(), {pr.dch, pr.k});
  if (outputs & kDbias) p.dbias = make_view(g.dbias.data(), {pr.dch});
  if ((outputs & kDstate) && pr.o.state) p.dconv_state = make_view(g.dconv_state.data(), {pr.slots, pr.k - 1, pr.dch});
  causal_conv1d_backward(p, exec);
  return g;
}

template <class T>
void check_conv(const ConvProblem<T>& pr, const std::string& what) {
  const ConvGrads<double> e = conv_expected(pr);
  rftest::for_each_isa([&] {
    for (CpuExec exec : {CpuExec{}, CpuExec{&pool()}}) {
      INFO(what << ", threads " << exec.threads());
      const ConvGrads<float> g = conv_run(pr, exec);
      check_grad(what + " dx", g.dx, e.dx);
      check_grad(what + " dweight", g.dweight, e.dweight);
      check_grad(what + " dbias", g.dbias, e.dbias);
      check_grad(what + " dconv_state", g.dconv_state, e.dconv_state);
    }
  });
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("causal_conv1d_backward matches finite differences", "[conv_backward]",
                        rftest::StorageTypes) {
  using T = TestType;
  unsigned variant = 0;
  for (int64_t k : {2, 3, 4})
    for (int64_t tokens : {1, 3, 17, 33})
      for (int64_t dch : {1, 13, 37}) {
        ConvOptions o;  // every combination of bias, silu, state, history across the loop
        o.bias = !(variant & 1);
        o.silu = variant & 2;
        o.state = !(variant & 4);
        o.init = !(variant & 8);
        ++variant;
        ConvProblem<T> pr(tokens, dch, k, o);
        check_conv(pr, "K " + std::to_string(k) + " tokens " + std::to_string(tokens) + " Dch " +
                           std::to_string(dch) + " variant " + std::to_string(variant - 1));
      }
  for (int64_t k = 5; k <= 8; ++k) {  // the other widths, with the longest history
    ConvOptions o;
    o.silu = true;
    ConvProblem<T> pr(9, 13, k, o);
    check_conv(pr, "K " + std::to_string(k));
  }
}

TEMPLATE_LIST_TEST_CASE("causal_conv1d_backward over packed sequences with padding", "[conv_backward]",
                        rftest::StorageTypes) {
  using T = TestType;
  for (bool silu : {false, true})
    for (bool init : {true, false}) {
      ConvOptions o;
      o.silu = silu;
      o.init = init;
      // lengths 1, 0, 2, 9, 3 (padding), 2 with K 4: empty, shorter than the history and longer;
      // slots 4 and 6 are used by nobody and must keep their dconv_state
      ConvProblem<T> pr(17, 13, 4, o, 7);
      pr.cu = {0, 1, 1, 3, 12, 15, 17};
      pr.state_slots = {5, 0, 3, 1, -1, 2};
      check_conv(pr, std::string("packed, silu ") + (silu ? "on" : "off") + ", history " + (init ? "on" : "off"));
    }
}

TEST_CASE("causal_conv1d_backward across channel panels is deterministic", "[conv_backward]") {
  // 300 channels: one panel of 256 + 44 on one thread, 160 + 140 on three
  ConvOptions o;
  o.silu = true;
  ConvProblem<float> pr(17, 300, 4, o, 3);
  pr.cu = {0, 5, 6, 17};
  pr.state_slots = {2, -1, 0};
  check_conv(pr, "wide");
  const auto one = conv_run(pr, CpuExec{}), three = conv_run(pr, CpuExec{&pool()});
  ThreadPool two_pool(2);
  const auto two = conv_run(pr, CpuExec{&two_pool});
  for (const auto* g : {&two, &three}) {
    REQUIRE(same_bits(g->dx, one.dx));
    REQUIRE(same_bits(g->dweight, one.dweight));
    REQUIRE(same_bits(g->dbias, one.dbias));
    REQUIRE(same_bits(g->dconv_state, one.dconv_state));
  }
}

TEST_CASE("causal_conv1d_backward computes each output alone", "[conv_backward]") {
  ConvOptions o;
  o.silu = true;
  ConvProblem<bfloat16> pr(17, 37, 3, o, 2);
  pr.cu = {0, 4, 17};
  const auto all = conv_run(pr, CpuExec{&pool()});
  for (unsigned out : {kDx, kDweight, kDbias, kDstate}) {
    INFO("output " << out);
    const auto g = conv_run(pr, CpuExec{&pool()}, out);
    const std::vector<float> untouched_dx(all.dx.size(), kSentinel), untouched_dw(all.dweight.size(), kSentinel),
        untouched_db(all.dbias.size(), kSentinel), untouched_ds(all.dconv_state.size(), kSentinel);
    REQUIRE(same_bits(g.dx, out == kDx ? all.dx : untouched_dx));
    REQUIRE(same_bits(g.dweight, out == kDweight ? all.dweight : untouched_dw));
    REQUIRE(same_bits(g.dbias, out == kDbias ? all.dbias : untouched_db));
    REQUIRE(same_bits(g.dconv_state, out == kDstate ? all.dconv_state : untouched_ds));
  }
}

TEST_CASE("causal_conv1d_backward: a wrong gradient would be caught", "[conv_backward]") {
  ConvOptions o;
  o.silu = true;
  ConvProblem<float> pr(17, 13, 4, o);
  const auto e = conv_expected(pr);
  const auto g = conv_run(pr, CpuExec{});
  REQUIRE(count_bad(g.dx, e.dx, kFdRel, kFdAbsOfMax) == 0);
  // 0.1% off everywhere
  auto scaled = e;
  for (auto* v : {&scaled.dx, &scaled.dweight, &scaled.dbias, &scaled.dconv_state})
    for (double& x : *v) x *= 1.001;
  CHECK(count_bad(g.dx, scaled.dx, kFdRel, kFdAbsOfMax) > g.dx.size() / 2);
  CHECK(count_bad(g.dweight, scaled.dweight, kFdRel, kFdAbsOfMax) > g.dweight.size() / 2);
  CHECK(count_bad(g.dbias, scaled.dbias, kFdRel, kFdAbsOfMax) > g.dbias.size() / 2);
  CHECK(count_bad(g.dconv_state, scaled.dconv_state, kFdRel, kFdAbsOfMax) > g.dconv_state.size() / 2);
  // the SiLU derivative left out
  ConvProblem<float> linear_act = pr;
  linear_act.o.silu = false;
  const auto wrong = conv_run(linear_act, CpuExec{});
  CHECK(count_bad(wrong.dx, e.dx, kFdRel, kFdAbsOfMax) > wrong.dx.size() / 2);
  CHECK(count_bad(wrong.dweight, e.dweight, kFdRel, kFdAbsOfMax) > wrong.dweight.size() / 2);
}

namespace {
std::string golden_grads_path(const std::string& c, const std::string& name) {
  return std::string(RECURFORMER_TEST_DATA_DIR) + "/golden_grads/" + c + "/" + name + ".npy";
}
std::vector<float> golden_f32(const std::string& c, const std::string& name) {
  return rftest::npy::load(golden_grads_path(c, name)).as<float>();
}
std::vector<double> golden_f64(const std::string& c, const std::string& name) {
  const auto v = golden_f32(c, name);
  return std::vector<double>(v.begin(), v.end());
}
// PyTorch fp32 against ours in fp32 with another summation order (tools/make_golden_grads_conv_linear.py).
constexpr double kGoldenRel = 1e-5, kGoldenAbsOfMax = 2e-6;
}  // namespace

TEST_CASE("causal_conv1d_backward reproduces PyTorch autograd", "[conv_backward][golden]") {
  struct Case {
    const char* name;
    bool silu, bias, init;
  };
  for (Case c : {Case{"conv_packed_history_silu", true, true, true}, Case{"conv_single_zero_history", false, false, false}}) {
    INFO(c.name);
    const rftest::npy::Array xa = rftest::npy::load(golden_grads_path(c.name, "x"));
    const rftest::npy::Array wa = rftest::npy::load(golden_grads_path(c.name, "weight"));
    const rftest::npy::Array sa = rftest::npy::load(golden_grads_path(c.name, "conv_state"));
    const int64_t tokens = xa.shape[0], dch = xa.shape[1], k = wa.shape[1], slots = sa.shape[0];
    ConvOptions o;
    o.silu = c.silu;
    o.bias = c.bias;
    o.init = c.init;
    ConvProblem<float> pr(tokens, dch, k, o, slots);
    pr.x = xa.as<float>();
    pr.weight = wa.as<float>();
    pr.conv_state = sa.as<float>();
    pr.bias = golden_f32(c.name, "bias");
    pr.dy = golden_f32(c.name, "dy");
    pr.cu = rftest::npy::load(golden_grads_path(c.name, "cu_seqlens")).as<int32_t>();
    pr.state_slots = rftest::npy::load(golden_grads_path(c.name, "state_slots")).as<int32_t>();
    if (pr.cu.size() == 2) pr.cu.clear();  // one sequence: cu_seqlens absent
    rftest::for_each_isa([&] {
      const auto g = conv_run(pr, CpuExec{&pool()});
      check_grad("dx", g.dx, golden_f64(c.name, "dx"), kGoldenRel, kGoldenAbsOfMax);
      check_grad("dweight", g.dweight, golden_f64(c.name, "dweight"), kGoldenRel, kGoldenAbsOfMax);
      check_grad("dbias", g.dbias, golden_f64(c.name, "dbias"), kGoldenRel, kGoldenAbsOfMax);
      if (c.init) {
        check_grad("dconv_state", g.dconv_state, golden_f64(c.name, "dconv_state"), kGoldenRel, kGoldenAbsOfMax);
      } else {
        for (float v : g.dconv_state) REQUIRE(v == kSentinel);  // history not read: untouched
      }
    });
  }
}

TEST_CASE("causal_conv1d_backward rejects bad input and writes nothing", "[conv_backward]") {
  ConvProblem<half> pr(6, 8, 4, ConvOptions{}, 3);
  pr.cu = {0, 2, 6};
  pr.state_slots = {2, 0};
  std::vector<float> dx(6 * 8, kSentinel), dw(8 * 4, kSentinel), db(8, kSentinel), ds(3 * 3 * 8, kSentinel);
  std::vector<float> wide(6 * 16, 0.5f);
  std::vector<int32_t> slot_dup = {1, 1};
  using P = CausalConv1dBackwardParams<half>&;
  auto good = [&] {
    CausalConv1dBackwardParams<half> p;
    p.fwd = pr.fwd();
    p.dy = make_view(pr.dy.data(), {6, 8});
    p.dx = make_view(dx.data(), {6, 8});
    p.dweight = make_view(dw.data(), {8, 4});
    p.dbias = make_view(db.data(), {8});
    p.dconv_state = make_view(ds.data(), {3, 3, 8});
    return p;
  };
  auto expect_throw = [&](const char* name, const std::string& message, const std::function<void(P)>& mutate) {
    INFO(name);
    auto p = good();
    mutate(p);
    try {
      causal_conv1d_backward(p, CpuExec{&pool()});
      FAIL("no Error thrown");
    } catch (const Error& e) {
      const std::string what = e.what();
      INFO(what);
      REQUIRE(what.find(message) != std::string::npos);
    }
    for (const auto* v : {&dx, &dw, &db, &ds})
      for (float x : *v) REQUIRE(x == kSentinel);
  };
  expect_throw("x absent", "causal_conv1d_backward: x is required", [](P p) { p.fwd.x.data = nullptr; });
  expect_throw("weight", "causal_conv1d_backward: weight has shape", [](P p) { p.fwd.weight.shape[0] = 7; });
  expect_throw("dy absent", "causal_conv1d_backward: dy is required", [](P p) { p.dy = {}; });
  expect_throw("dy rows", "causal_conv1d_backward: dy has shape", [](P p) { p.dy.shape[0] = 5; });
  expect_throw("dx", "causal_conv1d_backward: dx has shape", [](P p) { p.dx.shape[1] = 9; });
  expect_throw("dweight", "causal_conv1d_backward: dweight has shape [8, 3]", [](P p) { p.dweight.shape[1] = 3; });
  expect_throw("dbias", "causal_conv1d_backward: dbias has shape", [](P p) { p.dbias.shape[0] = 3; });
  expect_throw("dconv_state", "causal_conv1d_backward: dconv_state has shape", [](P p) { p.dconv_state.shape[0] = 2; });
  expect_throw("dconv_state without history", "dconv_state needs fwd.conv_state", [](P p) { p.fwd.conv_state = {}; });
  expect_throw("dy stride", "dy must have unit stride", [](P p) { p.dy.stride[1] = 2; });
  expect_throw("dx stride", "dx must have unit stride", [](P p) { p.dx.stride[1] = 2; });
  expect_throw("K = 16", "width K = weight.shape[1] must be in 2..8, got 16", [&](P p) {
    p.fwd.weight = make_view<const float>(wide.data(), {6, 16});
    p.fwd.weight.shape[0] = 8;
  });
  expect_throw("duplicate slots", "used by two sequences",
               [&](P p) { p.fwd.state_slots = make_view<const int32_t>(slot_dup.data(), {2}); });
  expect_throw("activation", "unknown activation", [](P p) { p.fwd.activation = ConvActivation(5); });
  // y is not read: absent is fine
  auto p = good();
  p.fwd.y = {};
  REQUIRE_NOTHROW(causal_conv1d_backward(p, CpuExec{}));
}

// ================================================================================================
// linear_backward
// ================================================================================================
namespace {

template <class TX_, class TW_>
struct Pair {
  using TX = TX_;
  using TW = TW_;
};
using Pairs = std::tuple<Pair<float, float>, Pair<float, half>, Pair<float, bfloat16>, Pair<half, half>,
                         Pair<bfloat16, bfloat16>>;

template <class TX, class TW>
struct LinearProblem {
  int64_t tokens, in, out, ldx, ldw, ldy, ld_dx, ld_dw;  // row strides: > the width when strided
  std::vector<TX> x;
  std::vector<TW> w;
  std::vector<float> b, dy;
  LinearProblem(int64_t tokens_, int64_t in_, int64_t out_, bool strided)
      : tokens(tokens_), in(in_), out(out_) {
    const int64_t pad = strided ? 3 : 0;
    ldx = in + pad, ldw = in + 2 * pad, ldy = out + pad, ld_dx = in + pad, ld_dw = in + 3 * pad;
    // one spare element each: the views of a 0-token problem still point somewhere (present)
    x = rftest::random_vector<TX>(size_t(tokens * ldx + 1));
    w = rftest::random_vector<TW>(size_t(out * ldw));
    b = rftest::random_vector<float>(size_t(out));
    dy = rftest::random_vector<float>(size_t(tokens * ldy + 1));
  }
  // The dense (unstrided) values as doubles.
  std::vector<double> xd() const {
    std::vector<double> v(size_t(tokens * in));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < in; ++i) v[size_t(t * in + i)] = double(float(x[size_t(t * ldx + i)]));
    return v;
  }
  std::vector<double> wd() const {
    std::vector<double> v(size_t(out * in));
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) v[size_t(o * in + i)] = double(float(w[size_t(o * ldw + i)]));
    return v;
  }
  double loss(const std::vector<double>& xv, const std::vector<double>& wv, const std::vector<double>& bv) const {
    double L = 0;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double y = bv[size_t(o)];
        for (int64_t i = 0; i < in; ++i) y += xv[size_t(t * in + i)] * wv[size_t(o * in + i)];
        L += double(dy[size_t(t * ldy + o)]) * y;
      }
    return L;
  }
};

struct LinearGrads {
  std::vector<double> dx, dweight, dbias;  // dense
};

template <class TX, class TW>
LinearGrads linear_fd(const LinearProblem<TX, TW>& pr) {
  auto xv = pr.xd(), wv = pr.wd();
  std::vector<double> bv(pr.b.begin(), pr.b.end());
  const auto L = [&] { return pr.loss(xv, wv, bv); };
  return {finite_differences(xv, L), finite_differences(wv, L), finite_differences(bv, L)};
}

/// The closed form in double, for sizes where differences would take too long.
template <class TX, class TW>
LinearGrads linear_closed_form(const LinearProblem<TX, TW>& pr) {
  const auto xv = pr.xd(), wv = pr.wd();
  LinearGrads g{std::vector<double>(size_t(pr.tokens * pr.in)), std::vector<double>(size_t(pr.out * pr.in)),
                std::vector<double>(size_t(pr.out))};
  for (int64_t t = 0; t < pr.tokens; ++t)
    for (int64_t o = 0; o < pr.out; ++o) {
      const double d = pr.dy[size_t(t * pr.ldy + o)];
      g.dbias[size_t(o)] += d;
      for (int64_t i = 0; i < pr.in; ++i) {
        g.dx[size_t(t * pr.in + i)] += d * wv[size_t(o * pr.in + i)];
        g.dweight[size_t(o * pr.in + i)] += d * xv[size_t(t * pr.in + i)];
      }
    }
  return g;
}

enum LinearOutput : unsigned { kLx = 1, kLw = 2, kLb = 4, kAllLinear = 7 };

/// Output buffers (strided as the problem says) and the op's call.
struct LinearOut {
  std::vector<float> dx, dweight, dbias;
};

template <class TX, class TW>
LinearBackwardParams<TX, TW> linear_params(const LinearProblem<TX, TW>& pr, LinearOut& g, unsigned outputs,
                                           bool accumulate) {
  LinearBackwardParams<TX, TW> p;
  p.x = make_strided_view(pr.x.data(), {pr.tokens, pr.in}, {pr.ldx, 1});
  p.weight = make_strided_view(pr.w.data(), {pr.out, pr.in}, {pr.ldw, 1});
  p.dy = make_strided_view(pr.dy.data(), {pr.tokens, pr.out}, {pr.ldy, 1});
  if (outputs & kLx) p.dx = make_strided_view(g.dx.data(), {pr.tokens, pr.in}, {pr.ld_dx, 1});
  if (outputs & kLw) p.dweight = make_strided_view(g.dweight.data(), {pr.out, pr.in}, {pr.ld_dw, 1});
  if (outputs & kLb) p.dbias = make_view(g.dbias.data(), {pr.out});
  p.accumulate = accumulate;
  return p;
}

/// Runs the backward on outputs that start as `init` (accumulate) or the sentinel.
template <class TX, class TW>
LinearOut linear_run(const LinearProblem<TX, TW>& pr, CpuExec exec, bool accumulate, const LinearOut* init,
                     unsigned outputs = kAllLinear) {
  LinearOut g;
  if (init) {
    g = *init;
  } else {
    g.dx.assign(size_t(pr.tokens * pr.ld_dx), kSentinel);
    g.dweight.assign(size_t(pr.out * pr.ld_dw), kSentinel);
    g.dbias.assign(size_t(pr.out), kSentinel);
  }
  const auto p = linear_params(pr, g, outputs, accumulate);
  Workspace ws(linear_backward_workspace_bytes(p, exec));
  linear_backward(p, exec, ws.data(), ws.size());
  return g;
}

/// The rows x cols of a strided buffer, dense; its padding columns must be as in `before`.
std::vector<float> dense(const std::vector<float>& v, const std::vector<float>& before, int64_t rows,
                         int64_t cols, int64_t ld) {
  std::vector<float> d(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      if (c < cols)
        d[size_t(r * cols + c)] = v[size_t(r * ld + c)];
      else
        REQUIRE(v[size_t(r * ld + c)] == before[size_t(r * ld + c)]);
    }
  return d;
}

template <class TX, class TW>
void check_linear(const LinearProblem<TX, TW>& pr, const LinearGrads& e, const std::string& what,
                  double rel = kFdRel, double abs_of_max = kFdAbsOfMax) {
  // accumulate: random initial gradients that must be added to
  LinearOut init;
  init.dx = rftest::random_vector<float>(size_t(pr.tokens * pr.ld_dx));
  init.dweight = rftest::random_vector<float>(size_t(pr.out * pr.ld_dw));
  init.dbias = rftest::random_vector<float>(size_t(pr.out));
  LinearOut sentinel;
  sentinel.dx.assign(init.dx.size(), kSentinel);
  sentinel.dweight.assign(init.dweight.size(), kSentinel);
  rftest::for_each_isa([&] {
    for (CpuExec exec : {CpuExec{}, CpuExec{&pool()}})
      for (bool acc : {false, true}) {
        INFO(what << ", threads " << exec.threads() << ", accumulate " << acc);
        const LinearOut g = linear_run(pr, exec, acc, acc ? &init : nullptr);
        const LinearOut& before = acc ? init : sentinel;
        LinearGrads want = e;
        if (acc) {  // the initial values plus the gradient
          const auto dx0 = dense(init.dx, init.dx, pr.tokens, pr.in, pr.ld_dx);
          const auto dw0 = dense(init.dweight, init.dweight, pr.out, pr.in, pr.ld_dw);
          for (size_t i = 0; i < dx0.size(); ++i) want.dx[i] += dx0[i];
          for (size_t i = 0; i < dw0.size(); ++i) want.dweight[i] += dw0[i];
          for (int64_t o = 0; o < pr.out; ++o) want.dbias[size_t(o)] += init.dbias[size_t(o)];
        }
        check_grad(what + " dx", dense(g.dx, before.dx, pr.tokens, pr.in, pr.ld_dx), want.dx, rel, abs_of_max);
        check_grad(what + " dweight", dense(g.dweight, before.dweight, pr.out, pr.in, pr.ld_dw), want.dweight,
                   rel, abs_of_max);
        check_grad(what + " dbias", g.dbias, want.dbias, rel, abs_of_max);
      }
  });
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("linear_backward matches finite differences", "[linear_backward]", Pairs) {
  using TX = typename TestType::TX;
  using TW = typename TestType::TW;
  struct Shape {
    int64_t in, out;
  };
  for (Shape s : {Shape{1, 1}, Shape{13, 37}, Shape{37, 13}})
    for (int64_t tokens : {1, 3, 17, 33}) {
      const bool strided = (tokens + s.in) % 2 == 1;
      LinearProblem<TX, TW> pr(tokens, s.in, s.out, strided);
      check_linear(pr, linear_fd(pr),
                   "tokens " + std::to_string(tokens) + " in " + std::to_string(s.in) + " out " +
                       std::to_string(s.out) + (strided ? " strided" : ""));
    }
}

TEMPLATE_LIST_TEST_CASE("linear_backward across every GEMM block edge", "[linear_backward]", Pairs) {
  using TX = typename TestType::TX;
  using TW = typename TestType::TW;
  using B = cpu::detail::LinearBlocking;
  // tokens past MC (dx row blocks) and KC (dweight k slices), in past NC (column blocks), out past
  // KC (dx k slices) and not a multiple of MR; sums of up to 260 terms: the closed form in double,
  // with the fp32 budget widened to 260 * 2^-24 = 1.5e-5 of the summed magnitudes (~sqrt(n) the
  // result's size): rel 2e-5, floor 1e-4 of the largest gradient.
  static_assert(260 > B::kMC && 130 > B::kNC && 140 > B::kKC, "the shape must cross the blocks");
  LinearProblem<TX, TW> pr(260, 130, 140, true);
  check_linear(pr, linear_closed_form(pr), "blocked", 2e-5, 1e-4);
  LinearProblem<TX, TW> narrow(45, 20, 9, false);  // fewer blocks than threads: finer row blocks
  check_linear(narrow, linear_closed_form(narrow), "narrow");
}

TEST_CASE("linear_backward is deterministic across thread counts", "[linear_backward]") {
  LinearProblem<float, bfloat16> pr(200, 150, 90, false);
  const auto one = linear_run(pr, CpuExec{}, false, nullptr);
  ThreadPool two_pool(2);
  for (CpuExec exec : {CpuExec{&two_pool}, CpuExec{&pool()}}) {
    const auto g = linear_run(pr, exec, false, nullptr);
    REQUIRE(same_bits(g.dx, one.dx));
    REQUIRE(same_bits(g.dweight, one.dweight));
    REQUIRE(same_bits(g.dbias, one.dbias));
  }
}

TEST_CASE("linear_backward computes each output alone; no tokens", "[linear_backward]") {
  LinearProblem<half, half> pr(33, 37, 13, true);
  const auto all = linear_run(pr, CpuExec{&pool()}, false, nullptr);
  for (unsigned out : {kLx, kLw, kLb}) {
    INFO("output " << out);
    const auto g = linear_run(pr, CpuExec{&pool()}, false, nullptr, out);
    REQUIRE(same_bits(g.dx, out == kLx ? all.dx : std::vector<float>(all.dx.size(), kSentinel)));
    REQUIRE(same_bits(g.dweight, out == kLw ? all.dweight : std::vector<float>(all.dweight.size(), kSentinel)));
    REQUIRE(same_bits(g.dbias, out == kLb ? all.dbias : std::vector<float>(all.dbias.size(), kSentinel)));
  }
  // zero tokens: dweight and dbias are empty sums (0), or unchanged when accumulating
  LinearProblem<float, float> none(0, 13, 5, false);
  const auto zero = linear_run(none, CpuExec{&pool()}, false, nullptr);
  for (float v : zero.dweight) REQUIRE(v == 0.f);
  for (float v : zero.dbias) REQUIRE(v == 0.f);
  LinearOut init{{}, std::vector<float>(size_t(13 * 5), 1.5f), std::vector<float>(5, 2.5f)};
  const auto kept = linear_run(none, CpuExec{&pool()}, true, &init);
  REQUIRE(same_bits(kept.dweight, init.dweight));
  REQUIRE(same_bits(kept.dbias, init.dbias));
}

TEST_CASE("linear_backward: a wrong gradient would be caught", "[linear_backward]") {
  LinearProblem<float, float> pr(17, 13, 37, false);
  auto e = linear_fd(pr);
  const auto g = linear_run(pr, CpuExec{}, false, nullptr);
  REQUIRE(count_bad(g.dx, e.dx, kFdRel, kFdAbsOfMax) == 0);
  for (auto* v : {&e.dx, &e.dweight, &e.dbias})
    for (double& x : *v) x *= 1.001;  // 0.1% off
  CHECK(count_bad(g.dx, e.dx, kFdRel, kFdAbsOfMax) > g.dx.size() / 2);
  CHECK(count_bad(g.dweight, e.dweight, kFdRel, kFdAbsOfMax) > g.dweight.size() / 2);
  CHECK(count_bad(g.dbias, e.dbias, kFdRel, kFdAbsOfMax) > g.dbias.size() / 2);
}

TEST_CASE("linear_backward reproduces PyTorch autograd", "[linear_backward][golden]") {
  for (const char* c : {"linear_small", "linear_blocked"}) {
    INFO(c);
    const rftest::npy::Array xa = rftest::npy::load(golden_grads_path(c, "x"));
    const rftest::npy::Array wa = rftest::npy::load(golden_grads_path(c, "weight"));
    LinearProblem<float, float> pr(xa.shape[0], xa.shape[1], wa.shape[0], false);
    pr.x = xa.as<float>();
    pr.w = wa.as<float>();
    pr.dy = golden_f32(c, "dy");
    rftest::for_each_isa([&] {
      const auto g = linear_run(pr, CpuExec{&pool()}, false, nullptr);
      check_grad("dx", g.dx, golden_f64(c, "dx"), kGoldenRel, kGoldenAbsOfMax);
      check_grad("dweight", g.dweight, golden_f64(c, "dweight"), kGoldenRel, kGoldenAbsOfMax);
      check_grad("dbias", g.dbias, golden_f64(c, "dbias"), kGoldenRel, kGoldenAbsOfMax);
    });
  }
}

TEST_CASE("linear_backward rejects bad input and writes nothing", "[linear_backward]") {
  LinearProblem<float, bfloat16> pr(20, 12, 9, false);
  LinearOut g{std::vector<float>(size_t(20 * 12), kSentinel), std::vector<float>(size_t(9 * 12), kSentinel),
              std::vector<float>(9, kSentinel)};
  const CpuExec exec{&pool()};
  using P = LinearBackwardParams<float, bfloat16>&;
  Workspace ws(linear_backward_workspace_bytes(linear_params(pr, g, kAllLinear, false), exec));
  REQUIRE(ws.size() > 0);
  auto expect_throw = [&](const char* name, const std::string& message, const std::function<void(P)>& mutate,
                          size_t bytes) {
    INFO(name);
    auto p = linear_params(pr, g, kAllLinear, true);
    mutate(p);
    try {
      linear_backward(p, exec, ws.data(), bytes);
      FAIL("no Error thrown");
    } catch (const Error& e) {
      const std::string what = e.what();
      INFO(what);
      REQUIRE(what.rfind("linear_backward: ", 0) == 0);
      REQUIRE(what.find(message) != std::string::npos);
    }
    for (const auto* v : {&g.dx, &g.dweight, &g.dbias})
      for (float x : *v) REQUIRE(x == kSentinel);
  };
  const size_t n = ws.size();
  expect_throw("x absent", "x is required", [](P p) { p.x = {}; }, n);
  expect_throw("weight", "weight has shape [9, 11], expected [-1, 12]", [](P p) { p.weight.shape[1] = 11; }, n);
  expect_throw("dy", "dy has shape [20, 8], expected [20, 9]", [](P p) { p.dy.shape[1] = 8; }, n);
  expect_throw("dy absent", "dy is required", [](P p) { p.dy = {}; }, n);
  expect_throw("dx", "dx has shape [19, 12]", [](P p) { p.dx.shape[0] = 19; }, n);
  expect_throw("dweight", "dweight has shape [9, 13]", [](P p) { p.dweight.shape[1] = 13; }, n);
  expect_throw("dbias", "dbias has shape [10]", [](P p) { p.dbias.shape[0] = 10; }, n);
  expect_throw("dweight stride", "dweight must have unit stride", [](P p) { p.dweight.stride[1] = 2; }, n);
  expect_throw("x stride", "x must have unit stride", [](P p) { p.x.stride[1] = 2; }, n);
  expect_throw("workspace", "workspace has", [](P) {}, n - 1);
  expect_throw("null workspace", "(null)", [&](P) { ws.bytes.clear(); }, n);
}
