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

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <unistd.h>

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
  void charge(uint64_t n, uint64_t each, const std::string& key) {
    RF_CHECK(each == 0 || n <= memory_left / each, src, ": metadata ", key, " would take more than ",
             kGgufMaxMetadataBytes >> 20, " MiB in memory (all metadata together may not)");
    memory_left -= n * each;
  }

  size_t left() const { return size - pos; }
  void need(uint64_t n, const char* what) const {
    RF_CHECK(n <= left(), src, ": truncated: ", what, " needs ", n, " bytes at offset ", pos, ", ", left(), " left");
  }
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
  std::string string(const char* what, const std::string* booked_to = nullptr) {
    const uint64_t n = read<uint64_t>(what);
    need(n, what);
    if (booked_to) charge(n, 1, *booked_to);
    std::string s(reinterpret_cast<const char*>(p + pos), size_t(n));
    pos += size_t(n);
    return s;
  }
};

inline size_t gguf_scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::uint8: case GgufValueType::int8: case GgufValueType::boolean: return 1;
    case GgufValueType::uint16: case GgufValueType::int16: return 2;
    case GgufValueType::uint32: case GgufValueType::int32: case GgufValueType::float32: return 4;
    case GgufValueType::uint64: case GgufValueType::int64: case GgufValueType::float64: return 8;
    case GgufValueType::string: return 8;   // at least its length
    case GgufValueType::array: return 12;   // at least its type and count
  }
  return 0;
}

inline bool gguf_is_int(GgufValueType t) {
  return t != GgufValueType::float32 && t != GgufValueType::float64 && t != GgufValueType::string &&
         t != GgufValueType::array;
}

inline GgufValue gguf_read_value(GgufCursor& c, uint32_t type_raw, const std::string& key, int depth);

inline void gguf_read_scalar(GgufCursor& c, GgufValueType t, const std::string& key, int64_t& i, double& f) {
  const char* w = "a metadata value";
  switch (t) {
    case GgufValueType::uint8: i = c.read<uint8_t>(w); break;
    case GgufValueType::int8: i = c.read<int8_t>(w); break;
    case GgufValueType::uint16: i = c.read<uint16_t>(w); break;
    case GgufValueType::int16: i = c.read<int16_t>(w); break;
    case GgufValueType::uint32: i = c.read<uint32_t>(w); break;
    case GgufValueType::int32: i = c.read<int32_t>(w); break;
    case GgufValueType::uint64: i = int64_t(c.read<uint64_t>(w)); break;
    case GgufValueType::int64: i = c.read<int64_t>(w); break;
    case GgufValueType::float32: f = c.read<float>(w); break;
    case GgufValueType::float64: f = c.read<double>(w); break;
    case GgufValueType::boolean: {
      const uint8_t b = c.read<uint8_t>(w);
      RF_CHECK(b <= 1, c.src, ": metadata ", key, ": bool value ", int(b), " is neither 0 nor 1");
      i = b;
      break;
    }
    default: fail(c.src, ": metadata ", key, ": not a scalar type");
  }
}

inline GgufValue gguf_read_value(GgufCursor& c, uint32_t type_raw, const std::string& key, int depth) {
  RF_CHECK(type_raw <= 12, c.src, ": metadata ", key, ": unknown value type ", type_raw);
  GgufValue v;
  v.type = GgufValueType(type_raw);
  if (v.type == GgufValueType::string) {
    c.charge(1, sizeof(std::string), key);
    v.s = c.string("a metadata string", &key);
  } else if (v.type == GgufValueType::array) {
    RF_CHECK(depth < 4, c.src, ": metadata ", key, ": arrays nested deeper than 4");
    const uint32_t et = c.read<uint32_t>("an array type");
    RF_CHECK(et <= 12, c.src, ": metadata ", key, ": unknown array element type ", et);
    v.elem = GgufValueType(et);
    const uint64_t n = c.read<uint64_t>("an array length");
    // Each element takes at least its minimal size: a lying count fails here, before any allocation.
    RF_CHECK(n <= c.left() / gguf_scalar_size(v.elem), c.src, ": metadata ", key, ": array of ", n,
             " elements runs past the end of the file");
    if (v.elem == GgufValueType::string) {
      c.charge(n, sizeof(std::string), key);
      v.strings.reserve(size_t(n));
      for (uint64_t k = 0; k < n; ++k) v.strings.push_back(c.string("an array string", &key));
    } else if (v.elem == GgufValueType::array) {
      RF_CHECK(n <= c.nested_left, c.src, ": metadata ", key, ": more than ", kGgufMaxNestedArrays,
               " arrays inside arrays in this file");
      c.nested_left -= n;
      c.charge(n, sizeof(GgufValue), key);
      for (uint64_t k = 0; k < n; ++k) v.arrays.push_back(gguf_read_value(c, 9, key, depth + 1));
    } else if (gguf_is_int(v.elem)) {
      c.charge(n, sizeof(int64_t), key);
      v.ints.resize(size_t(n));
      double unused = 0;
      for (uint64_t k = 0; k < n; ++k) gguf_read_scalar(c, v.elem, key, v.ints[size_t(k)], unused);
    } else {
      c.charge(n, sizeof(double), key);
      v.floats.resize(size_t(n));
      int64_t unused = 0;
      for (uint64_t k = 0; k < n; ++k) gguf_read_scalar(c, v.elem, key, unused, v.floats[size_t(k)]);
    }
  } else {
    gguf_read_scalar(c, v.type, key, v.i, v.f);
  }
  return v;
}

