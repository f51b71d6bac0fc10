// recurformer/core/support.hpp: whether a backend runs a call, asked before making it (ggml's
// ggml_backend_supports_op, with the reasons).
//
// Next to each op's entry point for an exec there is supports(params, exec) (cpu/*.hpp,
// cuda/*.cuh; supports_update for the one-token updates, which share their params type with the
// prefill): it answers, without throwing, allocating device memory or writing anything, whether
// op(params, exec) would run. When it would not, the answer lists why: either the params' own
// check (the message the op would throw; the backend's limits are not asked of invalid params)
// or every limit of the backend the call meets (a head count a kernel is not built for, paged K/V
// on CUDA, an unaligned view). The op throws the first reason. Not covered: the workspace, which
// the caller sizes with the op's *_workspace_bytes query.
//
//   if (Support s = supports(params, CudaExec{stream}); !s) fall back to the CPU, or report s.why()
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "recurformer/core/error.hpp"

namespace recurformer {

/// The answer of supports(): true when the call runs; otherwise the reasons it does not.
struct Support {
  std::vector<std::string> reasons;  ///< empty: supported

  explicit operator bool() const { return reasons.empty(); }
  /// The reasons joined by "; " (empty when supported).
  std::string why() const {
    std::string s;
    for (const std::string& r : reasons) s += (s.empty() ? "" : "; ") + r;
    return s;
  }
};

namespace detail {

/// Runs a check that throws Error and records its message; true when it passed.
template <class Check>
bool support_check(Support& s, Check&& check) {
  try {
    check();
    return true;
  } catch (const Error& e) {
    s.reasons.emplace_back(e.what());
    return false;
  }
}

/// The answer of a backend with no limits beyond a check: the check's message, if it throws.
template <class Check>
Support support_of(Check&& check) {
  Support s;
  support_check(s, std::forward<Check>(check));
  return s;
}

/// Records a backend limit: when cond is false, the concatenation of the parts is a reason.
template <class... Args>
void support_limit(Support& s, bool cond, Args&&... parts) {
  if (!cond) s.reasons.push_back(concat(std::forward<Args>(parts)...));
}

/// What an entry point does with the answer: throw its first reason.
inline void require_supported(const Support& s) {
  if (!s) throw Error(s.reasons.front());
}

}  // namespace detail
}  // namespace recurformer
