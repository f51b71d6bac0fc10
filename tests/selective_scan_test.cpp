// selective_scan / selective_state_update against a plain double-precision reference of spec
// section 4, in every storage dtype and CPU ISA, at awkward sizes (channels per group 1, 15, 17,
// N in {1, 5, 16, 64}, G in {1, 2}, R in {1, 3}, every optional operand on and off); the invariants
// (chunked == one call == token by token, packed == separate, padding untouched,
// use_initial_state=false == zero state, all bit-identical except the decode kernel's y, which sums
// in another order); and the checks.
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "recurformer/cpu/selective_scan.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

struct Shape {
  int64_t tokens, dch, n, g, r;
};
struct Options {
  bool D = true, z = true, delta_bias = true, softplus = true, init = true;
};

// Owns the inputs of one call (random, never zeros) and builds its params.
template <class T>
struct Problem {
  Shape s;
  Options o;
  int64_t slots;
  std::vector<T> u, delta, B, C, z, y;
  std::vector<float> A, D, delta_bias, state;
  std::vector<int32_t> cu, state_slots;

  Problem(Shape shape, Options opt, int64_t n_slots) : s(shape), o(opt), slots(n_slots) {
    u = rftest::random_vector<T>(size_t(s.tokens * s.dch));
    // dt in about (0.2, 1.3) either way: softplus of delta + bias in [-1.5, 1], or delta + bias in
    // [0.05, 0.8] as it is (a negative dt would make the state grow, which tests nothing more).
    delta = o.softplus ? rftest::random_vector<T>(size_t(s.tokens * s.dch), -1.0, 0.5)
                       : rftest::random_vector<T>(size_t(s.tokens * s.dch), 0.05, 0.6);
    B = rftest::random_vector<T>(size_t(s.tokens * s.g * s.n));
    C = rftest::random_vector<T>(size_t(s.tokens * s.g * s.r * s.n));
    z = rftest::random_vector<T>(size_t(s.tokens * s.dch), -3, 3);
    y = rftest::random_vector<T>(size_t(s.tokens * s.r * s.dch));  // poison: every live row is overwritten
    A = rftest::random_vector<float>(size_t(s.dch * s.n), -2.0, -0.05);
    D = rftest::random_vector<float>(size_t(s.dch));
    delta_bias = o.softplus ? rftest::random_vector<float>(size_t(s.dch), -0.5, 0.5)
                            : rftest::random_vector<float>(size_t(s.dch), 0.0, 0.2);
    state = rftest::random_vector<float>(size_t(slots * s.dch * s.n));
  }

  SelectiveScanParams<T> params() {
    SelectiveScanParams<T> p;
    p.u = make_view<const T>(u.data(), {s.tokens, s.dch});
    p.delta = make_view<const T>(delta.data(), {s.tokens, s.dch});
    p.A = make_view<const float>(A.data(), {s.dch, s.n});
    p.B = make_view<const T>(B.data(), {s.tokens, s.g, s.n});
    p.C = make_view<const T>(C.data(), {s.tokens, s.g, s.r, s.n});
    if (o.D) p.D = make_view<const float>(D.data(), {s.dch});
    if (o.z) p.z = make_view<const T>(z.data(), {s.tokens, s.dch});
    if (o.delta_bias) p.delta_bias = make_view<const float>(delta_bias.data(), {s.dch});
    p.y = make_view(y.data(), {s.tokens, s.r, s.dch});
    p.state = make_view(state.data(), {slots, s.dch, s.n});
    if (!cu.empty()) p.cu_seqlens = make_view<const int32_t>(cu.data(), {int64_t(cu.size())});
    if (!state_slots.empty())
      p.state_slots = make_view<const int32_t>(state_slots.data(), {int64_t(state_slots.size())});
    p.delta_activation = o.softplus ? DeltaActivation::softplus : DeltaActivation::identity;
    p.use_initial_state = o.init;
    return p;
  }
};

