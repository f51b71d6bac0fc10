// tests/support/test_util.hpp: what every op test needs: random inputs (never zeros), per-dtype
// tolerances in one trait, comparison against a double-precision reference that fails on NaN, and
// a loop over every CPU vector ISA this machine has (so the portable body is always tested).
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/support.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/cpu/detail/isa.hpp"

namespace rftest {

using recurformer::bfloat16;
using recurformer::half;

/// The storage types every op is tested in.
using StorageTypes = std::tuple<float, half, bfloat16>;

/// Tolerances for one output element computed from storage-type inputs with fp32 accumulation,
/// compared to a double reference on the same (already rounded) inputs: |a - e| <= abs + rel * |e|.
/// The 16-bit budgets cover rounding of the output and of intermediates the op stores.
template <class T>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double rel = 2e-5, abs = 2e-6;
};
template <>
struct Tolerance<half> {
  static constexpr double rel = 4e-3, abs = 1e-3;
};
template <>
struct Tolerance<bfloat16> {
  static constexpr double rel = 2e-2, abs = 5e-3;
};

/// A generator seeded from Catch's --rng-seed, so a failure reproduces with the same seed.
inline std::mt19937_64& rng() {
  static std::mt19937_64 g(Catch::rngSeed() ? Catch::rngSeed() : 0x5eed);
  return g;
}

/// n values uniform in [lo, hi), rounded to T, from generator g.
template <class T>
std::vector<T> random_vector(std::mt19937_64& g, size_t n, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = T(float(d(g)));
  return v;
}
/// The same from the test's generator.
template <class T>
std::vector<T> random_vector(size_t n, double lo = -1.0, double hi = 1.0) {
  return random_vector<T>(rng(), n, lo, hi);
}

/// The values as doubles (exact for every storage type).
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = double(float(v[i]));
  return r;
}

/// Compares element by element; reports the worst element and fails on any NaN or miss.
template <class A>
void check_close(const std::string& what, const A* actual, const double* expected, size_t n,
                 double rel, double abs) {
  size_t bad = 0, worst = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < n; ++i) {
    const double a = double(float(actual[i])), e = expected[i];
    const double err = std::fabs(a - e), lim = abs + rel * std::fabs(e);
    const bool ok = std::isfinite(a) == std::isfinite(e) && (err <= lim || (a == e));
    if (!ok || std::isnan(a)) {
      ++bad;
      const double excess = std::isnan(a) ? 1e300 : err / lim;
      if (excess > worst_excess) worst_excess = excess, worst = i;
    }
  }
  if (bad) {
    std::ostringstream os;
    os << what << ": " << bad << " of " << n << " elements out of tolerance (rel " << rel << ", abs "
       << abs << "); worst at [" << worst << "]: got " << double(float(actual[worst]))
       << ", expected " << expected[worst];
    FAIL(os.str());
  }
  SUCCEED();
}
template <class A>
void check_close(const std::string& what, const std::vector<A>& actual,
                 const std::vector<double>& expected, double rel, double abs) {
  REQUIRE(actual.size() == expected.size());
  check_close(what, actual.data(), expected.data(), actual.size(), rel, abs);
}
template <class T, class A>
void check_close(const std::string& what, const std::vector<A>& actual,
                 const std::vector<double>& expected, double scale = 1.0) {
  check_close(what, actual, expected, Tolerance<T>::rel * scale, Tolerance<T>::abs * scale);
}

/// Runs fn() once per CPU vector ISA available here (scalar first), restoring the limit after.
template <class F>
void for_each_isa(F&& fn) {
  using recurformer::cpu::Isa;
  const Isa best = recurformer::cpu::detected_isa();
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
    if (int(isa) > int(best)) break;
    recurformer::cpu::set_isa_limit(isa);
    INFO("isa " << recurformer::cpu::isa_name(isa));
    fn();
  }
  recurformer::cpu::set_isa_limit(Isa::avx512);
}

/// A vector as a 1-D read-only view (index arrays: cu_seqlens, slots, positions).
template <class T>
recurformer::View<const T, 1> cview(const std::vector<T>& v) {
  return recurformer::make_view(v.data(), {int64_t(v.size())});
}
/// The same for a braced list of indices, e.g. cview({0, 2}), valid until the full expression ends.
inline recurformer::View<const int32_t, 1> cview(const std::vector<int32_t>& v) { return cview<int32_t>(v); }

/// Whether RECURFORMER_REQUIRE_GPU is set (scripts/gpu-check.sh): then no GPU test may skip.
inline bool gpu_required() {
  const char* v = std::getenv("RECURFORMER_REQUIRE_GPU");
  return v && *v != '\0' && std::string(v) != "0";
}

/// A supports() answer must say what the call then does: true and the call runs, or false and
/// the call throws exactly its first reason.
template <class Call>
void require_agrees(const recurformer::Support& s, Call&& call) {
  INFO("supports: " << (s ? std::string("yes") : s.why()));
  if (s) {
    REQUIRE_NOTHROW(call());
  } else {
    REQUIRE_THROWS_WITH(call(), s.reasons.front());
  }
}

}  // namespace rftest
