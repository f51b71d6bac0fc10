// selective_scan_backward against central finite differences of a plain double-precision forward
// (spec section 4) with the loss L = sum(dy * y), in every storage dtype and CPU ISA, on awkward
// shapes: 1, 7, 18, 33 and 37 tokens, packed sequences of lengths 0, 3, 16, 17 and 21 (chunks are 16
// tokens), a padding sequence (slot -1) and an unread slot, G 1/2/3, Dch 6, 34 (a group in three
// blocks) and 131 (blocks of 17 channels), N 3, 5 and 16, R 1/2/3/5/8 (readers are handled in
// groups of up to 4), every optional operand on and off,
// softplus / identity, the softplus cut-off (x > 20), use_initial_state on and off. Also: the
// gradients are the same bits at 1 and 3 threads; PyTorch autograd on fixtures
// (tools/make_golden_grads_scan.py); the checks.
//
// Tolerance: |got - want| <= 2e-5 |want| + 2e-6 max|want| per gradient array (want: the finite
// difference, itself accurate to ~1e-9 in double). The backward accumulates in fp32 over at most
// 37 tokens x N x R terms; the floor covers elements that cancel to near zero. The same tolerance
// holds for half and bfloat16 storage: the reference runs on the same rounded inputs, the kernel
// converts them to fp32 exactly and stores nothing in 16 bits. Each gradient is O(0.1..10), so a
// wrong one misses by orders of magnitude more than this (checked below with wrong inputs).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "recurformer/cpu/selective_scan.hpp"
#include "support/npy.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

constexpr double kRel = 2e-5, kAbsOfMax = 2e-6;

struct Shape {
  int64_t tokens, dch, n, g, r;
};
struct Options {
  bool D = true, z = true, delta_bias = true, softplus = true, init = true;
};

double softplus_ref(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }

// The forward in double, as a function of every input, for finite differences. Absent D and
// delta_bias are zeros (their gradients are then the gradients at 0); absent z means no gate.
struct Reference {
  Shape s;
  Options o;
  std::vector<int32_t> cu, slots;  // always filled
  std::vector<double> u, delta, A, B, C, D, z, bias, state, dy;

  double loss() const {
    const int64_t per_group = s.dch / s.g;
    std::vector<double> h(size_t(s.n));
    double L = 0;
    for (size_t q = 0; q + 1 < cu.size(); ++q) {
      const int64_t slot = slots[q];
      if (slot < 0) continue;
      for (int64_t c = 0; c < s.dch; ++c) {
        const int64_t g = c / per_group;
        for (int64_t n = 0; n < s.n; ++n) h[size_t(n)] = o.init ? state[size_t((slot * s.dch + c) * s.n + n)] : 0.0;
        for (int64_t t = cu[q]; t < cu[q + 1]; ++t) {
          const double x = delta[size_t(t * s.dch + c)] + bias[size_t(c)];
          const double dt = o.softplus ? softplus_ref(x) : x;
          const double uc = u[size_t(t * s.dch + c)];
          for (int64_t n = 0; n < s.n; ++n)
            h[size_t(n)] = std::exp(dt * A[size_t(c * s.n + n)]) * h[size_t(n)] +
                           dt * B[size_t((t * s.g + g) * s.n + n)] * uc;
          double gate = 1.0;
          if (o.z) {
            const double zz = z[size_t(t * s.dch + c)];
            gate = zz / (1.0 + std::exp(-zz));
          }
          for (int64_t r = 0; r < s.r; ++r) {
            double y = D[size_t(c)] * uc;
            for (int64_t n = 0; n < s.n; ++n) y += h[size_t(n)] * C[size_t(((t * s.g + g) * s.r + r) * s.n + n)];
            L += dy[size_t((t * s.r + r) * s.dch + c)] * y * gate;
          }
        }
      }
    }
    return L;
  }

