// recurformer/cpu/detail/scan_sequences.hpp: the packed sequences of a scan / conv call, as the
// CPU kernels see them. Prefill reads cu_seqlens (absent: one sequence of all tokens); the one-token
// updates make every token row its own sequence. Both take the slot from state_slots (absent: the
// sequence index); a negative slot is padding.
#pragma once

#include <cstdint>

#include "recurformer/core/view.hpp"
#include "recurformer/ops/selective_scan.hpp"  // ScanMode

namespace recurformer {
namespace cpu {
namespace detail {

struct PackedSequences {
  recurformer::detail::ScanMode mode;
  int64_t tokens;
  View<const int32_t, 1> cu, slots;

  int64_t count() const {
    if (mode == recurformer::detail::ScanMode::state_update) return tokens;
    return cu.present() ? cu.shape[0] - 1 : 1;
  }
  int64_t begin(int64_t s) const {
    if (mode == recurformer::detail::ScanMode::state_update) return s;
    return cu.present() ? int64_t(cu(s)) : 0;
  }
  int64_t end(int64_t s) const {
    if (mode == recurformer::detail::ScanMode::state_update) return s + 1;
    return cu.present() ? int64_t(cu(s + 1)) : tokens;
  }
  int64_t slot(int64_t s) const { return slots.present() ? int64_t(slots(s)) : s; }
};

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
