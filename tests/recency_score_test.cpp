// recency_score against statistics of a materialised double P on small T (several sequences
// accumulated, GQA, every dtype and ISA, determinism across thread counts); group_recency;
// select_head_layout by ratio, threshold, minimum attention groups per layer and ties; bad input.
#include <cmath>

#include "recurformer/cpu/recency_score.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

// Adds one sequence's reference statistics (from the full P in double) to ref.
template <class T>
void reference(const std::vector<T>& q, const std::vector<T>& k, int T_, int n_q, int n_kv, int hd, int w,
               int sink, std::vector<RecencyHeadStats>& ref) {
  const auto qd = rftest::to_double(q), kd = rftest::to_double(k);
  const int g = n_q / n_kv;
  const double scale = 1.0 / std::sqrt(double(hd));
  for (int h = 0; h < n_q; ++h)
    for (int i = w; i < T_; ++i) {
      std::vector<double> P(static_cast<size_t>(i) + 1);
      double mx = -INFINITY;
      for (int j = 0; j <= i; ++j) {
        double dot = 0;
        for (int d = 0; d < hd; ++d)
          dot += qd[(size_t(i) * n_q + h) * hd + d] * kd[(size_t(j) * n_kv + h / g) * hd + d];
        P[size_t(j)] = scale * dot;
        mx = std::max(mx, P[size_t(j)]);
      }
      double sum = 0;
      for (double& x : P) sum += (x = std::exp(x - mx));
      double r = 0, s = 0, dist = 0;
      for (int j = 0; j <= i; ++j) {
        const double pr = P[size_t(j)] / sum;
        if (j > i - w) r += pr;
        if (j < sink) s += pr;
        dist += pr * (i - j);
      }
      ref[size_t(h)].recency_sum += r;
      ref[size_t(h)].sink_sum += s;
      ref[size_t(h)].distance_sum += dist;
      ref[size_t(h)].queries += 1;
    }
}

