// tests/support/gpu_probe.cuh: whether this machine can run the GPU tests. Only "no device" is a
// reason to skip: no driver installed at all (libcuda.so.1 cannot be loaded, where the runtime
// says "insufficient driver") or a driver that sees no device. Any other runtime error (a driver
// older than the toolkit, a broken install) is `broken`, which fails rather than skips.
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <string>

#include "test_util.hpp"  // gpu_required()

namespace rftest {

struct GpuProbe {
  bool usable = false, broken = false;
  std::string message;  // why not usable
};

inline GpuProbe probe_gpu() {
  GpuProbe g;
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  void* h = e == cudaErrorInsufficientDriver ? dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL) : nullptr;
  if (h) dlclose(h);
  const bool no_driver = e == cudaErrorInsufficientDriver && !h;
  if (e != cudaSuccess && e != cudaErrorNoDevice && !no_driver) {
    g.broken = true;
    g.message = std::string("CUDA runtime error ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e) +
                " (the driver, the toolkit or the install is broken: failing, not skipping)";
  } else if (e != cudaSuccess || n == 0) {
    g.message = no_driver ? "no CUDA driver installed (libcuda.so.1 not found)" : "no CUDA device visible";
  } else {
    g.usable = true;
  }
  return g;
}

}  // namespace rftest
