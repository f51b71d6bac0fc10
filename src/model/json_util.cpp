// src/model/json_util.cpp: typed reads of JSON fields with one-line errors that name the source and
// the key (model/detail/json_util.hpp).
#include "recurformer/model/detail/json_util.hpp"

#include <cmath>

namespace recurformer {
namespace detail {

json parse_json(const char* begin, const char* end, const std::string& source, const char* what) {
  return parse_json_as<json>(begin, end, source, what);
}

std::string json_quote(const json& v) {
  if (v.is_array()) return "a list of " + std::to_string(v.size()) + " elements";
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
  std::string s = v.dump();
  if (s.size() > 48) s = s.substr(0, 45) + "...";
  return s;
}

const char* json_type_name(const json& v) { return v.type_name(); }

int64_t json_int(const json& v, const std::string& source, const std::string& key, int64_t lo, int64_t hi) {
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

double json_number(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_number(), source, ": ", key, " must be a number, got ", json_type_name(v), " ", json_quote(v));
  return v.get<double>();
}

bool json_bool(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_boolean(), source, ": ", key, " must be true or false, got ", json_type_name(v), " ", json_quote(v));
  return v.get<bool>();
}

const std::string& json_string(const json& v, const std::string& source, const std::string& key) {
  RF_CHECK(v.is_string(), source, ": ", key, " must be a string, got ", json_type_name(v), " ", json_quote(v));
  return v.get_ref<const std::string&>();
}

const json& json_require(const json& obj, const std::string& key, const std::string& source,
                         const std::string& where) {
  const auto it = obj.find(key);
  RF_CHECK(it != obj.end(), source, ": missing ", where.empty() ? "" : where + ".", key);
  return *it;
}

const json* json_find(const json& obj, const std::string& key) {
  const auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

}  // namespace detail
}  // namespace recurformer
