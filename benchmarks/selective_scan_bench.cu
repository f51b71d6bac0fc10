// CUDA benchmarks (build/bin/recurformer-bench-cuda): the selective scan prefill, the one-token
// state update and the causal conv1d, timed with CUDA events (L2 flushed before each timed run),
// next to the device-to-device copy bandwidth measured in the same process, so every figure reads
// as a fraction of it. Counters: bytes/s of the op's compulsory traffic (each input read once,
// each output written once, the state read and written once).
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <vector>

#include "recurformer/cuda/causal_conv1d.cuh"
#include "recurformer/cuda/selective_scan.cuh"

using namespace recurformer;

namespace {

/// The device buffers of one benchmark, random (never zeros), freed when it ends.
struct DeviceArena {
  std::vector<void*> buffers;
  DeviceArena() = default;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  ~DeviceArena() {
    for (void* b : buffers) cudaFree(b);
  }
  template <class T>
  T* random(size_t n, float lo = -1.f, float hi = 1.f) {
    std::mt19937 g(unsigned(buffers.size() + 1));
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<T> h(n);
    for (auto& x : h) x = T(d(g));
    return upload(h);
  }
  template <class T>
  T* upload(const std::vector<T>& h) {
    T* p = nullptr;
    RF_CUDA_CHECK(cudaMalloc(&p, h.size() * sizeof(T)));
    buffers.push_back(p);
    RF_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
  }
};

/// Evicts the op's inputs from L2 (a write over a buffer larger than it).
void flush_l2() {
  static char* junk = nullptr;
  static size_t bytes = 0;
  if (!junk) {
    int dev = 0, l2 = 0;
    RF_CUDA_CHECK(cudaGetDevice(&dev));
    RF_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    bytes = size_t(l2) * 2;
    RF_CUDA_CHECK(cudaMalloc(&junk, bytes));
  }
  RF_CUDA_CHECK(cudaMemsetAsync(junk, 0, bytes));
}

/// Times fn() with events; reports bytes/s of `bytes` per iteration.
template <class F>
void time_cuda(benchmark::State& st, double bytes, F&& fn) {
  cudaEvent_t start, stop;
  RF_CUDA_CHECK(cudaEventCreate(&start));
  RF_CUDA_CHECK(cudaEventCreate(&stop));
  fn();  // warm-up (and first-launch errors)
  RF_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto _ : st) {
    flush_l2();
    RF_CUDA_CHECK(cudaEventRecord(start));
    fn();
    RF_CUDA_CHECK(cudaEventRecord(stop));
    RF_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    RF_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    st.SetIterationTime(double(ms) / 1e3);
  }
  st.counters["bytes/s"] = benchmark::Counter(bytes * double(st.iterations()), benchmark::Counter::kIsRate);
  RF_CUDA_CHECK(cudaEventDestroy(start));
  RF_CUDA_CHECK(cudaEventDestroy(stop));
}

