// RoPE in place on a Llama-3.2-1B layer's q and k (32 + 8 heads, head_dim 64) for a chunk of
// tokens: tokens/s and bytes/s (read + write of x) against BM_MemoryCopy; and at SmolLM2-135M's
// 9 query heads x 64 beside the backward (the inverse rotation of an fp32 gradient in place).
// Arguments: tokens, heads.
#include "bench_util.hpp"
#include "recurformer/cpu/rope.hpp"

namespace {

using namespace recurformer;

template <class T>
void BM_Rope(benchmark::State& st) {
  const int tokens = int(st.range(0)), heads = int(st.range(1)), hd = 64;
  auto x = rfbench::random_vector<T>(size_t(tokens) * size_t(heads) * hd);
  std::vector<int32_t> pos(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) pos[size_t(t)] = t;
  RopeScaling sc;
  sc.type = RopeScaling::Type::llama3;
  const auto inv = rope_inv_freq(hd, 500000.f, sc);
  RopeParams<T> p;
  p.x = make_view<T>(x.data(), {tokens, heads, hd});
  p.positions = make_view<const int32_t>(pos.data(), {tokens});
  p.inv_freq = make_view<const float>(inv.data(), {hd / 2});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    rope(p, exec);
    benchmark::DoNotOptimize(x.data());
  }
  rfbench::set_rate(st, "tokens/s", tokens);
  rfbench::set_rate(st, "bytes/s", 2.0 * double(x.size()) * sizeof(T));
}

void BM_RopeBackward(benchmark::State& st) {
  const int tokens = int(st.range(0)), heads = int(st.range(1)), hd = 64;
  auto g = rfbench::random_vector<float>(size_t(tokens) * size_t(heads) * hd);
  std::vector<int32_t> pos(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) pos[size_t(t)] = t;
  const auto inv = rope_inv_freq(hd, 100000.f);  // SmolLM2's theta
  RopeBackwardParams p;
  p.dx = make_view<float>(g.data(), {tokens, heads, hd});
  p.positions = make_view<const int32_t>(pos.data(), {tokens});
  p.inv_freq = make_view<const float>(inv.data(), {hd / 2});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    rope_backward(p, exec);
    benchmark::DoNotOptimize(g.data());
  }
  rfbench::set_rate(st, "tokens/s", tokens);
  rfbench::set_rate(st, "bytes/s", 2.0 * double(g.size()) * sizeof(float));
}

}  // namespace

BENCHMARK_TEMPLATE(BM_Rope, float)->Args({1, 40})->Args({512, 40})->Args({4096, 40})->Args({512, 9})->UseRealTime();
BENCHMARK_TEMPLATE(BM_Rope, recurformer::bfloat16)
    ->Args({1, 40})->Args({512, 40})->Args({4096, 40})->Args({512, 9})->UseRealTime();
BENCHMARK(BM_RopeBackward)->Args({512, 9})->Args({512, 40})->UseRealTime();
