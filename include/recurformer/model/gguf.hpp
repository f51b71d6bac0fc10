// recurformer/model/gguf.hpp: the GGUF container (llama.cpp's model file), version 2 and 3: reader
// in place over a memory map (or bytes in memory) and a writer for tests and tools.
//
// File layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 metadata count, the
// metadata key/values (string key, u32 type, value; arrays are u32 element type + u64 count +
// elements), the tensor infos (name, u32 n_dims, u64 ne[n_dims] innermost first, u32 ggml type,
// u64 offset), padding to general.alignment (default 32), then the data section. Every count,
// length and offset is checked against the bytes that remain before it is used, so a hostile file
// is a one-line Error ("FILE: problem"), never an out-of-bounds read or a huge allocation.
// Tensor types F32, F16, BF16 and the quantised block types of core/quant.hpp (Q4_0 .. Q8_0, the
// K-quants Q2_K .. Q6_K, IQ4_NL, IQ4_XS) are accepted; a row must be whole blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"
#include "recurformer/core/quant.hpp"
#include "recurformer/model/gguf_vocab.hpp"
#include "recurformer/model/mmap_file.hpp"

namespace recurformer {

/// Metadata value types (gguf_type).
enum class GgufValueType : uint32_t {
  uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, boolean = 7,
  string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12,
};

/// Q8_0: 32 weights share one fp16 scale d; weight i = d * qs[i] (BlockQ8_0).
constexpr int64_t kQ8_0Block = BlockQ8_0::size;
constexpr int64_t kQ8_0BlockBytes = int64_t(sizeof(BlockQ8_0));

/// One metadata value. Scalars use i (integers and bool; uint64 keeps its bits), f or s; arrays
/// keep their elements by family (ints, floats, strings, or nested arrays) with `elem` their type.
struct GgufValue {
  GgufValueType type = GgufValueType::uint32;
  GgufValueType elem = GgufValueType::uint32;  ///< element type when type == array
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;
  std::vector<GgufValue> arrays;

  bool is_array() const { return type == GgufValueType::array; }
  size_t array_size() const { return ints.size() + floats.size() + strings.size() + arrays.size(); }

  static GgufValue of(GgufValueType t, int64_t v) { GgufValue x; x.type = t; x.i = v; return x; }
  static GgufValue u32(uint32_t v) { return of(GgufValueType::uint32, v); }
  static GgufValue i32(int32_t v) { return of(GgufValueType::int32, v); }
  static GgufValue u64(uint64_t v) { return of(GgufValueType::uint64, int64_t(v)); }
  static GgufValue boolean(bool v) { return of(GgufValueType::boolean, v); }
  static GgufValue f32(float v) { GgufValue x; x.type = GgufValueType::float32; x.f = v; return x; }
  static GgufValue f64(double v) { GgufValue x; x.type = GgufValueType::float64; x.f = v; return x; }
  static GgufValue str(std::string v) { GgufValue x; x.type = GgufValueType::string; x.s = std::move(v); return x; }
  static GgufValue str_array(std::vector<std::string> v) {
    GgufValue x; x.type = GgufValueType::array; x.elem = GgufValueType::string; x.strings = std::move(v); return x;
  }
  static GgufValue int_array(GgufValueType t, std::vector<int64_t> v) {
    GgufValue x; x.type = GgufValueType::array; x.elem = t; x.ints = std::move(v); return x;
  }
  static GgufValue float_array(GgufValueType t, std::vector<double> v) {
    GgufValue x; x.type = GgufValueType::array; x.elem = t; x.floats = std::move(v); return x;
  }
};

/// One tensor of a GGUF file. `ne` is in GGUF order: ne[0] is the innermost (contiguous) extent.
struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::f32;
  std::vector<int64_t> ne;
  uint64_t offset = 0;         ///< within the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : ne) n *= d;
    return n;
  }
};

/// The tokenizer.ggml.* metadata (model/gguf_vocab.hpp); the name the reader has always used.
using GgufTokenizerData = GgufVocab;

