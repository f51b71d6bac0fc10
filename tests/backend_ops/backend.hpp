// tests/backend_ops/backend.hpp: the backends backend_ops_test runs every case on, behind one
// plain interface (no CUDA types), so the driver is compiled by the host compiler alone.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "cases.hpp"

namespace rfops {

struct Backend {
  std::string name;
  std::function<Result(const Case&)> run;
};

/// The CPU at every vector ISA this machine has, scalar (the reference) first (cpu_backend.cpp).
std::vector<Backend> cpu_backends();

#ifdef RF_BACKEND_OPS_CUDA
/// CUDA on the default stream, and on a non-blocking stream from a fresh host thread per case
/// (its own cuBLAS handle). Empty, with the reason in `why`, when no device is usable; a broken
/// driver or toolkit (not merely no device) sets `broken` (cuda_backend.cu).
std::vector<Backend> cuda_backends(std::string& why, bool& broken);
#endif

}  // namespace rfops
