// tests/support/npy.hpp: a tiny reader of NumPy .npy files, for the golden fixtures that
// tools/make_golden*.py write under tests/data/ (the tests never run Python).
//
// Supported, and nothing else (anything else is a clear error naming the file): format versions
// 1.0, 2.0 and 3.0; dtypes '<f4' (float32) and '<i4' (int32), little-endian; C order. The element
// type asked for must match the file's dtype exactly, so a fixture written with the wrong dtype
// fails loudly instead of being converted.
//
//   rftest::npy::Array a = rftest::npy::load(dir + "/y.npy");
//   a.shape            // e.g. {7, 32}
//   a.as<float>()      // the values, C order
//   rftest::npy::load_as<int32_t>(path, {5})   // values, after checking the shape
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace rftest {
namespace npy {

/// One array as stored: dtype descriptor ("<f4" or "<i4"), extents, raw little-endian bytes.
struct Array {
  std::string path;
  std::string descr;
  std::vector<int64_t> shape;  // empty for a 0-d array (one element)
  std::vector<char> bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  std::string shape_string() const {
    std::string r = "[";
    for (size_t i = 0; i < shape.size(); ++i) r += (i ? ", " : "") + std::to_string(shape[i]);
    return r + "]";
  }

  /// The values as T (float for '<f4', int32_t for '<i4'); throws on any other pairing.
  template <class T>
  std::vector<T> as() const {
    static_assert(std::is_same<T, float>::value || std::is_same<T, int32_t>::value,
                  "npy: only float and int32_t arrays are supported");
    const char* want = std::is_same<T, float>::value ? "<f4" : "<i4";
    if (descr != want)
      throw std::runtime_error("npy: " + path + " has dtype '" + descr + "', expected '" + want + "'");
    std::vector<T> v(static_cast<size_t>(numel()));
    if (!v.empty()) std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));  // x86: little-endian
    return v;
  }
};

namespace detail {
[[noreturn]] inline void bad(const std::string& path, const std::string& why) {
  throw std::runtime_error("npy: " + path + ": " + why);
}

// The value text of `key` in the header dict, e.g. "'<f4'" or "(3, 4)" or "False".
inline std::string dict_value(const std::string& path, const std::string& header, const char* key) {
  const std::string k = std::string("'") + key + "'";
  size_t p = header.find(k);
  if (p == std::string::npos) bad(path, std::string("header has no '") + key + "' entry: " + header);
  p = header.find(':', p + k.size());
  if (p == std::string::npos) bad(path, "malformed header: " + header);
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  size_t e = p;
  if (p < header.size() && header[p] == '(') {
    e = header.find(')', p);
    if (e == std::string::npos) bad(path, "malformed shape in header: " + header);
    ++e;
  } else if (p < header.size() && header[p] == '\'') {
    e = header.find('\'', p + 1);
    if (e == std::string::npos) bad(path, "malformed string in header: " + header);
    ++e;
  } else {
    while (e < header.size() && header[e] != ',' && header[e] != '}') ++e;
  }
  return header.substr(p, e - p);
}
}  // namespace detail

/// Reads a whole .npy file; throws std::runtime_error naming the file and the problem.
inline Array load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) detail::bad(path, "cannot open (is RECURFORMER_TEST_DATA_DIR right?)");
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    detail::bad(path, "not a .npy file (bad magic)");
  const int major = (unsigned char)magic[6];
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char l[2];
    if (!f.read(reinterpret_cast<char*>(l), 2)) detail::bad(path, "truncated header");
    header_len = uint32_t(l[0]) | uint32_t(l[1]) << 8;
  } else if (major == 2 || major == 3) {
    unsigned char l[4];
    if (!f.read(reinterpret_cast<char*>(l), 4)) detail::bad(path, "truncated header");
    header_len = uint32_t(l[0]) | uint32_t(l[1]) << 8 | uint32_t(l[2]) << 16 | uint32_t(l[3]) << 24;
  } else {
    detail::bad(path, "unsupported format version " + std::to_string(major));
  }
  std::string header(header_len, '\0');
  if (!f.read(&header[0], header_len)) detail::bad(path, "truncated header");

  Array a;
  a.path = path;
  const std::string descr = detail::dict_value(path, header, "descr");
  a.descr = descr.size() >= 2 ? descr.substr(1, descr.size() - 2) : descr;
  if (a.descr != "<f4" && a.descr != "<i4")
    detail::bad(path, "unsupported dtype '" + a.descr + "' (only '<f4' and '<i4')");
  if (detail::dict_value(path, header, "fortran_order") != "False")
    detail::bad(path, "Fortran-order arrays are not supported (write C order)");
  const std::string shape = detail::dict_value(path, header, "shape");
  for (size_t i = 1; i + 1 < shape.size();) {
    while (i + 1 < shape.size() && (shape[i] == ' ' || shape[i] == ',')) ++i;
    if (i + 1 >= shape.size()) break;
    size_t used = 0;
    const long long v = std::stoll(shape.substr(i), &used);
    if (used == 0 || v < 0) detail::bad(path, "malformed shape " + shape);
    a.shape.push_back(int64_t(v));
    i += used;
  }
  const int64_t n = a.numel();
  a.bytes.resize(size_t(n) * 4);
  if (n && !f.read(a.bytes.data(), std::streamsize(a.bytes.size())))
    detail::bad(path, "truncated data: expected " + std::to_string(n) + " elements of shape " +
                          a.shape_string());
  return a;
}

/// The values of a file, after checking its shape (-1 in `expected` matches any extent).
template <class T>
std::vector<T> load_as(const std::string& path, const std::vector<int64_t>& expected) {
  const Array a = load(path);
  bool ok = a.shape.size() == expected.size();
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || expected[i] == a.shape[i];
  if (!ok) {
    std::string e = "[";
    for (size_t i = 0; i < expected.size(); ++i) e += (i ? ", " : "") + std::to_string(expected[i]);
    detail::bad(path, "has shape " + a.shape_string() + ", expected " + e + "]");
  }
  return a.as<T>();
}

}  // namespace npy
}  // namespace rftest