double softplus_ref(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }

// The plain reference: y (untouched rows keep their given value) and the final state pool.
template <class T>
void reference(const Problem<T>& pr, std::vector<double>& y, std::vector<double>& state) {
  const Shape s = pr.s;
  const auto u = rftest::to_double(pr.u), delta = rftest::to_double(pr.delta),
             B = rftest::to_double(pr.B), C = rftest::to_double(pr.C), z = rftest::to_double(pr.z);
  y = rftest::to_double(pr.y);
  state = rftest::to_double(pr.state);
  std::vector<int32_t> cu = pr.cu;
  if (cu.empty()) cu = {0, int32_t(s.tokens)};
  const int64_t per_group = s.dch / s.g;
  for (size_t q = 0; q + 1 < cu.size(); ++q) {
    const int64_t slot = pr.state_slots.empty() ? int64_t(q) : pr.state_slots[q];
    if (slot < 0) continue;
    for (int64_t c = 0; c < s.dch; ++c) {
      const int64_t g = c / per_group;
      std::vector<double> h(size_t(s.n), 0.0);
      double* st = state.data() + (slot * s.dch + c) * s.n;
      if (pr.o.init)
        for (int64_t n = 0; n < s.n; ++n) h[size_t(n)] = st[n];
      for (int64_t t = cu[q]; t < cu[q + 1]; ++t) {
        double dt = delta[size_t(t * s.dch + c)] + (pr.o.delta_bias ? pr.delta_bias[size_t(c)] : 0.0);
        if (pr.o.softplus) dt = softplus_ref(dt);
        const double uc = u[size_t(t * s.dch + c)];
        for (int64_t n = 0; n < s.n; ++n)
          h[size_t(n)] = std::exp(dt * pr.A[size_t(c * s.n + n)]) * h[size_t(n)] +
                         dt * B[size_t((t * s.g + g) * s.n + n)] * uc;
        for (int64_t r = 0; r < s.r; ++r) {
          double acc = pr.o.D ? pr.D[size_t(c)] * uc : 0.0;
          for (int64_t n = 0; n < s.n; ++n)
            acc += h[size_t(n)] * C[size_t(((t * s.g + g) * s.r + r) * s.n + n)];
          if (pr.o.z) {
            const double zz = z[size_t(t * s.dch + c)];
            acc *= zz / (1.0 + std::exp(-zz));
          }
          y[size_t((t * s.r + r) * s.dch + c)] = acc;
        }
      }
      for (int64_t n = 0; n < s.n; ++n) st[n] = h[size_t(n)];
    }
  }
}

template <class T>
void check_against_reference(Problem<T>& pr, const std::string& what) {
  std::vector<double> y_ref, state_ref;
  reference(pr, y_ref, state_ref);
  selective_scan(pr.params(), CpuExec{});
  rftest::check_close<T>(what + " y", pr.y, y_ref);
  // the state is fp32 in every dtype: the float tolerance applies
  rftest::check_close<float>(what + " state", pr.state, state_ref);
}

Options options_from_bits(unsigned bits) {
  Options o;
  o.D = bits & 1;
  o.z = bits & 2;
  o.delta_bias = bits & 4;
  o.softplus = !(bits & 8);
  o.init = !(bits & 16);
  return o;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("selective_scan matches the double reference", "[selective_scan]",
                        rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    unsigned variant = 0;
    for (int64_t n : {1, 5, 16, 64})
      for (auto gd : {std::pair<int64_t, int64_t>{1, 1}, {1, 17}, {2, 30}, {2, 34}})
        for (int64_t r : {1, 3}) {
          const Shape s{13, gd.second, n, gd.first, r};
          const Options o = options_from_bits(variant);
          INFO("N " << n << " G " << s.g << " Dch " << s.dch << " R " << r << " options " << variant);
          Problem<T> pr(s, o, 1);
          check_against_reference(pr, "one sequence");
          variant = (variant + 7) % 32;  // walks all 32 on/off combinations over the shapes
        }
  });
}

