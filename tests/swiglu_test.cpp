// swiglu against a double reference in every storage dtype and ISA, at widths 1, not multiples of
// 16, W-1/W+1, strided rows, in place (out = gate and out = up), large |gate| where exp saturates;
// bad input leaves out untouched.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "recurformer/cpu/swiglu.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

enum class Alias { none, gate, up };

template <class T>
void run_swiglu(int64_t tokens, int64_t d, bool strided, Alias alias, double range = 6.0) {
  const int64_t ld = d + (strided ? 3 : 0);
  const auto g0 = rftest::random_vector<T>(size_t(tokens * ld), -range, range);
  const auto u0 = rftest::random_vector<T>(size_t(tokens * ld), -2.0, 2.0);
  std::vector<double> expected(size_t(tokens * d));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < d; ++i) {
      const double g = double(float(g0[size_t(t * ld + i)])), u = double(float(u0[size_t(t * ld + i)]));
      expected[size_t(t * d + i)] = g / (1.0 + std::exp(-g)) * u;
    }
  const T sentinel(7.f);
  rftest::for_each_isa([&] {
    auto gate = g0, up = u0;
    std::vector<T> obuf(size_t(tokens * ld), sentinel);
    T* out = alias == Alias::gate ? gate.data() : alias == Alias::up ? up.data() : obuf.data();
    SwigluParams<T> p;
    p.gate = make_strided_view<const T>(gate.data(), {tokens, d}, {ld, 1});
    p.up = make_strided_view<const T>(up.data(), {tokens, d}, {ld, 1});
    p.out = make_strided_view(out, {tokens, d}, {ld, 1});
    swiglu(p, CpuExec{&pool()});
    std::vector<T> got(size_t(tokens * d));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < d; ++i) got[size_t(t * d + i)] = out[t * ld + i];
    // factor 1: exp is within 2 ulp and one division and two products round in fp32, far inside
    // rel 2e-5; 16-bit outputs round once.
    rftest::check_close<T>("swiglu d=" + std::to_string(d), got, expected);
    const std::vector<T>& before = alias == Alias::gate ? g0 : alias == Alias::up ? u0 : obuf;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = d; i < ld; ++i) {
        const T a = out[t * ld + i], b = alias == Alias::none ? sentinel : before[size_t(t * ld + i)];
        REQUIRE(std::memcmp(&a, &b, sizeof a) == 0);
      }
  });
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("swiglu matches a double reference", "[swiglu]", rftest::StorageTypes) {
  using T = TestType;
  for (int64_t d : {1, 7, 8, 9, 15, 16, 17, 33, 100})
    for (int64_t tokens : {1, 2, 5}) {
      INFO("tokens " << tokens << ", d " << d);
      run_swiglu<T>(tokens, d, false, Alias::none);
      run_swiglu<T>(tokens, d, true, Alias::none);
      run_swiglu<T>(tokens, d, true, Alias::gate);
      run_swiglu<T>(tokens, d, false, Alias::up);
    }
  run_swiglu<T>(3, 200, false, Alias::none, 100.0);  // exp(-g) overflows / underflows
}

TEST_CASE("swiglu rejects bad input and leaves out untouched", "[swiglu]") {
  const int64_t tokens = 3, d = 10;
  auto g = rftest::random_vector<float>(size_t(tokens * d * 2));
  auto u = rftest::random_vector<float>(size_t(tokens * d));
  std::vector<float> out(size_t(tokens * d), 7.f);
  auto good = [&] {
    SwigluParams<float> p;
    p.gate = make_view<const float>(g.data(), {tokens, d});
    p.up = make_view<const float>(u.data(), {tokens, d});
    p.out = make_view(out.data(), {tokens, d});
    return p;
  };
  auto expect_throw = [&](const SwigluParams<float>& p, const char* what) {
    INFO(what);
    try {
      swiglu(p, CpuExec{&pool()});
      FAIL("no throw");
    } catch (const Error& e) {
      const std::string msg = e.what();
      INFO(msg);
      REQUIRE(msg.rfind("swiglu: ", 0) == 0);
      REQUIRE(msg.find(what) != std::string::npos);
    }
    for (float v : out) REQUIRE(v == 7.f);
  };
  auto p = good();
  p.up = make_view<const float>(u.data(), {tokens, d - 1});
  expect_throw(p, "up has shape");
  p = good();
  p.out = make_view(out.data(), {tokens - 1, d});
  expect_throw(p, "out has shape");
  p = good();
  p.gate.data = nullptr;
  expect_throw(p, "gate is required");
  p = good();
  p.gate = make_strided_view<const float>(g.data(), {tokens, d}, {2 * d, 2});
  expect_throw(p, "unit stride");
}