  /// dL/d(member) by central differences.
  std::vector<double> grad(std::vector<double> Reference::*member) {
    std::vector<double>& x = this->*member;
    std::vector<double> g(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const double x0 = x[i], h = 1e-5 * std::max(1.0, std::fabs(x0));
      x[i] = x0 + h;
      const double lp = loss();
      x[i] = x0 - h;
      const double lm = loss();
      x[i] = x0;
      g[i] = (lp - lm) / (2 * h);
    }
    return g;
  }
};

struct Grads {
  std::vector<float> du, ddelta, dA, dB, dC, dD, dz, ddb, dstate;
};
struct Expected {
  std::vector<double> du, ddelta, dA, dB, dC, dD, dz, ddb, dstate;
};

// Owns one call's inputs (random, never zeros) and its gradient buffers.
template <class T>
struct Problem {
  Shape s;
  Options o;
  int64_t slots;
  std::vector<T> u, delta, B, C, z;
  std::vector<float> A, D, delta_bias, state, dy;
  std::vector<int32_t> cu, state_slots;
  Grads gr;
  std::vector<float> dstate_poison;  // what dstate holds before a call (unread slots keep it)

  Problem(Shape shape, Options opt, int64_t n_slots) : s(shape), o(opt), slots(n_slots) {
    u = rftest::random_vector<T>(size_t(s.tokens * s.dch));
    // dt in about (0.2, 1.3): softplus of delta + bias in [-1.5, 1], or delta + bias in [0.05, 0.8]
    delta = o.softplus ? rftest::random_vector<T>(size_t(s.tokens * s.dch), -1.0, 0.5)
                       : rftest::random_vector<T>(size_t(s.tokens * s.dch), 0.05, 0.6);
    B = rftest::random_vector<T>(size_t(s.tokens * s.g * s.n));
    C = rftest::random_vector<T>(size_t(s.tokens * s.g * s.r * s.n));
    z = rftest::random_vector<T>(size_t(s.tokens * s.dch), -3, 3);
    A = rftest::random_vector<float>(size_t(s.dch * s.n), -2.0, -0.05);
    D = rftest::random_vector<float>(size_t(s.dch));
    delta_bias = o.softplus ? rftest::random_vector<float>(size_t(s.dch), -0.5, 0.5)
                            : rftest::random_vector<float>(size_t(s.dch), 0.0, 0.2);
    state = rftest::random_vector<float>(size_t(slots * s.dch * s.n));
    dy = rftest::random_vector<float>(size_t(s.tokens * s.r * s.dch));
    dstate_poison = rftest::random_vector<float>(state.size(), 5.0, 9.0);
  }

  void poison() {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    gr.du.assign(u.size(), nan);
    gr.ddelta.assign(u.size(), nan);
    gr.dz.assign(u.size(), nan);
    gr.dA.assign(A.size(), nan);
    gr.dB.assign(B.size(), nan);
    gr.dC.assign(C.size(), nan);
    gr.dD.assign(D.size(), nan);
    gr.ddb.assign(D.size(), nan);
    gr.dstate = dstate_poison;
  }