TEMPLATE_LIST_TEST_CASE("selective_scan with several vector blocks per task (small N, wide rows)",
                        "[selective_scan]", rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    // enough channels that a task interleaves up to 4 vector blocks, the last one partial
    for (auto shape : {Shape{13, 261, 5, 1, 3}, Shape{9, 260, 16, 2, 1}, Shape{7, 133, 1, 1, 2}}) {
      INFO("N " << shape.n << " G " << shape.g << " Dch " << shape.dch << " R " << shape.r);
      Problem<T> pr(shape, options_from_bits(shape.n == 16 ? 6u : 3u), 1);
      check_against_reference(pr, "sub-blocks");
    }
  });
}

TEMPLATE_LIST_TEST_CASE("selective_state_update matches the double reference", "[selective_scan]",
                        rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    unsigned variant = 3;
    for (int64_t n : {1, 5, 16, 64})
      for (auto gd : {std::pair<int64_t, int64_t>{1, 17}, {2, 30}, {2, 130}})  // 130: 2 channel chunks
        for (int64_t r : {1, 3}) {
          const Shape s{5, gd.second, n, gd.first, r};
          INFO("N " << n << " G " << s.g << " Dch " << s.dch << " R " << r << " options " << variant);
          Problem<T> pr(s, options_from_bits(variant), 7);
          variant = (variant + 7) % 32;
          pr.state_slots = {3, -1, 0, 6, 2};
          pr.cu = {0, 1, 2, 3, 4, 5};  // for the reference: one sequence per row
          std::vector<double> y_ref, state_ref;
          reference(pr, y_ref, state_ref);
          pr.cu.clear();
          selective_state_update(pr.params(), CpuExec{});
          rftest::check_close<T>("decode y", pr.y, y_ref);
          rftest::check_close<float>("decode state", pr.state, state_ref);
        }
  });
}

TEMPLATE_LIST_TEST_CASE("selective_scan over packed sequences with slots and padding",
                        "[selective_scan]", rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    for (unsigned bits : {0u, 31u, 16u}) {
      // lengths 5, 0, 1, 17, 3 (the 3-token one is padding); slots permuted inside a pool of 7
      Problem<T> pr({26, 20, 16, 2, 3}, options_from_bits(bits), 7);
      pr.cu = {0, 5, 5, 6, 23, 26};
      pr.state_slots = {4, 0, 6, 2, -1};
      INFO("options " << bits);
      check_against_reference(pr, "packed");
    }
  });
}

TEST_CASE("selective_scan softplus cut-off and an empty call", "[selective_scan]") {
  // delta + bias > 20 takes dt = x exactly; with A tiny the decay stays representable.
  Problem<float> pr({4, 3, 2, 1, 1}, Options{}, 1);
  for (auto& d : pr.delta) d = 25.f;
  for (auto& a : pr.A) a = -1e-3f;
  check_against_reference(pr, "large delta");
  Problem<float> empty({1, 3, 2, 1, 1}, Options{}, 2);
  const auto before = empty.state;
  const auto y_before = empty.y;
  auto p = empty.params();
  p.u.shape[0] = p.delta.shape[0] = p.B.shape[0] = p.C.shape[0] = p.z.shape[0] = p.y.shape[0] = 0;
  selective_scan(p, CpuExec{});
  REQUIRE(empty.state == before);  // a zero-length sequence keeps its state
  REQUIRE(empty.y == y_before);
}

namespace {
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}
}  // namespace

