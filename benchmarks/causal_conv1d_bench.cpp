// causal_conv1d prefill and its one-token update, in bytes/s of x, y and conv_state traffic, to be
// read against BM_MemoryCopy from the same run. Shapes: the v of every KV group of a Llama-3.2-1B
// layer (8 x 64 = 512 channels), a Mamba-sized 2048 channels, K 4.
#include "bench_util.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"

using namespace recurformer;

namespace {

template <class T>
struct ConvBench {
  int64_t tokens, dch, k, slots;
  std::vector<T> x, y, state;
  std::vector<float> w, bias;
  ConvBench(int64_t tokens_, int64_t dch_, int64_t k_, int64_t slots_)
      : tokens(tokens_), dch(dch_), k(k_), slots(slots_) {
    x = rfbench::random_vector<T>(size_t(tokens * dch), -1, 1, 1);
    y.resize(x.size());
    state = rfbench::random_vector<T>(size_t(slots * (k - 1) * dch), -1, 1, 2);
    w = rfbench::random_vector<float>(size_t(dch * k), -1, 1, 3);
    bias = rfbench::random_vector<float>(size_t(dch), -1, 1, 4);
  }
  CausalConv1dParams<T> params() {
    CausalConv1dParams<T> p;
    p.x = make_view<const T>(x.data(), {tokens, dch});
    p.weight = make_view<const float>(w.data(), {dch, k});
    p.bias = make_view<const float>(bias.data(), {dch});
    p.y = make_view(y.data(), {tokens, dch});
    p.conv_state = make_view(state.data(), {slots, k - 1, dch});
    return p;
  }
};

// args: tokens, Dch, K
template <class T>
void BM_CausalConv1d(benchmark::State& st) {
  ConvBench<T> b(st.range(0), st.range(1), st.range(2), 1);
  const auto p = b.params();
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    causal_conv1d(p, exec);
    benchmark::DoNotOptimize(b.y.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double((b.x.size() + b.y.size()) * sizeof(T)));
  rfbench::set_rate(st, "tokens/s", double(b.tokens));
}

// The backward (training) on the prefill shapes: bytes/s of x, dy and dx traffic.
// args: tokens, Dch, K
template <class T>
void BM_CausalConv1dBackward(benchmark::State& st) {
  ConvBench<T> b(st.range(0), st.range(1), st.range(2), 1);
  const auto dy = rfbench::random_vector<float>(b.x.size(), -1, 1, 5);
  std::vector<float> dx(b.x.size()), dw(b.w.size()), db(b.bias.size()), dstate(b.state.size());
  CausalConv1dBackwardParams<T> p;
  p.fwd = b.params();
  p.dy = make_view(dy.data(), {b.tokens, b.dch});
  p.dx = make_view(dx.data(), {b.tokens, b.dch});
  p.dweight = make_view(dw.data(), {b.dch, b.k});
  p.dbias = make_view(db.data(), {b.dch});
  p.dconv_state = make_view(dstate.data(), {b.slots, b.k - 1, b.dch});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    causal_conv1d_backward(p, exec);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double(b.x.size() * sizeof(T) + (dy.size() + dx.size()) * sizeof(float)));
  rfbench::set_rate(st, "tokens/s", double(b.tokens));
}

// args: slots (one token each), Dch, K
template <class T>
void BM_CausalConv1dUpdate(benchmark::State& st) {
  const int64_t batch = st.range(0);
  ConvBench<T> b(batch, st.range(1), st.range(2), batch);
  const auto p = b.params();
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    causal_conv1d_update(p, exec);
    benchmark::DoNotOptimize(b.y.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s",
                    double((b.x.size() + b.y.size() + 2 * b.state.size()) * sizeof(T)));
}

}  // namespace

BENCHMARK_TEMPLATE(BM_CausalConv1d, float)
    ->ArgNames({"T", "Dch", "K"})
    ->Args({4096, 512, 4})
    ->Args({4096, 2048, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CausalConv1d, bfloat16)
    ->ArgNames({"T", "Dch", "K"})
    ->Args({4096, 512, 4})
    ->Args({4096, 2048, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CausalConv1dBackward, float)
    ->ArgNames({"T", "Dch", "K"})
    ->Args({4096, 512, 4})
    ->Args({4096, 2048, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CausalConv1dBackward, bfloat16)
    ->ArgNames({"T", "Dch", "K"})
    ->Args({4096, 512, 4})
    ->Args({4096, 2048, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CausalConv1dUpdate, float)
    ->ArgNames({"slots", "Dch", "K"})
    ->Args({64, 512, 4})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CausalConv1dUpdate, bfloat16)
    ->ArgNames({"slots", "Dch", "K"})
    ->Args({64, 512, 4})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
