// Attention at a Llama-3.2-1B layer's shape (32 query heads, 8 KV heads, head_dim 64):
//  - decode: one query token over contexts 512..32768; memory-bound, so bytes/s counts the K+V
//    bytes read, to be set against BM_MemoryCopy's bytes/s from the same run;
//  - prefill: a causal chunk of 512..4096 tokens over its own keys; compute-bound, tokens/s and
//    FLOP/s (4 * hd flops per visible (query head, key) pair: QK^T and PV).
#include <cmath>

#include "bench_util.hpp"
#include "recurformer/cpu/attention.hpp"

namespace {

using namespace recurformer;

constexpr int kNq = 32, kNkv = 8, kHd = 64;

template <class T>
void BM_AttentionDecode(benchmark::State& st) {
  const int ctx = int(st.range(0));
  auto q = rfbench::random_vector<T>(size_t(kNq) * kHd);
  auto k = rfbench::random_vector<T>(size_t(kNkv) * ctx * kHd, -1, 1, 2);
  auto v = rfbench::random_vector<T>(size_t(kNkv) * ctx * kHd, -1, 1, 3);
  std::vector<T> out(size_t(kNq) * kHd);
  std::vector<int32_t> lens{ctx}, qpos{ctx - 1};
  AttentionParams<T> p;
  p.q = make_view<const T>(q.data(), {1, kNq, kHd});
  p.k = make_view<const T>(k.data(), {1, kNkv, ctx, kHd});
  p.v = make_view<const T>(v.data(), {1, kNkv, ctx, kHd});
  p.out = make_view<T>(out.data(), {1, kNq, kHd});
  p.kv_lens = make_view<const int32_t>(lens.data(), {1});
  p.q_positions = make_view<const int32_t>(qpos.data(), {1});
  const auto exec = rfbench::cpu_exec();
  std::vector<char> ws(attention_workspace_bytes(p, exec));
  for (auto _ : st) {
    attention(p, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(out.data());
  }
  rfbench::set_rate(st, "bytes/s", 2.0 * kNkv * ctx * kHd * sizeof(T));  // K + V read
  rfbench::set_rate(st, "tokens/s", 1.0);
}

template <class T>
void BM_AttentionPrefill(benchmark::State& st) {
  const int tokens = int(st.range(0));
  auto q = rfbench::random_vector<T>(size_t(tokens) * kNq * kHd);
  auto k = rfbench::random_vector<T>(size_t(kNkv) * tokens * kHd, -1, 1, 2);
  auto v = rfbench::random_vector<T>(size_t(kNkv) * tokens * kHd, -1, 1, 3);
  std::vector<T> out(size_t(tokens) * kNq * kHd);
  std::vector<int32_t> lens{tokens}, qpos(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) qpos[size_t(t)] = t;
  AttentionParams<T> p;
  p.q = make_view<const T>(q.data(), {tokens, kNq, kHd});
  p.k = make_view<const T>(k.data(), {1, kNkv, tokens, kHd});
  p.v = make_view<const T>(v.data(), {1, kNkv, tokens, kHd});
  p.out = make_view<T>(out.data(), {tokens, kNq, kHd});
  p.kv_lens = make_view<const int32_t>(lens.data(), {1});
  p.q_positions = make_view<const int32_t>(qpos.data(), {tokens});
  const auto exec = rfbench::cpu_exec();
  std::vector<char> ws(attention_workspace_bytes(p, exec));
  for (auto _ : st) {
    attention(p, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(out.data());
  }
  const double pairs = double(kNq) * tokens * (tokens + 1) / 2.0;
  rfbench::set_rate(st, "FLOP/s", 4.0 * kHd * pairs);
  rfbench::set_rate(st, "tokens/s", tokens);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_AttentionDecode, float)->Arg(512)->Arg(4096)->Arg(32768)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionDecode, recurformer::bfloat16)->Arg(512)->Arg(4096)->Arg(32768)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionPrefill, float)->Arg(512)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionPrefill, recurformer::bfloat16)->Arg(512)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