TEMPLATE_LIST_TEST_CASE("selective_scan invariants are bit-exact", "[selective_scan]",
                        rftest::StorageTypes) {
  using T = TestType;
  ThreadPool pool(2);
  const CpuExec exec{&pool};
  // N 5 and 20: the decode kernel's partial vectors over N; 64: full ones
  const int64_t n = GENERATE(5, 20, 64);
  rftest::for_each_isa([&] {
    const Shape s{23, 34, n, 2, 3};
    Problem<T> whole(s, Options{}, 1);
    Problem<T> base = whole;
    selective_scan(whole.params(), exec);

    SECTION("chunked prefill == one scan == token-by-token state updates") {
      Problem<T> chunked = base, stepped = base;
      for (auto range : {std::pair<int32_t, int32_t>{0, 7}, {7, 8}, {8, 8}, {8, 23}}) {
        chunked.cu = {0, range.second - range.first};
        auto p = chunked.params();
        const int64_t off = range.first, len = range.second - range.first;
        p.u.data += off * p.u.stride[0];
        p.delta.data += off * p.delta.stride[0];
        p.B.data += off * p.B.stride[0];
        p.C.data += off * p.C.stride[0];
        p.z.data += off * p.z.stride[0];
        p.y.data += off * p.y.stride[0];
        p.u.shape[0] = p.delta.shape[0] = p.B.shape[0] = p.C.shape[0] = p.z.shape[0] = p.y.shape[0] = len;
        selective_scan(p, exec);
      }
      REQUIRE(same_bits(chunked.y, whole.y));
      REQUIRE(same_bits(chunked.state, whole.state));
      for (int64_t t = 0; t < s.tokens; ++t) {
        auto p = stepped.params();
        p.u.data += t * p.u.stride[0];
        p.delta.data += t * p.delta.stride[0];
        p.B.data += t * p.B.stride[0];
        p.C.data += t * p.C.stride[0];
        p.z.data += t * p.z.stride[0];
        p.y.data += t * p.y.stride[0];
        p.u.shape[0] = p.delta.shape[0] = p.B.shape[0] = p.C.shape[0] = p.z.shape[0] = p.y.shape[0] = 1;
        selective_state_update(p, exec);
      }
      // the decode kernel sums y over N in another order: equal within rounding; the state exactly
      rftest::check_close<T>("token by token y", stepped.y, rftest::to_double(whole.y));
      REQUIRE(same_bits(stepped.state, whole.state));
    }
    SECTION("use_initial_state = false == a zeroed state") {
      Problem<T> fresh = base, zeroed = base;
      fresh.o.init = false;
      for (auto& v : zeroed.state) v = 0.f;
      selective_scan(fresh.params(), exec);
      selective_scan(zeroed.params(), exec);
      REQUIRE(same_bits(fresh.y, zeroed.y));
      REQUIRE(same_bits(fresh.state, zeroed.state));
    }
  });
}

TEMPLATE_LIST_TEST_CASE("packed sequences equal separate calls",
                        "[selective_scan]", rftest::StorageTypes) {
  using T = TestType;
  ThreadPool pool(2);
  const CpuExec exec{&pool};
  rftest::for_each_isa([&] {
    const Shape s{12, 17, 16, 1, 3};
    Problem<T> packed(s, Options{}, 5);
    packed.cu = {0, 4, 4, 9, 12};
    packed.state_slots = {3, 1, -1, 0};
    Problem<T> separate = packed;
    selective_scan(packed.params(), exec);
    for (size_t q = 0; q + 1 < separate.cu.size(); ++q) {
      if (separate.state_slots[q] < 0) continue;
      auto p = separate.params();
      const int64_t off = separate.cu[q], len = separate.cu[q + 1] - separate.cu[q];
      p.u.data += off * p.u.stride[0];
      p.delta.data += off * p.delta.stride[0];
      p.B.data += off * p.B.stride[0];
      p.C.data += off * p.C.stride[0];
      p.z.data += off * p.z.stride[0];
      p.y.data += off * p.y.stride[0];
      p.u.shape[0] = p.delta.shape[0] = p.B.shape[0] = p.C.shape[0] = p.z.shape[0] = p.y.shape[0] = len;
      p.cu_seqlens = {};
      p.state = make_view(separate.state.data() + separate.state_slots[q] * s.dch * s.n, {1, s.dch, s.n});
      p.state_slots = {};
      selective_scan(p, exec);
    }
    REQUIRE(same_bits(packed.y, separate.y));
    REQUIRE(same_bits(packed.state, separate.state));
  });
}