/// The storage type of a GGUF type number, when this library reads it.
inline bool gguf_tensor_type(uint32_t t, GgmlType& out) {
  out = GgmlType(t);
  return ggml_type_traits(out).block != 0;
}

}  // namespace detail

/// Dequantises n (a multiple of 32) Q8_0 weights to fp32.
inline void dequantize_q8_0(const uint8_t* blocks, int64_t n, float* out) { dequantize_row(GgmlType::q8_0, blocks, n, out); }

/// Quantises n (a multiple of 32) fp32 weights to Q8_0 as ggml does: d = max|x| / 127, q = round(x / d).
inline void quantize_q8_0(const float* x, int64_t n, uint8_t* blocks) {
  for (int64_t b = 0; b < n / kQ8_0Block; ++b) {
    const float* xb = x + b * kQ8_0Block;
    float amax = 0;
    for (int64_t i = 0; i < kQ8_0Block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    const float id = d != 0 ? 1.f / d : 0.f;
    uint8_t* blk = blocks + b * kQ8_0BlockBytes;
    const uint16_t d_bits = detail::float_to_half_bits(d);
    std::memcpy(blk, &d_bits, 2);
    for (int64_t i = 0; i < kQ8_0Block; ++i) blk[2 + i] = uint8_t(int8_t(std::lround(xb[i] * id)));
  }
}

/// A parsed GGUF file. open() maps and owns the file; parse() reads bytes the caller keeps alive.
class GgufFile {
 public:
  static GgufFile open(const std::string& path) {
    GgufFile f;
    f.map_ = MappedFile(path);
    f.parse_bytes(f.map_.bytes(), path);
    return f;
  }
  static GgufFile parse(ByteSpan bytes, const std::string& source) {
    GgufFile f;
    f.parse_bytes(bytes, source);
    return f;
  }

  const std::string& source() const { return source_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  ///< of the data section in the file
  /// Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  const GgufValue* find(const std::string& key) const {
    const auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
  }
  const GgufTensorInfo* find_tensor(const std::string& name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  /// Typed metadata reads; a missing key or a wrong type is "FILE: metadata KEY ...".
  const GgufValue& get(const std::string& key) const {
    const GgufValue* v = find(key);
    RF_CHECK(v, source_, ": missing metadata ", key);
    return *v;
  }
  int64_t get_int(const std::string& key) const {
    const GgufValue& v = get(key);
    RF_CHECK(detail::gguf_is_int(v.type) && v.type != GgufValueType::boolean, source_, ": metadata ", key,
             " must be an integer");
    return v.i;
  }
  double get_float(const std::string& key) const {
    const GgufValue& v = get(key);
    RF_CHECK(v.type == GgufValueType::float32 || v.type == GgufValueType::float64, source_, ": metadata ", key,
             " must be a float");
    return v.f;
  }
  bool get_bool(const std::string& key) const {
    const GgufValue& v = get(key);
    RF_CHECK(v.type == GgufValueType::boolean, source_, ": metadata ", key, " must be a bool");
    return v.i != 0;
  }
  const std::string& get_string(const std::string& key) const {
    const GgufValue& v = get(key);
    RF_CHECK(v.type == GgufValueType::string, source_, ": metadata ", key, " must be a string");
    return v.s;
  }

  /// The tokenizer.ggml.* metadata; Error when tokenizer.ggml.model or .tokens is missing.
  GgufTokenizerData tokenizer_data() const {
    GgufTokenizerData t;
    t.model = get_string("tokenizer.ggml.model");
    if (find("tokenizer.ggml.pre")) t.pre = get_string("tokenizer.ggml.pre");
    const GgufValue& tokens = get("tokenizer.ggml.tokens");
    RF_CHECK(tokens.is_array() && tokens.elem == GgufValueType::string, source_,
             ": metadata tokenizer.ggml.tokens must be an array of strings");
    t.tokens = tokens.strings;
    const int64_t n = int64_t(t.tokens.size());
    if (const GgufValue* v = find("tokenizer.ggml.scores")) {
      RF_CHECK(v->is_array() && int64_t(v->floats.size()) == n && int64_t(v->array_size()) == n, source_,
               ": metadata tokenizer.ggml.scores must be ", n, " floats");
      for (double s : v->floats) t.scores.push_back(float(s));
    }
    if (const GgufValue* v = find("tokenizer.ggml.token_type")) {
      RF_CHECK(v->is_array() && int64_t(v->ints.size()) == n && int64_t(v->array_size()) == n, source_,
               ": metadata tokenizer.ggml.token_type must be ", n, " integers");
      for (int64_t x : v->ints) t.token_types.push_back(int32_t(x));
    }
    if (const GgufValue* v = find("tokenizer.ggml.merges")) {
      RF_CHECK(v->is_array() && v->strings.size() == v->array_size(), source_,
               ": metadata tokenizer.ggml.merges must be an array of strings");
      t.merges = v->strings;
    }
    auto id = [&](const char* key, int32_t& out) {
      if (!find(key)) return;
      const int64_t x = get_int(key);
      RF_CHECK(x >= 0 && x < n, source_, ": metadata ", key, " = ", x, " is not a token id (vocab ", n, ")");
      out = int32_t(x);
    };
    id("tokenizer.ggml.bos_token_id", t.bos);
    id("tokenizer.ggml.eos_token_id", t.eos);
    id("tokenizer.ggml.unknown_token_id", t.unk);
    id("tokenizer.ggml.padding_token_id", t.pad);
    if (find("tokenizer.ggml.add_bos_token")) t.add_bos = get_bool("tokenizer.ggml.add_bos_token");
    if (find("tokenizer.ggml.add_eos_token")) t.add_eos = get_bool("tokenizer.ggml.add_eos_token");
    if (find("tokenizer.ggml.add_space_prefix")) t.add_space_prefix = get_bool("tokenizer.ggml.add_space_prefix");
    return t;
  }

 private:
  void parse_bytes(ByteSpan b, const std::string& src) {
    source_ = src;
    detail::GgufCursor c{b.data, b.size, 0, source_};
    RF_CHECK(b.size >= 4 && std::memcmp(b.data, "GGUF", 4) == 0, src, ": not a GGUF file (bad magic)");
    c.pos = 4;
    version_ = c.read<uint32_t>("the version");
    RF_CHECK(version_ == 2 || version_ == 3, src, ": unsupported GGUF version ", version_,
             version_ > 0xffff ? " (a big-endian file?)" : "", " (supported: 2, 3)");
    const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
    const uint64_t n_kv = c.read<uint64_t>("the metadata count");
    RF_CHECK(n_kv <= c.left() / 13, src, ": metadata count ", n_kv, " runs past the end of the file");
    for (uint64_t k = 0; k < n_kv; ++k) {
      std::string key = c.string("a metadata key");
      const uint32_t t = c.read<uint32_t>("a metadata type");
      GgufValue v = detail::gguf_read_value(c, t, key, 0);
      RF_CHECK(kv_index_.emplace(key, kv_.size()).second, src, ": metadata ", key, " appears twice");
      kv_.emplace_back(std::move(key), std::move(v));
    }
    if (const GgufValue* a = find("general.alignment")) {
      RF_CHECK(a->type == GgufValueType::uint32 && a->i > 0 && (a->i & (a->i - 1)) == 0, src,
               ": general.alignment must be a power-of-two uint32, got ", a->i);
      alignment_ = uint64_t(a->i);
    }
    RF_CHECK(n_tensors <= c.left() / 32, src, ": tensor count ", n_tensors, " runs past the end of the file");
    for (uint64_t k = 0; k < n_tensors; ++k) {
      GgufTensorInfo t;
      t.name = c.string("a tensor name");
      const uint32_t n_dims = c.read<uint32_t>("a tensor rank");
      RF_CHECK(n_dims >= 1 && n_dims <= 4, src, ": tensor ", t.name, ": rank ", n_dims, " (expected 1..4)");
      uint64_t numel = 1;
      for (uint32_t d = 0; d < n_dims; ++d) {
        const uint64_t ne = c.read<uint64_t>("a tensor extent");
        RF_CHECK(ne <= (uint64_t(1) << 40) && (ne == 0 || numel <= (uint64_t(1) << 40) / ne), src, ": tensor ",
                 t.name, ": extent ", ne, " is too large");
        numel *= ne;
        t.ne.push_back(int64_t(ne));
      }
      const uint32_t type = c.read<uint32_t>("a tensor type");
      RF_CHECK(detail::gguf_tensor_type(type, t.type), src, ": unsupported tensor type ", detail_type_name(type),
               " for tensor ", t.name,
               " (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)");
      t.offset = c.read<uint64_t>("a tensor offset");
      const GgmlTypeTraits tt = ggml_type_traits(t.type);
      RF_CHECK(t.ne[0] % tt.block == 0, src, ": tensor ", t.name, ": ", ggml_type_name(t.type), " row length ", t.ne[0],
               " is not a multiple of its block size ", tt.block);
      t.nbytes = size_t(int64_t(numel) / tt.block * tt.bytes);
      RF_CHECK(t.offset % alignment_ == 0, src, ": tensor ", t.name, ": offset ", t.offset,
               " is not a multiple of the alignment ", alignment_);
      RF_CHECK(tensor_index_.emplace(t.name, tensors_.size()).second, src, ": tensor ", t.name, " appears twice");
      tensors_.push_back(std::move(t));
    }
    data_offset_ = (uint64_t(c.pos) + alignment_ - 1) / alignment_ * alignment_;
    RF_CHECK(data_offset_ <= b.size || tensors_.empty(), src, ": truncated: the data section would start at ",
             data_offset_, " but the file has ", b.size, " bytes");
    const uint64_t data_size = data_offset_ <= b.size ? b.size - data_offset_ : 0;
    std::vector<std::pair<uint64_t, size_t>> order;
    for (size_t k = 0; k < tensors_.size(); ++k) {
      GgufTensorInfo& t = tensors_[k];
      RF_CHECK(t.offset <= data_size && t.nbytes <= data_size - t.offset, src, ": tensor ", t.name, ": bytes [",
               t.offset, ", ", t.offset + t.nbytes, ") run past the end of the data section (", data_size,
               " bytes; file truncated?)");
      t.data = b.data + data_offset_ + t.offset;
      if (t.nbytes) order.emplace_back(t.offset, k);
    }
    std::sort(order.begin(), order.end());
    for (size_t k = 1; k < order.size(); ++k) {
      const GgufTensorInfo& a = tensors_[order[k - 1].second];
      const GgufTensorInfo& n = tensors_[order[k].second];
      RF_CHECK(n.offset >= a.offset + a.nbytes, src, ": tensors ", a.name, " and ", n.name, " overlap");
    }
  }
  static std::string detail_type_name(uint32_t t) { return std::string(ggml_type_name(t)) + " (" + std::to_string(t) + ")"; }

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
  void set(const std::string& key, GgufValue v) {
    for (auto& kv : kv_)
      if (kv.first == key) {
        kv.second = std::move(v);
        return;
      }
    kv_.emplace_back(key, std::move(v));
  }
  /// `ne` in GGUF order (innermost first); `data` must hold the type's bytes for ne and outlive write().
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, const void* data) {
    Tensor t{name, type, std::move(ne), data};
    tensors_.push_back(std::move(t));
  }
  /// The file's bytes (tests, fuzz seeds).
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> out;
    emit([&](const void* p, size_t n) {
      const uint8_t* b = static_cast<const uint8_t*>(p);
      out.insert(out.end(), b, b + n);
    });
    return out;
  }
  void write(const std::string& path) const {
    const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    RF_CHECK(f, "GgufWriter: ", tmp, ": cannot open for writing (", std::strerror(errno), ")");
    bool ok = true;
    emit([&](const void* p, size_t n) { ok = ok && (n == 0 || std::fwrite(p, 1, n, f) == n); });
    ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
    ok = (std::fclose(f) == 0) && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
      std::remove(tmp.c_str());
      fail("GgufWriter: cannot write ", path);
    }
  }

  static size_t tensor_bytes(GgmlType type, const std::vector<int64_t>& ne) {
    int64_t n = 1;
    for (int64_t d : ne) n *= d;
    const GgmlTypeTraits tt = ggml_type_traits(type);
    return size_t(n / tt.block * tt.bytes);
  }

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
  static void put_string(const Sink& out, const std::string& s) {
    put<uint64_t>(out, s.size());
    out(s.data(), s.size());
  }
  static void put_scalar(const Sink& out, GgufValueType t, int64_t i, double f) {
    switch (t) {
      case GgufValueType::uint8: case GgufValueType::boolean: put<uint8_t>(out, uint8_t(i)); break;
      case GgufValueType::int8: put<int8_t>(out, int8_t(i)); break;
      case GgufValueType::uint16: put<uint16_t>(out, uint16_t(i)); break;
      case GgufValueType::int16: put<int16_t>(out, int16_t(i)); break;
      case GgufValueType::uint32: put<uint32_t>(out, uint32_t(i)); break;
      case GgufValueType::int32: put<int32_t>(out, int32_t(i)); break;
      case GgufValueType::uint64: put<uint64_t>(out, uint64_t(i)); break;
      case GgufValueType::int64: put<int64_t>(out, i); break;
      case GgufValueType::float32: put<float>(out, float(f)); break;
      case GgufValueType::float64: put<double>(out, f); break;
      default: break;
    }
  }
  static void put_value(const Sink& out, const GgufValue& v) {
    if (v.type == GgufValueType::string) {
      put_string(out, v.s);
    } else if (v.type == GgufValueType::array) {
      put<uint32_t>(out, uint32_t(v.elem));
      put<uint64_t>(out, v.array_size());
      for (const auto& s : v.strings) put_string(out, s);
      for (int64_t x : v.ints) put_scalar(out, v.elem, x, 0);
      for (double x : v.floats) put_scalar(out, v.elem, 0, x);
      for (const auto& a : v.arrays) put_value(out, a);
    } else {
      put_scalar(out, v.type, v.i, v.f);
    }
  }
  void emit(const Sink& out) const {
    uint64_t align = 32;
    for (const auto& kv : kv_)
      if (kv.first == "general.alignment") align = uint64_t(kv.second.i);
    out("GGUF", 4);
    put<uint32_t>(out, 3);
    put<uint64_t>(out, tensors_.size());
    put<uint64_t>(out, kv_.size());
    size_t pos = 24;
    const Sink counted = [&](const void* p, size_t n) { out(p, n); pos += n; };
    for (const auto& kv : kv_) {
      put_string(counted, kv.first);
      put<uint32_t>(counted, uint32_t(kv.second.type));
      put_value(counted, kv.second);
    }
    uint64_t offset = 0;
    for (const auto& t : tensors_) {
      put_string(counted, t.name);
      put<uint32_t>(counted, uint32_t(t.ne.size()));
      for (int64_t d : t.ne) put<uint64_t>(counted, uint64_t(d));
      put<uint32_t>(counted, uint32_t(t.type));
      put<uint64_t>(counted, offset);
      offset = (offset + tensor_bytes(t.type, t.ne) + align - 1) / align * align;
    }
    static const uint8_t zeros[256] = {};
    auto pad = [&](uint64_t n) {
      while (n) {
        const size_t k = size_t(std::min<uint64_t>(n, sizeof zeros));
        counted(zeros, k);
        n -= k;
      }
    };
    pad((align - pos % align) % align);
    for (const auto& t : tensors_) {
      const size_t n = tensor_bytes(t.type, t.ne);
      counted(t.data, n);
      pad((align - n % align) % align);
    }
  }

  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Tensor> tensors_;
};

}  // namespace recurformer
