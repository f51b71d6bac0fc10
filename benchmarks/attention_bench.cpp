// Attention at a Llama-3.2-1B layer's shape (32 query heads, 8 KV heads, head_dim 64):
//  - decode: one query token over contexts 512..32768; memory-bound, so bytes/s counts the K+V
//    bytes read, to be set against BM_MemoryCopy's bytes/s from the same run;
//  - prefill: a causal chunk of 512..4096 tokens over its own keys; compute-bound, tokens/s and
//    FLOP/s (4 * hd flops per visible (query head, key) pair: QK^T and PV).
// Training, at SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64), prefill of 512 and
// 2048 tokens: the forward with lse (what training runs) and attention_backward (dq, dk, dv) in the
// same run. FLOP/s counts the algorithm's work, 4 * hd (forward) and 10 * hd (backward: QK^T, dP,
// dV, dK, dQ) per visible pair, as FlashAttention reports it; the CPU backward's two passes execute
// 14 * hd (the logits and dP twice), so its FLOP/s reads 5/7 of the rate its FMAs run at.
#include <cmath>

#include "bench_util.hpp"
#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/attention_backward.hpp"

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

constexpr int kTrainNq = 9, kTrainNkv = 3;  // SmolLM2-135M

/// One causal prefill at SmolLM2's shape: inputs, forward (with lse) and backward params.
template <class T>
struct TrainAttention {
  std::vector<T> q, k, v, out, dout;
  std::vector<float> lse, dq, dk, dv;
  std::vector<int32_t> lens, qpos;
  AttentionParams<T> p;
  AttentionBackwardParams<T> b;
  explicit TrainAttention(int tokens)
      : q(rfbench::random_vector<T>(size_t(tokens) * kTrainNq * kHd)),
        k(rfbench::random_vector<T>(size_t(kTrainNkv) * tokens * kHd, -1, 1, 2)),
        v(rfbench::random_vector<T>(size_t(kTrainNkv) * tokens * kHd, -1, 1, 3)),
        out(q.size()),
        dout(rfbench::random_vector<T>(q.size(), -1, 1, 4)),
        lse(size_t(tokens) * kTrainNq),
        dq(q.size()),
        dk(k.size()),
        dv(k.size()),
        lens{tokens},
        qpos(static_cast<size_t>(tokens)) {
    for (int t = 0; t < tokens; ++t) qpos[size_t(t)] = t;
    p.q = make_view<const T>(q.data(), {tokens, kTrainNq, kHd});
    p.k = make_view<const T>(k.data(), {1, kTrainNkv, tokens, kHd});
    p.v = make_view<const T>(v.data(), {1, kTrainNkv, tokens, kHd});
    p.out = make_view<T>(out.data(), {tokens, kTrainNq, kHd});
    p.kv_lens = make_view<const int32_t>(lens.data(), {1});
    p.q_positions = make_view<const int32_t>(qpos.data(), {tokens});
    p.lse = make_view<float>(lse.data(), {tokens, kTrainNq});
    b.fwd = p;
    b.dout = make_view<const T>(dout.data(), {tokens, kTrainNq, kHd});
    b.dq = make_view<float>(dq.data(), {tokens, kTrainNq, kHd});
    b.dk = make_view<float>(dk.data(), {1, kTrainNkv, tokens, kHd});
    b.dv = make_view<float>(dv.data(), {1, kTrainNkv, tokens, kHd});
  }
  static double pairs(int tokens) { return double(kTrainNq) * tokens * (tokens + 1) / 2.0; }
};

template <class T>
void BM_AttentionTrainForward(benchmark::State& st) {
  const int tokens = int(st.range(0));
  TrainAttention<T> a(tokens);
  const auto exec = rfbench::cpu_exec();
  std::vector<char> ws(attention_workspace_bytes(a.p, exec));
  for (auto _ : st) {
    attention(a.p, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(a.out.data());
  }
  rfbench::set_rate(st, "FLOP/s", 4.0 * kHd * TrainAttention<T>::pairs(tokens));
  rfbench::set_rate(st, "tokens/s", tokens);
}

template <class T>
void BM_AttentionBackward(benchmark::State& st) {
  const int tokens = int(st.range(0));
  TrainAttention<T> a(tokens);
  const auto exec = rfbench::cpu_exec();
  std::vector<char> wf(attention_workspace_bytes(a.p, exec));
  attention(a.p, exec, wf.data(), wf.size());  // out and lse, as training has them
  std::vector<char> ws(attention_backward_workspace_bytes(a.b, exec));
  for (auto _ : st) {
    attention_backward(a.b, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(a.dq.data());
    benchmark::DoNotOptimize(a.dk.data());
  }
  rfbench::set_rate(st, "FLOP/s", 10.0 * kHd * TrainAttention<T>::pairs(tokens));
  rfbench::set_rate(st, "tokens/s", tokens);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_AttentionDecode, float)->Arg(512)->Arg(4096)->Arg(32768)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionDecode, recurformer::bfloat16)->Arg(512)->Arg(4096)->Arg(32768)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionPrefill, float)->Arg(512)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionPrefill, recurformer::bfloat16)->Arg(512)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionTrainForward, float)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionBackward, float)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionTrainForward, recurformer::bfloat16)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_AttentionBackward, recurformer::bfloat16)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
