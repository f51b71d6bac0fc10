// CUDA linear (cuBLAS) against a double reference and against the CPU op (linear_test_cpu.cpp) on
// the same random inputs: every supported (TX, TW) pair, with and without bias, tokens 1, 3, 17 and
// 64, in and out not multiples of 8 (and 1), x / weight / y rows strided past their length (the
// padding of y must stay untouched), a workspace that starts unaligned, a non-default stream,
// tokens = 0, and a second host thread (its own cuBLAS handle). Bad shapes, strides and workspaces
// throw an Error naming the argument, y untouched.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "recurformer/cuda/linear.cuh"
#include "support/cuda_util.cuh"
#include "support/test_util.hpp"

using namespace recurformer;

// The CPU side, in linear_test_cpu.cpp (compiled by the host compiler).
template <class TX, class TW>
void cpu_linear(const LinearParams<TX, TW>& p);

namespace {

using recurformer::half;  // not CUDA's ::half (cuda_fp16.h)

template <class TX_, class TW_>
struct Pair {
  using TX = TX_;
  using TW = TW_;
};
using CudaPairs = std::tuple<Pair<float, float>, Pair<float, half>, Pair<float, bfloat16>, Pair<half, half>,
                             Pair<bfloat16, bfloat16>>;

template <class T>
constexpr double unit_roundoff() {
  return std::is_same<T, half>::value ? 1.0 / 2048 : std::is_same<T, bfloat16>::value ? 1.0 / 256 : 0x1p-24;
}

// Budget per element, relative to m = |b| + sum_i |x_i w_i| (a dot product's rounding error scales
// with m, not with |y|; see linear_test.cpp): Tolerance<TX>::rel covers the fp32 accumulation of
// <= 300 terms (300 * 2^-24 < 2e-5) and, for 16-bit y, its one rounding. fp32 x with 16-bit weights
// adds the rounding of x to TW: each product x_i w_i changes by at most u_TW |x_i w_i| (the product
// of two TW values is exact in fp32: 11 + 11 or 8 + 8 significant bits), so u_TW * m in all; the
// factor 2 leaves room for the tensor cores' fp32 accumulation, which truncates inside an MMA
// instead of rounding (u_TW is 2^-11 for half, 2^-8 for bfloat16, so this is still 5-10x tighter
// than Tolerance<TW>).
template <class TX, class TW>
double linear_rel() {
  return rftest::Tolerance<TX>::rel + (std::is_same<TX, TW>::value ? 0.0 : 2.0 * unit_roundoff<TW>());
}

/// y [tokens, ldy] against expected [tokens, out] with |y - e| <= rel * m + abs; reports the worst.
template <class TX>
void check_y(const std::string& what, const std::vector<TX>& y, int64_t ldy, int64_t tokens, int64_t out,
             const std::vector<double>& expected, const std::vector<double>& magnitude, double rel, double abs) {
  int64_t bad = 0, worst = 0;
  double worst_excess = 0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out; ++o) {
      const double a = double(float(y[size_t(t * ldy + o)])), e = expected[size_t(t * out + o)];
      const double excess = std::isnan(a) ? 1e300 : std::fabs(a - e) / (rel * magnitude[size_t(t * out + o)] + abs);
      if (!(excess <= 1.0)) {
        ++bad;
        if (excess > worst_excess) worst_excess = excess, worst = t * out + o;
      }
    }
  INFO(what << ": " << bad << " elements out of tolerance (rel " << rel << " of sum |x w|, abs " << abs
            << "); worst [" << worst / out << ", " << worst % out << "] at " << worst_excess << "x the limit");
  REQUIRE(bad == 0);
}

