// CUDA linear (cuBLAS) benchmarks (in recurformer-bench-cuda), Llama-3.2-1B projections with fp32
// activations: q_proj (out 2048, in 2048) and the MLP up_proj (out 8192, in 2048), weights
// bfloat16 and float. Timed with CUDA events after an L2 flush, next to BM_DeviceCopy of the same
// run (cuda_bench_util.cuh).
//   decode (tokens 1, 4, 16): memory-bound GEMV; bytes/s counts the weight bytes, read once (the
//            x, its bfloat16 copy and y add at most 5% more at 16 tokens), to read against the
//            copy probe.
//   prefill (tokens 512, 4096): compute-bound; flop/s = 2 * tokens * out * in (bytes/s counts x,
//            W and y once, for reference).
// Both include the rounding of fp32 x to bfloat16 (the workspace kernel) that the op runs.
#include <cstdint>

#include "cuda_bench_util.cuh"
#include "recurformer/cuda/linear.cuh"

using namespace recurformer;
using rfbench::DeviceArena;
using rfbench::time_cuda;

namespace {

template <class TW>
void run_linear_bench(benchmark::State& st, bool count_flops) {
  const int64_t tokens = st.range(0), out = st.range(1), in = st.range(2);
  DeviceArena dev;
  LinearParams<float, TW> p;
  p.x = make_view<const float>(dev.random<float>(size_t(tokens * in)), {tokens, in});
  // Weights of a trained layer's magnitude; the values do not change the timing.
  p.weight = make_view<const TW>(dev.random<TW>(size_t(out * in), -0.05f, 0.05f), {out, in});
  p.y = make_view(dev.random<float>(size_t(tokens * out)), {tokens, out});
  const size_t ws_bytes = linear_workspace_bytes(p, CudaExec{});
  void* ws = dev.scratch(ws_bytes);
  const double weight_bytes = double(out * in) * double(sizeof(TW));
  const double io_bytes = double(tokens * (in + out)) * double(sizeof(float));
  time_cuda(st, count_flops ? weight_bytes + io_bytes : weight_bytes, [&] { linear(p, CudaExec{}, ws, ws_bytes); });
  if (count_flops) {
    const double flops = 2.0 * double(tokens) * double(out) * double(in);
    st.counters["flop/s"] = benchmark::Counter(flops * double(st.iterations()), benchmark::Counter::kIsRate);
  } else {
    st.counters["tokens/s"] = benchmark::Counter(double(tokens * st.iterations()), benchmark::Counter::kIsRate);
  }
}

template <class TW>
void BM_CudaLinearDecode(benchmark::State& st) {
  run_linear_bench<TW>(st, false);
}
template <class TW>
void BM_CudaLinearPrefill(benchmark::State& st) {
  run_linear_bench<TW>(st, true);
}

BENCHMARK_TEMPLATE(BM_CudaLinearDecode, bfloat16)
    ->ArgNames({"tokens", "out", "in"})->ArgsProduct({{1, 4, 16}, {2048, 8192}, {2048}})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_CudaLinearDecode, float)
    ->ArgNames({"tokens", "out", "in"})->ArgsProduct({{1, 4, 16}, {2048, 8192}, {2048}})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_CudaLinearPrefill, bfloat16)
    ->ArgNames({"tokens", "out", "in"})->ArgsProduct({{512, 4096}, {2048, 8192}, {2048}})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_CudaLinearPrefill, float)
    ->ArgNames({"tokens", "out", "in"})->ArgsProduct({{512, 4096}, {2048, 8192}, {2048}})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
