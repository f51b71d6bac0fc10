// Sampling: greedy is the arg-max, top-k / top-p keep exactly the documented support, the draw
// follows the candidate probabilities, and a seed reproduces a run.
#include <map>

#include "recurformer/model/sampling.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

TEST_CASE("argmax picks the largest logit, lowest id on ties", "[sampling]") {
  const auto v = rftest::random_vector<float>(1000, -5, 5);
  int64_t best = 0;
  for (int64_t i = 0; i < 1000; ++i)
    if (v[size_t(i)] > v[size_t(best)]) best = i;
  CHECK(argmax(v.data(), 1000) == best);
  const float tie[] = {1.f, 3.f, 2.f, 3.f};
  CHECK(argmax(tie, 4) == 1);
  const float one[] = {-7.f};
  CHECK(argmax(one, 1) == 0);
  CHECK_THROWS_AS(argmax(one, 0), Error);
  Sampler greedy(SamplingParams{0.f, 40, 0.9f, 1});
  CHECK(greedy.sample(v.data(), 1000) == best);
}

TEST_CASE("top-k and top-p keep the documented support", "[sampling]") {
  // probabilities (T = 1): softmax of log p = p itself.
  const double p[] = {0.05, 0.4, 0.1, 0.3, 0.15};
  float logits[5];
  for (int i = 0; i < 5; ++i) logits[i] = float(std::log(p[i]));
  SamplingParams sp{1.f, 0, 1.f, 1};
  auto all = sampling_candidates(logits, 5, sp);
  REQUIRE(all.size() == 5);
  CHECK(all[0].id == 1);
  CHECK(all[4].id == 0);
  for (const auto& t : all) CHECK(t.p == Approx(p[t.id]).epsilon(1e-5));
  sp.top_k = 2;
  auto k2 = sampling_candidates(logits, 5, sp);
  REQUIRE(k2.size() == 2);
  CHECK(k2[0].id == 1);
  CHECK(k2[1].id == 3);
  CHECK(k2[0].p == Approx(0.4 / 0.7).epsilon(1e-5));
  // top-p 0.8: 0.4 + 0.3 = 0.7 < 0.8, + 0.15 = 0.85 >= 0.8 -> three tokens.
  sp.top_k = 0;
  sp.top_p = 0.8f;
  auto p3 = sampling_candidates(logits, 5, sp);
  REQUIRE(p3.size() == 3);
  CHECK(p3[2].id == 4);
  CHECK(p3[2].p == Approx(0.15 / 0.85).epsilon(1e-5));
  // a tiny top-p keeps the best token only
  sp.top_p = 0.01f;
  CHECK(sampling_candidates(logits, 5, sp).size() == 1);
  // temperature 0.5 squares the kept probabilities before renormalising
  sp.top_p = 1.f;
  sp.top_k = 2;
  sp.temperature = 0.5f;
  auto t2 = sampling_candidates(logits, 5, sp);
  CHECK(t2[0].p == Approx(0.16 / (0.16 + 0.09)).epsilon(1e-5));
  sp.temperature = 0.f;
  CHECK_THROWS_AS(sampling_candidates(logits, 5, sp), Error);
}

TEST_CASE("sampling draws only from the support, with the right frequencies, reproducibly", "[sampling]") {
  const double p[] = {0.05, 0.4, 0.1, 0.3, 0.15};
  float logits[5];
  for (int i = 0; i < 5; ++i) logits[i] = float(std::log(p[i]));
  Sampler s(SamplingParams{1.f, 3, 1.f, 42});
  std::map<int, int> n;
  const int draws = 20000;
  std::vector<int> first;
  for (int i = 0; i < draws; ++i) {
    const int id = s.sample(logits, 5);
    n[id]++;
    if (i < 50) first.push_back(id);
  }
  CHECK(n.count(0) == 0);
  CHECK(n.count(2) == 0);
  // expected 0.4/0.85 etc; 20000 draws: sd of a frequency <= 0.0036, allow 4 sd.
  CHECK(double(n[1]) / draws == Approx(0.4 / 0.85).margin(0.015));
  CHECK(double(n[3]) / draws == Approx(0.3 / 0.85).margin(0.015));
  CHECK(double(n[4]) / draws == Approx(0.15 / 0.85).margin(0.015));
  Sampler again(SamplingParams{1.f, 3, 1.f, 42});
  std::vector<int> second;
  for (int i = 0; i < 50; ++i) second.push_back(again.sample(logits, 5));
  CHECK(first == second);
  Sampler other(SamplingParams{1.f, 3, 1.f, 43});
  std::vector<int> third;
  for (int i = 0; i < 50; ++i) third.push_back(other.sample(logits, 5));
  CHECK(first != third);
}