  SelectiveScanBackwardParams<T> params() {
    SelectiveScanBackwardParams<T> p;
    SelectiveScanParams<T>& f = p.fwd;
    f.u = make_view<const T>(u.data(), {s.tokens, s.dch});
    f.delta = make_view<const T>(delta.data(), {s.tokens, s.dch});
    f.A = make_view<const float>(A.data(), {s.dch, s.n});
    f.B = make_view<const T>(B.data(), {s.tokens, s.g, s.n});
    f.C = make_view<const T>(C.data(), {s.tokens, s.g, s.r, s.n});
    if (o.D) f.D = make_view<const float>(D.data(), {s.dch});
    if (o.z) f.z = make_view<const T>(z.data(), {s.tokens, s.dch});
    if (o.delta_bias) f.delta_bias = make_view<const float>(delta_bias.data(), {s.dch});
    f.state = make_view(state.data(), {slots, s.dch, s.n});
    if (!cu.empty()) f.cu_seqlens = make_view<const int32_t>(cu.data(), {int64_t(cu.size())});
    if (!state_slots.empty())
      f.state_slots = make_view<const int32_t>(state_slots.data(), {int64_t(state_slots.size())});
    f.delta_activation = o.softplus ? DeltaActivation::softplus : DeltaActivation::identity;
    f.use_initial_state = o.init;
    p.dy = make_view<const float>(dy.data(), {s.tokens, s.r, s.dch});
    p.du = make_view(gr.du.data(), {s.tokens, s.dch});
    p.ddelta = make_view(gr.ddelta.data(), {s.tokens, s.dch});
    p.dA = make_view(gr.dA.data(), {s.dch, s.n});
    p.dB = make_view(gr.dB.data(), {s.tokens, s.g, s.n});
    p.dC = make_view(gr.dC.data(), {s.tokens, s.g, s.r, s.n});
    p.dD = make_view(gr.dD.data(), {s.dch});
    if (o.z) p.dz = make_view(gr.dz.data(), {s.tokens, s.dch});
    p.ddelta_bias = make_view(gr.ddb.data(), {s.dch});
    p.dstate = make_view(gr.dstate.data(), {slots, s.dch, s.n});
    return p;
  }

  Reference reference() const {
    Reference r;
    r.s = s;
    r.o = o;
    r.cu = cu.empty() ? std::vector<int32_t>{0, int32_t(s.tokens)} : cu;
    r.slots = state_slots;
    if (r.slots.empty())
      for (size_t q = 0; q + 1 < r.cu.size(); ++q) r.slots.push_back(int32_t(q));
    r.u = rftest::to_double(u);
    r.delta = rftest::to_double(delta);
    r.A = rftest::to_double(A);
    r.B = rftest::to_double(B);
    r.C = rftest::to_double(C);
    r.D = o.D ? rftest::to_double(D) : std::vector<double>(D.size(), 0.0);
    r.z = rftest::to_double(z);
    r.bias = o.delta_bias ? rftest::to_double(delta_bias) : std::vector<double>(D.size(), 0.0);
    r.state = rftest::to_double(state);
    r.dy = rftest::to_double(dy);
    return r;
  }

  /// Finite-difference gradients; dstate keeps the poison on the slots that are not read.
  Expected expected() const {
    Reference r = reference();
    Expected e;
    e.du = r.grad(&Reference::u);
    e.ddelta = r.grad(&Reference::delta);
    e.dA = r.grad(&Reference::A);
    e.dB = r.grad(&Reference::B);
    e.dC = r.grad(&Reference::C);
    e.dD = r.grad(&Reference::D);
    e.dz = r.grad(&Reference::z);
    e.ddb = r.grad(&Reference::bias);
    e.dstate = rftest::to_double(dstate_poison);
    if (o.init) {
      const std::vector<double> ds = r.grad(&Reference::state);
      const size_t per_slot = size_t(s.dch * s.n);
      for (int32_t slot : r.slots)
        if (slot >= 0) std::copy(ds.begin() + slot * per_slot, ds.begin() + (slot + 1) * per_slot,
                                 e.dstate.begin() + slot * per_slot);
    }
    return e;
  }

  void run(CpuExec exec) {
    poison();
    auto p = params();
    const size_t bytes = selective_scan_backward_workspace_bytes(p, exec);
    std::vector<unsigned char> ws(bytes);
    selective_scan_backward(p, exec, ws.data(), bytes);
  }
};

double max_abs(const std::vector<double>& e) {
  double m = 0;
  for (double x : e) m = std::max(m, std::fabs(x));
  return m;
}

