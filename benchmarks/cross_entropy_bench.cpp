// The fused lm_head + cross-entropy at SmolLM2-135M's shape (d 576, vocab 49152) for 512 tokens in
// chunks of 32: the forward alone (what perplexity needs), the backward with dh only, with dh and
// dweight, and with a teacher (KL) of the same shape; lm_head fp32 or bf16. Compute-bound (GEMMs of
// 512 x 49152 x 576): "GFLOP/s" counts 2 T V d per GEMM (logits, teacher logits, dh, dW), so the
// forward and backward read as fractions of the same machine in the same run.
// Arguments: mode (0 forward, 1 backward dh, 2 backward dh + dweight, 3 as 2 with a teacher).
#include <cstdint>
#include <vector>

#include "bench_util.hpp"
#include "recurformer/cpu/cross_entropy.hpp"

using namespace recurformer;

namespace {

template <class TW>
void BM_CrossEntropy(benchmark::State& st) {
  const int64_t tokens = 512, d = 576, vocab = 49152;
  const int mode = int(st.range(0));
  const auto h = rfbench::random_vector<float>(size_t(tokens * d));
  const auto w = rfbench::random_vector<TW>(size_t(vocab * d), -0.1f, 0.1f, 2);
  const auto th = rfbench::random_vector<float>(size_t(tokens * d), -1.f, 1.f, 3);
  std::vector<int32_t> targets(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) targets[size_t(t)] = int32_t((t * 104729) % vocab);
  std::vector<float> dh(size_t(tokens * d)), dw(mode >= 2 ? size_t(vocab * d) : 0);
  CrossEntropyBackwardParams<TW> p;
  p.h = make_view(h.data(), {tokens, d});
  p.weight = make_view(w.data(), {vocab, d});
  p.targets = make_view<const int32_t>(targets.data(), {tokens});
  if (mode == 3) {
    p.teacher_h = make_view(th.data(), {tokens, d});
    p.teacher_weight = p.weight;  // the shape (and cost) of the original model's lm_head
    p.kl_weight = 1.f;
  }
  p.chunk_tokens = 32;
  p.dh = make_view(dh.data(), {tokens, d});
  if (mode >= 2) {
    p.dweight = make_view(dw.data(), {vocab, d});
    p.accumulate = true;
  }
  const auto exec = rfbench::cpu_exec();
  std::vector<unsigned char> ws(cross_entropy_workspace_bytes(p, exec));
  for (auto _ : st) {
    const CrossEntropyResult r = mode == 0 ? cross_entropy<TW>(p, exec, ws.data(), ws.size())
                                           : cross_entropy_backward(p, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(r.loss);
    benchmark::ClobberMemory();
  }
  const int gemms = mode == 0 ? 1 : mode == 1 ? 2 : mode == 2 ? 3 : 4;
  rfbench::set_rate(st, "GFLOP/s", 2e-9 * double(gemms) * double(tokens * vocab * d));
  rfbench::set_rate(st, "tokens/s", double(tokens));
  st.counters["workspace_MiB"] = double(ws.size()) / (1 << 20);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_CrossEntropy, float)->Arg(0)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_CrossEntropy, bfloat16)
    ->Arg(0)->Arg(1)->Arg(2)->Arg(3)->Unit(benchmark::kMillisecond)->UseRealTime();
