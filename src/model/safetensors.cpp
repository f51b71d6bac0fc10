// src/model/safetensors.cpp: the safetensors reader (SafetensorsFile, validated in place over a memory
// map) and the atomic writer (write_safetensors).
#include "recurformer/model/safetensors.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include <unistd.h>

#include "recurformer/model/detail/json_util.hpp"

namespace recurformer {

std::string TensorRef::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace detail {
namespace {

bool safetensors_dtype(const std::string& s, DType& out) {
  if (s == "F32") out = DType::f32;
  else if (s == "F16") out = DType::f16;
  else if (s == "BF16") out = DType::bf16;
  else return false;
  return true;
}

const char* safetensors_dtype_name(DType t) {
  return t == DType::f32 ? "F32" : t == DType::f16 ? "F16" : "BF16";
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// numel * elem_size of `shape`, or false on overflow past 2^62 bytes.
bool checked_nbytes(const std::vector<int64_t>& shape, int64_t elem_size, uint64_t& out) {
  const uint64_t limit = uint64_t(1) << 62;
  uint64_t n = uint64_t(elem_size);
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > limit / uint64_t(d)) return false;
    n *= uint64_t(d);
  }
  out = n;
  return true;
}

}  // namespace
}  // namespace detail

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.map_ = MappedFile(path);
  f.parse_bytes(f.map_.bytes(), path);
  return f;
}

SafetensorsFile SafetensorsFile::parse(ByteSpan bytes, const std::string& source) {
  SafetensorsFile f;
  f.parse_bytes(bytes, source);
  return f;
}

const TensorRef* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorRef& SafetensorsFile::tensor(const std::string& name) const {
  const TensorRef* t = find(name);
  RF_CHECK(t, source_, ": missing tensor ", name);
  return *t;
}

