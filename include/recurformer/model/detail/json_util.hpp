// recurformer/model/detail/json_util.hpp: typed reads of JSON fields with one-line errors that name
// the source (file path) and the key, shared by the safetensors header, the index and config.json.
#pragma once

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
json parse_json(const char* begin, const char* end, const std::string& source, const char* what);

/// A value as an error message quotes it: scalars as JSON (at most 48 characters), arrays and
/// objects by their size only, so a message stays one short line whatever the file holds.
std::string json_quote(const json& v);

const char* json_type_name(const json& v);

/// An integer field in [lo, hi]; `key` names it in errors.
int64_t json_int(const json& v, const std::string& source, const std::string& key,
                 int64_t lo = std::numeric_limits<int64_t>::min(),
                 int64_t hi = std::numeric_limits<int64_t>::max());

double json_number(const json& v, const std::string& source, const std::string& key);

bool json_bool(const json& v, const std::string& source, const std::string& key);

const std::string& json_string(const json& v, const std::string& source, const std::string& key);

/// obj[key], or an error naming the missing key. obj must be an object.
const json& json_require(const json& obj, const std::string& key, const std::string& source,
                         const std::string& where = "");

/// obj[key] when present and not null, else nullptr.
const json* json_find(const json& obj, const std::string& key);

}  // namespace detail
}  // namespace recurformer
