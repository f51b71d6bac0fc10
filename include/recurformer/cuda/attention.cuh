// recurformer/cuda/attention.cuh: attention (ops/attention.hpp) on a CUDA stream, every view
// (cu_seqlens, kv_slots, page_table, kv_lens, positions included) in device memory; K/V contiguous
// slots or a pool of pages (ops/attention.hpp).
//
// One kernel for decode and prefill (cuda/detail/attention_kernel.cuh): blocks of up to 16 query
// rows (tile tokens x the g query heads of a KV group) stream K/V tiles through shared memory with
// an online softmax. Decode (no more tokens than sequences) uses one-token tiles; prefill tiles of
// 16 / g tokens aligned to each sequence. When the grid would be small (decode, short prefill) the
// keys of each tile are split into up to capacity / kAttnMinSplitKeys ranges handled by separate
// blocks, whose partial (acc, max, sum) rows go to the workspace and are merged by log-sum-exp
// (FlashDecoding). The plan depends on shapes only (kv_lens are on the device), so the workspace
// is sized for the most keys a sequence can hold (the slot capacity, or its table's pages x page
// size); the ranges themselves are cut from the actual kv_lens.
//
// Index arrays are not read by the host check (that would synchronise): the kernels clamp
// cu_seqlens into [0, tokens], kv_lens into [0, capacity] and page indices into the pool, and a sequence whose slot is outside
// the pool sees no key (out = 0, lse = -inf). cu_seqlens must still be valid for every output row
// to be written. K and V rows must be 16-byte aligned (the data pointers and the slot, head and key
// strides), which any dense cache satisfies.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/core/support.hpp"
#include "recurformer/cuda/detail/attention_kernel.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/ops/attention.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

constexpr int64_t kAttnTargetBlocks = 1024;  ///< split the keys until the grid has this many blocks
constexpr int64_t kAttnMinSplitKeys = 256;   ///< of capacity per split: below, merging costs more

/// The CUDA kernel's limits for valid params p (supports() below).
template <class T>
void attention_limits(const AttentionParams<T>& p, Support& s) {
  using recurformer::detail::support_limit;
  const char* op = "attention";
  const int64_t g = p.q.shape[1] / p.k.shape[1];
  support_limit(s, g <= kAttnMaxRows, op, ": the CUDA kernel takes at most ", kAttnMaxRows,
                " query heads per KV head, got ", g);
  constexpr int64_t vec = 16 / int64_t(sizeof(T));
  auto aligned = [&](const auto& v) {
    return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.stride[0] % vec == 0 && v.stride[1] % vec == 0 &&
           v.stride[2] % vec == 0;
  };
  support_limit(s, aligned(p.k) && aligned(p.v), op, ": the CUDA kernel needs 16-byte aligned K and V rows (data ",
                "pointers and slot/head/key strides multiples of ", vec, " elements)");
  support_limit(s, p.q.shape[0] <= 0x7fffffff, op, ": at most 2^31 - 1 tokens per CUDA call, got ", p.q.shape[0]);
  support_limit(s, p.q.shape[1] <= 65535, op, ": at most 65535 query heads per CUDA call, got ", p.q.shape[1]);
}

template <class T>
AttnLaunch plan_attention(const AttentionParams<T>& p) {
  const int64_t tokens = p.q.shape[0], n_q = p.q.shape[1], n_kv = p.k.shape[1], g = n_q / n_kv;
  const int64_t S = recurformer::detail::attention_num_sequences(p);
  AttnLaunch L;
  L.one_token_tiles = tokens <= S;
  L.tile_tokens = L.one_token_tiles ? 1 : int(std::max<int64_t>(1, kAttnMaxRows / g));
  L.tiles = L.one_token_tiles ? tokens : (tokens + L.tile_tokens - 1) / L.tile_tokens + (p.cu_seqlens.data ? S : 0);
  const int64_t blocks = L.tiles * n_kv;
  if (blocks > 0 && blocks < kAttnTargetBlocks) {
    const int64_t want = (kAttnTargetBlocks + blocks - 1) / blocks;
    L.nsplit = int(std::max<int64_t>(1, std::min<int64_t>({want, attention_max_keys(p) / kAttnMinSplitKeys, 65535})));
  }
  L.scale = p.scale > 0 ? p.scale : float(1.0 / std::sqrt(double(p.q.shape[2])));
  return L;
}

