// recurformer/cuda/selective_scan.cuh: selective_scan and selective_state_update on a CUDA stream,
// the same params (ops/selective_scan.hpp) with every view in device memory.
//
// Prefill (Mamba-1's structure): one thread block per (channel, sequence). The sequence is cut into
// chunks of kThreads * kItems tokens; each thread owns kItems consecutive tokens. For every state
// n the recurrence h_t = a_t h_{t-1} + b_t (a = exp(dt A), b = dt B u) is a scan over the
// associative pairs (a, b); the thread folds its items, cub::BlockScan combines the threads, and a
// prefix callback carries the running state from chunk to chunk, so only the final state is ever
// stored (a backward pass can recompute per-chunk states from the chunk boundaries). y accumulates
// over n in registers.
// Decode: one warp per (token row, channel); lanes own states n = lane, lane + 32, ...; the state is
// read, updated and written once (the op is bound by that traffic); y is a warp reduction per
// reader.
// cu_seqlens and state_slots live on the device and are not read by the host checks; slots outside
// the pool are skipped like padding.
#pragma once

#include <cub/block/block_scan.cuh>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/core/support.hpp"
#include "recurformer/cuda/detail/convert.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/ops/selective_scan.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

/// Readers (GQA group size) one CUDA scan handles: y accumulators live in registers.
constexpr int kMaxReaders = 8;
/// States per lane in the decode kernel (N <= 32 * kMaxStatesPerLane).
constexpr int kMaxStatesPerLane = 8;

struct ScanPair {
  float a, b;  // h -> a h + b
};
struct ComposeScanPair {
  /// x first, then y.
  __device__ __forceinline__ ScanPair operator()(const ScanPair& x, const ScanPair& y) const {
    return {x.a * y.a, y.a * x.b + y.b};
  }
};
/// Hands each chunk the running state of the sequence (as the constant map h -> running) and
/// folds the chunk's aggregate into it. CUB calls it from every lane of the first warp and uses
/// lane 0's result only, so only lane 0 touches `running` (a read by the other lanes while lane 0
/// writes would be a shared-memory race for racecheck, harmless or not).
struct RunningStatePrefix {
  float* running;
  __device__ __forceinline__ ScanPair operator()(const ScanPair& chunk) {
    if (threadIdx.x % 32 != 0) return ScanPair{0.f, 0.f};  // discarded by CUB
    const ScanPair before{0.f, *running};
    *running = chunk.a * before.b + chunk.b;
    return before;
  }
};

template <class T>
__device__ __forceinline__ void sequence_range(const SelectiveScanParams<T>& p, int64_t s,
                                               int64_t& t0, int64_t& t1, int64_t& slot) {
  if (p.cu_seqlens.data) {
    const int64_t tokens = p.u.shape[0];
    t0 = recurformer::detail::clamp_index(p.cu_seqlens(s), 0, tokens);
    t1 = recurformer::detail::clamp_index(p.cu_seqlens(s + 1), t0, tokens);
  } else {
    t0 = 0, t1 = p.u.shape[0];
  }
  slot = p.state_slots.data ? int64_t(p.state_slots(s)) : s;
  if (slot >= p.state.shape[0]) slot = -1;  // outside the pool: skipped, like padding
}

__device__ __forceinline__ float delta_to_dt(float d, bool softplus_on) {
  return softplus_on ? softplus(d) : d;
}

