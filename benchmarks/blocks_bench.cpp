// rmsnorm, swiglu and embedding at Llama-3.2-1B shapes (d_model 2048, MLP 8192, vocab 128256),
// for 1 and 512 tokens, fp32 and bf16. All are memory-bound: "bytes/s" counts bytes read plus
// bytes written, to be set against BM_MemoryCopy's bytes/s in the same run.
#include <cstdint>
#include <vector>

#include "bench_util.hpp"
#include "recurformer/cpu/embedding.hpp"
#include "recurformer/cpu/rmsnorm.hpp"
#include "recurformer/cpu/swiglu.hpp"

using namespace recurformer;

namespace {

template <class T>
void BM_RmsNorm(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = 2048;
  const auto x = rfbench::random_vector<T>(size_t(tokens * d));
  const auto w = rfbench::random_vector<T>(size_t(d));
  std::vector<T> y(size_t(tokens * d));
  RmsNormParams<T, T> p;
  p.x = make_view(x.data(), {tokens, d});
  p.weight = make_view(w.data(), {d});
  p.y = make_view(y.data(), {tokens, d});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    rmsnorm(p, exec);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double(2 * tokens * d + d) * sizeof(T));
  rfbench::set_rate(st, "tokens/s", double(tokens));
}
BENCHMARK_TEMPLATE(BM_RmsNorm, float)->Arg(1)->Arg(512)->UseRealTime();
BENCHMARK_TEMPLATE(BM_RmsNorm, bfloat16)->Arg(1)->Arg(512)->UseRealTime();

template <class T>
void BM_Swiglu(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = 8192;
  const auto g = rfbench::random_vector<T>(size_t(tokens * d), -4.f, 4.f);
  const auto u = rfbench::random_vector<T>(size_t(tokens * d), -1.f, 1.f, 2);
  std::vector<T> out(size_t(tokens * d));
  SwigluParams<T> p;
  p.gate = make_view(g.data(), {tokens, d});
  p.up = make_view(u.data(), {tokens, d});
  p.out = make_view(out.data(), {tokens, d});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    swiglu(p, exec);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", 3.0 * double(tokens * d) * sizeof(T));
  rfbench::set_rate(st, "tokens/s", double(tokens));
}
BENCHMARK_TEMPLATE(BM_Swiglu, float)->Arg(1)->Arg(512)->UseRealTime();
BENCHMARK_TEMPLATE(BM_Swiglu, bfloat16)->Arg(1)->Arg(512)->UseRealTime();

// bf16 table (as in the checkpoint), fp32 or bf16 output rows.
template <class T>
void BM_Embedding(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = 2048, vocab = 128256;
  const auto table = rfbench::random_vector<bfloat16>(size_t(vocab * d));
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) ids[size_t(t)] = int32_t((t * 104729) % vocab);
  std::vector<T> out(size_t(tokens * d));
  EmbeddingParams<T, bfloat16> p;
  p.table = make_view(table.data(), {vocab, d});
  p.ids = make_view<const int32_t>(ids.data(), {tokens});
  p.out = make_view(out.data(), {tokens, d});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    embedding(p, exec);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double(tokens * d) * double(sizeof(bfloat16) + sizeof(T)));
  rfbench::set_rate(st, "tokens/s", double(tokens));
}
BENCHMARK_TEMPLATE(BM_Embedding, float)->Arg(1)->Arg(512)->UseRealTime();
BENCHMARK_TEMPLATE(BM_Embedding, bfloat16)->Arg(512)->UseRealTime();

}  // namespace
