// recurformer/cuda/detail/hybrid_kernels.cuh: the data movement of the hybrid head attention layer
// on the device (the CUDA HybridBackend, cuda/hybrid_head_attention.cuh), and the pinned staging
// of its host-computed metadata.
//
// Every kernel is one grid-stride loop over output elements: the moves are a few MB at most per
// layer call (the K/V of the chunk, the streaming window), so they run at the copy rate without
// tiling. All indices come from metadata the host computed and checked (slots, positions, ring
// entries), so the kernels trust them.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "recurformer/cuda/detail/convert.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/layers/detail/hybrid_head_attention_run.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

namespace hy = recurformer::detail::hybrid;
constexpr int kMoveThreads = 256;

#define RF_GRID_STRIDE(idx, count)                                                        \
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < (count); \
       idx += int64_t(gridDim.x) * blockDim.x)

/// Launches kernel(count, args...) over `count` elements on the stream (nothing when count <= 0).
template <class... KA, class... A>
void launch_moves(const char* name, void (*kernel)(int64_t, KA...), int64_t count, cudaStream_t stream,
                  const A&... args) {
  if (count <= 0) return;
  const int64_t blocks = std::min<int64_t>((count + kMoveThreads - 1) / kMoveThreads, int64_t(1) << 16);
  kernel<<<unsigned(blocks), kMoveThreads, 0, stream>>>(count, args...);
  recurformer::detail::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__);
}

// q heads: element (t, h, e) of qf [n, n_q, hd] -> q[kind] [n, nk, g, hd] of every kind slot serving
// the group; recurrent q scaled.
template <class T>
__global__ void gather_q_kernel(int64_t count, const hy::Plan pl, const hy::CallBuffers<T> b, float c_scale) {
  RF_GRID_STRIDE(idx, count) {
    const int64_t e = idx % pl.hd, h = (idx / pl.hd) % pl.n_q, t = idx / (pl.hd * pl.n_q);
    const int64_t j = h / pl.g, r = h % pl.g;
    for (int kind = 0; kind < 3; ++kind) {
      const int64_t i = b.group_local[j * 3 + kind], nk = pl.groups[kind];
      if (i < 0) continue;
      const float v = b.qf[t * pl.q_ld + h * pl.hd + e] * (kind == hy::kRec ? c_scale : 1.f);
      store_float(b.q[kind] + ((t * nk + i) * pl.g + r) * pl.hd + e, v);
    }
  }
}

// k, v: element (t, j, e) of kf/vf [n, n_kv, hd] -> k[kind], v[kind] [n, nk, hd].
template <class T>
__global__ void gather_kv_kernel(int64_t count, const hy::Plan pl, const hy::CallBuffers<T> b) {
  RF_GRID_STRIDE(idx, count) {
    const int64_t e = idx % pl.hd, j = (idx / pl.hd) % pl.n_kv, t = idx / (pl.hd * pl.n_kv);
    for (int kind = 0; kind < 3; ++kind) {
      const int64_t i = b.group_local[j * 3 + kind];
      if (i < 0) continue;
      const int64_t at = (t * pl.groups[kind] + i) * pl.hd + e;
      store_float(b.k[kind] + at, b.kf[t * pl.k_ld + j * pl.hd + e]);
      store_float(b.v[kind] + at, b.vf[t * pl.v_ld + j * pl.hd + e]);
    }
  }
}

// Head outputs o[kind] [n, nk, g, hd] -> heads [n, n_q, hd] in fp32 (the concat Wo reads): the sum over
// the kind slots serving the group, the recurrent output weighted by alpha in a windowed group.
template <class T>
__global__ void scatter_heads_kernel(int64_t count, const hy::Plan pl, const hy::CallBuffers<T> b) {
  RF_GRID_STRIDE(idx, count) {
    const int64_t e = idx % pl.hd, h = (idx / pl.hd) % pl.n_q, t = idx / (pl.hd * pl.n_q);
    const int64_t j = h / pl.g, r = h % pl.g;
    const bool windowed = b.group_local[j * 3 + hy::kStream] >= 0 && b.group_local[j * 3 + hy::kRec] >= 0;
    float acc = 0.f;
    for (int kind = 0; kind < 3; ++kind) {
      const int64_t i = b.group_local[j * 3 + kind], nk = pl.groups[kind];
      if (i < 0) continue;
      const float wgt = kind == hy::kRec && windowed ? b.alpha[i * pl.g + r] : 1.f;
      acc += wgt * load_float(b.o[kind] + ((t * nk + i) * pl.g + r) * pl.hd + e);
    }
    b.heads[t * pl.out_ld + h * pl.hd + e] = acc;
  }
}

// Attention groups: (t, i, e) of the chunk's k/v [n, nA, hd] -> K/V[slot, i, pos, e] (or its page and row).
template <class T>
__global__ void append_kv_kernel(int64_t count, const hy::Plan pl, const hy::CallBuffers<T> b, const View<T, 4> K,
                                 const View<T, 4> V) {
  const int64_t nA = pl.groups[hy::kAttn];
  RF_GRID_STRIDE(idx, count) {
    const int64_t e = idx % pl.hd, i = (idx / pl.hd) % nA, t = idx / (pl.hd * nA);
    const hy::KvRow at = hy::kv_row(pl, b, t);
    *K.ptr(at.page, i, at.row, e) = b.k[hy::kAttn][idx];
    *V.ptr(at.page, i, at.row, e) = b.v[hy::kAttn][idx];
  }
}

