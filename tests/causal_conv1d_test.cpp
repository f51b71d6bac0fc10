// causal_conv1d / causal_conv1d_update against a plain double-precision reference of spec
// sections 3 and 7, in every storage dtype and CPU ISA, for every width K in 2..8, at channel counts
// 1, 15, 17 and 33 (not multiples of the vector widths), with bias, SiLU and conv_state on and off;
// the invariants (chunked == one call == token by token, packed == separate, padding untouched,
// use_initial_state=false == zero history, all bit-identical); and the checks.
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "recurformer/cpu/causal_conv1d.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

struct Options {
  bool bias = true, silu = false, state = true, init = true;
};

template <class T>
struct Problem {
  int64_t tokens, dch, k, slots;
  Options o;
  std::vector<T> x, y, conv_state;
  std::vector<float> weight, bias;
  std::vector<int32_t> cu, state_slots;

  Problem(int64_t tokens_, int64_t dch_, int64_t k_, Options opt, int64_t slots_)
      : tokens(tokens_), dch(dch_), k(k_), slots(slots_), o(opt) {
    x = rftest::random_vector<T>(size_t(tokens * dch), -2, 2);
    y = rftest::random_vector<T>(size_t(tokens * dch));  // poison
    conv_state = rftest::random_vector<T>(size_t(slots * (k - 1) * dch), -2, 2);
    weight = rftest::random_vector<float>(size_t(dch * k));
    bias = rftest::random_vector<float>(size_t(dch));
  }
  CausalConv1dParams<T> params() {
    CausalConv1dParams<T> p;
    p.x = make_view<const T>(x.data(), {tokens, dch});
    p.weight = make_view<const float>(weight.data(), {dch, k});
    if (o.bias) p.bias = make_view<const float>(bias.data(), {dch});
    p.y = make_view(y.data(), {tokens, dch});
    if (o.state) p.conv_state = make_view(conv_state.data(), {slots, k - 1, dch});
    if (!cu.empty()) p.cu_seqlens = make_view<const int32_t>(cu.data(), {int64_t(cu.size())});
    if (!state_slots.empty())
      p.state_slots = make_view<const int32_t>(state_slots.data(), {int64_t(state_slots.size())});
    p.activation = o.silu ? ConvActivation::silu : ConvActivation::none;
    p.use_initial_state = o.init;
    return p;
  }
};

template <class T>
void reference(const Problem<T>& pr, std::vector<double>& y, std::vector<double>& state) {
  const auto x = rftest::to_double(pr.x);
  y = rftest::to_double(pr.y);
  state = rftest::to_double(pr.conv_state);
  std::vector<int32_t> cu = pr.cu;
  if (cu.empty()) cu = {0, int32_t(pr.tokens)};
  const int64_t K = pr.k, D = pr.dch;
  for (size_t q = 0; q + 1 < cu.size(); ++q) {
    const int64_t slot = pr.state_slots.empty() ? int64_t(q) : pr.state_slots[q];
    if (slot < 0) continue;
    for (int64_t c = 0; c < D; ++c) {
      // the sequence's inputs with its K-1 history in front
      std::vector<double> v(size_t(K - 1), 0.0);
      if (pr.o.state && pr.o.init)
        for (int64_t i = 0; i < K - 1; ++i) v[size_t(i)] = state[size_t((slot * (K - 1) + i) * D + c)];
      for (int64_t t = cu[q]; t < cu[q + 1]; ++t) v.push_back(x[size_t(t * D + c)]);
      for (int64_t t = cu[q]; t < cu[q + 1]; ++t) {
        const int64_t j = t - cu[q] + K - 1;  // index of token t in v
        double acc = pr.o.bias ? pr.bias[size_t(c)] : 0.0;
        for (int64_t i = 0; i < K; ++i) acc += pr.weight[size_t(c * K + i)] * v[size_t(j - K + 1 + i)];
        if (pr.o.silu) acc = acc / (1.0 + std::exp(-acc));
        y[size_t(t * D + c)] = acc;
      }
      if (pr.o.state)
        for (int64_t i = 0; i < K - 1; ++i)
          state[size_t((slot * (K - 1) + i) * D + c)] = v[v.size() - size_t(K - 1) + size_t(i)];
    }
  }
}

