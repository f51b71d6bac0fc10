// The vector types: exp() against std::exp in double over the range the kernels use, the
// reductions and the masked tails, in every ISA this machine has. Vector code runs inside
// flattened ISA entry points, as in the kernels.
#include <cmath>

#include "recurformer/cpu/detail/simd.hpp"
#include "support/test_util.hpp"

using namespace recurformer::cpu;

namespace {
constexpr int kMaxWidth = 16;

// y = exp(x); for each tail length n in 0..width: sums[n], maxes[n] of the first n of v, and
// tails[n] = v's first n lanes stored over a row of 7s.
template <class V>
void simd_body(int64_t len, const float* x, float* y, const float* v, float* sums, float* maxes,
               float* tails) {
  for (int64_t i = 0; i + V::width <= len; i += V::width) exp(V::load(x + i)).store(y + i);
  for (int n = 0; n <= V::width; ++n) {
    const V a = V::load_partial(v, n);
    sums[n] = a.reduce_add();
    maxes[n] = a.reduce_max();
    a.store_partial(tails + n * kMaxWidth, n);
  }
}
void simd_scalar(int64_t len, const float* x, float* y, const float* v, float* s, float* m, float* t) {
  simd_body<simd::F32x1>(len, x, y, v, s, m, t);
}
#if RF_HAVE_X86_SIMD
RF_KERNEL_AVX2 void simd_avx2(int64_t len, const float* x, float* y, const float* v, float* s, float* m, float* t) {
  simd_body<simd::F32x8>(len, x, y, v, s, m, t);
}
RF_KERNEL_AVX512 void simd_avx512(int64_t len, const float* x, float* y, const float* v, float* s, float* m, float* t) {
  simd_body<simd::F32x16>(len, x, y, v, s, m, t);
}
#endif

template <class Kernel>
void check_simd(int width, Kernel kernel) {
  std::vector<float> x;
  for (double t = -100; t <= 90; t += 0.0371) x.push_back(float(t));
  for (float s : {-87.3f, -87.4f, 88.7f, 88.8f, 0.f, -0.f, 1e-8f, -1e-8f}) x.push_back(s);
  while (x.size() % kMaxWidth) x.push_back(0.5f);
  std::vector<float> y(x.size()), v = rftest::random_vector<float>(kMaxWidth, -2, 2);
  std::vector<float> sums(kMaxWidth + 1), maxes(kMaxWidth + 1), tails((kMaxWidth + 1) * kMaxWidth, 7.f);
  kernel(int64_t(x.size()), x.data(), y.data(), v.data(), sums.data(), maxes.data(), tails.data());
  for (size_t i = 0; i < x.size(); ++i) {
    const double ref = std::exp(double(x[i]));
    INFO("width " << width << ": exp(" << x[i] << ") = " << y[i] << ", reference " << ref);
    if (ref < 1.2e-38) {
      REQUIRE(y[i] <= 1.2e-38f);  // below the normal range: 0 or a denormal is acceptable
    } else if (ref > 3.4e38) {
      REQUIRE(std::isinf(y[i]));
    } else {
      REQUIRE(std::fabs(y[i] - ref) <= 4e-7 * ref);
    }
  }
  for (int n = 0; n <= width; ++n) {
    INFO("width " << width << ", tail " << n);
    double s = 0;
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) s += v[i], m = std::max(m, v[i]);
    REQUIRE(std::fabs(sums[n] - s) <= 1e-5);
    if (n == width) REQUIRE(maxes[n] == m);
    for (int i = 0; i < kMaxWidth; ++i) REQUIRE(tails[n * kMaxWidth + i] == (i < n ? v[i] : 7.f));
  }
}
}  // namespace

TEST_CASE("vector exp, reductions and masked tails", "[simd]") {
  check_simd(1, simd_scalar);
#if RF_HAVE_X86_SIMD
  if (detected_isa() >= Isa::avx2) check_simd(8, simd_avx2);
  if (detected_isa() >= Isa::avx512) check_simd(16, simd_avx512);
#endif
}
