// RecencyScore over one calibration sequence at a Llama-3.2-1B layer's shape (32 query heads,
// 8 KV heads, head_dim 64): scored queries (query head x token) per second. Work grows as T^2, so
// queries/s falls with T; FLOP/s (2 * hd per causal (head, key) pair for the logits) reads as a
// fraction of the compute peak.
#include "bench_util.hpp"
#include "recurformer/cpu/recency_score.hpp"

namespace {

using namespace recurformer;

template <class T>
void BM_RecencyScore(benchmark::State& st) {
  const int T_ = int(st.range(0)), n_q = 32, n_kv = 8, hd = 64;
  auto q = rfbench::random_vector<T>(size_t(T_) * n_q * hd);
  auto k = rfbench::random_vector<T>(size_t(T_) * n_kv * hd, -1, 1, 2);
  std::vector<RecencyHeadStats> stats(static_cast<size_t>(n_q));
  RecencyScoreParams<T> p;
  p.q = make_view<const T>(q.data(), {T_, n_q, hd});
  p.k = make_view<const T>(k.data(), {T_, n_kv, hd});
  p.stats = make_view<RecencyHeadStats>(stats.data(), {n_q});
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    recency_score(p, exec);
    benchmark::DoNotOptimize(stats.data());
  }
  const double scored = double(T_ - p.window);
  rfbench::set_rate(st, "queries/s", scored * n_q);
  rfbench::set_rate(st, "FLOP/s", 2.0 * hd * n_q * (double(T_) * (T_ + 1) / 2));
}

}  // namespace

BENCHMARK_TEMPLATE(BM_RecencyScore, float)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(BM_RecencyScore, recurformer::bfloat16)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