// The ceiling: device-to-device copy, bytes read + written.
void BM_DeviceCopy(benchmark::State& st) {
  const size_t bytes = size_t(1) << 30;
  char *a = nullptr, *b = nullptr;
  RF_CUDA_CHECK(cudaMalloc(&a, bytes));
  RF_CUDA_CHECK(cudaMalloc(&b, bytes));
  RF_CUDA_CHECK(cudaMemset(a, 1, bytes));
  time_cuda(st, 2.0 * double(bytes), [&] { RF_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  cudaFree(a);
  cudaFree(b);
}
BENCHMARK(BM_DeviceCopy)->UseManualTime()->Unit(benchmark::kMillisecond);

// Prefill: S sequences of T tokens, Dch channels in G groups of head_dim 64, N 64, R readers.
template <class T>
void BM_CudaSelectiveScan(benchmark::State& st) {
  const int64_t seqs = st.range(0), t_len = st.range(1), groups = st.range(2), r = st.range(3);
  const int64_t dch = 64 * groups, n = 64, tokens = seqs * t_len;
  std::vector<int32_t> cu(size_t(seqs + 1));
  for (int64_t s = 0; s <= seqs; ++s) cu[size_t(s)] = int32_t(s * t_len);
  DeviceArena dev;
  int32_t* d_cu = dev.upload(cu);
  SelectiveScanParams<T> p;
  p.u = make_view<const T>(dev.random<T>(size_t(tokens * dch)), {tokens, dch});
  p.delta = make_view<const T>(dev.random<T>(size_t(tokens * dch), -2.f, 0.f), {tokens, dch});
  p.A = make_view<const float>(dev.random<float>(size_t(dch * n), -2.f, -0.1f), {dch, n});
  p.B = make_view<const T>(dev.random<T>(size_t(tokens * groups * n)), {tokens, groups, n});
  p.C = make_view<const T>(dev.random<T>(size_t(tokens * groups * r * n)), {tokens, groups, r, n});
  p.D = make_view<const float>(dev.random<float>(size_t(dch)), {dch});
  p.y = make_view(dev.random<T>(size_t(tokens * r * dch)), {tokens, r, dch});
  p.state = make_view(dev.random<float>(size_t(seqs * dch * n)), {seqs, dch, n});
  p.cu_seqlens = make_view<const int32_t>(d_cu, {seqs + 1});
  const double bytes = double(tokens) * double(sizeof(T)) * double(2 * dch + groups * n + groups * r * n + r * dch) +
                       2.0 * double(seqs * dch * n) * 4.0;
  time_cuda(st, bytes, [&] { selective_scan(p, CudaExec{}); });
  st.counters["tokens/s"] = benchmark::Counter(double(tokens) * double(st.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK_TEMPLATE(BM_CudaSelectiveScan, bfloat16)
    ->ArgNames({"seqs", "T", "groups", "R"})
    ->Args({1, 4096, 4, 4})->Args({8, 4096, 4, 4})->Args({1, 16384, 4, 4})
    ->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_CudaSelectiveScan, float)
    ->ArgNames({"seqs", "T", "groups", "R"})->Args({8, 4096, 4, 4})
    ->UseManualTime()->Unit(benchmark::kMillisecond);

// Decode: one token for each of `slots` sequences; the fp32 state dominates the traffic.
template <class T>
void BM_CudaStateUpdate(benchmark::State& st) {
  const int64_t rows = st.range(0), groups = st.range(1), r = 4, dch = 64 * groups, n = 64;
  DeviceArena dev;
  SelectiveScanParams<T> p;
  p.u = make_view<const T>(dev.random<T>(size_t(rows * dch)), {rows, dch});
  p.delta = make_view<const T>(dev.random<T>(size_t(rows * dch), -2.f, 0.f), {rows, dch});
  p.A = make_view<const float>(dev.random<float>(size_t(dch * n), -2.f, -0.1f), {dch, n});
  p.B = make_view<const T>(dev.random<T>(size_t(rows * groups * n)), {rows, groups, n});
  p.C = make_view<const T>(dev.random<T>(size_t(rows * groups * r * n)), {rows, groups, r, n});
  p.y = make_view(dev.random<T>(size_t(rows * r * dch)), {rows, r, dch});
  p.state = make_view(dev.random<float>(size_t(rows * dch * n)), {rows, dch, n});
  const double bytes = 2.0 * double(rows * dch * n) * 4.0 +
                       double(rows) * double(sizeof(T)) * double(2 * dch + groups * n + groups * r * n + r * dch);
  time_cuda(st, bytes, [&] { selective_state_update(p, CudaExec{}); });
}
BENCHMARK_TEMPLATE(BM_CudaStateUpdate, bfloat16)
    ->ArgNames({"slots", "groups"})->Args({64, 4})->Args({64, 16})->Args({256, 4})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

template <class T>
void BM_CudaCausalConv1d(benchmark::State& st) {
  const int64_t tokens = st.range(0), dch = st.range(1), k = 4;
  DeviceArena dev;
  CausalConv1dParams<T> p;
  p.x = make_view<const T>(dev.random<T>(size_t(tokens * dch)), {tokens, dch});
  p.y = make_view(dev.random<T>(size_t(tokens * dch)), {tokens, dch});
  p.weight = make_view<const float>(dev.random<float>(size_t(dch * k)), {dch, k});
  p.conv_state = make_view(dev.random<T>(size_t((k - 1) * dch)), {1, k - 1, dch});
  time_cuda(st, 2.0 * double(tokens * dch) * double(sizeof(T)), [&] { causal_conv1d(p, CudaExec{}); });
}
BENCHMARK_TEMPLATE(BM_CudaCausalConv1d, bfloat16)
    ->ArgNames({"tokens", "channels"})->Args({4096, 256})->Args({32768, 512})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
