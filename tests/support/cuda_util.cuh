// tests/support/cuda_util.cuh: device buffers for the gpu-labelled tests, which compare every CUDA
// op to its CPU implementation on the same random inputs.
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

/// The same view over another base pointer (host view -> device view of the same layout).
template <class V, class T>
V rebase(V v, const std::vector<T>& host, T* device) {
  if (v.data) v.data = device + (v.data - host.data());
  return v;
}

/// Element-wise a against b (both storage values), as doubles, with the test tolerance.
template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = double(float(v[i]));
  return r;
}

}  // namespace rftest