// The largest |got - want| / allowed over the array (infinite for NaN): <= 1 passes.
double excess(const std::vector<float>& got, const std::vector<double>& want) {
  const double floor = kAbsOfMax * max_abs(want);
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]);
    if (std::isnan(err)) return std::numeric_limits<double>::infinity();
    if (err != 0) worst = std::max(worst, err / (kRel * std::fabs(want[i]) + floor));
  }
  return worst;
}

void check_grad(const std::string& what, const std::vector<float>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  rftest::check_close(what, got.data(), want.data(), got.size(), kRel, kAbsOfMax * max_abs(want));
}

template <class T>
void check_all(const Problem<T>& pr, const Expected& e) {
  check_grad("du", pr.gr.du, e.du);
  check_grad("ddelta", pr.gr.ddelta, e.ddelta);
  check_grad("dA", pr.gr.dA, e.dA);
  check_grad("dB", pr.gr.dB, e.dB);
  check_grad("dC", pr.gr.dC, e.dC);
  check_grad("dD", pr.gr.dD, e.dD);
  if (pr.o.z) check_grad("dz", pr.gr.dz, e.dz);
  check_grad("ddelta_bias", pr.gr.ddb, e.ddb);
  check_grad("dstate", pr.gr.dstate, e.dstate);
}

struct Case {
  const char* name;
  Shape s;
  std::vector<int32_t> cu, slots;
  int64_t pool;
  Options o;
};