// grid (Dch, S), block kThreads. Shared: the running state of each n.
template <class T, int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads)
    selective_scan_kernel(const SelectiveScanParams<T> p) {
  using BlockScan = cub::BlockScan<ScanPair, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  extern __shared__ float running[];  // [N]

  const int64_t c = blockIdx.x, s = blockIdx.y;
  int64_t t0, t1, slot;
  sequence_range(p, s, t0, t1, slot);
  if (slot < 0) return;
  const int64_t n_state = p.A.shape[1], readers = p.C.shape[2];
  const int64_t group = c / (p.u.shape[1] / p.B.shape[1]);
  float* state = p.state.ptr(slot, c, 0);
  for (int64_t n = threadIdx.x; n < n_state; n += kThreads)
    running[n] = p.use_initial_state ? state[n] : 0.f;
  const bool softplus_on = p.delta_activation == DeltaActivation::softplus;
  const float bias = p.delta_bias.data ? p.delta_bias(c) : 0.f;
  const float skip = p.D.data ? p.D(c) : 0.f;
  __syncthreads();

  constexpr int64_t kChunk = int64_t(kThreads) * kItems;
  for (int64_t chunk = t0; chunk < t1; chunk += kChunk) {
    const int64_t first = chunk + int64_t(threadIdx.x) * kItems;
    float dt[kItems], u[kItems], y[kItems][kMaxReaders];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = first + i;
      const bool live = t < t1;
      u[i] = live ? load_float(p.u.ptr(t, c)) : 0.f;
      dt[i] = live ? delta_to_dt(load_float(p.delta.ptr(t, c)) + bias, softplus_on) : 0.f;
#pragma unroll
      for (int r = 0; r < kMaxReaders; ++r) y[i][r] = 0.f;
    }
    for (int64_t n = 0; n < n_state; ++n) {
      const float a_cn = p.A(c, n);
      ScanPair item[kItems];
      ScanPair folded{1.f, 0.f};
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = first + i;
        const bool live = t < t1;
        // Dead items are the identity map, so they leave the running state unchanged.
        item[i].a = live ? __expf(dt[i] * a_cn) : 1.f;
        item[i].b = live ? dt[i] * load_float(p.B.ptr(t, group, n)) * u[i] : 0.f;
        folded = ComposeScanPair()(folded, item[i]);
      }
      RunningStatePrefix prefix{&running[n]};
      ScanPair before;
      BlockScan(scan_storage).ExclusiveScan(folded, before, ComposeScanPair(), prefix);
      float h = before.b;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = first + i;
        h = item[i].a * h + item[i].b;
        if (t < t1) {
#pragma unroll
          for (int r = 0; r < kMaxReaders; ++r)  // unrolled to the bound so y stays in registers
            if (r < readers) y[i][r] += h * load_float(p.C.ptr(t, group, r, n));
        }
      }
      __syncthreads();  // scan_storage is reused for the next n
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = first + i;
      if (t >= t1) continue;
      const float gate = p.z.data ? silu(load_float(p.z.ptr(t, c))) : 1.f;
#pragma unroll
      for (int r = 0; r < kMaxReaders; ++r)
        if (r < readers) store_float(p.y.ptr(t, r, c), (y[i][r] + skip * u[i]) * gate);
    }
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < n_state; n += kThreads) state[n] = running[n];
}

// grid (ceil(Dch / kWarps), tokens), block 32 * kWarps: warp w of block b serves channel
// b * kWarps + w of token row blockIdx.y.
template <class T, int kWarps>
__global__ void __launch_bounds__(32 * kWarps)
    selective_state_update_kernel(const SelectiveScanParams<T> p) {
  const int lane = threadIdx.x % 32;
  const int64_t c = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, t = blockIdx.y;
  const int64_t dch = p.u.shape[1];
  if (c >= dch) return;
  int64_t slot = p.state_slots.data ? int64_t(p.state_slots(t)) : t;
  if (slot < 0 || slot >= p.state.shape[0]) return;
  const int64_t n_state = p.A.shape[1], readers = p.C.shape[2];
  const int64_t group = c / (dch / p.B.shape[1]);
  const float u = load_float(p.u.ptr(t, c));
  const float dt = delta_to_dt(load_float(p.delta.ptr(t, c)) + (p.delta_bias.data ? p.delta_bias(c) : 0.f),
                               p.delta_activation == DeltaActivation::softplus);
  float* state = p.state.ptr(slot, c, 0);
  float h[kMaxStatesPerLane];
#pragma unroll
  for (int j = 0; j < kMaxStatesPerLane; ++j) {
    const int64_t n = lane + 32 * j;
    h[j] = 0.f;
    if (n < n_state) {
      const float h0 = p.use_initial_state ? state[n] : 0.f;
      h[j] = __expf(dt * p.A(c, n)) * h0 + dt * load_float(p.B.ptr(t, group, n)) * u;
      state[n] = h[j];
    }
  }
  const float skip = p.D.data ? p.D(c) * u : 0.f;
  const float gate = p.z.data ? silu(load_float(p.z.ptr(t, c))) : 1.f;
  for (int64_t r = 0; r < readers; ++r) {
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxStatesPerLane; ++j) {
      const int64_t n = lane + 32 * j;
      if (n < n_state) acc += h[j] * load_float(p.C.ptr(t, group, r, n));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) store_float(p.y.ptr(t, r, c), (acc + skip) * gate);
  }
}

