// recurformer/core/index_memory.hpp: where an op's index arrays live, which decides how much of
// them its check() can read. The ops' params headers need this and nothing else of an exec.
#pragma once

namespace recurformer {

namespace detail {
/// Where an op's index arrays (cu_seqlens, slots, lengths, positions) live. Host: their contents
/// are checked too. Device (CUDA ops): only their shapes are, since reading them would
/// synchronise; the kernels skip indices outside the pool or clamp lengths instead, and a slot
/// named twice in one device call is the caller's error (undefined).
enum class IndexMemory { host, device };
}  // namespace detail

}  // namespace recurformer
