// linear: y = x W^T + b against a double reference, in every required (activation, weight) dtype
// pair and every ISA, on both paths (GEMV up to kGemvMaxTokens, blocked GEMM above) at shapes that
// cut every block edge: tokens 1..5 (GEMV passes of 4), 7..9 and kGemvMaxTokens (GEMV), the first
// GEMM size and MR-1, MR, MR+1 past it, 37 and past the MC block; in not a multiple of 16
// and past KC; out = 1, NR-1, NR+1 and past NC. Plus strided rows, bias on/off and bad input.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "recurformer/cpu/linear.hpp"
#include "recurformer/model/gguf.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

template <class TX_, class TW_>
struct Pair {
  using TX = TX_;
  using TW = TW_;
};
using Pairs = std::tuple<Pair<float, float>, Pair<float, half>, Pair<float, bfloat16>,
                         Pair<half, half>, Pair<bfloat16, bfloat16>>;

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

// Weights: random storage values, or Q8_0 blocks with scales in [0.002, 0.02) and all int8 codes.
template <class TW>
std::vector<TW> fixture_blocks(size_t n);
template <class TW>
std::vector<TW> random_weights(size_t n) {
  if constexpr (is_quant_block_v<TW>)
    return fixture_blocks<TW>(n);
  else
    return rftest::random_vector<TW>(n);
}
template <>
std::vector<BlockQ8_0> random_weights<BlockQ8_0>(size_t n) {
  std::vector<BlockQ8_0> w(n);
  std::uniform_int_distribution<int> q(-127, 127);
  const auto scales = rftest::random_vector<half>(n, 0.002, 0.02);
  for (size_t i = 0; i < n; ++i) {
    w[i].d = scales[i];
    for (auto& v : w[i].qs) v = int8_t(q(rftest::rng()));
  }
  return w;
}
// Other block types: blocks drawn at random from the real ones of tests/data/quant/blocks.gguf
// (quantised by the gguf package from random rows), so scales, mins and codes are realistic.
template <class TW>
std::vector<TW> fixture_blocks(size_t n) {
  static const GgufFile f = GgufFile::open(std::string(RECURFORMER_TEST_DATA_DIR) + "/quant/blocks.gguf");
  const GgufTensorInfo* t = f.find_tensor(ggml_type_name(TW::type));
  REQUIRE(t);
  REQUIRE(t->type == TW::type);
  const size_t have = t->nbytes / sizeof(TW);
  std::uniform_int_distribution<size_t> pick(0, have - 1);
  std::vector<TW> w(n);
  for (TW& b : w) std::memcpy(&b, t->data + pick(rftest::rng()) * sizeof(TW), sizeof(TW));
  return w;
}
// Row o of W as doubles (wd) and the scale of its dot-product terms (wm): |w| for dense weights,
// for block weights three times the largest |w| of the block (kernels may sum d * sum(x q) and
// c * sum(x) apart, whose terms reach a few times the block's largest weight even where w is ~0).
template <class TW>
void decode_row(const TW* row, int64_t in, double* wd, double* wm) {
  if constexpr (is_quant_block_v<TW>) {
    float buf[TW::size];
    for (int64_t b = 0; b < in / TW::size; ++b) {
      row[b].dequantize(buf);
      double amax = 0;
      for (float v : buf) amax = std::max(amax, std::fabs(double(v)));
      for (int64_t i = 0; i < TW::size; ++i) wd[b * TW::size + i] = buf[i], wm[b * TW::size + i] = 3 * amax;
    }
  } else {
    for (int64_t k = 0; k < in; ++k) wd[k] = double(float(row[k])), wm[k] = std::fabs(wd[k]);
  }
}

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

