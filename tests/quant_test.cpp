// Quantised GGUF blocks (core/quant.hpp): every type decodes bit for bit as the `gguf` Python
// package does (tests/data/quant/blocks.gguf, written once by tools/make_quant_fixtures.py), the
// block layouts match ggml's sizes, and files with bad quantised tensors (a row that is not whole
// blocks, truncated block bytes, a non-finite scale) get a one-line Error naming the tensor.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "recurformer/core/quant.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/gguf.hpp"
#include "support/temp_dir.hpp"

using namespace recurformer;

namespace {

const std::string kFixture = std::string(RECURFORMER_TEST_DATA_DIR) + "/quant/blocks.gguf";

const char* const kTypes[] = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K",
                              "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"};

std::string parse_error(const std::vector<uint8_t>& b) {
  try {
    GgufFile::parse({b.data(), b.size()}, "q.gguf");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("every quantised type decodes bit for bit as gguf.quants.dequantize", "[quant]") {
  const GgufFile f = GgufFile::open(kFixture);
  int checked = 0;
  for (const char* name : kTypes) {
    INFO("type " << name);
    const GgufTensorInfo* q = f.find_tensor(name);
    const GgufTensorInfo* want = f.find_tensor(std::string(name) + ".expected");
    REQUIRE(q);
    REQUIRE(want);
    CHECK(std::string(ggml_type_name(q->type)) == name);
    REQUIRE(want->type == GgmlType::f32);
    REQUIRE(q->ne == want->ne);
    REQUIRE(q->ne.size() == 2);
    const int64_t cols = q->ne[0], rows = q->ne[1];
    const GgmlTypeTraits tt = ggml_type_traits(q->type);
    REQUIRE(q->nbytes == size_t(rows * cols / tt.block * tt.bytes));
    std::vector<float> got(static_cast<size_t>(cols));
    std::vector<float> ref(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(q->type, q->data + r * (cols / tt.block * tt.bytes), cols, got.data());
      std::memcpy(ref.data(), want->data + r * cols * 4, size_t(cols) * 4);
      int64_t mismatches = 0, first = -1;
      for (int64_t i = 0; i < cols; ++i)
        if (std::memcmp(&got[size_t(i)], &ref[size_t(i)], 4) != 0 && mismatches++ == 0) first = i;
      INFO("row " << r << ": first mismatch at " << first << ": " << (first >= 0 ? got[size_t(first)] : 0.f)
                  << " vs " << (first >= 0 ? ref[size_t(first)] : 0.f));
      CHECK(mismatches == 0);
    }
    ++checked;
  }
  CHECK(checked == 12);
}

TEST_CASE("block structs have ggml's sizes and the traits agree", "[quant]") {
  const std::pair<GgmlType, GgmlTypeTraits> want[] = {
      {GgmlType::q4_0, {32, 18}},  {GgmlType::q4_1, {32, 20}},   {GgmlType::q5_0, {32, 22}},
      {GgmlType::q5_1, {32, 24}},  {GgmlType::q8_0, {32, 34}},   {GgmlType::q2_k, {256, 84}},
      {GgmlType::q3_k, {256, 110}}, {GgmlType::q4_k, {256, 144}}, {GgmlType::q5_k, {256, 176}},
      {GgmlType::q6_k, {256, 210}}, {GgmlType::iq4_nl, {32, 18}}, {GgmlType::iq4_xs, {256, 136}},
      {GgmlType::f32, {1, 4}},     {GgmlType::f16, {1, 2}},      {GgmlType::bf16, {1, 2}}};
  for (const auto& w : want) {
    INFO(ggml_type_name(w.first));
    CHECK(ggml_type_traits(w.first).block == w.second.block);
    CHECK(ggml_type_traits(w.first).bytes == w.second.bytes);
    CHECK(is_quantized(w.first) == (w.second.block > 1));
  }
  for (uint32_t t : {4u, 5u, 9u, 15u, 16u, 19u, 29u, 31u, 1000u}) {
    INFO(t);
    CHECK(ggml_type_traits(GgmlType(t)).block == 0);
    CHECK_FALSE(is_quantized(GgmlType(t)));
  }
  REQUIRE_THROWS_WITH(dispatch_quant(GgmlType(15), [](auto) {}),
                      Catch::Contains("quantised type Q8_K (15) is not supported"));
  std::vector<float> out(64);
  const std::vector<uint8_t> blocks(2 * 18, 0);
  REQUIRE_THROWS_WITH(dequantize_row(GgmlType::q4_0, blocks.data(), 40, out.data()),
                      "dequantize: 40 weights are not whole Q4_0 blocks of 32");
}

TEST_CASE("K-quant scales decode a word at a time as ggml's byte-at-a-time unpacking", "[quant]") {
  // The references, a byte at a time as ggml writes them: get_scale_min_k4 (Q4_K / Q5_K), and
  // Q3_K's scale k: low nibble k / 8 of byte k % 8, high bit pair k / 4 of byte 8 + k % 4, less 32.
  auto k4_scale_min = [](const uint8_t* s, int j, int& sc, int& mn) {
    sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  };
  auto k3_scale = [](const uint8_t* s, int k) {
    return (((s[k % 8] >> (4 * (k / 8))) & 0x0F) | ((s[8 + k % 4] >> (2 * (k / 4))) & 3) << 4) - 32;
  };
  // each of the 12 bytes takes each of its 256 values once (37 is odd), beside different neighbours
  for (int v = 0; v < 256; ++v) {
    uint8_t s[12];
    for (int i = 0; i < 12; ++i) s[i] = uint8_t(v * 37 + i * 101);
    uint8_t sc[8], mn[8];
    detail::k4_scales_mins(s, sc, mn);
    for (int j = 0; j < 8; ++j) {
      int sc1, mn1;
      k4_scale_min(s, j, sc1, mn1);
      CAPTURE(v, j);
      REQUIRE(int(sc[j]) == sc1);
      REQUIRE(int(mn[j]) == mn1);
    }
    int k3[16];
    detail::k3_scales(s, k3);
    for (int k = 0; k < 16; ++k) {
      CAPTURE(v, k);
      REQUIRE(k3[k] == k3_scale(s, k));
    }
  }
}

TEST_CASE("GGUF files with bad quantised tensors are rejected naming the tensor", "[quant][gguf]") {
  // Two rows of 256 Q4_K weights: 2 blocks of 144 bytes.
  std::vector<uint8_t> q4k(2 * 144, 0x11);
  SECTION("a row that is not whole blocks") {
    GgufWriter w;
    w.add_tensor("blk.0.attn_q.weight", GgmlType::q4_k, {128, 4}, q4k.data());
    CHECK(parse_error(w.bytes()) ==
          "q.gguf: tensor blk.0.attn_q.weight: Q4_K row length 128 is not a multiple of its block size 256");
  }
  SECTION("block bytes cut short") {
    GgufWriter w;
    w.add_tensor("blk.0.attn_q.weight", GgmlType::q4_k, {256, 2}, q4k.data());
    std::vector<uint8_t> b = w.bytes();
    b.resize(b.size() - 100);
    CHECK_THAT(parse_error(b), Catch::StartsWith("q.gguf: tensor blk.0.attn_q.weight: bytes [0, 288) run past the end"));
  }
  SECTION("an unsupported quantised type is named") {
    GgufWriter w;
    w.add_tensor("x", GgmlType::q4_k, {256}, q4k.data());
    std::vector<uint8_t> b = w.bytes();
    // The tensor info's type field sits right after the name, rank and extent.
    const std::string name = "x";
    auto it = std::search(b.begin(), b.end(), name.begin(), name.end());
    REQUIRE(it != b.end());
    const size_t type_at = size_t(it - b.begin()) + 1 + 4 + 8;
    const uint32_t q8k = 15;
    std::memcpy(&b[type_at], &q8k, 4);
    CHECK_THAT(parse_error(b), Catch::Contains("unsupported tensor type Q8_K (15) for tensor x"));
  }
}

TEST_CASE("a checkpoint refuses a quantised tensor whose scale is not finite", "[quant][checkpoint]") {
  rftest::TempDir dir("rf-quant");
  // A minimal llama GGUF is not needed: the check runs while the tensors are dequantised at open,
  // so a file whose metadata is incomplete fails later; the scale check must come first.
  std::vector<uint8_t> q(2 * 20, 0x21);  // two Q4_1 blocks
  const uint16_t inf_bits = 0x7c00;
  std::memcpy(&q[20 + 2], &inf_bits, 2);  // block 1's min m = inf
  GgufWriter w;
  w.set("general.architecture", GgufValue::str("llama"));
  w.add_tensor("blk.0.attn_q.weight", GgmlType::q4_1, {64}, q.data());
  const std::string path = dir.file("bad.gguf");
  w.write(path);
  REQUIRE_THROWS_WITH(Checkpoint::open(path),
                      path + ": tensor blk.0.attn_q.weight (Q4_1): block 1 decodes to a non-finite weight "
                             "(its scale is inf or NaN)");
  // Without keeping the decodings the blocks are checked a slice of 4096 blocks at a time: a bad
  // block past the first slice is found and named all the same.
  std::vector<uint8_t> big(8200 * 20, 0x21);
  std::memcpy(&big[8195 * 20 + 2], &inf_bits, 2);
  GgufWriter w2;
  w2.set("general.architecture", GgufValue::str("llama"));
  w2.add_tensor("blk.0.attn_q.weight", GgmlType::q4_1, {8200 * 32}, big.data());
  const std::string path2 = dir.file("bad2.gguf");
  w2.write(path2);
  for (bool keep : {true, false}) {
    INFO("decode_quantised " << keep);
    REQUIRE_THROWS_WITH(Checkpoint::open(path2, CheckpointOptions{keep}),
                        path2 + ": tensor blk.0.attn_q.weight (Q4_1): block 8195 decodes to a non-finite weight "
                                "(its scale is inf or NaN)");
  }
}