/// Whether the scan (mode scan) or the state update runs on CUDA: the check, then the kernels'
/// limits (R readers, d_state N, and grid.y, so a caller's dry run of the checks (the hybrid layer)
/// sees it before anything is written).
template <class T>
Support supports_scan(const char* op, recurformer::detail::ScanMode mode, const SelectiveScanParams<T>& p) {
  using recurformer::detail::support_limit;
  Support s;
  if (!recurformer::detail::support_check(s, [&] {
        recurformer::detail::check_selective_scan(op, mode, p, recurformer::detail::IndexMemory::device);
      }))
    return s;
  support_limit(s, p.C.shape[2] <= kMaxReaders, op, ": the CUDA kernels take at most ", kMaxReaders,
                " readers R, got ", p.C.shape[2]);
  support_limit(s, p.A.shape[1] <= 32 * kMaxStatesPerLane, op, ": the CUDA kernels take d_state N <= ",
                32 * kMaxStatesPerLane, ", got ", p.A.shape[1]);
  const bool update = mode == recurformer::detail::ScanMode::state_update;
  const int64_t rows = update ? p.u.shape[0] : p.cu_seqlens.data ? p.cu_seqlens.shape[0] - 1 : 1;
  support_limit(s, rows <= 65535, op, ": at most 65535 ", update ? "token rows" : "sequences",
                " per call on CUDA, got ", rows);
  return s;
}

template <class T>
void check_cuda_scan(const char* op, recurformer::detail::ScanMode mode, const SelectiveScanParams<T>& p) {
  recurformer::detail::require_supported(supports_scan(op, mode, p));
}

}  // namespace detail
}  // namespace cuda

/// Whether selective_scan(p, CudaExec) runs (core/support.hpp): p's check (index arrays in device
/// memory), then the kernels' limits: at most 8 readers R, d_state N <= 256, 65535 sequences.
template <class T>
Support supports(const SelectiveScanParams<T>& p, CudaExec) {
  return cuda::detail::supports_scan("selective_scan", detail::ScanMode::scan, p);
}
/// Whether selective_state_update(p, CudaExec) runs: as above, with 65535 token rows.
template <class T>
Support supports_update(const SelectiveScanParams<T>& p, CudaExec) {
  return cuda::detail::supports_scan("selective_state_update", detail::ScanMode::state_update, p);
}

/// Prefill / chunked prefill on the device (see ops/selective_scan.hpp for the math).
template <class T>
void selective_scan(const SelectiveScanParams<T>& p, CudaExec exec) {
  cuda::detail::check_cuda_scan("selective_scan", detail::ScanMode::scan, p);
  const int64_t n_seq = p.cu_seqlens.data ? p.cu_seqlens.shape[0] - 1 : 1;
  if (n_seq == 0) return;
  constexpr int kThreads = 128, kItems = 4;
  const dim3 grid(unsigned(p.u.shape[1]), unsigned(n_seq));
  cuda::detail::selective_scan_kernel<T, kThreads, kItems>
      <<<grid, kThreads, size_t(p.A.shape[1]) * sizeof(float), exec.stream>>>(p);
  RF_CUDA_CHECK_LAUNCH("selective_scan_kernel");
}

/// Decode on the device: token row t updates state slot state_slots[t] (absent: t) in place.
template <class T>
void selective_state_update(const SelectiveScanParams<T>& p, CudaExec exec) {
  cuda::detail::check_cuda_scan("selective_state_update", detail::ScanMode::state_update, p);
  const int64_t rows = p.u.shape[0];
  if (rows == 0) return;
  constexpr int kWarps = 4;
  const dim3 grid(unsigned((p.u.shape[1] + kWarps - 1) / kWarps), unsigned(rows));
  cuda::detail::selective_state_update_kernel<T, kWarps><<<grid, 32 * kWarps, 0, exec.stream>>>(p);
  RF_CUDA_CHECK_LAUNCH("selective_state_update_kernel");
}

}  // namespace recurformer
