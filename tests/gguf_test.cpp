// GGUF: writer -> reader round trips of every metadata value type and of F32/F16/BF16/Q8_0 tensors,
// Q8_0 (de)quantisation against a double reference, the tokenizer metadata, and broken files
// (truncation at every byte, lying counts and lengths, bad types, offsets, alignment) rejected
// with a one-line Error naming the file.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "recurformer/model/gguf.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

namespace fs = std::filesystem;
using namespace recurformer;

namespace {

// Every TempDir of this file is named after it.
struct TempDir : rftest::TempDir {
  TempDir() : rftest::TempDir("rf-gguf") {}
};

std::string parse_error(const std::vector<uint8_t>& b, const std::string& source = "m.gguf") {
  try {
    GgufFile::parse({b.data(), b.size()}, source);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Little-endian byte building for hand-made (broken) files.
struct Bytes {
  std::vector<uint8_t> b;
  template <class T>
  Bytes& put(T v) {
    const size_t n = b.size();
    b.resize(n + sizeof v);
    std::memcpy(b.data() + n, &v, sizeof v);
    return *this;
  }
  Bytes& str(const std::string& s) {
    put<uint64_t>(s.size());
    const size_t n = b.size();
    b.resize(n + s.size());
    std::memcpy(b.data() + n, s.data(), s.size());
    return *this;
  }
  Bytes& head(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b = {'G', 'G', 'U', 'F'};
    return put<uint32_t>(version).put<uint64_t>(n_tensors).put<uint64_t>(n_kv);
  }
  Bytes& pad(size_t align) {
    b.resize((b.size() + align - 1) / align * align, 0);
    return *this;
  }
};

}  // namespace

TEST_CASE("GGUF metadata of every value type round trips", "[gguf]") {
  GgufWriter w;
  w.set("u8", GgufValue::of(GgufValueType::uint8, 250));
  w.set("i8", GgufValue::of(GgufValueType::int8, -100));
  w.set("u16", GgufValue::of(GgufValueType::uint16, 65000));
  w.set("i16", GgufValue::of(GgufValueType::int16, -32000));
  w.set("u32", GgufValue::u32(4000000000u));
  w.set("i32", GgufValue::i32(-2000000000));
  w.set("f32", GgufValue::f32(0.1f));
  w.set("bool", GgufValue::boolean(true));
  w.set("str", GgufValue::str("héllo"));
  w.set("u64", GgufValue::u64(uint64_t(1) << 40));
  w.set("i64", GgufValue::of(GgufValueType::int64, -(int64_t(1) << 50)));
  w.set("f64", GgufValue::f64(0.1));
  w.set("strs", GgufValue::str_array({"a", "", "b c"}));
  w.set("i32s", GgufValue::int_array(GgufValueType::int32, {1, -2, 3}));
  w.set("bools", GgufValue::int_array(GgufValueType::boolean, {1, 0}));
  w.set("f32s", GgufValue::float_array(GgufValueType::float32, {0.5, -1.25}));
  GgufValue nested;
  nested.type = GgufValueType::array;
  nested.elem = GgufValueType::array;
  nested.arrays = {GgufValue::int_array(GgufValueType::uint8, {1, 2}), GgufValue::int_array(GgufValueType::uint8, {})};
  w.set("nested", nested);
  w.set("empty", GgufValue::str_array({}));
  const std::vector<uint8_t> bytes = w.bytes();
  const GgufFile f = GgufFile::parse({bytes.data(), bytes.size()}, "mem.gguf");
  CHECK(f.version() == 3);
  CHECK(f.metadata().size() == 18);
  CHECK(f.metadata()[0].first == "u8");  // file order kept
  CHECK(f.get_int("u8") == 250);
  CHECK(f.get_int("i8") == -100);
  CHECK(f.get_int("u16") == 65000);
  CHECK(f.get_int("i16") == -32000);
  CHECK(f.get_int("u32") == 4000000000ll);
  CHECK(f.get_int("i32") == -2000000000);
  CHECK(f.get_float("f32") == double(0.1f));
  CHECK(f.get_bool("bool"));
  CHECK(f.get_string("str") == "héllo");
  CHECK(f.get_int("u64") == int64_t(1) << 40);
  CHECK(f.get_int("i64") == -(int64_t(1) << 50));
  CHECK(f.get_float("f64") == 0.1);
  CHECK(f.get("strs").strings == std::vector<std::string>{"a", "", "b c"});
  CHECK(f.get("i32s").ints == std::vector<int64_t>{1, -2, 3});
  CHECK(f.get("i32s").elem == GgufValueType::int32);
  CHECK(f.get("bools").ints == std::vector<int64_t>{1, 0});
  CHECK(f.get("f32s").floats == std::vector<double>{0.5, -1.25});
  REQUIRE(f.get("nested").arrays.size() == 2);
  CHECK(f.get("nested").arrays[0].ints == std::vector<int64_t>{1, 2});
  CHECK(f.get("empty").array_size() == 0);
  CHECK(f.find("nope") == nullptr);
  REQUIRE_THROWS_WITH(f.get("nope"), "mem.gguf: missing metadata nope");
  REQUIRE_THROWS_WITH(f.get_int("str"), "mem.gguf: metadata str must be an integer");
  REQUIRE_THROWS_WITH(f.get_string("u8"), "mem.gguf: metadata u8 must be a string");
  REQUIRE_THROWS_WITH(f.get_bool("u8"), "mem.gguf: metadata u8 must be a bool");
  REQUIRE_THROWS_WITH(f.get_float("u8"), "mem.gguf: metadata u8 must be a float");
}

TEMPLATE_LIST_TEST_CASE("GGUF tensors round trip through a file at awkward shapes", "[gguf]", rftest::StorageTypes) {
  using T = TestType;
  const GgmlType type = std::is_same<T, float>::value ? GgmlType::f32
                        : std::is_same<T, half>::value ? GgmlType::f16 : GgmlType::bf16;
  TempDir dir;
  for (uint32_t align : {32u, 64u, 8u}) {
    const std::vector<std::vector<int64_t>> nes = {{1}, {17, 3}, {5, 1, 2}, {15}, {2, 2, 2, 3}};
    std::vector<std::vector<T>> values;
    GgufWriter w;
    if (align != 32) w.set("general.alignment", GgufValue::u32(align));
    for (size_t i = 0; i < nes.size(); ++i) {
      int64_t n = 1;
      for (int64_t d : nes[i]) n *= d;
      values.push_back(rftest::random_vector<T>(size_t(n)));
      w.add_tensor("t" + std::to_string(i), type, nes[i], values.back().data());
    }
    const std::string path = dir.file("m.gguf");
    w.write(path);
    const GgufFile f = GgufFile::open(path);
    CHECK(f.alignment() == align);
    CHECK(f.data_offset() % align == 0);
    REQUIRE(f.tensors().size() == nes.size());
    for (size_t i = 0; i < nes.size(); ++i) {
      const GgufTensorInfo* t = f.find_tensor("t" + std::to_string(i));
      REQUIRE(t);
      CHECK(t->type == type);
      CHECK(t->ne == nes[i]);
      CHECK(t->offset % align == 0);
      REQUIRE(t->nbytes == values[i].size() * sizeof(T));
      CHECK(std::memcmp(t->data, values[i].data(), t->nbytes) == 0);
    }
  }
}

TEST_CASE("Q8_0 quantisation and dequantisation match a double reference", "[gguf][q8_0]") {
  for (int64_t blocks : {1, 3, 7}) {
    const int64_t n = blocks * kQ8_0Block;
    auto x = rftest::random_vector<float>(size_t(n), -3.0, 3.0);
    x[5] = 0;  // a zero weight stays zero
    std::vector<uint8_t> q(size_t(blocks * kQ8_0BlockBytes));
    quantize_q8_0(x.data(), n, q.data());
    std::vector<float> y(static_cast<size_t>(n));
    dequantize_q8_0(q.data(), n, y.data());
    for (int64_t b = 0; b < blocks; ++b) {
      double amax = 0;
      for (int64_t i = 0; i < kQ8_0Block; ++i) amax = std::max(amax, std::fabs(double(x[size_t(b * kQ8_0Block + i)])));
      uint16_t d_bits;
      std::memcpy(&d_bits, &q[size_t(b * kQ8_0BlockBytes)], 2);
      const double d = double(float(half::from_bits(d_bits)));
      CHECK(d == Approx(amax / 127).epsilon(1e-3));  // the scale is fp16-rounded
      for (int64_t i = 0; i < kQ8_0Block; ++i) {
        const int8_t qi = int8_t(q[size_t(b * kQ8_0BlockBytes + 2 + i)]);
        const double ref = d * qi;  // the format's definition, in double
        CHECK(double(y[size_t(b * kQ8_0Block + i)]) == Approx(ref).margin(1e-7));
        // and quantisation is to the nearest step: |x - y| <= d/2 (+ the scale's rounding)
        CHECK(std::fabs(double(x[size_t(b * kQ8_0Block + i)]) - ref) <= 0.5 * d + 128 * d * 1e-3);
      }
    }
    CHECK(y[5] == 0.f);
  }
  // A hand-made block: d = 0.5, q = -128..: exact.
  std::vector<uint8_t> blk(kQ8_0BlockBytes);
  const uint16_t d = half(0.5f).bits;
  std::memcpy(blk.data(), &d, 2);
  for (int i = 0; i < 32; ++i) blk[size_t(2 + i)] = uint8_t(int8_t(i * 8 - 128));
  float out[32];
  dequantize_q8_0(blk.data(), 32, out);
  for (int i = 0; i < 32; ++i) CHECK(out[i] == 0.5f * float(i * 8 - 128));
}

TEST_CASE("GGUF Q8_0 tensors are read with their block bytes", "[gguf][q8_0]") {
  const auto x = rftest::random_vector<float>(64 * 3);
  std::vector<uint8_t> q(size_t(6 * kQ8_0BlockBytes));
  quantize_q8_0(x.data(), 64 * 3, q.data());
  GgufWriter w;
  w.add_tensor("q", GgmlType::q8_0, {64, 3}, q.data());
  const auto bytes = w.bytes();
  const GgufFile f = GgufFile::parse({bytes.data(), bytes.size()}, "q.gguf");
  const GgufTensorInfo& t = f.tensors().at(0);
  CHECK(t.type == GgmlType::q8_0);
  CHECK(t.nbytes == q.size());
  CHECK(std::memcmp(t.data, q.data(), q.size()) == 0);
}

TEST_CASE("GGUF tokenizer metadata becomes plain data", "[gguf]") {
  GgufWriter w;
  w.set("tokenizer.ggml.model", GgufValue::str("gpt2"));
  w.set("tokenizer.ggml.pre", GgufValue::str("llama-bpe"));
  w.set("tokenizer.ggml.tokens", GgufValue::str_array({"a", "b", "ab", "<s>"}));
  w.set("tokenizer.ggml.scores", GgufValue::float_array(GgufValueType::float32, {0, -1, -2, 0}));
  w.set("tokenizer.ggml.token_type", GgufValue::int_array(GgufValueType::int32, {1, 1, 1, 3}));
  w.set("tokenizer.ggml.merges", GgufValue::str_array({"a b"}));
  w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(3));
  w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(2));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(true));
  auto bytes = w.bytes();
  const GgufTokenizerData t = GgufFile::parse({bytes.data(), bytes.size()}, "t.gguf").tokenizer_data();
  CHECK(t.model == "gpt2");
  CHECK(t.pre == "llama-bpe");
  CHECK(t.tokens == std::vector<std::string>{"a", "b", "ab", "<s>"});
  CHECK(t.scores == std::vector<float>{0, -1, -2, 0});
  CHECK(t.token_types == std::vector<int32_t>{1, 1, 1, 3});
  CHECK(t.merges == std::vector<std::string>{"a b"});
  CHECK(t.bos == 3);
  CHECK(t.eos == 2);
  CHECK(t.unk == -1);
  CHECK(t.add_bos);
  CHECK(!t.add_eos);

  w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(4));
  bytes = w.bytes();
  REQUIRE_THROWS_WITH(GgufFile::parse({bytes.data(), bytes.size()}, "t.gguf").tokenizer_data(),
                      "t.gguf: metadata tokenizer.ggml.eos_token_id = 4 is not a token id (vocab 4)");
  w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(1));
  w.set("tokenizer.ggml.scores", GgufValue::float_array(GgufValueType::float32, {0}));
  bytes = w.bytes();
  REQUIRE_THROWS_WITH(GgufFile::parse({bytes.data(), bytes.size()}, "t.gguf").tokenizer_data(),
                      Catch::Contains("tokenizer.ggml.scores must be 4 floats"));
}