// Streaming scratch (s, i, m, e) [S, nS, cap, hd]: key m of sequence s from its ring entry
// (s_src >= 0) or from chunk token -(s_src + 1); rows past the sequence's key count are not read.
template <class T>
__global__ void stream_gather_kernel(int64_t count, const hy::Plan pl, const hy::CallBuffers<T> b,
                                     const View<T, 4> RK, const View<T, 4> RV, const View<T, 4> SK,
                                     const View<T, 4> SV) {
  const int64_t nS = pl.groups[hy::kStream], cap = pl.stream_cap;
  RF_GRID_STRIDE(idx, count) {
    const int64_t e = idx % pl.hd, m = (idx / pl.hd) % cap, i = (idx / (pl.hd * cap)) % nS;
    const int64_t s = idx / (pl.hd * cap * nS);
    if (m >= b.s_kv_lens[s]) continue;
    const int32_t src = b.s_src[s * cap + m];
    const int64_t chunk = (int64_t(-src - 1) * nS + i) * pl.hd + e;
    *SK.ptr(s, i, m, e) = src >= 0 ? *RK.ptr(b.slots[s], i, src, e) : b.k[hy::kStream][chunk];
    *SV.ptr(s, i, m, e) = src >= 0 ? *RV.ptr(b.slots[s], i, src, e) : b.v[hy::kStream][chunk];
  }
}

// Streaming groups: (t, i, e) of the chunk's k/v -> ring entry ring_dst[t] (skipped when -1: a
// later token of the chunk owns the entry, so no two threads write one entry).
template <class T>
__global__ void ring_write_kernel(int64_t count, const hy::Plan pl, const hy::CallBuffers<T> b, const View<T, 4> RK,
                                  const View<T, 4> RV) {
  const int64_t nS = pl.groups[hy::kStream];
  RF_GRID_STRIDE(idx, count) {
    const int64_t e = idx % pl.hd, i = (idx / pl.hd) % nS, t = idx / (pl.hd * nS);
    const int32_t entry = b.ring_dst[t];
    if (entry < 0) continue;
    const int32_t slot = b.slots[b.tok_seq[t]];
    *RK.ptr(slot, i, entry, e) = b.k[hy::kStream][idx];
    *RV.ptr(slot, i, entry, e) = b.v[hy::kStream][idx];
  }
}

template <class T>
__global__ void to_storage_kernel(int64_t count, T* dst, const float* src) {
  RF_GRID_STRIDE(idx, count) store_float(dst + idx, src[idx]);
}

#undef RF_GRID_STRIDE

/// Pinned host buffers for the metadata upload, per host thread and device. A ring of four, each
/// guarded by an event, lets the host fill the next call's metadata while earlier uploads are
/// still queued behind kernels (a pageable cudaMemcpyAsync would synchronise the stream instead).
class MetadataStaging {
 public:
  static constexpr int kRing = 4;
  MetadataStaging() = default;
  MetadataStaging(const MetadataStaging&) = delete;
  MetadataStaging& operator=(const MetadataStaging&) = delete;
  ~MetadataStaging() {
    for (Entry& e : ring_) {  // errors ignored: the runtime may be gone at thread exit
      if (e.done) cudaEventDestroy(e.done);
      if (e.host) cudaFreeHost(e.host);
    }
  }
  /// A host buffer of at least `bytes`, no longer read by an earlier upload.
  unsigned char* acquire(size_t bytes) {
    Entry& e = ring_[next_];
    if (e.done) RF_CUDA_CHECK(cudaEventSynchronize(e.done));
    if (e.bytes < bytes) {
      if (e.host) RF_CUDA_CHECK(cudaFreeHost(e.host));
      e.host = nullptr;
      e.bytes = 0;
      RF_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&e.host), bytes));
      e.bytes = bytes;
    }
    return e.host;
  }
  /// Uploads the buffer acquire() returned to `device_dst` on the stream; the next acquire uses the
  /// next buffer of the ring.
  void upload(void* device_dst, size_t bytes, cudaStream_t stream) {
    Entry& e = ring_[next_];
    RF_CUDA_CHECK(cudaMemcpyAsync(device_dst, e.host, bytes, cudaMemcpyHostToDevice, stream));
    if (!e.done) RF_CUDA_CHECK(cudaEventCreateWithFlags(&e.done, cudaEventDisableTiming));
    RF_CUDA_CHECK(cudaEventRecord(e.done, stream));
    next_ = (next_ + 1) % kRing;
  }
  /// This host thread's staging for the current device.
  static MetadataStaging& current() {
    constexpr int kMaxDevices = 64;
    thread_local MetadataStaging per_device[kMaxDevices];
    int device = 0;
    RF_CUDA_CHECK(cudaGetDevice(&device));
    RF_CHECK(device >= 0 && device < kMaxDevices, "hybrid_head_attention: device ", device, " beyond the ",
             kMaxDevices, " the metadata staging serves");
    return per_device[device];
  }

 private:
  struct Entry {
    unsigned char* host = nullptr;
    size_t bytes = 0;
    cudaEvent_t done = nullptr;
  };
  Entry ring_[kRing];
  int next_ = 0;
};

}  // namespace detail
}  // namespace cuda
}  // namespace recurformer