// A dot product's rounding error is bounded relative to sum |x_k w_k|, not to |sum x_k w_k|
// (cancellation), and the kernels sum in a different order than the reference. So each element is
// checked as |y - e| <= rel * (|b| + sum |x_k w_k|) + abs with the dtype's Tolerance: for fp32 the
// worst-case accumulation error in <= 300 terms is 300 * 2^-24 = 1.8e-5 < rel = 2e-5 (factor 1);
// for 16-bit y the output rounding (<= 2^-9 |e|) dominates and is covered by the same budget.
template <class TX>
void check_linear_close(const std::string& what, const std::vector<TX>& y, int64_t ldy,
                        int64_t tokens, int64_t out, const std::vector<double>& expected,
                        const std::vector<double>& magnitude) {
  using Tol = rftest::Tolerance<TX>;
  int64_t bad = 0, worst = -1;
  double worst_excess = 0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out; ++o) {
      const double a = double(float(y[size_t(t * ldy + o)])), e = expected[size_t(t * out + o)];
      const double lim = Tol::rel * magnitude[size_t(t * out + o)] + Tol::abs;
      const double excess = std::isnan(a) ? 1e300 : std::fabs(a - e) / lim;
      if (!(excess <= 1.0)) {
        ++bad;
        if (excess > worst_excess) worst_excess = excess, worst = t * out + o;
      }
    }
  INFO(what << ": " << bad << " elements out of tolerance; worst [" << worst / std::max<int64_t>(out, 1)
            << ", " << worst % std::max<int64_t>(out, 1) << "] at " << worst_excess << "x the limit");
  REQUIRE(bad == 0);
}

template <class TX, class TW>
void run_linear(int64_t tokens, int64_t in, int64_t out, bool with_bias, bool strided) {
  using TB = typename LinearWeight<TW>::bias_type;
  constexpr int64_t block = LinearWeight<TW>::block;
  const int64_t ldx = in + (strided ? 3 : 0), ldw = in / block + (strided ? 5 : 0), ldy = out + (strided ? 2 : 0);
  const auto x = rftest::random_vector<TX>(size_t(tokens * ldx));
  const auto w = random_weights<TW>(size_t(out * ldw));
  const auto b = rftest::random_vector<TB>(size_t(out));
  std::vector<double> wd(size_t(out * in)), wm(size_t(out * in));
  for (int64_t o = 0; o < out; ++o) decode_row(w.data() + o * ldw, in, &wd[size_t(o * in)], &wm[size_t(o * in)]);
  std::vector<double> expected(size_t(tokens * out)), magnitude(size_t(tokens * out));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = with_bias ? double(float(b[size_t(o)])) : 0.0, m = std::fabs(s);
      for (int64_t k = 0; k < in; ++k) {
        const double xk = double(float(x[size_t(t * ldx + k)]));
        s += xk * wd[size_t(o * in + k)];
        m += std::fabs(xk) * wm[size_t(o * in + k)];
      }
      expected[size_t(t * out + o)] = s;
      magnitude[size_t(t * out + o)] = m;
    }

  LinearParams<TX, TW> p;
  p.x = make_strided_view(x.data(), {tokens, in}, {ldx, 1});
  p.weight = make_strided_view(w.data(), {out, in / block}, {ldw, 1});
  if (with_bias) p.bias = make_view(b.data(), {out});
  const TX sentinel(7.f);
  std::vector<TX> y(size_t(tokens * ldy), sentinel);
  p.y = make_strided_view(y.data(), {tokens, out}, {ldy, 1});
  const CpuExec exec{&pool()};
  std::vector<unsigned char> ws(linear_workspace_bytes(p, exec));

  rftest::for_each_isa([&] {
    std::fill(y.begin(), y.end(), sentinel);
    linear(p, exec, ws.data(), ws.size());
    check_linear_close(std::string("linear ") + std::to_string(tokens) + "x" + std::to_string(in) +
                           " -> " + std::to_string(out),
                       y, ldy, tokens, out, expected, magnitude);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t o = out; o < ldy; ++o) REQUIRE(same_bits(y[size_t(t * ldy + o)], sentinel));
  });
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("linear matches a double reference", "[linear]", Pairs) {
  using TX = typename TestType::TX;
  using TW = typename TestType::TW;
  struct Shape {
    int64_t in, out;
  };
  constexpr int64_t kGemvMax = cpu::detail::LinearBlocking::kGemvMaxTokens, kMR = cpu::detail::LinearBlocking::kMR;
  static_assert(3 * kMR - 1 > kGemvMax, "the MR edges must be GEMM sizes");
  // in: 1, not a multiple of 16, past KC = 128 (three k slices); out: 1, NR-1, NR+1, past NC = 128
  for (Shape s : {Shape{1, 1}, Shape{17, 33}, Shape{40, 31}, Shape{300, 129}})
    for (int64_t tokens : {int64_t(1), int64_t(2), int64_t(3), int64_t(4), int64_t(5), int64_t(7), int64_t(8),
                           int64_t(9), kGemvMax, kGemvMax + 1, 3 * kMR - 1, 3 * kMR, 3 * kMR + 1, int64_t(37)}) {
      INFO("tokens " << tokens << ", in " << s.in << ", out " << s.out);
      run_linear<TX, TW>(tokens, s.in, s.out, false, false);
      run_linear<TX, TW>(tokens, s.in, s.out, true, true);
    }
  // past the MC = 256 token block (out > NC keeps the full block height), and a narrow output
  // whose tokens are split finer across the threads
  run_linear<TX, TW>(260, 70, 130, true, false);
  run_linear<TX, TW>(260, 70, 45, true, false);
}

