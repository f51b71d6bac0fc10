// The CUDA backend of backend_ops_test: device memory, the ops' CUDA entry points, and two ways of
// calling them: on the default stream, and on a non-blocking stream from a fresh host thread per
// case (the thread's own cuBLAS handle; every upload ordered before the launch on that stream).
#include <cuda_runtime.h>

#include <exception>
#include <memory>
#include <thread>

#include "recurformer/cuda/attention.cuh"
#include "recurformer/cuda/causal_conv1d.cuh"
#include "recurformer/cuda/linear.cuh"
#include "recurformer/cuda/recency_score.cuh"
#include "recurformer/cuda/rope.cuh"
#include "recurformer/cuda/selective_scan.cuh"
#include "support/gpu_probe.cuh"

#include "backend.hpp"

namespace rfops {
namespace {

class CudaBackend {
 public:
  explicit CudaBackend(cudaStream_t stream) : stream_(stream) {}
  template <class T>
  T* put(const std::vector<T>& host) {
    void* p = nullptr;
    RF_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(host.size(), 1) * sizeof(T)));
    owned_.emplace_back(p, [](void* q) { cudaFree(q); });
    if (!host.empty())  // ordered before the op on this stream, whatever kind of stream it is
      RF_CUDA_CHECK(cudaMemcpyAsync(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream_));
    RF_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the host vector may go before the copy lands
    return static_cast<T*>(p);
  }
  template <class T>
  std::vector<T> get(const T* p, size_t n) const {
    std::vector<T> host(n);
    RF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (n) RF_CUDA_CHECK(cudaMemcpy(host.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  CudaExec exec() const { return CudaExec{stream_}; }

 private:
  cudaStream_t stream_;
  std::vector<std::unique_ptr<void, void (*)(void*)>> owned_;
};

Result run_on_stream(const Case& c, cudaStream_t stream) {
  CudaBackend be(stream);
  return run_case(c, be);
}

}  // namespace

std::vector<Backend> cuda_backends(std::string& why, bool& broken) {
  const rftest::GpuProbe gpu = rftest::probe_gpu();
  broken = gpu.broken;
  if (!gpu.usable) {
    why = gpu.message;
    return {};
  }
  auto other_thread = [](const Case& c) {
    Result r;
    std::exception_ptr error;
    std::thread t([&] {
      try {
        cudaStream_t s = nullptr;
        RF_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        std::unique_ptr<CUstream_st, void (*)(cudaStream_t)> own(s, [](cudaStream_t x) { cudaStreamDestroy(x); });
        r = run_on_stream(c, s);
      } catch (...) {
        error = std::current_exception();
      }
    });
    t.join();
    if (error) std::rethrow_exception(error);
    return r;
  };
  return {{"cuda", [](const Case& c) { return run_on_stream(c, nullptr); }}, {"cuda-thread", other_thread}};
}

}  // namespace rfops
