// CUDA attention, rope and recency_score benchmarks (in recurformer-bench-cuda), Llama-3.2-1B
// shapes: 32 query heads, 8 KV heads (GQA group 4), head_dim 64 and 128. Timed with CUDA events
// after an L2 flush, next to BM_DeviceCopy of the same run (cuda_bench_util.cuh).
//   decode:  one token per sequence over a 32K-token K/V cache, batch 1 and 8; bytes/s counts the
//            K and V bytes read (the issue's target: >= 70% of the copy probe on H100/H200).
//   prefill: one 4096-token sequence, causal; flop/s counts 4 * hd flops per visible (query, key).
//   rope:    q and k of 4096 tokens in place; bytes/s = read + write.
//   recency: one 2048-token calibration sequence; flop/s as prefill (logits only: 2 * hd).
#include <cstdint>
#include <vector>

#include "cuda_bench_util.cuh"
#include "recurformer/cuda/attention.cuh"
#include "recurformer/cuda/recency_score.cuh"
#include "recurformer/cuda/rope.cuh"

using namespace recurformer;
using rfbench::DeviceArena;
using rfbench::time_cuda;

namespace {

constexpr int64_t kNQ = 32, kNKV = 8;

/// Attention over `seqs` sequences of `chunk` new tokens each, after `before` cached keys.
template <class T>
AttentionParams<T> attention_setup(DeviceArena& dev, int64_t seqs, int64_t chunk, int64_t before, int64_t hd) {
  const int64_t tokens = seqs * chunk, cap = before + chunk;
  std::vector<int32_t> cu, lens, qpos;
  for (int64_t s = 0; s <= seqs; ++s) cu.push_back(int32_t(s * chunk));
  for (int64_t s = 0; s < seqs; ++s) {
    lens.push_back(int32_t(cap));
    for (int64_t i = 0; i < chunk; ++i) qpos.push_back(int32_t(before + i));
  }
  AttentionParams<T> p;
  p.q = make_view<const T>(dev.random<T>(size_t(tokens * kNQ * hd)), {tokens, kNQ, hd});
  p.k = make_view<const T>(dev.random<T>(size_t(seqs * kNKV * cap * hd)), {seqs, kNKV, cap, hd});
  p.v = make_view<const T>(dev.random<T>(size_t(seqs * kNKV * cap * hd)), {seqs, kNKV, cap, hd});
  p.out = make_view(dev.random<T>(size_t(tokens * kNQ * hd)), {tokens, kNQ, hd});
  p.cu_seqlens = make_view<const int32_t>(dev.upload(cu), {seqs + 1});
  p.kv_lens = make_view<const int32_t>(dev.upload(lens), {seqs});
  p.q_positions = make_view<const int32_t>(dev.upload(qpos), {tokens});
  return p;
}

template <class T>
void BM_CudaAttentionDecode(benchmark::State& st) {
  const int64_t batch = st.range(0), ctx = st.range(1), hd = st.range(2);
  DeviceArena dev;
  const AttentionParams<T> p = attention_setup<T>(dev, batch, 1, ctx - 1, hd);
  const size_t ws_bytes = attention_workspace_bytes(p, CudaExec{});
  void* ws = dev.scratch(ws_bytes);
  const double kv_bytes = 2.0 * double(batch * kNKV * ctx * hd) * double(sizeof(T));
  time_cuda(st, kv_bytes, [&] { attention(p, CudaExec{}, ws, ws_bytes); });
  st.counters["tokens/s"] = benchmark::Counter(double(batch * st.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK_TEMPLATE(BM_CudaAttentionDecode, bfloat16)
    ->ArgNames({"batch", "ctx", "hd"})
    ->Args({1, 32768, 64})->Args({8, 32768, 64})->Args({1, 32768, 128})->Args({8, 32768, 128})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_CudaAttentionDecode, float)
    ->ArgNames({"batch", "ctx", "hd"})->Args({8, 32768, 64})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

template <class T>
void BM_CudaAttentionPrefill(benchmark::State& st) {
  const int64_t tokens = st.range(0), hd = st.range(1);
  DeviceArena dev;
  const AttentionParams<T> p = attention_setup<T>(dev, 1, tokens, 0, hd);
  const size_t ws_bytes = attention_workspace_bytes(p, CudaExec{});
  void* ws = dev.scratch(ws_bytes);
  const double bytes = double(sizeof(T)) * double(tokens * hd) * double(2 * kNQ + 2 * kNKV);
  time_cuda(st, bytes, [&] { attention(p, CudaExec{}, ws, ws_bytes); });
  const double flops = 4.0 * double(hd * kNQ) * double(tokens) * double(tokens + 1) / 2;
  st.counters["flop/s"] = benchmark::Counter(flops * double(st.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK_TEMPLATE(BM_CudaAttentionPrefill, bfloat16)
    ->ArgNames({"tokens", "hd"})->Args({4096, 64})->Args({4096, 128})
    ->UseManualTime()->Unit(benchmark::kMillisecond);

template <class T>
void BM_CudaRope(benchmark::State& st) {
  const int64_t tokens = st.range(0), heads = kNQ + kNKV, hd = 64;
  DeviceArena dev;
  std::vector<int32_t> pos(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) pos[size_t(t)] = int32_t(t);
  RopeScaling llama3;
  llama3.type = RopeScaling::Type::llama3;
  RopeParams<T> p;
  p.x = make_view(dev.random<T>(size_t(tokens * heads * hd)), {tokens, heads, hd});
  p.positions = make_view<const int32_t>(dev.upload(pos), {tokens});
  p.inv_freq = make_view<const float>(dev.upload(rope_inv_freq(int(hd), 500000.f, llama3)), {hd / 2});
  time_cuda(st, 2.0 * double(tokens * heads * hd) * double(sizeof(T)), [&] { rope(p, CudaExec{}); });
}
BENCHMARK_TEMPLATE(BM_CudaRope, bfloat16)
    ->ArgNames({"tokens"})->Args({1})->Args({4096})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_CudaRope, float)
    ->ArgNames({"tokens"})->Args({4096})->UseManualTime()->Unit(benchmark::kMicrosecond);

template <class T>
void BM_CudaRecencyScore(benchmark::State& st) {
  const int64_t seq = st.range(0), hd = 64;
  DeviceArena dev;
  RecencyScoreParams<T> p;
  p.q = make_view<const T>(dev.random<T>(size_t(seq * kNQ * hd)), {seq, kNQ, hd});
  p.k = make_view<const T>(dev.random<T>(size_t(seq * kNKV * hd)), {seq, kNKV, hd});
  p.stats = make_view(dev.upload(std::vector<RecencyHeadStats>(size_t(kNQ))), {kNQ});
  time_cuda(st, double(sizeof(T)) * double(seq * hd * (kNQ + kNKV)), [&] { recency_score(p, CudaExec{}); });
  const double flops = 2.0 * double(hd * kNQ) * double(seq) * double(seq + 1) / 2;
  st.counters["flop/s"] = benchmark::Counter(flops * double(st.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK_TEMPLATE(BM_CudaRecencyScore, bfloat16)
    ->ArgNames({"T"})->Args({2048})->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace
