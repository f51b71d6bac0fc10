// recurformer/cuda/rope.cuh: rope (ops/rope.hpp) on a CUDA stream, x, positions and inv_freq in
// device memory.
//
// One thread per (token, head, frequency pair): the pair is read, rotated in fp32 and written back
// once, so the op runs at the copy rate of x. The angle is float(pos) * inv_freq[i] in fp32 and
// cos/sin are the accurate sincosf (angles reach 10^4 rad at long contexts; the fast __sinf would
// lose the low bits there), exactly as the CPU op rounds. positions live on the device and are not
// read by the host check; a token with a negative position is left unrotated.
#pragma once

#include <algorithm>
#include <cstdint>

#include "recurformer/cuda/detail/convert.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/ops/rope.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

constexpr int kRopeThreads = 256;

template <class T>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams<T> p) {
  const int64_t heads = p.x.shape[1], n_freq = p.x.shape[2] / 2;
  const int64_t pairs = p.x.shape[0] * heads * n_freq;
  const bool interleaved = p.layout == RopeLayout::interleaved;
  for (int64_t idx = int64_t(blockIdx.x) * kRopeThreads + threadIdx.x; idx < pairs;
       idx += int64_t(gridDim.x) * kRopeThreads) {
    const int64_t i = idx % n_freq, h = (idx / n_freq) % heads, t = idx / (n_freq * heads);
    const int32_t pos = __ldg(p.positions.ptr(t));
    if (pos < 0) continue;
    float s, c;
    sincosf(float(pos) * __ldg(p.inv_freq.ptr(i)), &s, &c);
    T* a_ptr = p.x.ptr(t, h, interleaved ? 2 * i : i);
    T* b_ptr = interleaved ? a_ptr + 1 : a_ptr + n_freq;
    const float a = load_float_rw(a_ptr), b = load_float_rw(b_ptr);
    store_float(a_ptr, a * c - b * s);
    store_float(b_ptr, b * c + a * s);
  }
}

}  // namespace detail
}  // namespace cuda

/// Whether rope(p, CudaExec) runs (core/support.hpp): p's check, positions in device memory.
template <class T>
Support supports(const RopeParams<T>& p, CudaExec) {
  return detail::support_of([&] { check(p, detail::IndexMemory::device); });
}

/// Applies RoPE in place on the device. Checks the shapes first (positions are not read on the host).
template <class T>
void rope(const RopeParams<T>& p, CudaExec exec) {
  check(p, detail::IndexMemory::device);
  const int64_t pairs = p.x.shape[0] * p.x.shape[1] * (p.x.shape[2] / 2);
  if (pairs == 0) return;
  // Grid-stride loop: enough blocks to fill any current GPU, never more than 2^20.
  const int64_t blocks = std::min<int64_t>((pairs + cuda::detail::kRopeThreads - 1) / cuda::detail::kRopeThreads,
                                           int64_t(1) << 20);
  cuda::detail::rope_kernel<T><<<unsigned(blocks), cuda::detail::kRopeThreads, 0, exec.stream>>>(p);
  RF_CUDA_CHECK_LAUNCH("rope_kernel");
}

}  // namespace recurformer