std::vector<Case> cases() {
  Options all;
  Options bare;
  bare.D = bare.z = bare.delta_bias = false;
  Options ident;  // identity activation, gate, no D, no bias, no initial state
  ident.softplus = ident.D = ident.delta_bias = ident.init = false;
  Options no_gate;
  no_gate.z = false;
  Options no_init = all;
  no_init.init = false;
  return {
      {"one token", {1, 6, 5, 2, 3}, {}, {}, 1, all},
      {"7 tokens in 2 sequences, G 3, R 1, no D / z / bias", {7, 6, 5, 3, 1}, {0, 3, 7}, {1, 0}, 2, bare},
      {"37 tokens: lengths 17, 0, 3 (padding), 17; slot 2 unread", {37, 6, 5, 2, 3}, {0, 17, 17, 20, 37},
       {3, 0, -1, 1}, 4, all},
      {"37 tokens: lengths 16, 21, identity, no initial state", {37, 6, 5, 3, 3}, {0, 16, 37}, {0, 1}, 2, ident},
      {"a group of 34 channels in 3 blocks, N 16, no gate", {18, 34, 16, 1, 1}, {}, {}, 1, no_gate},
      {"blocks of 17 channels (Dch 131), padding, R 2", {7, 131, 3, 1, 2}, {0, 2, 7}, {0, -1}, 1, all},
      {"33 tokens, G 2, R 2, no initial state", {33, 6, 5, 2, 2}, {0, 33}, {0}, 1, no_init},
      {"R 5 (readers in groups of 4 + 1)", {9, 6, 5, 2, 5}, {0, 4, 9}, {1, 0}, 2, all},
      {"R 8 (two groups of 4), N 16", {4, 6, 16, 3, 8}, {}, {}, 1, bare},
  };
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("selective_scan_backward matches finite differences of the double forward",
                        "[selective_scan_backward]", rftest::StorageTypes) {
  using T = TestType;
  ThreadPool pool(2);
  for (const Case& c : cases()) {
    INFO(c.name);
    Problem<T> pr(c.s, c.o, c.pool);
    pr.cu = c.cu;
    pr.state_slots = c.slots;
    const Expected e = pr.expected();
    rftest::for_each_isa([&] {
      pr.run(CpuExec{&pool});
      check_all(pr, e);
    });
  }
}

TEST_CASE("selective_scan_backward through the softplus cut-off (x > 20: derivative 1)",
          "[selective_scan_backward]") {
  Problem<float> pr({5, 6, 5, 2, 2}, Options{}, 1);
  for (size_t i = 0; i < pr.delta.size(); i += 2) pr.delta[i] = 25.f;
  for (auto& a : pr.A) a *= 0.02f;  // the decay stays representable at dt = 25
  const Expected e = pr.expected();
  rftest::for_each_isa([&] {
    pr.run(CpuExec{});
    check_all(pr, e);
  });
}

TEST_CASE("the tolerance catches wrong gradients", "[selective_scan_backward]") {
  // Every gradient is far larger than the tolerance's floor...
  Problem<float> pr({37, 6, 5, 2, 3}, Options{}, 2);
  pr.cu = {0, 20, 37};
  const Expected e = pr.expected();
  for (const auto* g : {&e.du, &e.ddelta, &e.dA, &e.dB, &e.dC, &e.dD, &e.dz, &e.ddb, &e.dstate})
    REQUIRE(max_abs(*g) > 0.05);
  pr.run(CpuExec{});
  REQUIRE(excess(pr.gr.du, e.du) <= 1);
  // ... and the backward of a slightly different forward misses by orders of magnitude.
  auto miss = [&](const std::function<void(Problem<float>&)>& change, const std::vector<float> Grads::*g,
                  const std::vector<double>& want) {
    Problem<float> wrong = pr;
    change(wrong);
    wrong.run(CpuExec{});
    return excess(wrong.gr.*g, want);
  };
  CHECK(miss([](Problem<float>& w) { w.o.softplus = false; }, &Grads::ddelta, e.ddelta) > 100);
  CHECK(miss([](Problem<float>& w) { w.o.init = false; }, &Grads::dA, e.dA) > 100);
  CHECK(miss([](Problem<float>& w) { w.cu = {0, 19, 37}; }, &Grads::dB, e.dB) > 100);
  CHECK(miss([](Problem<float>& w) { w.dy[7] += 0.01f; }, &Grads::dC, e.dC) > 100);
  CHECK(miss([](Problem<float>& w) { w.z[3] += 0.01f; }, &Grads::dz, e.dz) > 100);
}

TEMPLATE_LIST_TEST_CASE("selective_scan_backward gives the same bits at any thread count",
                        "[selective_scan_backward]", rftest::StorageTypes) {
  using T = TestType;
  ThreadPool one(1), three(3);
  rftest::for_each_isa([&] {
    // several blocks per group (dB / dC partials) and several sequences (dA / dD / bias partials)
    Problem<T> a({40, 68, 16, 2, 3}, Options{}, 5);
    a.cu = {0, 9, 9, 30, 33, 40};
    a.state_slots = {4, 1, 0, -1, 2};
    Problem<T> b = a;
    a.run(CpuExec{&one});
    b.run(CpuExec{&three});
    const Grads& x = a.gr;
    const Grads& y = b.gr;
    for (auto m : {&Grads::du, &Grads::ddelta, &Grads::dA, &Grads::dB, &Grads::dC, &Grads::dD, &Grads::dz,
                   &Grads::ddb, &Grads::dstate})
      REQUIRE(std::memcmp((x.*m).data(), (y.*m).data(), (x.*m).size() * sizeof(float)) == 0);
  });
}

TEST_CASE("selective_scan_backward: optional gradients, no sequences, no state", "[selective_scan_backward]") {
  Problem<float> pr({9, 6, 5, 2, 3}, Options{}, 2);
  pr.cu = {0, 4, 9};
  const Expected e = pr.expected();
  ThreadPool pool(2);
  const CpuExec exec{&pool};
  SECTION("each gradient alone equals its value among all") {
    for (int which = 0; which < 9; ++which) {
      pr.poison();
      auto p = pr.params();
      View<float, 2> du = p.du, ddelta = p.ddelta, dA = p.dA, dz = p.dz;
      View<float, 3> dB = p.dB, dstate = p.dstate;
      View<float, 4> dC = p.dC;
      View<float, 1> dD = p.dD, ddb = p.ddelta_bias;
      p.du = {}, p.ddelta = {}, p.dA = {}, p.dz = {}, p.dB = {}, p.dstate = {}, p.dC = {}, p.dD = {},
      p.ddelta_bias = {};
      switch (which) {
        case 0: p.du = du; break;
        case 1: p.ddelta = ddelta; break;
        case 2: p.dA = dA; break;
        case 3: p.dz = dz; break;
        case 4: p.dB = dB; break;
        case 5: p.dstate = dstate; break;
        case 6: p.dC = dC; break;
        case 7: p.dD = dD; break;
        default: p.ddelta_bias = ddb; break;
      }
      const size_t bytes = selective_scan_backward_workspace_bytes(p, exec);
      std::vector<unsigned char> ws(bytes);
      selective_scan_backward(p, exec, ws.data(), bytes);
      INFO("gradient " << which);
      const std::vector<std::pair<const std::vector<float>*, const std::vector<double>*>> all = {
          {&pr.gr.du, &e.du}, {&pr.gr.ddelta, &e.ddelta}, {&pr.gr.dA, &e.dA},       {&pr.gr.dz, &e.dz},
          {&pr.gr.dB, &e.dB}, {&pr.gr.dstate, &e.dstate}, {&pr.gr.dC, &e.dC}, {&pr.gr.dD, &e.dD},
          {&pr.gr.ddb, &e.ddb}};
      check_grad("the one asked for", *all[size_t(which)].first, *all[size_t(which)].second);
      for (size_t k = 0; k < all.size(); ++k)  // the others are untouched (still NaN / the poison)
        if (k != size_t(which) && k != 5) REQUIRE(std::isnan((*all[k].first)[0]));
      if (which != 5) REQUIRE(pr.gr.dstate == pr.dstate_poison);
    }
  }
  SECTION("no state when it is not read; zero sequences write zero sums") {
    pr.o.init = false;
    pr.poison();
    auto p = pr.params();
    p.fwd.state = {};
    p.dstate = {};
    const size_t bytes = selective_scan_backward_workspace_bytes(p, exec);
    std::vector<unsigned char> ws(bytes);
    selective_scan_backward(p, exec, ws.data(), bytes);
    Problem<float> ref = pr;
    ref.run(exec);
    REQUIRE(pr.gr.dA == ref.gr.dA);
    REQUIRE(pr.gr.du == ref.gr.du);

    std::vector<int32_t> no_seqs = {0};
    pr.poison();
    p = pr.params();
    p.fwd.u.shape[0] = p.fwd.delta.shape[0] = p.fwd.B.shape[0] = p.fwd.C.shape[0] = p.fwd.z.shape[0] = 0;
    p.dy.shape[0] = p.du.shape[0] = p.ddelta.shape[0] = p.dB.shape[0] = p.dC.shape[0] = p.dz.shape[0] = 0;
    p.fwd.cu_seqlens = make_view<const int32_t>(no_seqs.data(), {1});
    const size_t bytes0 = selective_scan_backward_workspace_bytes(p, exec);
    std::vector<unsigned char> ws0(bytes0);
    selective_scan_backward(p, exec, ws0.data(), bytes0);
    for (float x : pr.gr.dA) REQUIRE(x == 0.f);
    for (float x : pr.gr.dD) REQUIRE(x == 0.f);
    for (float x : pr.gr.ddb) REQUIRE(x == 0.f);
    REQUIRE(std::isnan(pr.gr.du[0]));
  }
}

// ------------------------------------------------------------------------------------------------
// PyTorch autograd fixtures (tools/make_golden_grads_scan.py)
// ------------------------------------------------------------------------------------------------
namespace {
std::string fixture(const std::string& name, const std::string& array) {
  return std::string(RECURFORMER_TEST_DATA_DIR) + "/golden_grads/" + name + "/" + array + ".npy";
}
std::vector<float> load_f32(const std::string& name, const std::string& array, std::vector<int64_t>& shape) {
  const rftest::npy::Array a = rftest::npy::load(fixture(name, array));
  shape = a.shape;
  return a.as<float>();
}
bool has_array(const std::string& name, const std::string& array) {
  return std::ifstream(fixture(name, array)).good();
}
}  // namespace

TEST_CASE("selective_scan_backward matches PyTorch autograd", "[selective_scan_backward][golden]") {
  for (const char* name : {"scan_packed", "scan_training"}) {
    INFO("fixture " << name);
    std::vector<int64_t> su, sA, sC, sst, sh;
    Problem<float> pr({1, 1, 1, 1, 1}, Options{}, 1);
    pr.u = load_f32(name, "u", su);
    pr.delta = load_f32(name, "delta", sh);
    pr.A = load_f32(name, "A", sA);
    pr.B = load_f32(name, "B", sh);
    pr.C = load_f32(name, "C", sC);
    pr.dy = load_f32(name, "dy", sh);
    pr.s = {su[0], su[1], sA[1], sC[1], sC[2]};
    pr.o.D = has_array(name, "D");
    pr.o.z = has_array(name, "z");
    pr.o.delta_bias = has_array(name, "delta_bias");
    pr.o.init = has_array(name, "state");
    if (pr.o.D) pr.D = load_f32(name, "D", sh);
    if (pr.o.z) pr.z = load_f32(name, "z", sh);
    if (pr.o.delta_bias) pr.delta_bias = load_f32(name, "delta_bias", sh);
    pr.D.resize(size_t(pr.s.dch));
    pr.delta_bias.resize(size_t(pr.s.dch));
    if (pr.o.init) {
      pr.state = load_f32(name, "state", sst);
      pr.slots = sst[0];
    } else {
      pr.slots = 1;
      pr.state.assign(size_t(pr.s.dch * pr.s.n), 0.f);
    }
    pr.dstate_poison.assign(pr.state.size(), 0.f);
    pr.cu = rftest::npy::load(fixture(name, "cu_seqlens")).as<int32_t>();
    pr.state_slots = rftest::npy::load(fixture(name, "state_slots")).as<int32_t>();
    pr.o.softplus = true;

    std::vector<int64_t> shape;
    auto golden = [&](const char* array) {
      const std::vector<float> v = load_f32(name, array, shape);
      return std::vector<double>(v.begin(), v.end());
    };
    auto check = [&](const char* what, const std::vector<float>& got, const std::vector<double>& want) {
      REQUIRE(got.size() == want.size());
      rftest::check_close(what, got.data(), want.data(), got.size(), 1e-5, 2e-6 * max_abs(want));
    };
    rftest::for_each_isa([&] {
      // the fixture's forward is the op's forward
      std::vector<float> y(pr.dy.size()), state = pr.state;
      auto f = pr.params().fwd;
      f.y = make_view(y.data(), {pr.s.tokens, pr.s.r, pr.s.dch});
      f.state = make_view(state.data(), {pr.slots, pr.s.dch, pr.s.n});
      selective_scan(f, CpuExec{});
      check("y", y, golden("y"));  // padding rows: left at 0 by the op, 0 in the fixture
      pr.run(CpuExec{});
      check("du", pr.gr.du, golden("du"));
      check("ddelta", pr.gr.ddelta, golden("ddelta"));
      check("dA", pr.gr.dA, golden("dA"));
      check("dB", pr.gr.dB, golden("dB"));
      check("dC", pr.gr.dC, golden("dC"));
      if (pr.o.D) check("dD", pr.gr.dD, golden("dD"));
      if (pr.o.z) check("dz", pr.gr.dz, golden("dz"));
      if (pr.o.delta_bias) check("ddelta_bias", pr.gr.ddb, golden("ddelta_bias"));
      if (pr.o.init) check("dstate", pr.gr.dstate, golden("dstate"));
    });
  }
}

TEST_CASE("selective_scan_backward rejects bad input and writes nothing", "[selective_scan_backward]") {
  using T = half;
  Problem<T> pr({6, 8, 4, 2, 2}, Options{}, 3);
  pr.cu = {0, 2, 6};
  pr.state_slots = {2, 0};
  pr.poison();
  const Grads before = pr.gr;
  std::vector<unsigned char> ws(1 << 20);
  auto expect_throw = [&](const char* name, const std::string& message,
                          const std::function<void(SelectiveScanBackwardParams<T>&, size_t&)>& mutate) {
    INFO(name);
    auto p = pr.params();
    size_t bytes = ws.size();
    mutate(p, bytes);
    try {
      selective_scan_backward(p, CpuExec{}, bytes ? ws.data() : nullptr, bytes);
      FAIL("no Error thrown");
    } catch (const Error& e) {
      const std::string what = e.what();
      INFO(what);
      REQUIRE(what.find(message) != std::string::npos);
    }
    for (auto m : {&Grads::du, &Grads::ddelta, &Grads::dA, &Grads::dB, &Grads::dC, &Grads::dD, &Grads::dz,
                   &Grads::ddb, &Grads::dstate})
      REQUIRE(std::memcmp((pr.gr.*m).data(), (before.*m).data(), (before.*m).size() * sizeof(float)) == 0);
  };
  using P = SelectiveScanBackwardParams<T>&;
  expect_throw("dy absent", "selective_scan_backward: dy is required", [](P p, size_t&) { p.dy = {}; });
  expect_throw("dy readers", "selective_scan_backward: dy has shape [6, 3, 8], expected [6, 2, 8]",
               [](P p, size_t&) { p.dy.shape[1] = 3; });
  expect_throw("dy inner stride", "dy must have unit stride", [](P p, size_t&) { p.dy.stride[2] = 2; });
  expect_throw("du rows", "selective_scan_backward: du has shape", [](P p, size_t&) { p.du.shape[0] = 5; });
  expect_throw("ddelta channels", "selective_scan_backward: ddelta has shape", [](P p, size_t&) { p.ddelta.shape[1] = 7; });
  expect_throw("dA", "selective_scan_backward: dA has shape", [](P p, size_t&) { p.dA.shape[1] = 5; });
  expect_throw("dB groups", "selective_scan_backward: dB has shape", [](P p, size_t&) { p.dB.shape[1] = 1; });
  expect_throw("dC readers", "selective_scan_backward: dC has shape", [](P p, size_t&) { p.dC.shape[2] = 1; });
  expect_throw("dD", "selective_scan_backward: dD has shape", [](P p, size_t&) { p.dD.shape[0] = 9; });
  expect_throw("ddelta_bias", "selective_scan_backward: ddelta_bias has shape", [](P p, size_t&) { p.ddelta_bias.shape[0] = 1; });
  expect_throw("dstate slots", "selective_scan_backward: dstate has shape [2, 8, 4], expected [3, 8, 4]",
               [](P p, size_t&) { p.dstate.shape[0] = 2; });
  expect_throw("dz without z", "dz is given but z is absent", [](P p, size_t&) { p.fwd.z = {}; });
  expect_throw("forward input", "selective_scan_backward: B has shape", [](P p, size_t&) { p.fwd.B.shape[2] = 3; });
  expect_throw("state read but absent", "selective_scan_backward: state is required",
               [](P p, size_t&) { p.fwd.state = {}; });
  expect_throw("slot outside the pool", "outside the pool of 1", [](P p, size_t&) {
    p.dstate.shape[0] = 1;
    p.fwd.state.shape[0] = 1;
  });
  expect_throw("workspace too small", "selective_scan_backward: workspace has 100 bytes", [](P, size_t& b) { b = 100; });
  expect_throw("no workspace", "(null)", [](P, size_t& b) { b = 0; });
}
