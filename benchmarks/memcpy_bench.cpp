// The bandwidth probe: a multi-threaded copy of a buffer far larger than the caches. Its bytes/s
// (read + write) is the ceiling that memory-bound kernels are reported against in the same run.
#include <cstring>

#include "bench_util.hpp"

static void BM_MemoryCopy(benchmark::State& st) {
  const size_t bytes = size_t(st.range(0)) << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 2);
  auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    exec.parallel_for(int64_t(bytes), [&](int64_t b, int64_t e, int) {
      std::memcpy(dst.data() + b, src.data() + b, size_t(e - b));
    });
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", 2.0 * double(bytes));  // read + write
  st.counters["threads"] = rfbench::bench_threads();
}
BENCHMARK(BM_MemoryCopy)->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime();
