// tests/support/grad_check.hpp: what the backward tests share: central finite differences of a
// double-precision reference loss, a gradient comparison that can also answer "would this wrong
// gradient pass?", the PyTorch fixtures under tests/data/golden_grads/, thread pools of several
// sizes and aligned workspaces.
//
// Gradient tolerance: |got - want| <= rel |want| + abs per element, abs a small fraction of the
// size of the terms the gradient sums (usually max|want|). The fp32
// kernels are compared with finite differences of a double reference evaluated at the same
// (already rounded) inputs, whose own error (step 1e-5: truncation ~1e-10, rounding ~1e-11 of the
// loss) is far below fp32's; the relative part covers ordinary elements, the floor the elements
// that cancel to near zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "recurformer/cpu/thread_pool.hpp"
#include "support/npy.hpp"
#include "support/test_util.hpp"

namespace rftest {

/// dloss/dx[i] for every i by central differences: loss(i) is evaluated with x[i] moved by +-step
/// (x is modified in place and restored). loss(i) may recompute only what x[i] touches.
template <class F>
std::vector<double> fd_gradient(std::vector<double>& x, F&& loss, double step = 1e-5) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + step;
    const double up = loss(i);
    x[i] = x0 - step;
    const double down = loss(i);
    x[i] = x0;
    g[i] = (up - down) / (2 * step);
  }
  return g;
}

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

/// Empty when every |got - want| <= rel |want| + abs (and no NaN), else a message naming the
/// worst element.
template <class A>
std::string grad_mismatch(const A* got, const double* want, size_t n, double rel, double abs) {
  size_t bad = 0, worst = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < n; ++i) {
    const double a = double(got[i]), e = want[i];
    const double lim = abs + rel * std::fabs(e);
    if (std::fabs(a - e) <= lim && !std::isnan(a)) continue;
    ++bad;
    const double excess = std::isnan(a) ? 1e300 : std::fabs(a - e) / lim;
    if (excess > worst_excess) worst_excess = excess, worst = i;
  }
  if (!bad) return {};
  std::ostringstream os;
  os << bad << " of " << n << " out of tolerance (rel " << rel << ", abs " << abs << "); worst ["
     << worst << "]: got " << double(got[worst]) << ", want " << want[worst];
  return os.str();
}

/// Fails the test unless got matches want (grad_mismatch). Also fails when the floor `abs` is not
/// far below the reference's largest element: such a check could not catch a wrong gradient.
template <class A>
void check_grad(const std::string& what, const std::vector<A>& got, const std::vector<double>& want,
                double rel, double abs) {
  REQUIRE(got.size() == want.size());
  INFO(what);
  REQUIRE((want.empty() || abs <= 1e-3 * max_abs(want)));
  const std::string err = grad_mismatch(got.data(), want.data(), got.size(), rel, abs);
  if (!err.empty()) FAIL(what << ": " << err);
  SUCCEED();
}

/// The same comparison as a bool, for "a wrong gradient is caught" checks.
template <class A>
bool grad_matches(const std::vector<A>& got, const std::vector<double>& want, double rel, double abs) {
  return got.size() == want.size() && grad_mismatch(got.data(), want.data(), got.size(), rel, abs).empty();
}

/// PyTorch fixtures: tests/data/golden_grads/<case>/<name>.npy (tools/make_golden_grads_*.py).
inline std::string golden_grads_path(const std::string& test_case, const std::string& name) {
  return std::string(RECURFORMER_TEST_DATA_DIR) + "/golden_grads/" + test_case + "/" + name + ".npy";
}
inline npy::Array golden_grads(const std::string& test_case, const std::string& name) {
  return npy::load(golden_grads_path(test_case, name));
}
inline std::vector<double> as_double(const npy::Array& a) {
  const std::vector<float> v = a.as<float>();
  return std::vector<double>(v.begin(), v.end());
}
/// Fixture tolerance (meta.json's): fp32 against fp32 autograd with another summation order.
constexpr double kGoldenGradRel = 1e-5, kGoldenGradAbsOfMax = 2e-6;

/// Pools of 1, 2 and 3 threads (results must not depend on which).
inline recurformer::ThreadPool& pool(int threads = 2) {
  static recurformer::ThreadPool p1(1), p2(2), p3(3);
  return threads == 1 ? p1 : threads == 3 ? p3 : p2;
}

/// Caller-owned, 64-byte aligned scratch for an op's workspace query.
struct Workspace {
  std::vector<unsigned char> bytes;
  void* data = nullptr;
  size_t size = 0;
  explicit Workspace(size_t n) : bytes(n + 64), size(n) {
    data = bytes.data() + (64 - reinterpret_cast<uintptr_t>(bytes.data()) % 64) % 64;
  }
};

}  // namespace rftest