template <class TX, class TW>
void run_case(int64_t tokens, int64_t in, int64_t out, bool with_bias, bool strided, cudaStream_t stream = nullptr) {
  using TB = typename LinearWeight<TW>::bias_type;
  const int64_t ldx = in + (strided ? 5 : 0), ldw = in + (strided ? 3 : 0), ldy = out + (strided ? 2 : 0);
  // + 1 element: with tokens = 0 the host views still need a non-null pointer (an absent x or y throws).
  const auto x = rftest::random_vector<TX>(size_t(tokens * ldx + 1));
  const auto w = rftest::random_vector<TW>(size_t(out * ldw));
  const auto b = rftest::random_vector<TB>(size_t(out));
  std::vector<double> expected(size_t(tokens * out)), magnitude(size_t(tokens * out));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = with_bias ? double(float(b[size_t(o)])) : 0.0, m = std::fabs(s);
      for (int64_t i = 0; i < in; ++i) {
        const double prod = double(float(x[size_t(t * ldx + i)])) * double(float(w[size_t(o * ldw + i)]));
        s += prod;
        m += std::fabs(prod);
      }
      expected[size_t(t * out + o)] = s;
      magnitude[size_t(t * out + o)] = m;
    }

  const TX sentinel(7.f);
  std::vector<TX> y_cpu(size_t(tokens * ldy + 1), sentinel);
  rftest::DeviceBuffer<TX> dx(x), dy(y_cpu);
  rftest::DeviceBuffer<TW> dw(w);
  rftest::DeviceBuffer<TB> db(b);
  LinearParams<TX, TW> hp;
  hp.x = make_strided_view<const TX>(x.data(), {tokens, in}, {ldx, 1});
  hp.weight = make_strided_view<const TW>(w.data(), {out, in}, {ldw, 1});
  if (with_bias) hp.bias = make_view<const TB>(b.data(), {out});
  hp.y = make_strided_view(y_cpu.data(), {tokens, out}, {ldy, 1});
  LinearParams<TX, TW> dp = hp;
  dp.x.data = dx.data(), dp.weight.data = dw.data(), dp.y.data = dy.data();
  if (with_bias) dp.bias.data = db.data();

  cpu_linear(hp);
  // The workspace starts 6 bytes past an allocation, so the op's own alignment is exercised.
  const size_t ws_bytes = linear_workspace_bytes(dp, CudaExec{stream});
  if (std::is_same<TX, TW>::value || tokens == 0) REQUIRE(ws_bytes == 0);
  rftest::DeviceBuffer<unsigned char> ws{std::vector<unsigned char>(ws_bytes + 6)};
  linear(dp, CudaExec{stream}, ws.data() + 6, ws_bytes);
  if (stream) RF_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<TX> y = dy.download();

  const std::string what = "linear " + std::to_string(tokens) + "x" + std::to_string(in) + " -> " +
                           std::to_string(out) + (with_bias ? " + bias" : "") + (strided ? ", strided" : "");
  const double rel = linear_rel<TX, TW>(), abs = rftest::Tolerance<TX>::abs;
  check_y(what + " (CUDA vs double)", y, ldy, tokens, out, expected, magnitude, rel, abs);
  // Against the CPU op: both are within their budgets of the exact value, so within the sum.
  std::vector<double> cpu(size_t(tokens * out));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out; ++o) cpu[size_t(t * out + o)] = double(float(y_cpu[size_t(t * ldy + o)]));
  check_y(what + " (CUDA vs CPU)", y, ldy, tokens, out, cpu, magnitude, rel + rftest::Tolerance<TX>::rel, 2 * abs);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = out; o < ldy; ++o) REQUIRE(float(y[size_t(t * ldy + o)]) == 7.f);  // padding untouched
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("CUDA linear matches a double reference and the CPU linear", "[linear][cuda]", CudaPairs) {
  using TX = typename TestType::TX;
  using TW = typename TestType::TW;
  struct Shape {
    int64_t in, out;
  };
  // in and out: 1, not multiples of 8, and 300 (the most the fp32 budget above covers) x 129.
  for (Shape s : {Shape{1, 1}, Shape{7, 13}, Shape{33, 31}, Shape{64, 40}, Shape{300, 129}})
    for (int64_t tokens : {1, 3, 17, 64}) {
      INFO("tokens " << tokens << ", in " << s.in << ", out " << s.out);
      run_case<TX, TW>(tokens, s.in, s.out, false, false);
      run_case<TX, TW>(tokens, s.in, s.out, true, true);
    }
  cudaStream_t stream = nullptr;
  RF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  run_case<TX, TW>(17, 40, 24, true, true, stream);
  RF_CUDA_CHECK(cudaStreamDestroy(stream));
  run_case<TX, TW>(0, 16, 8, true, false);  // no tokens: no launch, no workspace
}