inline size_t attention_partial_bytes(const AttnLaunch& L, int64_t tokens, int64_t n_q, int64_t hd) {
  return L.nsplit > 1 ? size_t(tokens * n_q * L.nsplit * (hd + 2)) * sizeof(float) : 0;
}

}  // namespace detail
}  // namespace cuda

/// Whether attention(p, CudaExec, ...) runs (core/support.hpp): p's check (index arrays in device
/// memory), then the kernel's limits: n_q / n_kv <= 16, 16-byte aligned K and V rows (slots or
/// pages), at most 65535 heads.
template <class T>
Support supports(const AttentionParams<T>& p, CudaExec) {
  Support s;
  if (detail::support_check(s, [&] { check(p, detail::IndexMemory::device); })) cuda::detail::attention_limits(p, s);
  return s;
}

namespace cuda {
namespace detail {
template <class T>
void check_cuda_attention(const AttentionParams<T>& p) {
  recurformer::detail::require_supported(supports(p, CudaExec{}));
}
}  // namespace detail
}  // namespace cuda

/// Bytes of device scratch attention(p, CudaExec, ...) needs (0 when the keys are not split). A
/// function of the shapes only.
template <class T>
size_t attention_workspace_bytes(const AttentionParams<T>& p, CudaExec) {
  cuda::detail::check_cuda_attention(p);
  return cuda::detail::attention_partial_bytes(cuda::detail::plan_attention(p), p.q.shape[0], p.q.shape[1],
                                               p.q.shape[2]);
}

/// Runs attention on exec.stream; workspace is device memory of at least
/// attention_workspace_bytes(p, exec) bytes. Checks shapes before any launch; head_dim must be in
/// AttentionHeadDims and n_q / n_kv at most 16.
template <class T>
void attention(const AttentionParams<T>& p, CudaExec exec, void* workspace, size_t workspace_bytes) {
  cuda::detail::check_cuda_attention(p);
  cuda::detail::AttnLaunch L = cuda::detail::plan_attention(p);
  const int64_t tokens = p.q.shape[0], n_q = p.q.shape[1], n_kv = p.k.shape[1];
  const size_t need = cuda::detail::attention_partial_bytes(L, tokens, n_q, p.q.shape[2]);
  RF_CHECK(workspace_bytes >= need, "attention: workspace has ", workspace_bytes, " bytes, expected at least ", need,
           " (attention_workspace_bytes)");
  RF_CHECK(need == 0 || workspace != nullptr, "attention: workspace is null");
  L.part = static_cast<float*>(workspace);
  detail::dispatch_attention_head_dim("attention: head_dim", p.q.shape[2], [&](auto hd) {
    constexpr int HD = decltype(hd)::value;
    if (tokens == 0 || L.tiles == 0) return;
    const dim3 grid(unsigned(L.tiles), unsigned(n_kv), unsigned(L.nsplit));
    cuda::detail::attention_tile_kernel<T, HD><<<grid, cuda::detail::kAttnThreads, 0, exec.stream>>>(p, L);
    RF_CUDA_CHECK_LAUNCH("attention_tile_kernel");
    if (L.nsplit == 1) return;
    cuda::detail::attention_merge_kernel<T, HD>
        <<<dim3(unsigned(tokens), unsigned(n_q)), HD, 0, exec.stream>>>(p, L.part, L.nsplit);
    RF_CUDA_CHECK_LAUNCH("attention_merge_kernel");
  });
}

}  // namespace recurformer
