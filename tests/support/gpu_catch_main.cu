// Main for the gpu-labelled tests. Without a CUDA device they exit 77, which ctest reports as
// skipped (SKIP_RETURN_CODE), so a GPU-less CI stays green and honest; a broken driver or toolkit
// fails (support/gpu_probe.cuh), and with RECURFORMER_REQUIRE_GPU=1 (scripts/gpu-check.sh on a GPU
// machine) nothing skips at all, so a first run on a GPU cannot pass by skipping.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>

#include "gpu_probe.cuh"

int main(int argc, char** argv) {
  const rftest::GpuProbe gpu = rftest::probe_gpu();
  if (gpu.broken) {
    std::printf("%s\n", gpu.message.c_str());
    return 1;
  }
  if (!gpu.usable) {
    if (rftest::gpu_required()) {
      std::printf("%s, and RECURFORMER_REQUIRE_GPU is set: failing\n", gpu.message.c_str());
      return 1;
    }
    std::printf("%s: skipped\n", gpu.message.c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
