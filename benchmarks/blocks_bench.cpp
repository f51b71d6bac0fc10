// rmsnorm, swiglu and embedding at Llama-3.2-1B shapes (d_model 2048, MLP 8192, vocab 128256),
// for 1 and 512 tokens, fp32 and bf16, and at SmolLM2-135M's (d 576, MLP 1536, vocab 49152) for 512
// tokens beside their backward passes (fp32 gradients). All are memory-bound: "bytes/s" counts
// the bytes an op must read plus write once (a backward that reads an input twice is not credited
// twice), to be set against BM_MemoryCopy's bytes/s and the forward's in the same run.
// Arguments: tokens, width (and vocab for the embedding).
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
  const int64_t tokens = st.range(0), d = st.range(1);
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
BENCHMARK_TEMPLATE(BM_RmsNorm, float)->Args({1, 2048})->Args({512, 2048})->Args({512, 576})->UseRealTime();
BENCHMARK_TEMPLATE(BM_RmsNorm, bfloat16)->Args({1, 2048})->Args({512, 2048})->Args({512, 576})->UseRealTime();

// dx and dweight from dy (fp32), x and weight in T.
template <class T>
void BM_RmsNormBackward(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = st.range(1);
  const auto x = rfbench::random_vector<T>(size_t(tokens * d));
  const auto w = rfbench::random_vector<T>(size_t(d));
  const auto dy = rfbench::random_vector<float>(size_t(tokens * d), -1.f, 1.f, 2);
  std::vector<float> dx(size_t(tokens * d)), dw(static_cast<size_t>(d));
  RmsNormBackwardParams<T, T> p;
  p.x = make_view(x.data(), {tokens, d});
  p.weight = make_view(w.data(), {d});
  p.dy = make_view(dy.data(), {tokens, d});
  p.dx = make_view(dx.data(), {tokens, d});
  p.dweight = make_view(dw.data(), {d});
  std::vector<unsigned char> ws(rmsnorm_backward_workspace_bytes(p));
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    rmsnorm_backward(p, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double(tokens * d) * double(sizeof(T) + 2 * sizeof(float)) +
                                       double(d) * double(sizeof(T) + sizeof(float)));
  rfbench::set_rate(st, "tokens/s", double(tokens));
}
BENCHMARK_TEMPLATE(BM_RmsNormBackward, float)->Args({512, 576})->Args({512, 2048})->UseRealTime();
BENCHMARK_TEMPLATE(BM_RmsNormBackward, bfloat16)->Args({512, 576})->UseRealTime();

template <class T>
void BM_Swiglu(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = st.range(1);
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
BENCHMARK_TEMPLATE(BM_Swiglu, float)->Args({1, 8192})->Args({512, 8192})->Args({512, 1536})->UseRealTime();
BENCHMARK_TEMPLATE(BM_Swiglu, bfloat16)->Args({1, 8192})->Args({512, 8192})->Args({512, 1536})->UseRealTime();

// dgate, dup (fp32) from dout (fp32), gate and up in T.
template <class T>
void BM_SwigluBackward(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = st.range(1);
  const auto g = rfbench::random_vector<T>(size_t(tokens * d), -4.f, 4.f);
  const auto u = rfbench::random_vector<T>(size_t(tokens * d), -1.f, 1.f, 2);
  const auto dout = rfbench::random_vector<float>(size_t(tokens * d), -1.f, 1.f, 3);
  std::vector<float> dg(size_t(tokens * d)), du(size_t(tokens * d));
  SwigluBackwardParams<T> p;
  p.gate = make_view(g.data(), {tokens, d});
  p.up = make_view(u.data(), {tokens, d});
  p.dout = make_view(dout.data(), {tokens, d});
  p.dgate = make_view(dg.data(), {tokens, d});
  p.dup = make_view(du.data(), {tokens, d});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    swiglu_backward(p, exec);
    benchmark::DoNotOptimize(dg.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double(tokens * d) * double(2 * sizeof(T) + 3 * sizeof(float)));
  rfbench::set_rate(st, "tokens/s", double(tokens));
}
BENCHMARK_TEMPLATE(BM_SwigluBackward, float)->Args({512, 1536})->Args({512, 8192})->UseRealTime();
BENCHMARK_TEMPLATE(BM_SwigluBackward, bfloat16)->Args({512, 1536})->UseRealTime();

// bf16 table (as in the checkpoint), fp32 or bf16 output rows.
template <class T>
void BM_Embedding(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = st.range(1), vocab = st.range(2);
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
BENCHMARK_TEMPLATE(BM_Embedding, float)
    ->Args({1, 2048, 128256})->Args({512, 2048, 128256})->Args({512, 576, 49152})->UseRealTime();
BENCHMARK_TEMPLATE(BM_Embedding, bfloat16)->Args({512, 2048, 128256})->UseRealTime();

// fp32 dtable [vocab, d] += rows of dout (accumulate: the training loop zeroes gradients once per
// step); the 4th argument 0 times the call that zeroes dtable first (a vocab x d memset).
void BM_EmbeddingBackward(benchmark::State& st) {
  const int64_t tokens = st.range(0), d = st.range(1), vocab = st.range(2);
  const bool accumulate = st.range(3) != 0;
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) ids[size_t(t)] = int32_t((t * 104729) % vocab);
  const auto dout = rfbench::random_vector<float>(size_t(tokens * d));
  std::vector<float> dtable(size_t(vocab * d));
  EmbeddingBackwardParams p;
  p.ids = make_view<const int32_t>(ids.data(), {tokens});
  p.dout = make_view(dout.data(), {tokens, d});
  p.dtable = make_view(dtable.data(), {vocab, d});
  p.accumulate = accumulate;
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    embedding_backward(p, exec);
    benchmark::DoNotOptimize(dtable.data());
    benchmark::ClobberMemory();
  }
  // dout read, the named rows read and written, and (not accumulating) the whole table written
  rfbench::set_rate(st, "bytes/s", double(tokens * d) * 3.0 * sizeof(float) +
                                       (accumulate ? 0.0 : double(vocab * d) * sizeof(float)));
  rfbench::set_rate(st, "tokens/s", double(tokens));
}
BENCHMARK(BM_EmbeddingBackward)->Args({512, 576, 49152, 1})->Args({512, 576, 49152, 0})->UseRealTime();

}  // namespace
