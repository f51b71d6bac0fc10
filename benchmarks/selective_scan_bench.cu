// CUDA benchmarks (build/bin/recurformer-bench-cuda): the selective scan prefill, the one-token
// state update and the causal conv1d, timed with CUDA events (L2 flushed before each timed run),
// next to the device-to-device copy bandwidth measured in the same process, so every figure reads
// as a fraction of it. Counters: bytes/s of the op's compulsory traffic (each input read once,
// each output written once, the state read and written once).
#include <cstdint>
#include <vector>

#include "cuda_bench_util.cuh"
#include "recurformer/cuda/causal_conv1d.cuh"
#include "recurformer/cuda/selective_scan.cuh"

using namespace recurformer;
using rfbench::DeviceArena;
using rfbench::time_cuda;

namespace {

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