TEST_CASE("CUDA linear gives the same y from another host thread (its own cuBLAS handle)", "[linear][cuda]") {
  const int64_t tokens = 5, in = 72, out = 40;
  rftest::DeviceBuffer<float> dx(rftest::random_vector<float>(size_t(tokens * in)));
  rftest::DeviceBuffer<bfloat16> dw(rftest::random_vector<bfloat16>(size_t(out * in)));
  const std::vector<float> zeros(size_t(tokens * out));
  rftest::DeviceBuffer<float> dy1(zeros), dy2(zeros);
  LinearParams<float, bfloat16> p;
  p.x = make_view<const float>(dx.data(), {tokens, in});
  p.weight = make_view<const bfloat16>(dw.data(), {out, in});
  p.y = make_view(dy1.data(), {tokens, out});
  const size_t need = linear_workspace_bytes(p, CudaExec{});
  rftest::DeviceBuffer<unsigned char> ws1{std::vector<unsigned char>(need)}, ws2{std::vector<unsigned char>(need)};
  linear(p, CudaExec{}, ws1.data(), need);
  LinearParams<float, bfloat16> p2 = p;
  p2.y.data = dy2.data();
  std::exception_ptr error;  // Catch's assertions are not thread-safe: the thread only records
  std::thread other([&] {
    try {
      linear(p2, CudaExec{}, ws2.data(), need);
      RF_CUDA_CHECK(cudaDeviceSynchronize());
    } catch (...) {
      error = std::current_exception();
    }
  });
  other.join();
  if (error) std::rethrow_exception(error);
  // Same call, same GPU, same toolkit: cuBLAS results are bit-wise reproducible across handles.
  REQUIRE(dy1.download() == dy2.download());
}

TEST_CASE("CUDA linear checks its arguments before launching", "[linear][cuda]") {
  const int64_t tokens = 3, in = 20, out = 12;
  const std::vector<float> y0(size_t(tokens * out), 7.f);
  rftest::DeviceBuffer<float> dx(rftest::random_vector<float>(size_t(tokens * in))), dy(y0);
  rftest::DeviceBuffer<bfloat16> dw(rftest::random_vector<bfloat16>(size_t(out * in)));
  rftest::DeviceBuffer<bfloat16> db(rftest::random_vector<bfloat16>(size_t(out)));
  auto good = [&] {
    LinearParams<float, bfloat16> p;
    p.x = make_view<const float>(dx.data(), {tokens, in});
    p.weight = make_view<const bfloat16>(dw.data(), {out, in});
    p.bias = make_view<const bfloat16>(db.data(), {out});
    p.y = make_view(dy.data(), {tokens, out});
    return p;
  };
  const size_t need = linear_workspace_bytes(good(), CudaExec{});
  REQUIRE(need >= size_t(tokens * in) * sizeof(bfloat16));
  rftest::DeviceBuffer<unsigned char> ws{std::vector<unsigned char>(need)};
  auto expect_throw = [&](const LinearParams<float, bfloat16>& p, const char* what, size_t bytes = 0,
                          void* workspace = nullptr) {
    INFO(what);
    REQUIRE_THROWS_WITH(linear(p, CudaExec{}, workspace ? workspace : ws.data(), bytes ? bytes : need),
                        Catch::StartsWith("linear") && Catch::Contains(what));
  };
  auto p = good();
  p.weight.shape[1] = in - 1;
  expect_throw(p, "weight has shape");
  p = good();
  p.bias.shape[0] = out + 1;
  expect_throw(p, "bias has shape");
  p = good();
  p.y.shape[1] = out - 1;
  expect_throw(p, "y has shape");
  p = good();
  p.x.stride[0] = in - 1;  // rows would overlap: not a cuBLAS leading dimension
  expect_throw(p, "x has row stride");
  p = good();
  p.y.stride[0] = out - 2;
  expect_throw(p, "y has row stride");
  p = good();
  p.weight.stride[0] = int64_t(INT_MAX) + 1;
  expect_throw(p, "weight has row stride");
  p = good();
  p.x.stride[1] = 2;
  expect_throw(p, "unit stride");
  // Sizes past int: host metadata only, nothing is read.
  p = good();
  p.x.shape[1] = p.weight.shape[1] = int64_t(INT_MAX) + 1;
  p.x.stride[0] = p.weight.stride[0] = int64_t(INT_MAX) + 1;
  expect_throw(p, "x has");
  expect_throw(good(), "workspace", need - 1);
  REQUIRE_THROWS_WITH(linear(good(), CudaExec{}, nullptr, need),
                      Catch::Contains("workspace") && Catch::Contains("null"));
  REQUIRE(dy.download() == y0);
}
