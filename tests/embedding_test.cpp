// embedding: exact gather (storage -> storage conversion is exact to fp32 and rounds once to a
// narrower type) in every table/output dtype pair and ISA, widths 1, not multiples of 16, strided
// rows and ids, repeated ids; out-of-range ids and bad shapes throw before anything is written.
// A GGUF block-quantised table, every type, gathers gguf.quants.dequantize's rows bit for bit.
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "recurformer/cpu/embedding.hpp"
#include "recurformer/model/gguf.hpp"
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

TEST_CASE("embedding gathers a block-quantised table's rows as the gguf package decodes them", "[embedding][quant]") {
  // tests/data/quant/blocks.gguf: per type a [3, 512] table and its decoding by gguf.quants.dequantize
  const GgufFile f = GgufFile::open(std::string(RECURFORMER_TEST_DATA_DIR) + "/quant/blocks.gguf");
  const CpuExec exec{&pool()};
  int types = 0;
  for (const GgufTensorInfo& t : f.tensors()) {
    if (t.type == GgmlType::f32) continue;  // the expected decodings
    const GgufTensorInfo* want = f.find_tensor(t.name + ".expected");
    REQUIRE(want);
    const int64_t vocab = t.ne[1], d = t.ne[0];
    const float* expected = reinterpret_cast<const float*>(want->data);
    const std::vector<int32_t> ids = {2, 0, 1, 1, 2, 0, 2};
    const int64_t T = int64_t(ids.size()), ldo = d + 5;  // strided out rows: the padding stays put
    std::vector<float> out(size_t(T * ldo), 7.f);
    const std::vector<float> shape_only(1);
    EmbeddingParams<float, float> p{make_strided_view(shape_only.data(), {vocab, d}, {0, 1}),
                                    make_view<const int32_t>(ids.data(), {T}),
                                    make_strided_view(out.data(), {T, d}, {ldo, 1})};
    const BlockWeight blocks{t.data, t.type};
    INFO(ggml_type_name(t.type));
    REQUIRE(bool(supports(p, blocks, exec)));
    embedding(p, blocks, exec);
    for (int64_t r = 0; r < T; ++r) {
      REQUIRE(std::memcmp(&out[size_t(r * ldo)], expected + ids[size_t(r)] * d, size_t(d) * sizeof(float)) == 0);
      for (int64_t i = d; i < ldo; ++i) REQUIRE(out[size_t(r * ldo + i)] == 7.f);
    }
    ++types;
  }
  CHECK(types == 12);
  // A width that is not whole blocks, and a type that is not a block type, throw before writing.
  const BlockWeight q4{f.find_tensor("Q4_0")->data, GgmlType::q4_0};
  const std::vector<float> shape_only(1);
  const std::vector<int32_t> ids = {0};
  std::vector<float> out(48, 7.f);
  EmbeddingParams<float, float> p{make_strided_view(shape_only.data(), {3, 48}, {0, 1}),
                                  make_view<const int32_t>(ids.data(), {1}), make_view(out.data(), {1, 48})};
  REQUIRE_THROWS_WITH(embedding(p, q4, exec), "embedding: d = 48 is not whole Q4_0 blocks of 32");
  CHECK_FALSE(bool(supports(p, q4, exec)));
  p.table.shape[1] = 32, p.out.shape[1] = 32;
  REQUIRE_THROWS_WITH(embedding(p, BlockWeight{q4.data, GgmlType::f16}, exec),
                      "embedding: block weights of type F16 are not a GGUF block type");
  for (float v : out) REQUIRE(v == 7.f);
}
