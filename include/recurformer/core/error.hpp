// recurformer/core/error.hpp: the library's one error type and its host-side checks.
//
// Every public entry point validates its arguments before it touches memory and throws
// recurformer::Error with a message that names the operation, the argument and the expectation,
// e.g. "selective_scan: B has shape [7, 2, 64], expected [7, 1, 64]". Nothing is written when a check
// fails, so a caller can catch the error and carry on with its state intact.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace recurformer {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

/// Throws Error whose message is the concatenation of the arguments.
template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace recurformer

/// RF_CHECK(cond, parts...): throw recurformer::Error(concat(parts...)) unless cond holds.
#define RF_CHECK(cond, ...)                        \
  do {                                             \
    if (!(cond)) ::recurformer::fail(__VA_ARGS__); \
  } while (0)
