// recurformer/model/detail/json_util.hpp: typed reads of JSON fields with one-line errors that name
// the source (file path) and the key, shared by the safetensors header, the index and config.json.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "recurformer/core/error.hpp"

namespace recurformer {
namespace detail {

using json = nlohmann::json;

/// Input rules for every JSON the library reads: nesting at most kJsonMaxDepth deep (a deeper
/// document would overflow the stack in nlohmann's recursive dump and destructors), and no key twice
/// in one object (nlohmann keeps the last one silently; a file with two "num_hidden_layers" means
/// two things).
constexpr int kJsonMaxDepth = 64;

/// Parses `text` as J (json or ordered_json) under the rules above; a violation or a syntax error
/// becomes "SOURCE: malformed JSON in WHAT (...)".
template <class J = nlohmann::json>
J parse_json_as(const char* begin, const char* end, const std::string& source, const char* what) {
  std::vector<std::unordered_set<std::string>> keys;  // the keys seen so far in each open object
  const auto rules = [&](int depth, typename J::parse_event_t event, J& parsed) {
    using E = typename J::parse_event_t;
    if (event == E::object_start || event == E::array_start)
      RF_CHECK(depth < kJsonMaxDepth, source, ": malformed JSON in ", what, " (nested deeper than ", kJsonMaxDepth,
               " levels)");
    if (event == E::object_start) keys.emplace_back();
    if (event == E::object_end && !keys.empty()) keys.pop_back();
    if (event == E::key && !keys.empty()) {
      const std::string& k = parsed.template get_ref<const std::string&>();
      RF_CHECK(keys.back().insert(k).second, source, ": malformed JSON in ", what, " (key \"", k.substr(0, 48),
               "\" appears twice in one object)");
    }
    return true;
  };
  try {
    return J::parse(begin, end, rules);
  } catch (const nlohmann::json::exception& e) {
    fail(source, ": malformed JSON in ", what, " (", e.what(), ")");
  }
}
inline json parse_json(const char* begin, const char* end, const std::string& source, const char* what) {
  return parse_json_as<json>(begin, end, source, what);
}

/// A value as an error message quotes it: scalars as JSON (at most 48 characters), arrays and
/// objects by their size only, so a message stays one short line whatever the file holds.
inline std::string json_quote(const json& v) {
  if (v.is_array()) return "a list of " + std::to_string(v.size()) + " elements";
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
  std::string s = v.dump();
  if (s.size() > 48) s = s.substr(0, 45) + "...";
  return s;
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
  } else if (v.is_number_float() && std::fabs(v.get<double>()) <= 9.0e18 &&
             v.get<double>() == std::floor(v.get<double>())) {
    x = int64_t(v.get<double>());  // 2.0 is accepted where an integer is meant (range first: the cast of 1e75 is UB)
  } else {
    fail(source, ": ", key, " must be an integer, got ", json_type_name(v), " ", json_quote(v));
  }
  RF_CHECK(x >= lo && x <= hi, source, ": ", key, " = ", x, " is out of range [", lo, ", ", hi, "]");
  return x;
}

inline double json_number(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_number(), source, ": ", key, " must be a number, got ", json_type_name(v), " ", json_quote(v));
  return v.get<double>();
}

inline bool json_bool(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_boolean(), source, ": ", key, " must be true or false, got ", json_type_name(v), " ", json_quote(v));
  return v.get<bool>();
}

inline const std::string& json_string(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_string(), source, ": ", key, " must be a string, got ", json_type_name(v), " ", json_quote(v));
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
