// recurformer/cuda/memory.cuh: DeviceMemory, HostMemory's twin (core/memory.hpp) for owners of
// long-lived device buffers: HybridCache<T, DeviceMemory> is the cache in device memory.
//
// Buffers are cudaMalloc'ed on the current device and zeroed at allocation (waited for, so a new
// cache is ready before any stream uses it). zero() and copy() are asynchronous on the
// memory's stream, ordered with the kernels the caller enqueues on the same stream.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "recurformer/cuda/exec.cuh"

namespace recurformer {

/// An owning array in device memory (movable, not copyable).
template <class E>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { resize(n); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  E* data() { return data_; }
  const E* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  /// n zeroed elements; the old contents are not kept (HybridCache only resizes to overwrite).
  void resize(size_t n) {
    if (n == size_) return;
    release();
    if (n == 0) return;
    RF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(E)));
    size_ = n;
    RF_CUDA_CHECK(cudaMemset(data_, 0, n * sizeof(E)));
    // cudaMemset of device memory is asynchronous on the default stream, which a non-blocking (or
    // per-thread default) stream does not wait for: wait here, or its first kernels may read garbage.
    RF_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  }

 private:
  void release() noexcept {
    if (data_) cudaFree(data_);  // never throws: called from the destructor
    data_ = nullptr;
    size_ = 0;
  }
  E* data_ = nullptr;
  size_t size_ = 0;
};

struct DeviceMemory {
  static constexpr bool host_accessible = false;
  template <class E>
  using Buffer = DeviceBuffer<E>;

  cudaStream_t stream = nullptr;  ///< where zero() and copy() run (null: the legacy default stream)

  template <class E>
  static Buffer<E> zeros(int64_t n) {
    return Buffer<E>(size_t(n > 0 ? n : 0));
  }
  template <class E>
  void zero(E* p, int64_t n) const {
    if (n > 0) RF_CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(n) * sizeof(E), stream));
  }
  template <class E>
  void copy(E* dst, const E* src, int64_t n) const {
    if (n > 0 && dst != src)
      RF_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(E), cudaMemcpyDeviceToDevice, stream));
  }
};

}  // namespace recurformer
