// recurformer/core/memory.hpp: where an owner of long-lived buffers (HybridCache) keeps them.
//
// A Memory is a small copyable policy, the twin of an exec: HostMemory (this header) keeps
// buffers in std::vector and copies with memcpy; DeviceMemory (cuda/memory.cuh) keeps them in
// cudaMalloc'ed memory and copies and clears asynchronously on its stream. Both provide
//   template <class E> using Buffer       an owning, movable array: data(), size(), empty(),
//                                         resize(n) (the contents afterwards are unspecified)
//   template <class E> Buffer<E> zeros(n) n elements, all bits zero (0.0 in every storage type)
//   zero(p, n), copy(dst, src, n)         on elements of one buffer or of two buffers of this memory
// so the owner is written once, over either memory.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace recurformer {

struct HostMemory {
  static constexpr bool host_accessible = true;
  template <class E>
  using Buffer = std::vector<E>;

  template <class E>
  static Buffer<E> zeros(int64_t n) {
    Buffer<E> b(static_cast<size_t>(n));
    if (n > 0) std::memset(static_cast<void*>(b.data()), 0, size_t(n) * sizeof(E));
    return b;
  }
  template <class E>
  void zero(E* p, int64_t n) const {
    if (n > 0) std::memset(static_cast<void*>(p), 0, size_t(n) * sizeof(E));
  }
  template <class E>
  void copy(E* dst, const E* src, int64_t n) const {
    if (n > 0 && dst != src) std::memmove(static_cast<void*>(dst), static_cast<const void*>(src), size_t(n) * sizeof(E));
  }
};

}  // namespace recurformer
