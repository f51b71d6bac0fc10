// The perplexity protocol on a stub logits source with known probabilities, computed by hand.
#include <cmath>

#include "recurformer/model/perplexity.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {
// A "model" over a 4-token vocabulary that predicts the next token with probability p_hit for
// token (prev + 1) % 4 and spreads the rest evenly; it records what it was asked.
struct Stub {
  double p_hit = 0.7;
  std::vector<std::vector<int32_t>> seen;
  void operator()(const int32_t* t, int n, float* logits) {
    seen.emplace_back(t, t + n);
    for (int i = 0; i < n; ++i)
      for (int v = 0; v < 4; ++v)
        logits[i * 4 + v] = float(std::log(v == (t[i] + 1) % 4 ? p_hit : (1 - p_hit) / 3));
  }
};
}  // namespace

TEST_CASE("perplexity follows llama.cpp's chunking, BOS and scoring", "[perplexity]") {
  // 21 tokens, n_ctx 8: 2 chunks (tokens 0..7, 8..15), the tail is dropped.
  std::vector<int32_t> tok = {3, 0, 1, 2, 3, 2, 1, 0, 3, 0, 1, 1, 2, 3, 0, 2, 1, 1, 1, 1, 1};
  Stub stub;
  std::vector<double> progress;
  auto r = perplexity(tok, 8, 4, /*bos=*/3,
                      [&](const int32_t* t, int n, float* l) { stub(t, n, l); },
                      [&](int, double p) { progress.push_back(p); });
  REQUIRE(stub.seen.size() == 2);
  CHECK(stub.seen[0] == std::vector<int32_t>{3, 0, 1, 2, 3, 2, 1, 0});
  CHECK(stub.seen[1] == std::vector<int32_t>{3, 0, 1, 1, 2, 3, 0, 2});  // first token -> BOS
  // scored: positions 4, 5, 6 of each chunk predicting the token after them.
  // chunk 0: 3->2 miss, 2->1 miss, 1->0 miss; chunk 1: 2->3 hit, 3->0 hit, 0->2 miss.
  const double hit = -std::log(0.7), miss = -std::log(0.1);
  const double l[] = {miss, miss, miss, hit, hit, miss};
  double m = 0, m2 = 0;
  for (double x : l) m += x / 6, m2 += x * x / 6;
  const double se = std::sqrt((m2 - m * m) / 5);
  CHECK(r.n_chunks == 2);
  CHECK(r.n_scored == 6);
  CHECK(r.mean_nll == Approx(m).epsilon(1e-6));
  CHECK(r.ppl == Approx(std::exp(m)).epsilon(1e-6));
  CHECK(r.ppl_error == Approx(se * std::exp(m)).epsilon(1e-6));
  REQUIRE(progress.size() == 2);
  CHECK(progress[0] == Approx(10.0).epsilon(1e-5));  // three misses: exp(-log 0.1)
  CHECK(progress[1] == Approx(r.ppl).epsilon(1e-9));
}

TEST_CASE("perplexity without BOS keeps the chunks as they are; bad input throws", "[perplexity]") {
  std::vector<int32_t> tok = {1, 2, 3, 0, 1, 2, 3, 0};
  Stub stub;
  stub.p_hit = 0.25;  // uniform: PPL = 4 exactly, zero spread
  auto r = perplexity(tok, 4, 4, -1, [&](const int32_t* t, int n, float* l) { stub(t, n, l); });
  CHECK(stub.seen[1][0] == 1);
  CHECK(r.ppl == Approx(4.0).epsilon(1e-6));
  CHECK(r.ppl_error == 0.0);
  auto noop = [](const int32_t*, int, float*) {};
  CHECK_THROWS_WITH(perplexity(tok, 8, 4, -1, noop), Catch::Contains("at least 2 * ctx-size"));
  CHECK_THROWS_AS(perplexity(tok, 2, 4, -1, noop), Error);
  std::vector<int32_t> bad = {1, 9, 3, 0, 1, 2, 3, 0};
  CHECK_THROWS_WITH(perplexity(bad, 4, 4, -1, [&](const int32_t* t, int n, float* l) { stub(t, n, l); }),
                    Catch::Contains("outside the vocabulary"));
}

TEST_CASE("the long-range probe scores exactly the verbatim copies", "[perplexity]") {
  const std::vector<int32_t> tok = {1, 3, 0, 2, 2, 1, 0, 3, 3, 3};  // two blocks of 4, a tail of 2
  const std::vector<int32_t> rep = repeat_halves(tok, 8);
  CHECK(rep == std::vector<int32_t>{1, 3, 0, 2, 1, 3, 0, 2, 2, 1, 0, 3, 2, 1, 0, 3});
  // A copier that predicts token i from token i - 3 (the same place in the first copy) with p 0.9
  // is right on every scored position of the probe, and at chance on text without repeats.
  auto copier = [](const int32_t* t, int n, float* l) {
    for (int i = 0; i < n; ++i)
      for (int v = 0; v < 4; ++v) l[i * 4 + v] = float(std::log(i >= 3 && v == t[i - 3] ? 0.9 : i >= 3 ? 0.1 / 3 : 0.25));
  };
  CHECK(perplexity(rep, 8, 4, -1, copier).ppl == Approx(1 / 0.9).epsilon(1e-6));
  CHECK(perplexity(tok, 4, 4, -1, copier).ppl > 2.0);
  CHECK_THROWS_WITH(repeat_halves(tok, 7), Catch::Contains("must be even"));
}