TEMPLATE_LIST_TEST_CASE("padding rows and unused slots keep their bits", "[selective_scan]",
                        rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    const Shape s{6, 17, 5, 1, 2};
    Problem<T> pr(s, Options{}, 4);
    pr.cu = {0, 2, 6};
    pr.state_slots = {1, -1};
    const auto y0 = pr.y;
    const auto state0 = pr.state;
    selective_scan(pr.params(), CpuExec{});
    const size_t row = size_t(s.r * s.dch), slot = size_t(s.dch * s.n);
    REQUIRE(std::memcmp(pr.y.data() + 2 * row, y0.data() + 2 * row, 4 * row * sizeof(T)) == 0);
    REQUIRE(std::memcmp(pr.y.data(), y0.data(), 2 * row * sizeof(T)) != 0);
    for (size_t k : {0u, 2u, 3u})
      REQUIRE(std::memcmp(pr.state.data() + k * slot, state0.data() + k * slot, slot * sizeof(float)) == 0);
    // decode: a padding row leaves its y row and every slot alone too
    Problem<T> dec({3, 17, 5, 1, 2}, Options{}, 4);
    dec.state_slots = {2, -1, 0};
    const auto dy0 = dec.y;
    const auto ds0 = dec.state;
    selective_state_update(dec.params(), CpuExec{});
    REQUIRE(std::memcmp(dec.y.data() + row, dy0.data() + row, row * sizeof(T)) == 0);
    for (size_t k : {1u, 3u})
      REQUIRE(std::memcmp(dec.state.data() + k * slot, ds0.data() + k * slot, slot * sizeof(float)) == 0);
  });
}