using Blocks = std::tuple<BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ2_K, BlockQ3_K,
                          BlockQ4_K, BlockQ5_K, BlockQ6_K, BlockIQ4_NL, BlockIQ4_XS>;

TEMPLATE_LIST_TEST_CASE("linear with GGUF block weights matches a double reference", "[linear][quant]", Blocks) {
  using TW = TestType;
  constexpr int64_t QB = TW::size;
  // in: one block, past KC = 128 (a block cut by the k slices when QB = 256), three blocks;
  // out: 1, NR-1, NR+1, past NC; tokens: every GEMV token group, and GEMM sizes
  for (int64_t in : {QB, QB == 32 ? int64_t(160) : 2 * QB, 3 * QB})
    for (int64_t out : {1, 31, 33, 129})
      for (int64_t tokens : {1, 2, 3, 4, 5, 9, 17, 37}) {
        INFO(ggml_type_name(TW::type) << ": tokens " << tokens << ", in " << in << ", out " << out);
        run_linear<float, TW>(tokens, in, out, false, false);
        run_linear<float, TW>(tokens, in, out, true, true);
      }
}

TEST_CASE("linear rejects bad input and leaves y untouched", "[linear]") {
  const int64_t tokens = cpu::detail::LinearBlocking::kGemvMaxTokens + 1, in = 20, out = 12;  // GEMM: a workspace
  auto x = rftest::random_vector<float>(size_t(2 * tokens * in));  // room for a stride-2 view
  auto w = rftest::random_vector<bfloat16>(size_t(out * in));
  auto b = rftest::random_vector<bfloat16>(size_t(out));
  std::vector<float> y(size_t(tokens * out), 7.f);
  const CpuExec exec{&pool()};
  auto good = [&] {
    LinearParams<float, bfloat16> p;
    p.x = make_view(x.data(), {tokens, in});
    p.weight = make_view(w.data(), {out, in});
    p.bias = make_view(b.data(), {out});
    p.y = make_view(y.data(), {tokens, out});
    return p;
  };
  std::vector<unsigned char> ws(linear_workspace_bytes(good(), exec));
  REQUIRE(ws.size() > 0);
  auto expect_throw = [&](const LinearParams<float, bfloat16>& p, const char* what, size_t bytes) {
    INFO(what);
    REQUIRE_THROWS_AS(linear(p, exec, ws.data(), bytes), Error);
    try {
      linear(p, exec, ws.data(), bytes);
    } catch (const Error& e) {
      const std::string msg = e.what();
      INFO(msg);
      REQUIRE(msg.rfind("linear", 0) == 0);
      REQUIRE(msg.find(what) != std::string::npos);
    }
    for (float v : y) REQUIRE(v == 7.f);
  };
  auto p = good();
  p.weight = make_view(w.data(), {out, in - 1});
  expect_throw(p, "weight", ws.size());
  p = good();
  p.x.data = nullptr;
  expect_throw(p, "x", ws.size());
  p = good();
  p.bias = make_view(b.data(), {out - 1});
  expect_throw(p, "bias", ws.size());
  p = good();
  p.y = make_view(y.data(), {tokens, out - 1});
  expect_throw(p, "y", ws.size());
  p = good();
  p.x = make_strided_view<const float>(x.data(), {tokens, in}, {2 * in, 2});
  expect_throw(p, "unit stride", ws.size());
  p = good();
  p.x = make_view(x.data(), {tokens, int64_t(0)});
  p.weight = make_view(w.data(), {out, int64_t(0)});
  expect_throw(p, "at least one column", ws.size());
  expect_throw(good(), "workspace", ws.size() - 1);
  REQUIRE_THROWS_AS(linear(good(), exec, nullptr, ws.size()), Error);
  for (float v : y) REQUIRE(v == 7.f);
  // the GEMV path needs no workspace; a larger buffer than needed is fine
  auto one = good();
  one.x = make_view(x.data(), {int64_t(1), in});
  one.y = make_view(y.data(), {int64_t(1), out});
  REQUIRE(linear_workspace_bytes(one, exec) == 0);
  REQUIRE_NOTHROW(linear(one, exec, nullptr, 0));
  REQUIRE_NOTHROW(linear(good(), exec, ws.data(), ws.size() + 100));

  // Q8_0: in must be whole blocks and weight is [out, in / 32]
  std::vector<BlockQ8_0> q(size_t(out * 2));
  LinearParams<float, BlockQ8_0> pq;
  pq.x = make_view(x.data(), {tokens, in});  // in = 20: not a multiple of 32
  pq.weight = make_view(q.data(), {out, int64_t(1)});
  pq.y = make_view(y.data(), {tokens, out});
  std::fill(y.begin(), y.end(), 7.f);
  REQUIRE_THROWS_WITH(linear(pq, exec, ws.data(), ws.size()), Catch::Contains("multiple of the weight block size 32"));
  pq.x = make_view(x.data(), {tokens, int64_t(64)});
  REQUIRE_THROWS_WITH(linear(pq, exec, ws.data(), ws.size()), Catch::Contains("weight has shape [12, 1], expected [-1, 2]"));
  for (float v : y) REQUIRE(v == 7.f);
}

