// safetensors: writer -> reader round trips in every dtype at awkward shapes, and every kind of
// broken file (written by the test) rejected with a one-line Error naming the file and the problem.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "recurformer/model/safetensors.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

namespace fs = std::filesystem;
using namespace recurformer;

namespace {

// Every TempDir of this file is named after it.
struct TempDir : rftest::TempDir {
  TempDir() : rftest::TempDir("rf-safetensors") {}
};

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}
void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

// A safetensors file with this header text (length prefix added) and `data_bytes` bytes of data.
// The header is padded with spaces so the data starts 8-byte aligned, as writers do.
std::vector<uint8_t> make_file(std::string header, size_t data_bytes, uint64_t claimed_len = ~uint64_t(0)) {
  header.append((8 - header.size() % 8) % 8, ' ');
  const uint64_t n = claimed_len == ~uint64_t(0) ? header.size() : claimed_len;
  std::vector<uint8_t> b(8 + header.size());
  for (int i = 0; i < 8; ++i) b[size_t(i)] = uint8_t(n >> (8 * i));
  std::memcpy(b.data() + 8, header.data(), header.size());
  for (size_t i = 0; i < data_bytes; ++i) b.push_back(uint8_t(i * 7 + 1));
  return b;
}

// Parses bytes and returns the error message ("" when it parses).
std::string parse_error(const std::vector<uint8_t>& b, const std::string& source = "mem.safetensors") {
  try {
    SafetensorsFile::parse({b.data(), b.size()}, source);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("safetensors round trip keeps bytes, shapes, dtypes and metadata", "[safetensors]",
                        rftest::StorageTypes) {
  using T = TestType;
  TempDir dir;
  const std::vector<std::vector<int64_t>> shapes = {{1}, {17}, {3, 5}, {2, 3, 7}, {0, 4}, {15, 17}, {}};
  std::vector<std::vector<T>> values;
  std::vector<TensorRef> tensors;
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : shapes[i]) n *= d;
    values.push_back(rftest::random_vector<T>(size_t(n)));
    tensors.push_back({"t." + std::to_string(i), dtype_of<T>(), shapes[i], values.back().data()});
  }
  const std::string path = dir.file("model.safetensors");
  write_safetensors(path, tensors, {{"format", "pt"}, {"note", "x"}});
  REQUIRE(fs::exists(path));
  REQUIRE(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);  // no temp file left

  const std::vector<uint8_t> raw = read_bytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, raw.data(), 8);
  CHECK((8 + header_len) % 8 == 0);  // data section 8-byte aligned

  const SafetensorsFile f = SafetensorsFile::open(path);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "x");
  REQUIRE(f.tensors().size() == tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorRef& t = f.tensor(tensors[i].name);
    CHECK(t.dtype == dtype_of<T>());
    CHECK(t.shape == shapes[i]);
    REQUIRE(t.nbytes() == values[i].size() * sizeof(T));
    CHECK((t.nbytes() == 0 || std::memcmp(t.data, values[i].data(), t.nbytes()) == 0));
    CHECK(reinterpret_cast<uintptr_t>(t.data) % sizeof(T) == 0);
  }
  // The same bytes parse from memory too.
  const SafetensorsFile m = SafetensorsFile::parse({raw.data(), raw.size()}, "mem");
  CHECK(m.tensors().size() == tensors.size());
  CHECK(m.find("missing") == nullptr);
  REQUIRE_THROWS_WITH(m.tensor("missing"), "mem: missing tensor missing");
}

TEST_CASE("safetensors writer aligns every tensor to its element size in mixed-dtype files", "[safetensors]") {
  TempDir dir;
  const auto h = rftest::random_vector<half>(3);  // 6 bytes: an f32 stored after it would be misaligned
  const auto f = rftest::random_vector<float>(5);
  const auto b = rftest::random_vector<bfloat16>(7);
  write_safetensors(dir.file("m.safetensors"),
                    {{"h", DType::f16, {3}, h.data()}, {"f", DType::f32, {5}, f.data()}, {"b", DType::bf16, {7}, b.data()}});
  const SafetensorsFile s = SafetensorsFile::open(dir.file("m.safetensors"));
  for (const TensorRef& t : s.tensors()) CHECK(reinterpret_cast<uintptr_t>(t.data) % size_t(dtype_size(t.dtype)) == 0);
  CHECK(std::memcmp(s.tensor("f").data, f.data(), 20) == 0);
  CHECK(std::memcmp(s.tensor("h").data, h.data(), 6) == 0);
  CHECK(std::memcmp(s.tensor("b").data, b.data(), 14) == 0);
  // Contiguous data (readers such as the reference implementation reject gaps): the last byte of
  // the file is the end of the last tensor.
  size_t total = 0;
  for (const TensorRef& t : s.tensors()) total += t.nbytes();
  uint64_t n = 0;
  const auto raw = read_bytes(dir.file("m.safetensors"));
  std::memcpy(&n, raw.data(), 8);
  CHECK(raw.size() == 8 + n + total);
}

TEST_CASE("safetensors writer rejects bad input and leaves no file", "[safetensors][bad]") {
  TempDir dir;
  const float x[2] = {1, 2};
  const std::string path = dir.file("w.safetensors");
  REQUIRE_THROWS_WITH(write_safetensors(path, {{"a", DType::f32, {2}, x}, {"a", DType::f32, {2}, x}}),
                      Catch::Contains("tensor a is given twice"));
  REQUIRE_THROWS_WITH(write_safetensors(path, {{"__metadata__", DType::f32, {2}, x}}),
                      Catch::Contains("invalid tensor name"));
  REQUIRE_THROWS_WITH(write_safetensors(path, {{"a", DType::f32, {-1}, x}}), Catch::Contains("invalid shape"));
  REQUIRE_THROWS_WITH(write_safetensors(path, {{"a", DType::f32, {2}, nullptr}}), Catch::Contains("has no data"));
  CHECK(!fs::exists(path));
  REQUIRE_THROWS_WITH(write_safetensors(dir.file("no/such/dir/w.safetensors"), {{"a", DType::f32, {2}, x}}),
                      Catch::Contains("no/such/dir/w.safetensors") && Catch::Contains("cannot open"));
}