TEST_CASE("GGUF: a file truncated at any byte is rejected with the file's name", "[gguf][bad]") {
  const auto a = rftest::random_vector<half>(6);
  std::vector<uint8_t> q(kQ8_0BlockBytes, 1);
  GgufWriter w;
  w.set("general.architecture", GgufValue::str("llama"));
  w.set("strs", GgufValue::str_array({"x", "yz"}));
  w.set("f", GgufValue::float_array(GgufValueType::float32, {1, 2}));
  w.add_tensor("a", GgmlType::f16, {3, 2}, a.data());
  w.add_tensor("q", GgmlType::q8_0, {32}, q.data());
  const std::vector<uint8_t> full = w.bytes();
  REQUIRE(parse_error(full).empty());
  // The last tensor ends at the last byte (q is last, 34 bytes, then 30 bytes of padding):
  // every cut before its end must fail.
  const size_t end_of_q = full.size() - 30;
  for (size_t cut = 0; cut < end_of_q; ++cut) {
    INFO("truncated to " << cut << " of " << full.size() << " bytes");
    const std::string e = parse_error(std::vector<uint8_t>(full.begin(), full.begin() + std::ptrdiff_t(cut)), "cut.gguf");
    REQUIRE(e.rfind("cut.gguf: ", 0) == 0);
    CHECK(e.find('\n') == std::string::npos);
  }
}