TEST_CASE("linear workspace grows with the token count", "[linear]") {
  LinearParams<half, half> p;
  std::vector<half> x(600 * 300), w(300 * 300), y(600 * 300);
  const CpuExec exec{&pool()};
  size_t prev = 0;
  for (int64_t tokens : {1, 4, 5, 8, 9, 100, 256, 257, 600}) {
    p.x = make_view<const half>(x.data(), {tokens, 300});
    p.weight = make_view<const half>(w.data(), {300, 300});
    p.y = make_view(y.data(), {tokens, 300});
    const size_t n = linear_workspace_bytes(p, exec);
    REQUIRE(n >= prev);
    prev = n;
  }
}

TEST_CASE("linear reads a matrix's GGUF blocks through BlockWeight, after checking them", "[linear][quant]") {
  // The dense view gives the shape; the blocks give the weights (the dense values here are
  // deliberately unrelated, so a call that read them would not match).
  const int64_t tokens = 3, in = 64, out = 5;
  const auto x = rftest::random_vector<float>(size_t(tokens * in));
  const auto dense = rftest::random_vector<float>(size_t(out * in));
  const auto q = random_weights<BlockQ4_1>(size_t(out * in / 32));
  std::vector<float> y(size_t(tokens * out), 7.f), want(y.size());
  const CpuExec exec{&pool()};
  LinearParams<float, BlockQ4_1> pq{make_view(x.data(), {tokens, in}), make_view(q.data(), {out, in / 32}), {},
                                    make_view(want.data(), {tokens, out})};
  linear(pq, exec, nullptr, 0);
  LinearParams<float, float> p{make_view(x.data(), {tokens, in}), make_view(dense.data(), {out, in}), {},
                               make_view(y.data(), {tokens, out})};
  linear(p, BlockWeight{q.data(), GgmlType::q4_1}, exec, nullptr, 0);
  for (size_t i = 0; i < y.size(); ++i) REQUIRE(same_bits(y[i], want[i]));

  std::fill(y.begin(), y.end(), 7.f);
  REQUIRE_THROWS_WITH(linear(p, BlockWeight{q.data(), GgmlType::f16}, exec, nullptr, 0),
                      Catch::Contains("F16 are not a GGUF block type"));
  REQUIRE_THROWS_WITH(linear(p, BlockWeight{q.data(), GgmlType::q4_k}, exec, nullptr, 0),
                      Catch::Contains("in = 64 is not whole Q4_K blocks of 256"));
  const auto w16 = rftest::random_vector<half>(size_t(out * in)), b16 = rftest::random_vector<half>(size_t(out));
  LinearParams<float, half> ph{p.x, make_view(w16.data(), {out, in}), make_view(b16.data(), {out}), p.y};
  REQUIRE_THROWS_WITH(linear(ph, BlockWeight{q.data(), GgmlType::q4_1}, exec, nullptr, 0),
                      Catch::Contains("bias with block weights must be fp32"));
  for (float v : y) REQUIRE(v == 7.f);
}