void SafetensorsFile::parse_bytes(ByteSpan b, const std::string& src) {
  using namespace detail;
  source_ = src;
  RF_CHECK(b.size >= 8, src, ": truncated: ", b.size, " bytes, a safetensors file starts with an 8-byte header length");
  const uint64_t n = read_le64(b.data);
  RF_CHECK(n <= b.size - 8, src, ": header length ", n, " runs past the end of the file (", b.size, " bytes)");
  RF_CHECK(n <= kMaxSafetensorsHeader, src, ": header length ", n, " exceeds the ", kMaxSafetensorsHeader, "-byte limit");
  const char* h = reinterpret_cast<const char*>(b.data + 8);
  const json header = parse_json(h, h + n, src, "safetensors header");
  RF_CHECK(header.is_object(), src, ": safetensors header must be a JSON object, got ", header.type_name());
  const uint8_t* base = b.data + 8 + n;
  const uint64_t data_size = b.size - 8 - n;
  struct Range {
    uint64_t begin, end;
    size_t tensor;
  };
  std::vector<Range> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") {
      RF_CHECK(e.is_object(), src, ": __metadata__ must be an object of strings");
      for (auto m = e.begin(); m != e.end(); ++m)
        metadata_[m.key()] = json_string(m.value(), src, "__metadata__." + m.key());
      continue;
    }
    const std::string key = "tensor " + name;
    RF_CHECK(e.is_object(), src, ": ", key, ": entry must be an object, got ", e.type_name());
    TensorRef t;
    t.name = name;
    const std::string& ds = json_string(json_require(e, "dtype", src, key), src, key + " dtype");
    RF_CHECK(safetensors_dtype(ds, t.dtype), src, ": unsupported dtype ", ds, " for tensor ", name,
             " (supported: F32, F16, BF16)");
    const json& shape = json_require(e, "shape", src, key);
    RF_CHECK(shape.is_array() && shape.size() <= 8, src, ": ", key, ": shape must be a list of at most 8 sizes");
    for (const json& d : shape) t.shape.push_back(json_int(d, src, key + " shape", 0));
    const json& off = json_require(e, "data_offsets", src, key);
    RF_CHECK(off.is_array() && off.size() == 2, src, ": ", key, ": data_offsets must be [begin, end]");
    const uint64_t begin = uint64_t(json_int(off[0], src, key + " data_offsets", 0));
    const uint64_t end = uint64_t(json_int(off[1], src, key + " data_offsets", 0));
    RF_CHECK(begin <= end, src, ": ", key, ": data_offsets [", begin, ", ", end, "] are reversed");
    RF_CHECK(end <= data_size, src, ": ", key, ": data_offsets [", begin, ", ", end,
             "] run past the end of the data (", data_size, " bytes; file truncated?)");
    uint64_t nbytes = 0;
    RF_CHECK(checked_nbytes(t.shape, dtype_size(t.dtype), nbytes), src, ": ", key, ": shape ", t.shape_str(),
             " is too large");
    RF_CHECK(nbytes == end - begin, src, ": ", key, ": shape ", t.shape_str(), " of ", ds, " is ", nbytes,
             " bytes but data_offsets [", begin, ", ", end, "] hold ", end - begin);
    t.data = base + begin;
    RF_CHECK(reinterpret_cast<uintptr_t>(t.data) % uintptr_t(dtype_size(t.dtype)) == 0 || nbytes == 0, src, ": ",
             key, ": data at offset ", begin, " is not aligned to its ", dtype_size(t.dtype), "-byte elements");
    ranges.push_back({begin, end, tensors_.size()});
    tensors_.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& c) {
    return a.begin != c.begin ? a.begin < c.begin : a.end < c.end;
  });
  for (size_t i = 1; i < ranges.size(); ++i) {
    const Range& a = ranges[i - 1];
    const Range& c = ranges[i];
    RF_CHECK(c.begin >= a.end || a.begin == a.end || c.begin == c.end, src, ": tensors ", tensors_[a.tensor].name,
             " [", a.begin, ", ", a.end, ") and ", tensors_[c.tensor].name, " [", c.begin, ", ", c.end, ") overlap");
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

/// Writes `tensors` (dtype, shape, data each) and string metadata to `path` as safetensors.
/// The data section starts 8-byte aligned and tensors are stored contiguously (as every reader
/// requires), 4-byte tensors first, so each tensor is aligned to its element size. The file is
/// written to PATH.tmp-PID, flushed to disk, then renamed over PATH: a reader never sees half a file.
void write_safetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  using detail::json;
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return dtype_size(tensors[a].dtype) > dtype_size(tensors[b].dtype);
  });
  nlohmann::ordered_json header;
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (size_t i : order) {
    const TensorRef& t = tensors[i];
    RF_CHECK(!t.name.empty() && t.name != "__metadata__", "write_safetensors: ", path, ": invalid tensor name \"",
             t.name, "\"");
    RF_CHECK(!header.contains(t.name), "write_safetensors: ", path, ": tensor ", t.name, " is given twice");
    uint64_t nbytes = 0;
    RF_CHECK(detail::checked_nbytes(t.shape, dtype_size(t.dtype), nbytes), "write_safetensors: ", path, ": tensor ",
             t.name, " has an invalid shape ", t.shape_str());
    RF_CHECK(t.data || nbytes == 0, "write_safetensors: ", path, ": tensor ", t.name, " has no data");
    header[t.name] = {{"dtype", detail::safetensors_dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string h = header.empty() ? std::string("{}") : header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // data starts 8-byte aligned (8 + |h| is a multiple of 8)
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));

  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  RF_CHECK(f, "write_safetensors: ", tmp, ": cannot open for writing (", std::strerror(errno), ")");
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
  for (size_t i : order) {
    if (!ok) break;
    const size_t n = tensors[i].nbytes();
    ok = n == 0 || std::fwrite(tensors[i].data, 1, n, f) == n;
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int err = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    fail("write_safetensors: ", tmp, ": write failed (", std::strerror(err), ")");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    fail("write_safetensors: cannot rename ", tmp, " to ", path, " (", std::strerror(e), ")");
  }
}

}  // namespace recurformer
