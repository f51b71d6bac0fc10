// CUDA recency_score against the CPU op (itself tested against a materialised P in
// recency_score_test.cpp) on the same random inputs: every storage dtype, head dims 64 and 128,
// GQA groups 1, 4 and 8, sequences shorter than the window (stats unchanged), of 40, 300 and 1000
// tokens, windows 1, 16 and 64, sink 0 and 4, accumulated on top of earlier stats. Bad shapes
// throw before launching.
#include <cstdint>
#include <vector>

#include "recurformer/cuda/recency_score.cuh"
#include "support/cuda_util.cuh"
#include "support/test_util.hpp"

using namespace recurformer;

// The CPU side, in recency_score_test_cpu.cpp (compiled by the host compiler).
template <class T> void cpu_recency_score(const RecencyScoreParams<T>& p);

namespace {

// Both sides round the same storage values to fp32 and sum in double; they differ in the fp32
// logits' summation order, in exp (CPU polynomial vs CUDA expf) and in the order of the double
// sums, which moves each row's r_i, sink_i and distance_i by a few fp32 ulps (~1e-6 relative). The
// sums over up to 1000 rows are compared at 1e-5 relative plus 1e-6 absolute per scored row.
void check_stats(const std::vector<RecencyHeadStats>& gpu, const std::vector<RecencyHeadStats>& cpu) {
  REQUIRE(gpu.size() == cpu.size());
  for (size_t h = 0; h < gpu.size(); ++h) {
    CAPTURE(h);
    REQUIRE(gpu[h].queries == cpu[h].queries);
    const double abs = 1e-6 * double(cpu[h].queries + 1);
    const double got[3] = {gpu[h].recency_sum, gpu[h].sink_sum, gpu[h].distance_sum};
    const double want[3] = {cpu[h].recency_sum, cpu[h].sink_sum, cpu[h].distance_sum};
    for (int i = 0; i < 3; ++i) {
      CAPTURE(i, got[i], want[i]);
      REQUIRE(std::fabs(got[i] - want[i]) <= abs + 1e-5 * std::fabs(want[i]));
    }
  }
}

template <class T>
void compare_recency(int64_t seq, int64_t n_q, int64_t n_kv, int64_t hd, int window, int sink) {
  CAPTURE(seq, n_q, n_kv, hd, window, sink);
  auto q = rftest::random_vector<T>(size_t(seq * n_q * hd), -2, 2);
  auto k = rftest::random_vector<T>(size_t(seq * n_kv * hd), -2, 2);
  std::vector<RecencyHeadStats> stats(static_cast<size_t>(n_q));
  for (size_t h = 0; h < stats.size(); ++h)  // earlier sequences' sums: the op adds to them
    stats[h] = {0.25 * double(h), 0.5, 3.0 * double(h), int64_t(h) * 7};
  rftest::DeviceBuffer<T> dq(q), dk(k);
  rftest::DeviceBuffer<RecencyHeadStats> dstats(stats);
  RecencyScoreParams<T> hp;
  hp.q = make_view<const T>(q.data(), {seq, n_q, hd});
  hp.k = make_view<const T>(k.data(), {seq, n_kv, hd});
  hp.stats = make_view(stats.data(), {n_q});
  hp.window = window;
  hp.sink_tokens = sink;
  RecencyScoreParams<T> dp = hp;
  dp.q.data = dq.data(), dp.k.data = dk.data(), dp.stats.data = dstats.data();
  cpu_recency_score(hp);
  recency_score(dp, CudaExec{});
  check_stats(dstats.download(), stats);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("CUDA recency_score equals the CPU op", "[recency_score][cuda]", rftest::StorageTypes) {
  using T = TestType;
  compare_recency<T>(10, 4, 1, 64, 16, 4);    // shorter than the window: nothing scored
  compare_recency<T>(40, 4, 4, 64, 1, 0);     // group 1, window 1
  compare_recency<T>(300, 8, 2, 128, 16, 4);  // group 4
  compare_recency<T>(1000, 8, 1, 64, 64, 4);  // group 8, many rows per warp
}

TEST_CASE("CUDA recency_score checks its arguments before launching", "[recency_score][cuda]") {
  std::vector<RecencyHeadStats> stats(4);
  rftest::DeviceBuffer<RecencyHeadStats> dstats(stats);
  rftest::DeviceBuffer<float> q(std::vector<float>(20 * 4 * 96, 0.5f)), k(std::vector<float>(20 * 2 * 96, 0.5f));
  RecencyScoreParams<float> p;
  p.q = make_view<const float>(q.data(), {20, 4, 96});
  p.k = make_view<const float>(k.data(), {20, 2, 96});
  p.stats = make_view(dstats.data(), {4});
  REQUIRE_THROWS_WITH(recency_score(p, CudaExec{}), Catch::Contains("head_dim"));
  p.q.shape[2] = p.k.shape[2] = 64;
  p.k.shape[1] = 3;
  REQUIRE_THROWS_WITH(recency_score(p, CudaExec{}), Catch::Contains("multiple of n_kv"));
  p.k.shape[1] = 2;
  p.stats.shape[0] = 3;
  REQUIRE_THROWS_WITH(recency_score(p, CudaExec{}), Catch::Contains("stats has shape"));
  p.stats.shape[0] = 4;
  p.window = 0;
  REQUIRE_THROWS_WITH(recency_score(p, CudaExec{}), Catch::Contains("window must be >= 1"));
  const auto after = dstats.download();
  for (const auto& s : after) REQUIRE((s.queries == 0 && s.recency_sum == 0 && s.distance_sum == 0));
}
