// recurformer/cuda/hybrid_head_attention.cuh: the hybrid head attention layer
// (layers/hybrid_head_attention.hpp) on a CUDA stream, over a HybridCache<T, DeviceMemory>.
//
//   hybrid_head_attention_workspace_bytes(p, CudaExec{stream})
//   hybrid_head_attention(p, CudaExec{stream}, device_workspace, bytes)
//
// The same orchestration as the CPU layer (layers/detail/hybrid_head_attention_run.hpp) over the
// CUDA ops: cuBLAS projections (cuda/linear.cuh), rope, attention (split-KV decode), causal conv,
// selective scan / state update, with the moves between them as small kernels
// (cuda/detail/hybrid_kernels.cuh). x, out, the weights, inv_freq, the cache and the workspace are
// device memory; cu_seqlens and slots are host arrays (the call is planned on the host from them
// and the cache's host-side lengths, and every index is checked there). The host-computed
// metadata (a few KB) goes up with one cudaMemcpyAsync from pinned staging, so a call never
// synchronises the stream: the host may run ahead by up to four calls. With a step plan
// (plan_hybrid_step: the caller's page-locked staging and device buffer, uploaded once per step)
// the per-layer calls launch kernels only and can be captured in a CUDA graph.
//
// Run the layer on the stream the cache's DeviceMemory uses (or order the two yourself): the
// cache's reset/copy/snapshot/restore are enqueued there. Precision is the CPU layer's except the
// projections: half / bfloat16 weights take x rounded to their type (cuda/linear.cuh).
#pragma once

#include "recurformer/cuda/attention.cuh"
#include "recurformer/cuda/causal_conv1d.cuh"
#include "recurformer/cuda/detail/hybrid_kernels.cuh"
#include "recurformer/cuda/linear.cuh"
#include "recurformer/cuda/memory.cuh"
#include "recurformer/cuda/rope.cuh"
#include "recurformer/cuda/selective_scan.cuh"
#include "recurformer/layers/detail/hybrid_head_attention_run.hpp"

namespace recurformer {
namespace detail {
namespace hybrid {

template <>
struct HybridBackend<CudaExec> {
  static constexpr IndexMemory kIndex = IndexMemory::device;

  static unsigned char* metadata_buffer(unsigned char*, size_t bytes, CudaExec) {
    return cuda::detail::MetadataStaging::current().acquire(bytes);
  }
  static void upload_metadata(unsigned char* ws, const unsigned char*, size_t bytes, CudaExec exec) {
    cuda::detail::MetadataStaging::current().upload(ws, bytes, exec.stream);
  }
  // A step plan fills the caller's staging and uploads it once: no hidden buffers, so the layer
  // calls that follow can be captured in a graph.
  static unsigned char* plan_staging(unsigned char*, const HybridPlanBuffers& buf) {
    RF_CHECK(buf.host_staging != nullptr, kCoreOp,
             ": host_staging is null: on CUDA the plan fills its metadata in host memory (page-locked) and uploads it");
    return align_ptr(buf.host_staging);
  }
  static void upload_plan(unsigned char* dst, const unsigned char* host, size_t bytes, CudaExec exec) {
    RF_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, exec.stream));
  }

  template <class T>
  static void check_attention(const AttentionParams<T>& ap) { cuda::detail::check_cuda_attention(ap); }
  template <class T>
  static void check_conv(const CausalConv1dParams<T>& cp, bool decode) {
    check_causal_conv1d(decode ? "causal_conv1d_update" : "causal_conv1d",
                        decode ? ScanMode::state_update : ScanMode::scan, cp, kIndex);
  }
  template <class T>
  static void check_scan(const SelectiveScanParams<T>& sp, bool decode) {
    cuda::detail::check_cuda_scan(decode ? "selective_state_update" : "selective_scan",
                                  decode ? ScanMode::state_update : ScanMode::scan, sp);
  }

  template <class T>
  static void to_storage(T* dst, const float* src, int64_t n, CudaExec exec) {
    cuda::detail::launch_moves("to_storage_kernel", cuda::detail::to_storage_kernel<T>, n, exec.stream, dst, src);
  }
  static void copy_floats(float* dst, const float* src, int64_t n, CudaExec exec) {
    RF_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, exec.stream));
  }
  template <class T>
  static void gather_heads(const Plan& pl, const CallBuffers<T>& b, float c_scale, CudaExec exec) {
    namespace cd = cuda::detail;
    cd::launch_moves("gather_q_kernel", cd::gather_q_kernel<T>, pl.n * pl.n_q * pl.hd, exec.stream, pl, b, c_scale);
    cd::launch_moves("gather_kv_kernel", cd::gather_kv_kernel<T>, pl.n * pl.n_kv * pl.hd, exec.stream, pl, b);
  }
  template <class T>
  static void scatter_heads(const Plan& pl, const CallBuffers<T>& b, CudaExec exec) {
    cuda::detail::launch_moves("scatter_heads_kernel", cuda::detail::scatter_heads_kernel<T>, pl.n * pl.n_q * pl.hd,
                               exec.stream, pl, b);
  }
  template <class T>
  static void append_kv(const Plan& pl, const CallBuffers<T>& b, View<T, 4> K, View<T, 4> V, CudaExec exec) {
    cuda::detail::launch_moves("append_kv_kernel", cuda::detail::append_kv_kernel<T>,
                               pl.n * pl.groups[kAttn] * pl.hd, exec.stream, pl, b, K, V);
  }
  template <class T>
  static void stream_gather(const Plan& pl, const CallBuffers<T>& b, View<T, 4> RK, View<T, 4> RV, View<T, 4> SK,
                            View<T, 4> SV, CudaExec exec) {
    cuda::detail::launch_moves("stream_gather_kernel", cuda::detail::stream_gather_kernel<T>,
                               pl.S * pl.groups[kStream] * pl.stream_cap * pl.hd, exec.stream, pl, b, RK, RV, SK, SV);
  }
  template <class T>
  static void ring_write(const Plan& pl, const CallBuffers<T>& b, View<T, 4> RK, View<T, 4> RV, CudaExec exec) {
    cuda::detail::launch_moves("ring_write_kernel", cuda::detail::ring_write_kernel<T>,
                               pl.n * pl.groups[kStream] * pl.hd, exec.stream, pl, b, RK, RV);
  }
};

}  // namespace hybrid
}  // namespace detail