TEST_CASE("GGUF: bad magic, versions, lying counts, types, offsets and alignment", "[gguf][bad]") {
  Bytes b;
  CHECK(parse_error({'G', 'G', 'U'}) == "m.gguf: not a GGUF file (bad magic)");
  CHECK(parse_error({'G', 'G', 'M', 'L', 3, 0, 0, 0}) == "m.gguf: not a GGUF file (bad magic)");
  CHECK_THAT(parse_error(b.head(0, 0, 1).b), Catch::Contains("unsupported GGUF version 1"));
  CHECK_THAT(parse_error(b.head(0, 0, 0x03000000).b), Catch::Contains("big-endian"));
  CHECK(parse_error(b.head(0, 0).b).empty());
  CHECK_THAT(parse_error(b.head(0, uint64_t(1) << 60).b), Catch::Contains("metadata count"));
  CHECK_THAT(parse_error(b.head(uint64_t(1) << 60, 0).b), Catch::Contains("tensor count"));
  // a string whose length runs past the end
  CHECK_THAT(parse_error(b.head(0, 1).str("k").put<uint32_t>(8).put<uint64_t>(1000).b),
             Catch::Contains("truncated: a metadata string needs 1000 bytes"));
  // a key whose length is huge
  CHECK_THAT(parse_error(b.head(0, 1).put<uint64_t>(~uint64_t(0)).put<uint64_t>(0).b), Catch::Contains("truncated: a metadata key"));
  // an array whose count is huge (no allocation happens first)
  CHECK_THAT(parse_error(b.head(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(uint64_t(1) << 61).b),
             Catch::Contains("metadata k: array of 2305843009213693952 elements runs past the end"));
  CHECK_THAT(parse_error(b.head(0, 1).str("k").put<uint32_t>(13).put<uint32_t>(0).b),
             Catch::Contains("metadata k: unknown value type 13"));
  CHECK_THAT(parse_error(b.head(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(99).put<uint64_t>(0).b),
             Catch::Contains("unknown array element type 99"));
  CHECK_THAT(parse_error(b.head(0, 1).str("k").put<uint32_t>(7).put<uint8_t>(2).b),
             Catch::Contains("bool value 2"));
  CHECK_THAT(parse_error(b.head(0, 2).str("k").put<uint32_t>(4).put<uint32_t>(1).str("k").put<uint32_t>(4).put<uint32_t>(1).b),
             Catch::Contains("metadata k appears twice"));
  {  // arrays nested past the limit
    Bytes n;
    n.head(0, 1).str("k").put<uint32_t>(9);
    for (int i = 0; i < 6; ++i) n.put<uint32_t>(9).put<uint64_t>(1);
    CHECK_THAT(parse_error(n.b), Catch::Contains("nested deeper than 4"));
  }
  CHECK_THAT(parse_error(b.head(0, 1).str("general.alignment").put<uint32_t>(4).put<uint32_t>(24).b),
             Catch::Contains("general.alignment must be a power-of-two uint32, got 24"));
  CHECK_THAT(parse_error(b.head(0, 1).str("general.alignment").put<uint32_t>(10).put<uint64_t>(32).b),
             Catch::Contains("general.alignment must be a power-of-two uint32"));

  // One tensor info: name, rank, extents, type, offset; then the data.
  auto tensor_file = [](uint32_t rank, std::vector<uint64_t> ne, uint32_t type, uint64_t offset, size_t data) {
    Bytes t;
    t.head(1, 0).str("w").put<uint32_t>(rank);
    for (uint64_t d : ne) t.put<uint64_t>(d);
    t.put<uint32_t>(type).put<uint64_t>(offset).pad(32);
    t.b.resize(t.b.size() + data, 0x11);
    return t.b;
  };
  CHECK(parse_error(tensor_file(2, {4, 2}, 0, 0, 32)).empty());
  CHECK_THAT(parse_error(tensor_file(2, {4, 2}, 0, 0, 31)),
             Catch::Contains("tensor w: bytes [0, 32) run past the end of the data section (31 bytes"));
  CHECK_THAT(parse_error(tensor_file(2, {4, 2}, 0, 64, 32)), Catch::Contains("run past the end of the data section"));
  CHECK_THAT(parse_error(tensor_file(2, {4, 2}, 0, ~uint64_t(0) - 31, 32)), Catch::Contains("run past the end"));
  CHECK_THAT(parse_error(tensor_file(2, {4, 2}, 0, 8, 64)), Catch::Contains("offset 8 is not a multiple of the alignment 32"));
  CHECK_THAT(parse_error(tensor_file(2, {4, 2}, 15, 0, 32), "m.gguf"),
             Catch::StartsWith("m.gguf: unsupported tensor type Q8_K (15) for tensor w (supported: F32, F16, BF16, Q4_0,"));
  CHECK(parse_error(tensor_file(2, {4, 2}, 12, 0, 32), "m.gguf") ==
        "m.gguf: tensor w: Q4_K row length 4 is not a multiple of its block size 256");
  CHECK_THAT(parse_error(tensor_file(1, {4}, 999, 0, 32)), Catch::Contains("unknown (999)"));
  CHECK_THAT(parse_error(tensor_file(5, {1, 1, 1, 1, 1}, 0, 0, 32)), Catch::Contains("tensor w: rank 5"));
  CHECK_THAT(parse_error(tensor_file(0, {}, 0, 0, 32)), Catch::Contains("tensor w: rank 0"));
  CHECK_THAT(parse_error(tensor_file(2, {uint64_t(1) << 40, uint64_t(1) << 40}, 0, 0, 32)), Catch::Contains("too large"));
  CHECK_THAT(parse_error(tensor_file(1, {48}, 8, 0, 64)), Catch::Contains("Q8_0 row length 48 is not a multiple of its block size 32"));
  {  // two tensors over the same bytes; a tensor named twice
    Bytes t;
    t.head(2, 0);
    for (const char* name : {"a", "b"}) t.str(name).put<uint32_t>(1).put<uint64_t>(16).put<uint32_t>(0).put<uint64_t>(32);
    t.pad(32).b.resize(t.b.size() + 128, 0);
    CHECK_THAT(parse_error(t.b), Catch::Contains("tensors a and b overlap"));
    Bytes d;
    d.head(2, 0);
    for (uint64_t off : {0, 64}) d.str("a").put<uint32_t>(1).put<uint64_t>(4).put<uint32_t>(0).put<uint64_t>(off);
    d.pad(32).b.resize(d.b.size() + 128, 0);
    CHECK_THAT(parse_error(d.b), Catch::Contains("tensor a appears twice"));
  }
}

TEST_CASE("GGUF: metadata cannot take much more memory than a real vocabulary", "[gguf][bad][hostile]") {
  {  // 2^16 + 1 empty arrays inside an array: 786 KB of file, refused before ~10 MB of GgufValues
    Bytes n;
    const uint64_t count = detail::kGgufMaxNestedArrays + 1;
    n.head(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(count);
    for (uint64_t i = 0; i < count; ++i) n.put<uint32_t>(8).put<uint64_t>(0);
    CHECK(parse_error(n.b) == "m.gguf: metadata k: more than 65536 arrays inside arrays in this file");
    n.b.resize(n.b.size() - 12);  // exactly the limit is fine
    n.b[4 + 4 + 8 + 8 + 8 + 1 + 4 + 4] = 0;  // count 2^16 + 1 -> 2^16 (low byte 1 -> 0)
    CHECK(parse_error(n.b).empty());
  }
  // the account: every value is booked at its size in memory before it is allocated
  const std::string src = "m.gguf";
  const auto read_with_budget = [&](const Bytes& v, uint64_t budget) {
    detail::GgufCursor c{v.b.data(), v.b.size(), 0, src};
    c.memory_left = budget;
    try {
      detail::gguf_read_value(c, 9, "k", 0);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  Bytes bytes;  // 200 uint8: 200 bytes of file, 1600 in memory (int64 each)
  bytes.put<uint32_t>(0).put<uint64_t>(200);
  for (int i = 0; i < 200; ++i) bytes.put<uint8_t>(uint8_t(i));
  CHECK(read_with_budget(bytes, 1600).empty());
  CHECK(read_with_budget(bytes, 1599) == "m.gguf: metadata k would take more than 256 MiB in memory (all metadata together may not)");
  Bytes strings;  // three strings of 10 bytes: each booked as a std::string plus its bytes
  strings.put<uint32_t>(8).put<uint64_t>(3);
  for (int i = 0; i < 3; ++i) strings.str("0123456789");
  CHECK(read_with_budget(strings, 3 * (sizeof(std::string) + 10)).empty());
  CHECK_THAT(read_with_budget(strings, 3 * (sizeof(std::string) + 10) - 1), Catch::Contains("would take more than"));
}

TEST_CASE("GGUF open: errors name the path", "[gguf][bad]") {
  TempDir dir;
  REQUIRE_THROWS_WITH(GgufFile::open(dir.file("none.gguf")), Catch::StartsWith(dir.file("none.gguf") + ": cannot open"));
  GgufWriter w;
  w.set("a", GgufValue::u32(1));
  w.write(dir.file("ok.gguf"));
  CHECK(GgufFile::open(dir.file("ok.gguf")).get_int("a") == 1);
  REQUIRE_THROWS_WITH(w.write(dir.file("no/dir/x.gguf")), Catch::Contains("no/dir/x.gguf"));
}
