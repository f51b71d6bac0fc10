// recurformer/model/detail/json_util.hpp: typed reads of JSON fields with one-line errors that name
// the source (file path) and the key, shared by the safetensors header, the index and config.json.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "recurformer/core/error.hpp"

namespace recurformer {
namespace detail {

using json = nlohmann::json;

/// Parses `text` as JSON; a syntax error becomes "SOURCE: malformed JSON (...)".
inline json parse_json(const char* begin, const char* end, const std::string& source, const char* what) {
  try {
    return json::parse(begin, end);
  } catch (const json::exception& e) {
    fail(source, ": malformed JSON in ", what, " (", e.what(), ")");
  }
}

inline const char* json_type_name(const json& v) { return v.type_name(); }

/// An integer field in [lo, hi]; `key` names it in errors.
inline int64_t json_int(const json& v, const std::string& source, const std::string& key,
                        int64_t lo = std::numeric_limits<int64_t>::min(),
                        int64_t hi = std::numeric_limits<int64_t>::max()) {
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    RF_CHECK(u <= uint64_t(std::numeric_limits<int64_t>::max()), source, ": ", key, " = ", u, " is too large");
    x = int64_t(u);
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
  } else if (v.is_number_float() && v.get<double>() == double(int64_t(v.get<double>())) &&
             v.get<double>() >= -9.0e18 && v.get<double>() <= 9.0e18) {
    x = int64_t(v.get<double>());  // 2.0 is accepted where an integer is meant
  } else {
    fail(source, ": ", key, " must be an integer, got ", json_type_name(v), " ", v.dump());
  }
  RF_CHECK(x >= lo && x <= hi, source, ": ", key, " = ", x, " is out of range [", lo, ", ", hi, "]");
  return x;
}

inline double json_number(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_number(), source, ": ", key, " must be a number, got ", json_type_name(v), " ", v.dump());
  return v.get<double>();
}

inline bool json_bool(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_boolean(), source, ": ", key, " must be true or false, got ", json_type_name(v), " ", v.dump());
  return v.get<bool>();
}

inline const std::string& json_string(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_string(), source, ": ", key, " must be a string, got ", json_type_name(v), " ", v.dump());
  return v.get_ref<const std::string&>();
}

/// obj[key], or an error naming the missing key. obj must be an object.
inline const json& json_require(const json& obj, const std::string& key, const std::string& source,
                                const std::string& where = "") {
  const auto it = obj.find(key);
  RF_CHECK(it != obj.end(), source, ": missing ", where.empty() ? "" : where + ".", key);
  return *it;
}

/// obj[key] when present and not null, else nullptr.
inline const json* json_find(const json& obj, const std::string& key) {
  const auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

}  // namespace detail
}  // namespace recurformer
