// selective_scan at the shapes of the issue (ggml's ssm_scan comparison: f32, one sequence of 4096
// tokens, (N 16, Dch 1536) and (N 64, Dch 256)), at the RecurFormer head shape (one KV group of
// head_dim 64 channels, N 64, R 4 readers) in f32 and bf16, and the decode state update over 64
// slots. states/s counts T * Dch * N channel-token-states per second: each costs one exp, so it is
// also the exp rate. The decode figure is bytes/s of state traffic (read + write), to be set against
// BM_MemoryCopy from the same run.
// selective_scan_backward runs at the same shapes plus the training one (one RecurFormer group,
// T 512, Dch 64, N 64, R 3), every gradient but dz (no gate), so its time reads against the forward's
// of the same run, and bwd/fwd is the ratio measured within each iteration (forward, then backward,
// each timed); states/s again counts T * Dch * N (the backward does two exps per state).
#include <chrono>

#include "bench_util.hpp"
#include "recurformer/cpu/selective_scan.hpp"

using namespace recurformer;

namespace {

template <class T>
struct ScanBench {
  int64_t tokens, dch, n, g, r, slots;
  std::vector<T> u, delta, B, C, y;
  std::vector<float> A, D, state;
  std::vector<int32_t> state_slots;

  ScanBench(int64_t tokens_, int64_t dch_, int64_t n_, int64_t g_, int64_t r_, int64_t slots_)
      : tokens(tokens_), dch(dch_), n(n_), g(g_), r(r_), slots(slots_) {
    u = rfbench::random_vector<T>(size_t(tokens * dch), -1, 1, 1);
    delta = rfbench::random_vector<T>(size_t(tokens * dch), -4, 0, 2);
    B = rfbench::random_vector<T>(size_t(tokens * g * n), -1, 1, 3);
    C = rfbench::random_vector<T>(size_t(tokens * g * r * n), -1, 1, 4);
    y.resize(size_t(tokens * r * dch));
    A = rfbench::random_vector<float>(size_t(dch * n), -8, -0.5f, 5);
    D = rfbench::random_vector<float>(size_t(dch), -1, 1, 6);
    state.assign(size_t(slots * dch * n), 0.f);
  }
  SelectiveScanParams<T> params(bool with_D) {
    SelectiveScanParams<T> p;
    p.u = make_view<const T>(u.data(), {tokens, dch});
    p.delta = make_view<const T>(delta.data(), {tokens, dch});
    p.A = make_view<const float>(A.data(), {dch, n});
    p.B = make_view<const T>(B.data(), {tokens, g, n});
    p.C = make_view<const T>(C.data(), {tokens, g, r, n});
    if (with_D) p.D = make_view<const float>(D.data(), {dch});
    p.y = make_view(y.data(), {tokens, r, dch});
    p.state = make_view(state.data(), {slots, dch, n});
    return p;
  }
};

// args: tokens, Dch, N, G, R
template <class T>
void BM_SelectiveScan(benchmark::State& st) {
  ScanBench<T> b(st.range(0), st.range(1), st.range(2), st.range(3), st.range(4), 1);
  // ggml's ssm_scan has no D: the comparison shapes (R = 1) run without it, the RecurFormer ones with
  auto p = b.params(b.r > 1);
  p.use_initial_state = false;
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    selective_scan(p, exec);
    benchmark::DoNotOptimize(b.y.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "states/s", double(b.tokens * b.dch * b.n));
  rfbench::set_rate(st, "tokens/s", double(b.tokens));
}

// args: tokens, Dch, N, G, R
template <class T>
void BM_SelectiveScanBackward(benchmark::State& st) {
  ScanBench<T> b(st.range(0), st.range(1), st.range(2), st.range(3), st.range(4), 1);
  SelectiveScanBackwardParams<T> p;
  p.fwd = b.params(b.r > 1);
  p.fwd.use_initial_state = false;
  const int64_t tokens = b.tokens, dch = b.dch, n = b.n, g = b.g, r = b.r;
  std::vector<float> dy = rfbench::random_vector<float>(size_t(tokens * r * dch), -1, 1, 7);
  std::vector<float> du(size_t(tokens * dch)), ddelta(du.size()), dA(size_t(dch * n)),
      dB(size_t(tokens * g * n)), dC(size_t(tokens * g * r * n)), dD(static_cast<size_t>(dch)),
      ddb(static_cast<size_t>(dch));
  p.dy = make_view<const float>(dy.data(), {tokens, r, dch});
  p.du = make_view(du.data(), {tokens, dch});
  p.ddelta = make_view(ddelta.data(), {tokens, dch});
  p.dA = make_view(dA.data(), {dch, n});
  p.dB = make_view(dB.data(), {tokens, g, n});
  p.dC = make_view(dC.data(), {tokens, g, r, n});
  p.dD = make_view(dD.data(), {dch});
  p.ddelta_bias = make_view(ddb.data(), {dch});
  const auto exec = rfbench::cpu_exec();
  std::vector<unsigned char> ws(selective_scan_backward_workspace_bytes(p, exec));
  st.counters["workspace_MiB"] = double(ws.size()) / (1 << 20);
  // Each iteration also runs the forward of the same call, timed apart, so the ratio
  // backward / forward is measured under the same load (this machine is shared).
  using Clock = std::chrono::steady_clock;
  double fwd_s = 0, bwd_s = 0;
  for (auto _ : st) {
    const auto t0 = Clock::now();
    selective_scan(p.fwd, exec);
    benchmark::DoNotOptimize(b.y.data());
    benchmark::ClobberMemory();
    const auto t1 = Clock::now();
    selective_scan_backward(p, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(du.data());
    benchmark::ClobberMemory();
    const auto t2 = Clock::now();
    const double bwd = std::chrono::duration<double>(t2 - t1).count();
    fwd_s += std::chrono::duration<double>(t1 - t0).count();
    bwd_s += bwd;
    st.SetIterationTime(bwd);
  }
  st.counters["bwd/fwd"] = bwd_s / fwd_s;
  rfbench::set_rate(st, "states/s", double(tokens * dch * n));
  rfbench::set_rate(st, "tokens/s", double(tokens));
}

// args: slots (one token each), Dch, N, R
template <class T>
void BM_SelectiveStateUpdate(benchmark::State& st) {
  const int64_t batch = st.range(0);
  ScanBench<T> b(batch, st.range(1), st.range(2), 1, st.range(3), batch);
  auto p = b.params(true);
  const auto exec = rfbench::cpu_exec();
  for (auto _ : st) {
    selective_state_update(p, exec);
    benchmark::DoNotOptimize(b.state.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", 2.0 * double(b.state.size() * sizeof(float)));  // state read + write
  rfbench::set_rate(st, "states/s", double(batch * b.dch * b.n));
}

}  // namespace

BENCHMARK_TEMPLATE(BM_SelectiveScan, float)
    ->ArgNames({"T", "Dch", "N", "G", "R"})
    ->Args({4096, 1536, 16, 1, 1})  // ggml ssm_scan comparison: 290 ms there
    ->Args({4096, 256, 64, 1, 1})   // ggml ssm_scan comparison: 214 ms there
    ->Args({4096, 64, 64, 1, 4})    // one RecurFormer group of a Llama-3.2-1B layer
    ->Args({512, 64, 64, 1, 3})     // the training shape (the backward's)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_SelectiveScan, bfloat16)
    ->ArgNames({"T", "Dch", "N", "G", "R"})
    ->Args({4096, 64, 64, 1, 4})
    ->Args({512, 64, 64, 1, 3})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_SelectiveScanBackward, float)
    ->ArgNames({"T", "Dch", "N", "G", "R"})
    ->Args({4096, 1536, 16, 1, 1})
    ->Args({4096, 256, 64, 1, 1})
    ->Args({4096, 64, 64, 1, 4})
    ->Args({512, 64, 64, 1, 3})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime();
BENCHMARK_TEMPLATE(BM_SelectiveScanBackward, bfloat16)
    ->ArgNames({"T", "Dch", "N", "G", "R"})
    ->Args({4096, 64, 64, 1, 4})
    ->Args({512, 64, 64, 1, 3})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime();
BENCHMARK_TEMPLATE(BM_SelectiveStateUpdate, float)
    ->ArgNames({"slots", "Dch", "N", "R"})
    ->Args({64, 64, 64, 4})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_SelectiveStateUpdate, bfloat16)
    ->ArgNames({"slots", "Dch", "N", "R"})
    ->Args({64, 64, 64, 4})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
