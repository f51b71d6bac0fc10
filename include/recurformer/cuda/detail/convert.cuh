// recurformer/cuda/detail/convert.cuh: storage dtype <-> fp32 on the device with the hardware
// conversions (the host structs' bit arithmetic would be correct but slow in a kernel). The
// storage structs are layout-compatible with __half and __nv_bfloat16 (core/dtype.hpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "recurformer/core/dtype.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_float(const half* p) {
  return __half2float(__ldg(reinterpret_cast<const __half*>(p)));
}
__device__ __forceinline__ float load_float(const bfloat16* p) {
  return __bfloat162float(__ldg(reinterpret_cast<const __nv_bfloat16*>(p)));
}

__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(half* p, float v) {
  *reinterpret_cast<__half*>(p) = __float2half_rn(v);
}
__device__ __forceinline__ void store_float(bfloat16* p, float v) {
  *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
}

/// Plain (non-__ldg) load, for buffers the same kernel also writes (states).
template <class T>
__device__ __forceinline__ float load_float_rw(const T* p) {
  return to_float(*p);
}
__device__ __forceinline__ float load_float_rw(const half* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}
__device__ __forceinline__ float load_float_rw(const bfloat16* p) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

}  // namespace detail
}  // namespace cuda
}  // namespace recurformer