namespace {
// x as ActivationMath::int8 quantises it, written out plainly: per 32 values d = max|x| / 127 and
// q = round half to even of x * (1 / d) (all in float), returned as the doubles d * q.
std::vector<double> int8_x_reference(const std::vector<float>& x) {
  std::vector<double> xh(x.size());
  for (size_t b = 0; b < x.size(); b += 32) {
    float amax = 0.f;
    for (size_t i = b; i < b + 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    for (size_t i = b; i < b + 32; ++i) {
      const float q = std::nearbyint(x[i] * id);
      REQUIRE(std::fabs(q) <= 127.f);
      xh[i] = double(d) * double(q);
    }
  }
  return xh;
}

template <class TW>
void run_int8_x(int64_t tokens, int64_t in, int64_t out, bool with_bias) {
  auto x = rftest::random_vector<float>(size_t(tokens * in));
  std::fill_n(x.begin() + 32, std::min<int64_t>(32, tokens * in - 32), 0.f);  // an all-zero block: d = 0
  const auto w = random_weights<TW>(size_t(out * in / TW::size));
  const auto b = rftest::random_vector<float>(size_t(out));
  const auto dense = rftest::random_vector<float>(size_t(out * in));  // the shape only
  // Up to kGemvMaxTokens x is quantised; past it (the GEMM) int8 does not apply and x stays fp32.
  const bool quantised = tokens <= cpu::detail::LinearBlocking::kGemvMaxTokens;
  std::vector<double> xr(x.begin(), x.end());
  if (quantised) xr = int8_x_reference(x);
  std::vector<double> wd(size_t(out * in)), wm(size_t(out * in));
  for (int64_t o = 0; o < out; ++o)
    decode_row(w.data() + o * in / TW::size, in, &wd[size_t(o * in)], &wm[size_t(o * in)]);
  std::vector<double> expected(size_t(tokens * out)), magnitude(size_t(tokens * out));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = with_bias ? double(b[size_t(o)]) : 0.0, m = std::fabs(s);
      for (int64_t k = 0; k < in; ++k) {
        s += xr[size_t(t * in + k)] * wd[size_t(o * in + k)];
        m += std::fabs(xr[size_t(t * in + k)]) * wm[size_t(o * in + k)];
      }
      expected[size_t(t * out + o)] = s, magnitude[size_t(t * out + o)] = m;
    }
  std::vector<float> y(size_t(tokens * out));
  LinearParams<float, float> p{make_view(x.data(), {tokens, in}), make_view(dense.data(), {out, in}), {},
                               make_view(y.data(), {tokens, out})};
  if (with_bias) p.bias = make_view(b.data(), {out});
  const CpuExec exec{&pool()};
  std::vector<unsigned char> ws(linear_workspace_bytes(p, exec));
  rftest::for_each_isa([&] {
    std::fill(y.begin(), y.end(), 7.f);
    linear(p, BlockWeight{w.data(), TW::type, ActivationMath::int8}, exec, ws.data(), ws.size());
    check_linear_close(std::string("int8 x ") + std::to_string(tokens) + "x" + std::to_string(in) + " -> " +
                           std::to_string(out),
                       y, out, tokens, out, expected, magnitude);
  });
}
}  // namespace

