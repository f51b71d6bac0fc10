// benchmarks/bench_util.hpp: what every benchmark shares: the thread pool (RECURFORMER_THREADS,
// default 2 = this project's development machines), random inputs, and counters that read as
// rates (bytes/s, tokens/s, items/s) so each figure can be set against the memory-copy probe.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdlib>
#include <random>
#include <vector>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/exec.hpp"

namespace rfbench {

inline int bench_threads() {
  const char* e = std::getenv("RECURFORMER_THREADS");
  return e && std::atoi(e) > 0 ? std::atoi(e) : 2;
}

inline recurformer::ThreadPool& pool() {
  static recurformer::ThreadPool p(bench_threads());
  return p;
}
inline recurformer::CpuExec cpu_exec() { return recurformer::CpuExec{&pool()}; }

template <class T>
std::vector<T> random_vector(size_t n, float lo = -1.f, float hi = 1.f, unsigned seed = 1) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = T(d(g));
  return v;
}

/// Sets a rate counter: value per second of wall time over all iterations.
inline void set_rate(benchmark::State& st, const char* name, double per_iteration) {
  st.counters[name] = benchmark::Counter(per_iteration * double(st.iterations()),
                                         benchmark::Counter::kIsRate);
}

}  // namespace rfbench
