// src/model/gguf.cpp: the GGUF reader (GgufFile, its bounds-checked metadata parser) and writer
// (GgufWriter), and the Q8_0 helpers.
#include "recurformer/model/gguf.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>

#include <unistd.h>

namespace recurformer {

namespace detail {

void GgufCursor::charge(uint64_t n, uint64_t each, const std::string& key) {
  RF_CHECK(each == 0 || n <= memory_left / each, src, ": metadata ", key, " would take more than ",
           kGgufMaxMetadataBytes >> 20, " MiB in memory (all metadata together may not)");
  memory_left -= n * each;
}

void GgufCursor::need(uint64_t n, const char* what) const {
  RF_CHECK(n <= left(), src, ": truncated: ", what, " needs ", n, " bytes at offset ", pos, ", ", left(), " left");
}

std::string GgufCursor::string(const char* what, const std::string* booked_to) {
  const uint64_t n = read<uint64_t>(what);
  need(n, what);
  if (booked_to) charge(n, 1, *booked_to);
  std::string s(reinterpret_cast<const char*>(p + pos), size_t(n));
  pos += size_t(n);
  return s;
}

namespace {

size_t gguf_scalar_size(GgufValueType t) {
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

bool gguf_is_int(GgufValueType t) {
  return t != GgufValueType::float32 && t != GgufValueType::float64 && t != GgufValueType::string &&
         t != GgufValueType::array;
}

void gguf_read_scalar(GgufCursor& c, GgufValueType t, const std::string& key, int64_t& i, double& f) {
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

}  // namespace

GgufValue gguf_read_value(GgufCursor& c, uint32_t type_raw, const std::string& key, int depth) {
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

namespace {

/// The storage type of a GGUF type number, when this library reads it.
bool gguf_tensor_type(uint32_t t, GgmlType& out) {
  out = GgmlType(t);
  return ggml_type_traits(out).block != 0;
}

}  // namespace

}  // namespace detail

/// Dequantises n (a multiple of 32) Q8_0 weights to fp32.
void dequantize_q8_0(const uint8_t* blocks, int64_t n, float* out) { dequantize_row(GgmlType::q8_0, blocks, n, out); }

/// Quantises n (a multiple of 32) fp32 weights to Q8_0 as ggml does: d = max|x| / 127, q = round(x / d).
void quantize_q8_0(const float* x, int64_t n, uint8_t* blocks) {
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

GgufFile GgufFile::open(const std::string& path) {
  GgufFile f;
  f.map_ = MappedFile(path);
  f.parse_bytes(f.map_.bytes(), path);
  return f;
}

GgufFile GgufFile::parse(ByteSpan bytes, const std::string& source) {
  GgufFile f;
  f.parse_bytes(bytes, source);
  return f;
}

const GgufValue* GgufFile::find(const std::string& key) const {
  const auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufValue& GgufFile::get(const std::string& key) const {
  const GgufValue* v = find(key);
  RF_CHECK(v, source_, ": missing metadata ", key);
  return *v;
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& v = get(key);
  RF_CHECK(detail::gguf_is_int(v.type) && v.type != GgufValueType::boolean, source_, ": metadata ", key,
           " must be an integer");
  return v.i;
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& v = get(key);
  RF_CHECK(v.type == GgufValueType::float32 || v.type == GgufValueType::float64, source_, ": metadata ", key,
           " must be a float");
  return v.f;
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = get(key);
  RF_CHECK(v.type == GgufValueType::boolean, source_, ": metadata ", key, " must be a bool");
  return v.i != 0;
}

const std::string& GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = get(key);
  RF_CHECK(v.type == GgufValueType::string, source_, ": metadata ", key, " must be a string");
  return v.s;
}

GgufTokenizerData GgufFile::tokenizer_data() const {
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

void GgufFile::parse_bytes(ByteSpan b, const std::string& src) {
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

std::string GgufFile::detail_type_name(uint32_t t) { return std::string(ggml_type_name(t)) + " (" + std::to_string(t) + ")"; }

void GgufWriter::set(const std::string& key, GgufValue v) {
  for (auto& kv : kv_)
    if (kv.first == key) {
      kv.second = std::move(v);
      return;
    }
  kv_.emplace_back(key, std::move(v));
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, const void* data) {
  Tensor t{name, type, std::move(ne), data};
  tensors_.push_back(std::move(t));
}

std::vector<uint8_t> GgufWriter::bytes() const {
  std::vector<uint8_t> out;
  emit([&](const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    out.insert(out.end(), b, b + n);
  });
  return out;
}

void GgufWriter::write(const std::string& path) const {
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

size_t GgufWriter::tensor_bytes(GgmlType type, const std::vector<int64_t>& ne) {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  const GgmlTypeTraits tt = ggml_type_traits(type);
  return size_t(n / tt.block * tt.bytes);
}

void GgufWriter::put_string(const Sink& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out(s.data(), s.size());
}

void GgufWriter::put_scalar(const Sink& out, GgufValueType t, int64_t i, double f) {
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

void GgufWriter::put_value(const Sink& out, const GgufValue& v) {
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

void GgufWriter::emit(const Sink& out) const {
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

}  // namespace recurformer