/// Scratch bytes (device memory) the layer core (layers/hybrid_attention_core.hpp) needs on the device.
template <class T, class TW>
size_t hybrid_attention_core_workspace_bytes(const HybridAttentionCoreParams<T, TW>& p, CudaExec exec) {
  return detail::hybrid::core_workspace_bytes(p, exec);
}

/// Runs the layer core on exec.stream over device views (the step's arrays stay on the host).
template <class T, class TW>
void hybrid_attention_core(const HybridAttentionCoreParams<T, TW>& p, CudaExec exec, void* workspace,
                           size_t workspace_bytes) {
  detail::hybrid::core_call(p, exec, workspace, workspace_bytes);
}

/// The step plan on the device (layers/hybrid_attention_core.hpp): metadata filled in
/// buffers.host_staging and uploaded to buffers.metadata (device) on exec.stream.
template <class T, class TW>
HybridStepPlan<T, TW> plan_hybrid_step(const HybridStepShape& shape, const HybridStep& step, int64_t tokens,
                                       CudaExec exec, const HybridPlanBuffers& buffers) {
  return detail::hybrid::plan_step<CudaExec, T, TW>(shape, step, tokens, exec, buffers);
}

/// One layer of the planned step on exec.stream: kernel launches only (graph-capturable).
template <class T, class TW>
void hybrid_attention_core(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan,
                           CudaExec exec, void* workspace, size_t workspace_bytes) {
  detail::hybrid::core_call(p, plan, exec, workspace, workspace_bytes);
}

template <class T, class TW>
size_t hybrid_head_attention_workspace_bytes(const HybridHeadAttentionParams<T, TW, DeviceMemory>& p,
                                             const HybridStepPlan<T, TW>& plan, CudaExec exec) {
  return detail::hybrid::workspace_bytes(p, plan, exec);
}

template <class T, class TW>
void hybrid_head_attention(const HybridHeadAttentionParams<T, TW, DeviceMemory>& p, const HybridStepPlan<T, TW>& plan,
                           CudaExec exec, void* workspace, size_t workspace_bytes) {
  detail::hybrid::call(p, plan, exec, workspace, workspace_bytes);
}

/// Scratch bytes (device memory) hybrid_head_attention needs for this call on the device.
template <class T, class TW>
size_t hybrid_head_attention_workspace_bytes(const HybridHeadAttentionParams<T, TW, DeviceMemory>& p,
                                             CudaExec exec) {
  return detail::hybrid::workspace_bytes(p, exec);
}

/// Runs the layer on exec.stream (see the top of this file and layers/hybrid_head_attention.hpp).
template <class T, class TW>
void hybrid_head_attention(const HybridHeadAttentionParams<T, TW, DeviceMemory>& p, CudaExec exec, void* workspace,
                           size_t workspace_bytes) {
  detail::hybrid::call(p, exec, workspace, workspace_bytes);
}

/// Whether hybrid_attention_core(p, CudaExec, ...) runs (core/support.hpp): every check of the
/// call, the CUDA ops' limits among them (contiguous K/V: no page table; n_q / n_kv at most 16 for
/// attention and streaming groups, 8 for recurrent ones; d_state <= 256), without touching the
/// device. The first failure is the reason.
template <class T, class TW>
Support supports(const HybridAttentionCoreParams<T, TW>& p, CudaExec exec) {
  return detail::support_of([&] { detail::hybrid::check_core_call(p, exec); });
}

/// Whether hybrid_head_attention(p, CudaExec, ...) runs: the same, with the cuBLAS projections and
/// the cache's capacity.
template <class T, class TW>
Support supports(const HybridHeadAttentionParams<T, TW, DeviceMemory>& p, CudaExec exec) {
  return detail::support_of([&] { detail::hybrid::check_layer_call(p, exec); });
}

/// Whether hybrid_attention_core(p, plan, CudaExec, ...) runs: the views and weights against the
/// plan's shape, and every CUDA limit above, without touching the device.
template <class T, class TW>
Support supports(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan, CudaExec exec) {
  return detail::support_of([&] { detail::hybrid::check_core_plan_call(p, plan, exec); });
}

/// Whether hybrid_head_attention(p, plan, CudaExec, ...) runs: the same, with the projections.
template <class T, class TW>
Support supports(const HybridHeadAttentionParams<T, TW, DeviceMemory>& p, const HybridStepPlan<T, TW>& plan,
                 CudaExec exec) {
  return detail::support_of([&] { detail::hybrid::check_layer_plan_call(p, plan, exec); });
}

}  // namespace recurformer
