// tests/support/cuda_util.cuh: device buffers for the gpu-labelled layer tests.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "recurformer/cuda/exec.cuh"

namespace rftest {

/// A device copy of a host vector; download() brings it back.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(const std::vector<T>& host) : n_(host.size()) {
    RF_CUDA_CHECK(cudaMalloc(&data_, (n_ ? n_ : 1) * sizeof(T)));
    if (n_) RF_CUDA_CHECK(cudaMemcpy(data_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
    // A pageable cudaMemcpy may return before its DMA lands, ordered only on the default stream:
    // wait, so a kernel on a non-blocking stream (linear_test.cu) reads the uploaded data.
    RF_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(data_); }
  T* data() const { return data_; }
  std::vector<T> download() const {
    RF_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> host(n_);
    if (n_) RF_CUDA_CHECK(cudaMemcpy(host.data(), data_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t n_;
};

}  // namespace rftest
