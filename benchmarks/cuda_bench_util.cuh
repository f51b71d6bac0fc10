// benchmarks/cuda_bench_util.cuh: what every CUDA benchmark shares: random device buffers, an L2
// flush, CUDA-event timing with a bytes/s counter, and the same-run device copy probe
// (BM_DeviceCopy, registered once for the whole recurformer-bench-cuda binary) that every figure is
// read against.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <random>
#include <vector>

#include "recurformer/cuda/exec.cuh"

namespace rfbench {

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
  /// Uninitialised device scratch (a workspace).
  void* scratch(size_t bytes) {
    void* p = nullptr;
    RF_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
    buffers.push_back(p);
    return p;
  }
};

/// Evicts the op's inputs from L2 (a write over a buffer larger than it).
inline void flush_l2() {
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

/// Times fn() with events (L2 flushed before each run); reports bytes/s of `bytes` per iteration.
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

/// The ceiling: device-to-device copy, bytes read + written.
inline void BM_DeviceCopy(benchmark::State& st) {
  const size_t bytes = size_t(1) << 30;
  char *a = nullptr, *b = nullptr;
  RF_CUDA_CHECK(cudaMalloc(&a, bytes));
  RF_CUDA_CHECK(cudaMalloc(&b, bytes));
  RF_CUDA_CHECK(cudaMemset(a, 1, bytes));
  time_cuda(st, 2.0 * double(bytes), [&] { RF_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  cudaFree(a);
  cudaFree(b);
}
// An inline variable is initialised once per program however many bench files include this header.
inline benchmark::internal::Benchmark* const kDeviceCopyProbe =
    benchmark::RegisterBenchmark("BM_DeviceCopy", BM_DeviceCopy)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace rfbench
