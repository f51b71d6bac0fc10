// recurformer/cpu/support.hpp: supports(params, CpuExec) for the CPU entry points (core/support.hpp).
//
// The CPU kernels have no limits of their own beyond what the params' check() already asks (every
// head dim of the dispatch list, any head count, stride or alignment, any index memory on the
// host), so for the params types the cpu/ entry points take the answer is that check, reported
// instead of thrown. Ops whose entry points share a params type have their own query next to them:
// supports_update (cpu/selective_scan.hpp, cpu/causal_conv1d.hpp) and the block-weight linear's
// and embedding's supports(p, blocks, exec) (cpu/linear.hpp, cpu/embedding.hpp).
#pragma once

#include <type_traits>

#include "recurformer/core/exec.hpp"
#include "recurformer/core/support.hpp"

namespace recurformer {

template <class T, class TW>
struct HybridAttentionCoreParams;
template <class T, class TW, class Memory>
struct HybridHeadAttentionParams;

namespace detail {
/// Whether a params type's CPU answer is its check. Not for the hybrid layer and its core: their
/// calls check more than their params (the step, the cache's capacity, every inner op), and their
/// answers are in cpu/hybrid_head_attention.hpp, so a unit without it gets no answer, not a wrong one.
template <class Params>
struct cpu_support_is_check : std::true_type {};
template <class T, class TW>
struct cpu_support_is_check<HybridAttentionCoreParams<T, TW>> : std::false_type {};
template <class T, class TW, class Memory>
struct cpu_support_is_check<HybridHeadAttentionParams<T, TW, Memory>> : std::false_type {};
}  // namespace detail

/// Whether op(p, CpuExec) runs: p's check, reported instead of thrown.
template <class Params, std::enable_if_t<detail::cpu_support_is_check<Params>::value, int> = 0>
auto supports(const Params& p, CpuExec) -> decltype(check(p), Support()) {
  return detail::support_of([&] { check(p); });
}

}  // namespace recurformer