namespace detail {

// Metadata held in memory may take at most this many bytes (a Llama 3 vocabulary and its merges take
// ~20 MB), and arrays of arrays (no llama.cpp key uses them) at most this many elements in a file:
// 12 bytes of file per empty nested array would otherwise become a ~150-byte GgufValue (a 60 MB file
// of them loaded at 1.3 GB).
inline constexpr uint64_t kGgufMaxMetadataBytes = uint64_t(256) << 20;
inline constexpr uint64_t kGgufMaxNestedArrays = uint64_t(1) << 16;

// Bounds-checked little-endian reads over the file's bytes, and the metadata's memory account.
struct GgufCursor {
  const uint8_t* p;
  size_t size;
  size_t pos;
  const std::string& src;
  uint64_t memory_left = kGgufMaxMetadataBytes;  // what the parsed metadata may still take
  uint64_t nested_left = kGgufMaxNestedArrays;

  // Books n elements of `each` bytes of parsed metadata, before they are allocated.
  void charge(uint64_t n, uint64_t each, const std::string& key);

  size_t left() const { return size - pos; }
  void need(uint64_t n, const char* what) const;
  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p + pos, sizeof(T));  // the library targets little-endian hosts, as GGUF files are
    pos += sizeof(T);
    return v;
  }
  // A length-prefixed string. A metadata value's bytes are booked to its key's memory account
  // (booked_to; the std::string itself is booked by the caller, before a vector of them is reserved).
  std::string string(const char* what, const std::string* booked_to = nullptr);
};

GgufValue gguf_read_value(GgufCursor& c, uint32_t type_raw, const std::string& key, int depth);

}  // namespace detail

/// Dequantises n (a multiple of 32) Q8_0 weights to fp32.
void dequantize_q8_0(const uint8_t* blocks, int64_t n, float* out);

/// Quantises n (a multiple of 32) fp32 weights to Q8_0 as ggml does: d = max|x| / 127, q = round(x / d).
void quantize_q8_0(const float* x, int64_t n, uint8_t* blocks);

/// A parsed GGUF file. open() maps and owns the file; parse() reads bytes the caller keeps alive.
class GgufFile {
 public:
  static GgufFile open(const std::string& path);
  static GgufFile parse(ByteSpan bytes, const std::string& source);

  const std::string& source() const { return source_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  ///< of the data section in the file
  /// Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  const GgufValue* find(const std::string& key) const;
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  /// Typed metadata reads; a missing key or a wrong type is "FILE: metadata KEY ...".
  const GgufValue& get(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;

  /// The tokenizer.ggml.* metadata; Error when tokenizer.ggml.model or .tokens is missing.
  GgufTokenizerData tokenizer_data() const;

 private:
  void parse_bytes(ByteSpan b, const std::string& src);
  static std::string detail_type_name(uint32_t t);

  MappedFile map_;
  std::string source_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

/// Builds a GGUF v3 file: metadata in insertion order, tensors aligned to general.alignment
/// (default 32). For tests and tools; write() is atomic (temp file + rename).
class GgufWriter {
 public:
  void set(const std::string& key, GgufValue v);
  /// `ne` in GGUF order (innermost first); `data` must hold the type's bytes for ne and outlive write().
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, const void* data);
  /// The file's bytes (tests, fuzz seeds).
  std::vector<uint8_t> bytes() const;
  void write(const std::string& path) const;

  static size_t tensor_bytes(GgmlType type, const std::vector<int64_t>& ne);

 private:
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    const void* data;
  };
  using Sink = std::function<void(const void*, size_t)>;
  template <class T>
  static void put(const Sink& out, T v) { out(&v, sizeof v); }
  static void put_string(const Sink& out, const std::string& s);
  static void put_scalar(const Sink& out, GgufValueType t, int64_t i, double f);
  static void put_value(const Sink& out, const GgufValue& v);
  void emit(const Sink& out) const;

  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Tensor> tensors_;
};

}  // namespace recurformer