TEST_CASE("safetensors: a file truncated at any byte is rejected with the file's name", "[safetensors][bad]") {
  TempDir dir;
  const auto a = rftest::random_vector<float>(6);
  const auto b = rftest::random_vector<bfloat16>(10);
  const std::string path = dir.file("full.safetensors");
  write_safetensors(path, {{"a", DType::f32, {2, 3}, a.data()}, {"b", DType::bf16, {10}, b.data()}}, {{"k", "v"}});
  const std::vector<uint8_t> full = read_bytes(path);
  REQUIRE(parse_error(full).empty());
  for (size_t cut = 0; cut < full.size(); ++cut) {
    INFO("truncated to " << cut << " of " << full.size() << " bytes");
    const std::vector<uint8_t> t(full.begin(), full.begin() + std::ptrdiff_t(cut));
    const std::string e = parse_error(t, "cut.safetensors");
    REQUIRE(e.rfind("cut.safetensors: ", 0) == 0);
    CHECK(e.find('\n') == std::string::npos);
  }
  // From disk: the message names the path.
  const std::vector<uint8_t> t(full.begin(), full.end() - 3);
  write_bytes(dir.file("t.safetensors"), t);
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.file("t.safetensors")),
                      Catch::StartsWith(dir.file("t.safetensors") + ": ") && Catch::Contains("run past the end"));
}

TEST_CASE("safetensors: lying header lengths, bad offsets, dtypes, shapes and JSON", "[safetensors][bad]") {
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  REQUIRE(parse_error(make_file(ok, 16)).empty());

  CHECK_THAT(parse_error({1, 2, 3}), Catch::Contains("truncated: 3 bytes"));
  CHECK_THAT(parse_error(make_file(ok, 16, ok.size() + 100)), Catch::Contains("header length") && Catch::Contains("runs past the end"));
  CHECK_THAT(parse_error(make_file(ok, 16, ~uint64_t(0) - 1)), Catch::Contains("runs past the end"));
  CHECK_THAT(parse_error(make_file(ok, 16, ok.size() - 5)), Catch::Contains("malformed JSON"));
  CHECK_THAT(parse_error(make_file("{\"w\": [1,", 0)), Catch::Contains("malformed JSON"));
  CHECK_THAT(parse_error(make_file("[1, 2]", 0)), Catch::Contains("must be a JSON object"));
  CHECK_THAT(parse_error(make_file(ok, 15)), Catch::Contains("tensor w") && Catch::Contains("run past the end of the data"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}})", 16)),
             Catch::Contains("run past the end of the data"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[16,0]}})", 16)),
             Catch::Contains("reversed"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,-16]}})", 16)),
             Catch::Contains("out of range"));
  CHECK(parse_error(make_file(R"({"w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})", 2), "m.st") ==
        "m.st: unsupported dtype I8 for tensor w (supported: F32, F16, BF16)");
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4)),
             Catch::Contains("unsupported dtype f32 for tensor w"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}})", 16)),
             Catch::Contains("shape [2, 3] of F32 is 24 bytes but data_offsets [0, 16] hold 16"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[2,-2],"data_offsets":[0,16]}})", 16)),
             Catch::Contains("out of range"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", 16)),
             Catch::Contains("too large"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,16]}})", 16)),
             Catch::Contains("shape must be a list"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"shape":[2,2],"data_offsets":[0,16]}})", 16)),
             Catch::Contains("missing tensor w.dtype"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[2,2]}})", 16)), Catch::Contains("data_offsets"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0]}})", 16)),
             Catch::Contains("data_offsets must be [begin, end]"));
  CHECK_THAT(parse_error(make_file(R"({"w":7})", 0)), Catch::Contains("entry must be an object"));
  CHECK_THAT(parse_error(make_file(R"({"__metadata__":{"a":1}})", 0)), Catch::Contains("__metadata__.a must be a string"));
  CHECK_THAT(parse_error(make_file(
                 R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16)),
             Catch::Contains("tensors a [0, 16) and b [8, 16) overlap"));
  CHECK_THAT(parse_error(make_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})", 8)),
             Catch::Contains("not aligned to its 4-byte elements"));
  // The error is one line and starts with the source.
  const std::string e = parse_error(make_file(ok, 3), "x/y.safetensors");
  CHECK(e.rfind("x/y.safetensors: ", 0) == 0);
  CHECK(e.find('\n') == std::string::npos);
}

TEST_CASE("MappedFile errors name the path", "[safetensors][bad]") {
  TempDir dir;
  REQUIRE_THROWS_WITH(MappedFile(dir.file("nope")), Catch::StartsWith(dir.file("nope") + ": cannot open"));
  REQUIRE_THROWS_WITH(MappedFile(dir.path.string()), Catch::Contains("not a regular file"));
  write_bytes(dir.file("empty"), {});
  MappedFile m(dir.file("empty"));
  CHECK(m.size() == 0);
  MappedFile moved = std::move(m);
  CHECK(moved.path() == dir.file("empty"));
  CHECK_THAT(parse_error({}, "empty"), Catch::Contains("truncated"));
}