template <class T>
void check_against_reference(Problem<T>& pr, const std::string& what) {
  std::vector<double> y_ref, state_ref;
  reference(pr, y_ref, state_ref);
  causal_conv1d(pr.params(), CpuExec{});
  rftest::check_close<T>(what + " y", pr.y, y_ref);
  // the new state holds input values: exactly
  rftest::check_close(what + " conv_state", pr.conv_state, state_ref, 0.0, 0.0);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Restricts p to tokens [off, off + len).
template <class T>
void slice_tokens(CausalConv1dParams<T>& p, int64_t off, int64_t len) {
  p.x.data += off * p.x.stride[0];
  p.y.data += off * p.y.stride[0];
  p.x.shape[0] = p.y.shape[0] = len;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("causal_conv1d matches the double reference", "[causal_conv1d]",
                        rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    unsigned variant = 0;
    for (int64_t k = 2; k <= 8; ++k)
      for (int64_t dch : {1, 15, 17, 33}) {
        Options o;
        o.bias = variant & 1;
        o.silu = variant & 2;
        o.state = !(variant & 4);
        o.init = !(variant & 8);
        ++variant;
        INFO("K " << k << " Dch " << dch << " variant " << variant - 1);
        Problem<T> pr(11, dch, k, o, 1);
        check_against_reference(pr, "one sequence");
      }
  });
}

TEMPLATE_LIST_TEST_CASE("causal_conv1d with more channels than one panel", "[causal_conv1d]",
                        rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    Options o;
    o.silu = true;
    Problem<T> pr(5, cpu::detail::kConvPanel + 17, 3, o, 2);
    pr.cu = {0, 2, 5};
    check_against_reference(pr, "wide");
  });
}

TEMPLATE_LIST_TEST_CASE("causal_conv1d over packed sequences shorter and longer than K",
                        "[causal_conv1d]", rftest::StorageTypes) {
  using T = TestType;
  rftest::for_each_isa([] {
    for (bool silu : {false, true}) {
      Options o;
      o.silu = silu;
      // lengths 1, 0, 2, 9, 3 (the last is padding) with K 4: shorter than the history and longer
      Problem<T> pr(15, 19, 4, o, 6);
      pr.cu = {0, 1, 1, 3, 12, 15};
      pr.state_slots = {5, 0, 3, 1, -1};
      check_against_reference(pr, "packed");
    }
  });
}

TEMPLATE_LIST_TEST_CASE("causal_conv1d invariants are bit-exact", "[causal_conv1d]",
                        rftest::StorageTypes) {
  using T = TestType;
  ThreadPool pool(2);
  const CpuExec exec{&pool};
  rftest::for_each_isa([&] {
    Options o;
    o.silu = true;
    Problem<T> base(13, 33, 5, o, 1);
    Problem<T> whole = base;
    causal_conv1d(whole.params(), exec);

    Problem<T> chunked = base, stepped = base;
    for (auto range : {std::pair<int64_t, int64_t>{0, 2}, {2, 2}, {2, 3}, {3, 13}}) {
      auto p = chunked.params();
      slice_tokens(p, range.first, range.second - range.first);
      causal_conv1d(p, exec);
    }
    REQUIRE(same_bits(chunked.y, whole.y));
    REQUIRE(same_bits(chunked.conv_state, whole.conv_state));
    for (int64_t t = 0; t < base.tokens; ++t) {
      auto p = stepped.params();
      slice_tokens(p, t, 1);
      causal_conv1d_update(p, exec);
    }
    REQUIRE(same_bits(stepped.y, whole.y));
    REQUIRE(same_bits(stepped.conv_state, whole.conv_state));

    Problem<T> fresh = base, zeroed = base;
    fresh.o.init = false;
    for (auto& v : zeroed.conv_state) v = T(0.f);
    causal_conv1d(fresh.params(), exec);
    causal_conv1d(zeroed.params(), exec);
    REQUIRE(same_bits(fresh.y, zeroed.y));
    REQUIRE(same_bits(fresh.conv_state, zeroed.conv_state));
  });
}