template <class T>
void check_stats(int n_q, int n_kv, int hd, std::vector<int> lengths, int w, CpuExec exec) {
  std::vector<RecencyHeadStats> ours(static_cast<size_t>(n_q)), ref(static_cast<size_t>(n_q));
  for (int T_ : lengths) {
    INFO("sequence of " << T_ << " tokens");
    // Keys with a growing bias along one direction so some heads lean on recent tokens.
    auto q = rftest::random_vector<T>(size_t(T_) * n_q * hd, -2, 2);
    auto k = rftest::random_vector<T>(size_t(T_) * n_kv * hd, -2, 2);
    reference(q, k, T_, n_q, n_kv, hd, w, 4, ref);
    RecencyScoreParams<T> p;
    p.q = make_view<const T>(q.data(), {T_, n_q, hd});
    p.k = make_view<const T>(k.data(), {T_, n_kv, hd});
    p.stats = make_view<RecencyHeadStats>(ours.data(), {n_q});
    p.window = w;
    recency_score(p, exec);
  }
  for (int h = 0; h < n_q; ++h) {
    INFO("head " << h);
    REQUIRE(ours[size_t(h)].queries == ref[size_t(h)].queries);
    // fp32 logits and exp on the same rounded inputs: each r_i is good to ~1e-6 relative; the
    // sums add up to ~100 rows, hence 4x the fp32 budget.
    const double got[3] = {ours[size_t(h)].recency_sum, ours[size_t(h)].sink_sum, ours[size_t(h)].distance_sum};
    const double want[3] = {ref[size_t(h)].recency_sum, ref[size_t(h)].sink_sum, ref[size_t(h)].distance_sum};
    rftest::check_close("recency, sink, distance sums", got, want, 3, 4 * rftest::Tolerance<float>::rel,
                        4 * rftest::Tolerance<float>::abs * (1 + ref[size_t(h)].queries));
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("recency_score: matches a materialised P, accumulated over sequences", "[recency]",
                        rftest::StorageTypes) {
  ThreadPool pool(2);
  rftest::for_each_isa([&] {
    for (int hd : {64, 128}) {
      INFO("hd " << hd);
      check_stats<TestType>(4, 2, hd, {1, 16, 17, 50, 70}, 16, CpuExec{&pool});
      check_stats<TestType>(3, 1, hd, {33, 40}, 5, CpuExec{});
      check_stats<TestType>(2, 2, hd, {8}, 1, CpuExec{&pool});  // w = 1: only the diagonal
    }
  });
}

TEST_CASE("recency_score: identical results for any thread count", "[recency]") {
  const int T_ = 90, n_q = 8, n_kv = 2, hd = 64;
  auto q = rftest::random_vector<float>(size_t(T_) * n_q * hd);
  auto k = rftest::random_vector<float>(size_t(T_) * n_kv * hd);
  std::vector<RecencyHeadStats> a(n_q), b(n_q);
  RecencyScoreParams<float> p;
  p.q = make_view<const float>(q.data(), {T_, n_q, hd});
  p.k = make_view<const float>(k.data(), {T_, n_kv, hd});
  p.stats = make_view<RecencyHeadStats>(a.data(), {n_q});
  recency_score(p, CpuExec{});
  ThreadPool pool(2);
  p.stats = make_view<RecencyHeadStats>(b.data(), {n_q});
  recency_score(p, CpuExec{&pool});
  for (int h = 0; h < n_q; ++h) {
    REQUIRE(a[size_t(h)].recency_sum == b[size_t(h)].recency_sum);
    REQUIRE(a[size_t(h)].distance_sum == b[size_t(h)].distance_sum);
    REQUIRE(a[size_t(h)].queries == T_ - 16);
    REQUIRE(a[size_t(h)].score() > 0);
    REQUIRE(a[size_t(h)].score() < 1);
  }
}

TEST_CASE("recency_score: bad input throws and leaves the stats untouched", "[recency]") {
  std::vector<float> q(20 * 4 * 64, 0.5f), k(20 * 2 * 64, 0.5f);
  std::vector<RecencyHeadStats> st(4);
  RecencyScoreParams<float> p;
  p.q = make_view<const float>(q.data(), {20, 4, 64});
  p.k = make_view<const float>(k.data(), {20, 2, 64});
  p.stats = make_view<RecencyHeadStats>(st.data(), {4});
  REQUIRE_NOTHROW(check(p));
  SECTION("k length") {
    auto b = p;
    b.k = make_view<const float>(k.data(), {10, 2, 64});
    REQUIRE_THROWS_WITH(recency_score(b, CpuExec{}), Catch::Contains("recency_score: k has shape"));
  }
  SECTION("stats size") {
    auto b = p;
    b.stats = make_view<RecencyHeadStats>(st.data(), {3});
    REQUIRE_THROWS_WITH(recency_score(b, CpuExec{}), Catch::Contains("recency_score: stats has shape"));
  }
  SECTION("GQA") {
    auto b = p;
    b.k = make_view<const float>(k.data(), {20, 3, 32});
    b.q = make_view<const float>(q.data(), {20, 4, 32});
    REQUIRE_THROWS_WITH(recency_score(b, CpuExec{}), Catch::Contains("multiple of n_kv"));
  }
  SECTION("window") {
    auto b = p;
    b.window = 0;
    REQUIRE_THROWS_WITH(recency_score(b, CpuExec{}), Catch::Contains("window must be >= 1"));
  }
  SECTION("head_dim") {
    auto b = p;
    b.q = make_view<const float>(q.data(), {20, 4, 32});
    b.k = make_view<const float>(k.data(), {20, 2, 32});
    REQUIRE_THROWS_WITH(recency_score(b, CpuExec{}), Catch::Contains("supported: 64, 128"));
  }
  for (const auto& s : st) REQUIRE(s.queries == 0);
}

TEST_CASE("group_recency: mean and min of the group's query heads", "[recency]") {
  std::vector<RecencyHeadStats> heads(6);
  const double scores[6] = {0.9, 0.5, 0.2, 0.4, 0.7, 0.1};
  for (int h = 0; h < 6; ++h) heads[size_t(h)] = {scores[h] * 10, 0, 0, 10};
  const GroupRecency g = group_recency(heads, 3);
  REQUIRE(g.mean[0] == Approx(0.7));
  REQUIRE(g.mean[1] == Approx(0.3));
  REQUIRE(g.mean[2] == Approx(0.4));
  REQUIRE(g.min[0] == Approx(0.5));
  REQUIRE(g.min[1] == Approx(0.2));
  REQUIRE(g.min[2] == Approx(0.1));
  REQUIRE_THROWS_WITH(group_recency(heads, 4), Catch::Contains("not a multiple"));
}

TEST_CASE("select_head_layout: ratio, threshold, minimum per layer, ties", "[recency]") {
  using K = HeadKind;
  const std::vector<std::vector<double>> s = {{0.9, 0.1, 0.8, 0.3}, {0.95, 0.85, 0.2, 0.4}};
  auto kinds = [](const HeadLayout& l) {
    std::vector<std::vector<K>> r;
    for (const auto& layer : l.layers) r.push_back(layer.groups);
    return r;
  };
  SECTION("ratio 0.5: the top 4 of 8") {
    REQUIRE(kinds(select_head_layout(s)) ==
            std::vector<std::vector<K>>{{K::recurrent, K::attention, K::recurrent, K::attention},
                                        {K::recurrent, K::recurrent, K::attention, K::attention}});
  }
  SECTION("ratio 0.3: floor(2.4) = 2") {
    HeadSelection sel;
    sel.ratio = 0.3;
    const HeadLayout l = select_head_layout(s, sel);
    REQUIRE(l.count(K::recurrent) == 2);
    REQUIRE(l.layers[0].groups[0] == K::recurrent);
    REQUIRE(l.layers[1].groups[0] == K::recurrent);
  }
  SECTION("threshold") {
    HeadSelection sel;
    sel.rule = HeadSelection::Rule::threshold;
    sel.threshold = 0.85;  // inclusive
    REQUIRE(kinds(select_head_layout(s, sel)) ==
            std::vector<std::vector<K>>{{K::recurrent, K::attention, K::attention, K::attention},
                                        {K::recurrent, K::recurrent, K::attention, K::attention}});
  }
  SECTION("minimum attention groups per layer: the quota moves to the next layer") {
    HeadSelection sel;
    sel.ratio = 0.75;  // 6 of 8
    sel.min_attention_per_layer = 2;
    const HeadLayout l = select_head_layout(s, sel);
    REQUIRE(l.layers[0].count(K::attention) == 2);
    REQUIRE(l.layers[1].count(K::attention) == 2);
    REQUIRE(l.count(K::recurrent) == 4);  // the rule could not reach 6
    REQUIRE(l.layers[1].groups[3] == K::attention);
  }
  SECTION("ties: lower layer first, then lower group") {
    const std::vector<std::vector<double>> t = {{0.5, 0.5}, {0.5, 0.5}};
    HeadSelection sel;
    sel.ratio = 0.5;
    REQUIRE(kinds(select_head_layout(t, sel)) ==
            std::vector<std::vector<K>>{{K::recurrent, K::recurrent}, {K::attention, K::attention}});
    sel.min_attention_per_layer = 1;
    REQUIRE(kinds(select_head_layout(t, sel)) ==
            std::vector<std::vector<K>>{{K::recurrent, K::attention}, {K::recurrent, K::attention}});
  }
  SECTION("bad input") {
    REQUIRE_THROWS_WITH(select_head_layout({{0.1, 0.2}, {0.3}}), Catch::Contains("layer 1 has 1 groups"));
    REQUIRE_THROWS_WITH(select_head_layout({{0.1, NAN}}), Catch::Contains("NaN"));
    HeadSelection sel;
    sel.ratio = 1.5;
    REQUIRE_THROWS_WITH(select_head_layout(s, sel), Catch::Contains("ratio must be in [0, 1]"));
    sel.ratio = 0.5;
    sel.min_attention_per_layer = 5;
    REQUIRE_THROWS_WITH(select_head_layout(s, sel), Catch::Contains("min_attention_per_layer"));
    REQUIRE_THROWS_WITH(select_head_layout({}), Catch::Contains("no layers"));
  }
}