TEST_CASE("selective_scan rejects bad input and leaves y and state untouched", "[selective_scan]") {
  using T = bfloat16;
  const Shape s{6, 8, 4, 2, 2};
  Problem<T> pr(s, Options{}, 3);
  pr.cu = {0, 2, 6};
  pr.state_slots = {2, 0};
  const auto y0 = pr.y;
  const auto state0 = pr.state;
  std::vector<float> big_A(size_t(s.dch * 300), -1.f);
  std::vector<T> big_B(size_t(s.tokens * 300), T(1.f)), big_C(size_t(s.tokens * 2 * 300), T(1.f));
  std::vector<int32_t> cu_bad_start = {1, 2, 6}, cu_bad_order = {0, 4, 2, 6}, cu_bad_end = {0, 2, 5};
  std::vector<int32_t> slot_out = {3, 0}, slot_dup = {1, 1}, slot_short = {0};

  auto expect_throw = [&](const char* name, const std::string& message,
                          const std::function<void(SelectiveScanParams<T>&)>& mutate, bool update) {
    INFO(name);
    auto p = pr.params();
    mutate(p);
    try {
      if (update)
        selective_state_update(p, CpuExec{});
      else
        selective_scan(p, CpuExec{});
      FAIL("no Error thrown");
    } catch (const Error& e) {
      const std::string what = e.what();
      INFO(what);
      REQUIRE(what.find(message) != std::string::npos);
    }
    REQUIRE(same_bits(pr.y, y0));
    REQUIRE(same_bits(pr.state, state0));
  };
  using P = SelectiveScanParams<T>&;
  expect_throw("u absent", "selective_scan: u is required", [](P p) { p.u.data = nullptr; }, false);
  expect_throw("delta rows", "selective_scan: delta has shape", [](P p) { p.delta.shape[0] = 5; }, false);
  expect_throw("A rows", "selective_scan: A has shape", [](P p) { p.A.shape[0] = 7; }, false);
  expect_throw("B state dim", "selective_scan: B has shape", [](P p) { p.B.shape[2] = 3; }, false);
  expect_throw("G divides Dch", "must be >= 1 and divide Dch", [](P p) {
    p.B.shape[1] = 3;
    p.C.shape[1] = 3;
  }, false);
  expect_throw("C groups", "selective_scan: C has shape", [](P p) { p.C.shape[1] = 1; }, false);
  expect_throw("R >= 1", "readers R", [](P p) {
    p.C.shape[2] = 0;
    p.y.shape[1] = 0;
  }, false);
  expect_throw("N too large", "d_state N", [&](P p) {
    p.A = make_view<const float>(big_A.data(), {s.dch, 300});
    p.B = make_view<const T>(big_B.data(), {s.tokens, 1, 300});
  }, false);
  expect_throw("R * N past the limit", "R * N = 72057594037927936 * 4 exceeds", [](P p) {
    p.C.shape[2] = int64_t(1) << 56;
    p.y.shape[1] = int64_t(1) << 56;
  }, false);
  expect_throw("R * N past int64 (R = 2^62 from a caller)",
               "C of shape [6, 2, 4611686018427387904, 4] holds more elements than 64-bit sizes count",
               [](P p) { p.C.shape[2] = int64_t(1) << 62; }, false);
  expect_throw("extents past int64", "u of shape [4611686018427387904, 8] holds more elements than 64-bit sizes count",
               [](P p) { p.u.shape[0] = int64_t(1) << 62; }, false);
  expect_throw("y readers", "selective_scan: y has shape", [](P p) { p.y.shape[1] = 3; }, false);
  expect_throw("D size", "selective_scan: D has shape", [](P p) { p.D.shape[0] = 9; }, false);
  expect_throw("z rows", "selective_scan: z has shape", [](P p) { p.z.shape[0] = 1; }, false);
  expect_throw("delta_bias size", "delta_bias has shape", [](P p) { p.delta_bias.shape[0] = 4; }, false);
  expect_throw("state channels", "selective_scan: state has shape", [](P p) { p.state.shape[1] = 4; }, false);
  expect_throw("u inner stride", "u must have unit stride", [](P p) { p.u.stride[1] = 2; }, false);
  expect_throw("C inner stride", "C must have unit stride", [](P p) { p.C.stride[3] = 2; }, false);
  expect_throw("state inner stride", "state must have unit stride", [](P p) { p.state.stride[2] = 3; }, false);
  expect_throw("cu start", "cu_seqlens[0] must be 0",
               [&](P p) { p.cu_seqlens = make_view<const int32_t>(cu_bad_start.data(), {3}); }, false);
  expect_throw("cu order", "non-decreasing", [&](P p) {
    p.cu_seqlens = make_view<const int32_t>(cu_bad_order.data(), {4});
    p.state_slots = {};
  }, false);
  expect_throw("cu end", "must end at the number of tokens 6",
               [&](P p) { p.cu_seqlens = make_view<const int32_t>(cu_bad_end.data(), {3}); }, false);
  expect_throw("slot outside pool", "outside the pool of 3",
               [&](P p) { p.state_slots = make_view<const int32_t>(slot_out.data(), {2}); }, false);
  expect_throw("duplicate slots", "used by two sequences",
               [&](P p) { p.state_slots = make_view<const int32_t>(slot_dup.data(), {2}); }, false);
  expect_throw("slots per sequence", "state_slots has shape",
               [&](P p) { p.state_slots = make_view<const int32_t>(slot_short.data(), {1}); }, false);
  expect_throw("pool too small", "the pool needs 6 slots", [](P p) {
    p.cu_seqlens = {};
    p.state_slots = {};
  }, true);
  expect_throw("update without cu", "selective_state_update: cu_seqlens must be absent", [](P) {}, true);
  expect_throw("bad activation", "delta_activation",
               [](P p) { p.delta_activation = DeltaActivation(7); }, false);
}