TEMPLATE_LIST_TEST_CASE("packed conv equals separate calls; padding keeps its bits",
                        "[causal_conv1d]", rftest::StorageTypes) {
  using T = TestType;
  ThreadPool pool(2);
  const CpuExec exec{&pool};
  rftest::for_each_isa([&] {
    Problem<T> packed(12, 17, 3, Options{}, 5);
    packed.cu = {0, 4, 4, 9, 12};
    packed.state_slots = {3, 1, -1, 0};
    Problem<T> separate = packed;
    const auto y0 = packed.y;
    const auto state0 = packed.conv_state;
    causal_conv1d(packed.params(), exec);
    for (size_t q = 0; q + 1 < separate.cu.size(); ++q) {
      if (separate.state_slots[q] < 0) continue;
      auto p = separate.params();
      slice_tokens(p, separate.cu[q], separate.cu[q + 1] - separate.cu[q]);
      p.cu_seqlens = {};
      p.state_slots = {};
      p.conv_state = make_view(separate.conv_state.data() + separate.state_slots[q] * 2 * 17, {1, 2, 17});
      causal_conv1d(p, exec);
    }
    REQUIRE(same_bits(packed.y, separate.y));
    REQUIRE(same_bits(packed.conv_state, separate.conv_state));
    const size_t row = 17, slot = 2 * 17;
    REQUIRE(std::memcmp(packed.y.data() + 4 * row, y0.data() + 4 * row, 5 * row * sizeof(T)) == 0);  // sequence 2
    for (size_t s : {2u, 4u})
      REQUIRE(std::memcmp(packed.conv_state.data() + s * slot, state0.data() + s * slot, slot * sizeof(T)) == 0);
    // decode with a padding row
    Problem<T> dec(3, 17, 3, Options{}, 4);
    dec.state_slots = {2, -1, 0};
    const auto dy0 = dec.y;
    const auto ds0 = dec.conv_state;
    causal_conv1d_update(dec.params(), exec);
    REQUIRE(std::memcmp(dec.y.data() + row, dy0.data() + row, row * sizeof(T)) == 0);
    for (size_t s : {1u, 3u})
      REQUIRE(std::memcmp(dec.conv_state.data() + s * slot, ds0.data() + s * slot, slot * sizeof(T)) == 0);
    REQUIRE(std::memcmp(dec.conv_state.data() + 2 * slot, ds0.data() + 2 * slot, slot * sizeof(T)) != 0);
  });
}

TEST_CASE("causal_conv1d rejects bad input and leaves y and conv_state untouched", "[causal_conv1d]") {
  using T = half;
  Problem<T> pr(6, 8, 4, Options{}, 3);
  pr.cu = {0, 2, 6};
  pr.state_slots = {2, 0};
  const auto y0 = pr.y;
  const auto state0 = pr.conv_state;
  std::vector<float> wide(8 * 9, 0.5f);
  std::vector<int32_t> cu_bad = {0, 3, 2, 6}, slot_out = {3, 0}, slot_dup = {1, 1};
  using P = CausalConv1dParams<T>&;
  auto expect_throw = [&](const char* name, const std::string& message,
                          const std::function<void(P)>& mutate, bool update) {
    INFO(name);
    auto p = pr.params();
    mutate(p);
    try {
      if (update)
        causal_conv1d_update(p, CpuExec{});
      else
        causal_conv1d(p, CpuExec{});
      FAIL("no Error thrown");
    } catch (const Error& e) {
      const std::string what = e.what();
      INFO(what);
      REQUIRE(what.find(message) != std::string::npos);
    }
    REQUIRE(same_bits(pr.y, y0));
    REQUIRE(same_bits(pr.conv_state, state0));
  };
  expect_throw("x absent", "causal_conv1d: x is required", [](P p) { p.x.data = nullptr; }, false);
  expect_throw("weight rows", "causal_conv1d: weight has shape", [](P p) { p.weight.shape[0] = 7; }, false);
  expect_throw("K = 1", "width K", [](P p) {
    p.weight.shape[1] = 1;
    p.conv_state.shape[1] = 0;
  }, false);
  expect_throw("K = 9", "width K = weight.shape[1] must be in 2..8, got 9", [&](P p) {
    p.weight = make_view<const float>(wide.data(), {8, 9});
  }, false);
  expect_throw("bias size", "bias has shape", [](P p) { p.bias.shape[0] = 3; }, false);
  expect_throw("y rows", "causal_conv1d: y has shape", [](P p) { p.y.shape[0] = 5; }, false);
  expect_throw("conv_state history", "conv_state has shape", [](P p) { p.conv_state.shape[1] = 2; }, false);
  expect_throw("x inner stride", "x must have unit stride", [](P p) { p.x.stride[1] = 2; }, false);
  expect_throw("conv_state inner stride", "conv_state must have unit stride",
               [](P p) { p.conv_state.stride[2] = 2; }, false);
  expect_throw("cu order", "non-decreasing", [&](P p) {
    p.cu_seqlens = make_view<const int32_t>(cu_bad.data(), {4});
    p.state_slots = {};
  }, false);
  expect_throw("slot outside pool", "outside the pool of 3",
               [&](P p) { p.state_slots = make_view<const int32_t>(slot_out.data(), {2}); }, false);
  expect_throw("duplicate slots", "used by two sequences",
               [&](P p) { p.state_slots = make_view<const int32_t>(slot_dup.data(), {2}); }, false);
  expect_throw("update needs state", "causal_conv1d_update: conv_state is required", [](P p) {
    p.cu_seqlens = {};
    p.state_slots = {};
    p.conv_state = {};
  }, true);
  expect_throw("update without cu", "causal_conv1d_update: cu_seqlens must be absent", [](P) {}, true);
  expect_throw("bad activation", "unknown activation", [](P p) { p.activation = ConvActivation(3); }, false);
}
