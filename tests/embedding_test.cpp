// embedding: exact gather (storage -> storage conversion is exact to fp32 and rounds once to a
// narrower type) in every table/output dtype pair and ISA, widths 1, not multiples of 16, strided
// rows and ids, repeated ids; out-of-range ids and bad shapes throw before anything is written.
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "recurformer/cpu/embedding.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

template <class T_, class TW_>
struct Pair {
  using T = T_;
  using TW = TW_;
};
using Pairs = std::tuple<Pair<float, float>, Pair<half, half>, Pair<bfloat16, bfloat16>,
                         Pair<float, half>, Pair<float, bfloat16>, Pair<half, float>,
                         Pair<bfloat16, float>>;

template <class T, class TW>
void run_embedding(int64_t vocab, int64_t d, int64_t tokens, bool strided) {
  const int64_t ldt = d + (strided ? 3 : 0), ldo = d + (strided ? 2 : 0), ids_stride = strided ? 2 : 1;
  const auto table = rftest::random_vector<TW>(size_t(vocab * ldt));
  std::vector<int32_t> ids(size_t(tokens * ids_stride), -1);
  for (int64_t t = 0; t < tokens; ++t) ids[size_t(t * ids_stride)] = int32_t((t * 7 + 3) % vocab);
  std::vector<double> expected(size_t(tokens * d));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < d; ++i)  // the reference rounds the table value to T once
      expected[size_t(t * d + i)] = double(float(T(float(table[size_t(ids[size_t(t * ids_stride)] * ldt + i)]))));
  const T sentinel(7.f);
  rftest::for_each_isa([&] {
    std::vector<T> out(size_t(tokens * ldo), sentinel);
    EmbeddingParams<T, TW> p;
    p.table = make_strided_view(table.data(), {vocab, d}, {ldt, 1});
    p.ids = make_strided_view<const int32_t>(ids.data(), {tokens}, {ids_stride});
    p.out = make_strided_view(out.data(), {tokens, d}, {ldo, 1});
    embedding(p, CpuExec{&pool()});
    std::vector<T> got(size_t(tokens * d));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < d; ++i) got[size_t(t * d + i)] = out[size_t(t * ldo + i)];
    rftest::check_close("embedding d=" + std::to_string(d), got, expected, 0.0, 0.0);  // exact
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = d; i < ldo; ++i)
        REQUIRE(std::memcmp(&out[size_t(t * ldo + i)], &sentinel, sizeof sentinel) == 0);
  });
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("embedding gathers rows exactly", "[embedding]", Pairs) {
  using T = typename TestType::T;
  using TW = typename TestType::TW;
  for (int64_t d : {1, 15, 16, 17, 33, 70})
    for (int64_t tokens : {1, 2, 9}) {
      INFO("tokens " << tokens << ", d " << d);
      run_embedding<T, TW>(5, d, tokens, false);  // 9 tokens over 5 rows: repeated ids
      run_embedding<T, TW>(11, d, tokens, true);
    }
}

TEST_CASE("embedding rejects out-of-range ids and bad shapes, leaving out untouched", "[embedding]") {
  const int64_t vocab = 6, d = 5, tokens = 4;
  auto table = rftest::random_vector<bfloat16>(size_t(vocab * d));
  std::vector<int32_t> ids = {0, 5, 2, 1};
  std::vector<float> out(size_t(tokens * d), 7.f);
  auto good = [&] {
    EmbeddingParams<float, bfloat16> p;
    p.table = make_view<const bfloat16>(table.data(), {vocab, d});
    p.ids = make_view<const int32_t>(ids.data(), {tokens});
    p.out = make_view(out.data(), {tokens, d});
    return p;
  };
  auto expect_throw = [&](const EmbeddingParams<float, bfloat16>& p, const char* what) {
    INFO(what);
    try {
      embedding(p, CpuExec{&pool()});
      FAIL("no throw");
    } catch (const Error& e) {
      const std::string msg = e.what();
      INFO(msg);
      REQUIRE(msg.rfind("embedding: ", 0) == 0);
      REQUIRE(msg.find(what) != std::string::npos);
    }
    for (float v : out) REQUIRE(v == 7.f);
  };
  ids[3] = 6;  // the last id is out of range: the earlier rows must not be written either
  expect_throw(good(), "ids[3] = 6 is outside the vocabulary [0, 6)");
  ids[3] = -1;
  expect_throw(good(), "ids[3] = -1");
  ids[3] = 1;
  auto p = good();
  p.out = make_view(out.data(), {tokens, d - 1});
  expect_throw(p, "out has shape");
  p = good();
  p.ids = make_view<const int32_t>(ids.data(), {tokens - 1});
  expect_throw(p, "out has shape");
  p = good();
  p.table.data = nullptr;
  expect_throw(p, "table is required");
  REQUIRE_NOTHROW(embedding(good(), CpuExec{&pool()}));
  REQUIRE(out[size_t(1 * d)] == float(table[size_t(5 * d)]));
}
