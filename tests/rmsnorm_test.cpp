// rmsnorm against a double reference in every storage dtype (activations and weights alike, and
// fp32 weights on 16-bit activations) and every ISA, at widths 1, not multiples of 16, 2W-1/2W+1
// of the two-accumulator loop, strided rows and in place; bad input leaves y untouched.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "recurformer/cpu/rmsnorm.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

template <class T, class TW>
void run_rmsnorm(int64_t tokens, int64_t d, bool strided, bool in_place) {
  const int64_t ldx = d + (strided ? 5 : 0), ldy = in_place ? ldx : d + (strided ? 3 : 0);
  const float eps = 1e-5f;
  // scale the rows differently so the normalisation matters
  auto x = rftest::random_vector<T>(size_t(tokens * ldx), -3.0, 3.0);
  const auto w = rftest::random_vector<TW>(size_t(d), 0.5, 1.5);
  std::vector<double> expected(size_t(tokens * d));
  for (int64_t t = 0; t < tokens; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(float(x[size_t(t * ldx + i)])) * double(float(x[size_t(t * ldx + i)]));
    const double r = 1.0 / std::sqrt(ss / double(d) + double(eps));
    for (int64_t i = 0; i < d; ++i)
      expected[size_t(t * d + i)] = double(float(x[size_t(t * ldx + i)])) * r * double(float(w[size_t(i)]));
  }
  const auto x0 = x;
  const T sentinel(7.f);
  std::vector<T> ybuf(size_t(tokens * ldy), sentinel);
  rftest::for_each_isa([&] {
    x = x0;
    std::fill(ybuf.begin(), ybuf.end(), sentinel);
    T* y = in_place ? x.data() : ybuf.data();
    RmsNormParams<T, TW> p;
    p.x = make_strided_view<const T>(x.data(), {tokens, d}, {ldx, 1});
    p.weight = make_view(w.data(), {d});
    p.y = make_strided_view(y, {tokens, d}, {ldy, 1});
    p.eps = eps;
    rmsnorm(p, CpuExec{&pool()});
    std::vector<T> got(size_t(tokens * d));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < d; ++i) got[size_t(t * d + i)] = y[t * ldy + i];
    // factor 1: the fp32 sum of d <= 300 positive squares is off by <= d * 2^-24 relative, halved by
    // the square root, well inside rel = 2e-5; 16-bit outputs round once.
    rftest::check_close<T>("rmsnorm d=" + std::to_string(d), got, expected);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = d; i < ldy; ++i) {
        const T a = y[t * ldy + i], b = in_place ? x0[size_t(t * ldx + i)] : sentinel;
        REQUIRE(std::memcmp(&a, &b, sizeof a) == 0);
      }
  });
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("rmsnorm matches a double reference", "[rmsnorm]", rftest::StorageTypes) {
  using T = TestType;
  for (int64_t d : {1, 7, 15, 16, 17, 31, 33, 100, 300})
    for (int64_t tokens : {1, 3, 8}) {
      INFO("tokens " << tokens << ", d " << d);
      run_rmsnorm<T, T>(tokens, d, false, false);
      run_rmsnorm<T, T>(tokens, d, true, false);
      run_rmsnorm<T, T>(tokens, d, true, true);
      run_rmsnorm<T, float>(tokens, d, false, false);  // fp32 weights on any activation dtype
    }
}

TEST_CASE("rmsnorm matches HF's formula at Llama scale", "[rmsnorm]") {
  run_rmsnorm<bfloat16, bfloat16>(2, 2048, false, false);
  run_rmsnorm<float, float>(2, 2048, false, true);
}

TEST_CASE("rmsnorm rejects bad input and leaves y untouched", "[rmsnorm]") {
  const int64_t tokens = 3, d = 10;
  auto x = rftest::random_vector<half>(size_t(tokens * d * 2));
  auto w = rftest::random_vector<half>(size_t(d));
  std::vector<half> y(size_t(tokens * d), half(7.f));
  auto good = [&] {
    RmsNormParams<half, half> p;
    p.x = make_view<const half>(x.data(), {tokens, d});
    p.weight = make_view<const half>(w.data(), {d});
    p.y = make_view(y.data(), {tokens, d});
    return p;
  };
  auto expect_throw = [&](const RmsNormParams<half, half>& p, const char* what) {
    INFO(what);
    try {
      rmsnorm(p, CpuExec{&pool()});
      FAIL("no throw");
    } catch (const Error& e) {
      const std::string msg = e.what();
      INFO(msg);
      REQUIRE(msg.rfind("rmsnorm: ", 0) == 0);
      REQUIRE(msg.find(what) != std::string::npos);
    }
    for (half v : y) REQUIRE(v.bits == half(7.f).bits);
  };
  auto p = good();
  p.weight = make_view<const half>(w.data(), {d - 1});
  expect_throw(p, "weight");
  p = good();
  p.y = make_view(y.data(), {tokens - 1, d});
  expect_throw(p, "y has shape");
  p = good();
  p.x.data = nullptr;
  expect_throw(p, "x is required");
  p = good();
  p.x = make_strided_view<const half>(x.data(), {tokens, d}, {2 * d, 2});
  expect_throw(p, "unit stride");
  p = good();
  p.eps = -1.f;
  expect_throw(p, "eps");
  p = good();
  p.eps = NAN;
  expect_throw(p, "eps");
}
