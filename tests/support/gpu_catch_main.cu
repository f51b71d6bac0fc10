// Main for the gpu-labelled tests. Without a CUDA device they exit 77, which ctest reports as
// skipped (SKIP_RETURN_CODE), so a GPU-less CI stays green and honest. Only "no device" skips: no
// driver installed at all (libcuda.so.1 cannot be loaded, where the runtime says "insufficient
// driver") or a driver that sees no device. Any other runtime error (a driver older than the
// toolkit, a broken install) fails, and
// with RECURFORMER_REQUIRE_GPU=1 (scripts/gpu-check.sh on a GPU machine) nothing skips at all, so a
// first run on a GPU cannot pass by skipping.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {
bool driver_installed() {
  void* h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (h) dlclose(h);
  return h != nullptr;
}
}  // namespace

int main(int argc, char** argv) {
  const char* require = std::getenv("RECURFORMER_REQUIRE_GPU");
  const bool required = require && std::strcmp(require, "0") != 0 && *require != '\0';
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  const bool no_driver = e == cudaErrorInsufficientDriver && !driver_installed();
  if (e != cudaSuccess && e != cudaErrorNoDevice && !no_driver) {
    std::printf("CUDA runtime error %s: %s (the driver, the toolkit or the install is broken: failing, not skipping)\n",
                cudaGetErrorName(e), cudaGetErrorString(e));
    return 1;
  }
  if (e != cudaSuccess || n == 0) {
    const char* what = no_driver ? "no CUDA driver installed (libcuda.so.1 not found)" : "no CUDA device visible";
    if (required) {
      std::printf("%s, and RECURFORMER_REQUIRE_GPU is set: failing\n", what);
      return 1;
    }
    std::printf("%s: skipped\n", what);
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