TEMPLATE_TEST_CASE("linear with int8 activations matches a double reference over the quantised x",
                   "[linear][quant]", BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ2_K, BlockQ3_K,
                   BlockQ4_K, BlockQ5_K, BlockQ6_K, BlockIQ4_NL, BlockIQ4_XS) {
  using TW = TestType;
  constexpr int64_t QB = TW::size;
  // in: one block, several, and past the 4096-value quantisation chunk (y added to after it);
  // out: 1, a row tile and a remainder; tokens: every GEMV token group, and a GEMM size (fp32 x)
  const int64_t chunk = cpu::detail::kQ8Chunk;
  for (int64_t in : {QB, 5 * QB, chunk + (QB == 32 ? 96 : QB)})
    for (int64_t out : {1, 7, 33})
      for (int64_t tokens : {1, 2, 3, 4, 5, 9, 16, 17}) {
        INFO(ggml_type_name(TW::type) << ": tokens " << tokens << ", in " << in << ", out " << out);
        run_int8_x<TW>(tokens, in, out, out == 7);
      }
}

TEST_CASE("linear with int8 activations turns a NaN or infinite x into NaN y (as fp32 x does)", "[linear][quant]") {
  const int64_t tokens = 3, in = 96, out = 9;
  auto x = rftest::random_vector<float>(size_t(tokens * in));
  x[size_t(1 * in + 40)] = std::numeric_limits<float>::quiet_NaN();  // token 1, second block
  x[size_t(2 * in + 70)] = -std::numeric_limits<float>::infinity();  // token 2, third block
  const auto w = random_weights<BlockQ4_1>(size_t(out * in / 32));
  const auto dense = rftest::random_vector<float>(size_t(out * in));  // the shape only
  std::vector<float> y(size_t(tokens * out));
  LinearParams<float, float> p{make_view(x.data(), {tokens, in}), make_view(dense.data(), {out, in}), {},
                               make_view(y.data(), {tokens, out})};
  const CpuExec exec{&pool()};
  rftest::for_each_isa([&] {
    std::fill(y.begin(), y.end(), 7.f);
    linear(p, BlockWeight{w.data(), GgmlType::q4_1, ActivationMath::int8}, exec, nullptr, 0);
    for (int64_t o = 0; o < out; ++o) {
      CHECK(std::isfinite(y[size_t(o)]));  // token 0 is untouched by the others' blocks
      CHECK(std::isnan(y[size_t(out + o)]));
      CHECK(std::isnan(y[size_t(2 * out + o)]));
    }
  });
}
