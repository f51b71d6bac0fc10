// recurformer/cuda/detail/attention_kernel.cuh: the kernels behind cuda/attention.cuh.
//
// attention_tile_kernel: one block per (query tile, KV head, key split), over contiguous slots or
// pages of K/V (ops/attention.hpp; each key's row found through the page table). The tile's query rows are
// (token, query head) pairs: up to kAttnMaxRows rows = tile tokens x the g query heads of the KV
// group, so every K/V tile staged in shared memory (16-byte loads) serves all g heads and all tile
// tokens (the GQA fold; decode tiles are one token x g heads). Warp w owns rows w, w + 4, ...: its
// lanes take the tile's keys for the logits (q broadcast from shared memory) and the head
// dimensions for P V, with an online softmax per row (fp32, natural-log units, the accurate expf: a decode row sums
// thousands of weights and the fast __expf loses up to ~20 ulps at large |x|). A split of the keys
// either writes the final row (one split) or a partial (acc, max, sum) that
// attention_merge_kernel combines by log-sum-exp, as the CPU op does (FlashDecoding).
#pragma once

#include <climits>
#include <cstdint>

#include "recurformer/cuda/detail/convert.cuh"
#include "recurformer/cuda/exec.cuh"
#include "recurformer/ops/attention.hpp"

namespace recurformer {
namespace cuda {
namespace detail {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr int kAttnMaxRows = 16;  ///< query rows per block (so at most 16 query heads per KV head)
constexpr int kAttnRowsPerWarp = kAttnMaxRows / kAttnWarps;

/// Shared memory of one block. K rows are padded by 16 bytes so that the 8 lanes of a 16-byte
/// access phase reading 8 different keys at the same offset hit 8 distinct groups of 4 banks.
template <class T, int HD>
struct AttnSmem {
  static constexpr int kKeys = sizeof(T) == 4 ? 32 : 64;  ///< keys per tile: 8 or 16 KiB of K
  static constexpr int kVec = 16 / int(sizeof(T));       ///< elements per 16-byte load
  static constexpr int kRowBytes = HD * int(sizeof(T)) + 16;
  alignas(16) unsigned char k[kKeys * kRowBytes];
  alignas(16) unsigned char v[kKeys * HD * sizeof(T)];
  alignas(16) float q[kAttnMaxRows][HD];  // scaled queries
  int kpos[kKeys];
  int qpos[kAttnMaxRows];
};

/// How a call is cut into blocks; the same for attention_workspace_bytes and attention.
struct AttnLaunch {
  bool one_token_tiles = false;  ///< decode: tile b is token b (its sequence found by bisection)
  int tile_tokens = 1;           ///< otherwise: tiles of this many tokens, aligned to each sequence
  int64_t tiles = 0;             ///< grid.x (an upper bound when tiles are aligned to sequences)
  int nsplit = 1;                ///< key splits (grid.z); > 1: partials in the workspace
  float scale = 0;
  float* part = nullptr;         ///< [tokens][n_q][nsplit][HD + 2]: acc, max, sum
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/// Sequence s and its tokens [t0, t1) of tile b; false for a grid slot past the last tile. cu_seqlens
/// is clamped into [0, tokens] and made non-decreasing, so bad device indices cannot fault.
template <class T>
__device__ bool attention_tile(const AttentionParams<T>& p, const AttnLaunch& L, int64_t b, int64_t& s,
                               int64_t& t0, int64_t& t1) {
  const int64_t tokens = p.q.shape[0];
  if (!p.cu_seqlens.data) {
    s = 0;
    t0 = b * L.tile_tokens;
    t1 = min64(tokens, t0 + L.tile_tokens);
    return t0 < tokens;
  }
  const int64_t S = p.cu_seqlens.shape[0] - 1;
  auto cu = [&](int64_t i) { return recurformer::detail::clamp_index(p.cu_seqlens(i), 0, tokens); };
  if (L.one_token_tiles) {
    if (b >= tokens) return false;
    int64_t lo = 0, hi = S;  // the last sequence starting at or before token b
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (cu(mid) <= b ? lo : hi) = mid;
    }
    s = lo, t0 = b, t1 = b + 1;
    return true;
  }
  for (s = 0; s < S; ++s) {
    const int64_t c0 = cu(s), c1 = max64(c0, cu(s + 1));
    const int64_t n = (c1 - c0 + L.tile_tokens - 1) / L.tile_tokens;
    if (b < n) {
      t0 = c0 + b * L.tile_tokens;
      t1 = min64(c1, t0 + L.tile_tokens);
      return true;
    }
    b -= n;
  }
  return false;
}

/// The most keys a sequence can hold: the slot capacity, or its table's pages x page size.
template <class T>
RF_HOST_DEVICE inline int64_t attention_max_keys(const AttentionParams<T>& p) {
  return p.page_table.data ? p.page_table.shape[1] * p.k.shape[2] : p.k.shape[2];
}

/// Storage elements of a 16-byte word as floats.
__device__ __forceinline__ void unpack16(const uint4& w, const float*, float (&f)[4]) {
  f[0] = __uint_as_float(w.x), f[1] = __uint_as_float(w.y), f[2] = __uint_as_float(w.z), f[3] = __uint_as_float(w.w);
}
__device__ __forceinline__ void unpack16(const uint4& w, const half*, float (&f)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x, f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& w, const bfloat16*, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x, f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/// The streaming/causal mask of ops/attention.hpp, in int64 so qp - window cannot overflow.
__device__ __forceinline__ bool key_visible(int kp, int qp, int sink, int window) {
  return kp <= qp && (window == 0 || kp < sink || int64_t(kp) > int64_t(qp) - window);
}

// grid (L.tiles, n_kv, L.nsplit), block kAttnThreads.
template <class T, int HD>
__global__ void __launch_bounds__(kAttnThreads)
    attention_tile_kernel(const AttentionParams<T> p, const AttnLaunch L) {
  using Smem = AttnSmem<T, HD>;
  constexpr int kKeys = Smem::kKeys, kVec = Smem::kVec, kChunks = HD / kVec;
  constexpr int kKeysPerLane = kKeys / 32, kDimsPerLane = HD / 32;
  constexpr int kLoads = kKeys * kChunks / kAttnThreads;  // 16-byte K (and V) loads per thread per tile
  static_assert(kKeys * kChunks % kAttnThreads == 0, "tile loads must divide evenly");
  __shared__ Smem sm;

  int64_t s, t0, t1;
  if (!attention_tile(p, L, blockIdx.x, s, t0, t1)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n_q = p.q.shape[1], g = n_q / p.k.shape[1], kh = blockIdx.y, split = blockIdx.z;
  // Paged: key j of sequence s is row j % page_size of page page_table[s, j / page_size] (a page
  // index outside the pool is clamped into it, like every device index: no fault, wrong keys).
  const bool paged = p.page_table.data != nullptr;
  const int64_t rows_per_block = p.k.shape[2], cap = attention_max_keys(p);
  const int64_t slot = paged ? 0 : p.kv_slots.data ? int64_t(p.kv_slots(s)) : s;
  const bool slot_ok = slot >= 0 && slot < p.k.shape[0];
  int64_t keys = slot_ok ? recurformer::detail::clamp_index(p.kv_lens(s), 0, cap) : 0;
  const int rows = int((t1 - t0) * g);

  for (int i = threadIdx.x; i < rows * HD; i += kAttnThreads) {
    const int r = i / HD, d = i % HD;
    sm.q[r][d] = load_float(p.q.ptr(t0 + r / g, kh * g + r % g, d)) * L.scale;
  }
  if (threadIdx.x < rows) sm.qpos[threadIdx.x] = p.q_positions(t0 + threadIdx.x / g);
  int qmax = INT_MIN;
  for (int64_t t = t0; t < t1; ++t) qmax = max(qmax, int(p.q_positions(t)));
  // With index positions no key past the tile's last query position is visible.
  if (!p.k_positions.data) keys = min64(keys, int64_t(qmax) + 1);
  keys = max64(keys, 0);
  const int64_t k_begin = keys * split / L.nsplit, k_end = keys * (split + 1) / L.nsplit;

  float m[kAttnRowsPerWarp], l[kAttnRowsPerWarp], acc[kAttnRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int r = 0; r < kAttnRowsPerWarp; ++r) {
    m[r] = -INFINITY, l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) acc[r][e] = 0.f;
  }
  __syncthreads();

  for (int64_t j0 = k_begin; j0 < k_end; j0 += kKeys) {
    const int nk = int(min64(kKeys, k_end - j0));
    // Stage the K/V tile: all loads first (they overlap), then the shared-memory stores.
    uint4 kr[kLoads], vr[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int idx = threadIdx.x + i * kAttnThreads, key = idx / kChunks, c = idx % kChunks;
      kr[i] = vr[i] = make_uint4(0, 0, 0, 0);
      if (key < nk) {
        int64_t block = slot, row = j0 + key;
        if (paged) {
          block = recurformer::detail::clamp_index(p.page_table(s, row / rows_per_block), 0, p.k.shape[0] - 1);
          row %= rows_per_block;
        }
        kr[i] = __ldg(reinterpret_cast<const uint4*>(p.k.ptr(block, kh, row, int64_t(c) * kVec)));
        vr[i] = __ldg(reinterpret_cast<const uint4*>(p.v.ptr(block, kh, row, int64_t(c) * kVec)));
      }
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int idx = threadIdx.x + i * kAttnThreads, key = idx / kChunks, c = idx % kChunks;
      *reinterpret_cast<uint4*>(sm.k + key * Smem::kRowBytes + c * 16) = kr[i];
      *reinterpret_cast<uint4*>(sm.v + (key * HD + c * kVec) * sizeof(T)) = vr[i];
    }
    if (threadIdx.x < kKeys)
      sm.kpos[threadIdx.x] = threadIdx.x >= nk ? INT_MAX
                             : p.k_positions.data ? p.k_positions(slot, j0 + threadIdx.x)
                                                  : int(j0 + threadIdx.x);
    __syncthreads();

    // Logits of this lane's keys for each of the warp's rows.
    float sc[kAttnRowsPerWarp][kKeysPerLane];
#pragma unroll
    for (int r = 0; r < kAttnRowsPerWarp; ++r)
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) sc[r][i] = 0.f;
#pragma unroll 2
    for (int c = 0; c < kChunks; ++c) {
      float kf[kKeysPerLane][kVec];
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i)
        unpack16(*reinterpret_cast<const uint4*>(sm.k + (lane + 32 * i) * Smem::kRowBytes + c * 16),
                 static_cast<const T*>(nullptr), kf[i]);
#pragma unroll
      for (int r = 0; r < kAttnRowsPerWarp; ++r) {
        const int rg = warp + kAttnWarps * r;
        if (rg >= rows) break;  // warp-uniform
#pragma unroll
        for (int e4 = 0; e4 < kVec; e4 += 4) {  // one broadcast 16-byte q read serves every key of the lane
          const float4 qv = *reinterpret_cast<const float4*>(&sm.q[rg][c * kVec + e4]);
#pragma unroll
          for (int i = 0; i < kKeysPerLane; ++i)
            sc[r][i] += qv.x * kf[i][e4] + qv.y * kf[i][e4 + 1] + qv.z * kf[i][e4 + 2] + qv.w * kf[i][e4 + 3];
        }
      }
    }
    // Online softmax per row; sc becomes p = exp(s - m).
#pragma unroll
    for (int r = 0; r < kAttnRowsPerWarp; ++r) {
      const int rg = warp + kAttnWarps * r;
      if (rg >= rows) break;
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        const int key = lane + 32 * i;
        if (key >= nk || !key_visible(sm.kpos[key], sm.qpos[rg], p.sink, p.window)) sc[r][i] = -INFINITY;
        mx = fmaxf(mx, sc[r][i]);
      }
      const float m_new = fmaxf(m[r], warp_max(mx));
      if (m_new == -INFINITY) {  // nothing visible yet: keep the row empty
#pragma unroll
        for (int i = 0; i < kKeysPerLane; ++i) sc[r][i] = 0.f;
        continue;
      }
      const float alpha = expf(m[r] - m_new);  // 0 when m was -inf
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kKeysPerLane; ++i) {
        sc[r][i] = expf(sc[r][i] - m_new);
        sum += sc[r][i];
      }
      l[r] = l[r] * alpha + warp_sum(sum);
      m[r] = m_new;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) acc[r][e] *= alpha;
    }
    // acc += P V: lane owns dimensions [lane * kDimsPerLane, +kDimsPerLane).
#pragma unroll
    for (int i = 0; i < kKeysPerLane; ++i) {
      for (int jj = 0; jj < 32; ++jj) {
        const int key = 32 * i + jj;
        if (key >= nk) break;  // uniform
        const T* vrow = reinterpret_cast<const T*>(sm.v) + key * HD + lane * kDimsPerLane;
        float vf[kDimsPerLane];
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) vf[e] = load_float_rw(vrow + e);
#pragma unroll
        for (int r = 0; r < kAttnRowsPerWarp; ++r) {
          const float pj = __shfl_sync(0xffffffffu, sc[r][i], jj);
          if (warp + kAttnWarps * r >= rows) break;
#pragma unroll
          for (int e = 0; e < kDimsPerLane; ++e) acc[r][e] += pj * vf[e];
        }
      }
    }
    __syncthreads();  // the tile buffers are refilled next
  }

#pragma unroll
  for (int r = 0; r < kAttnRowsPerWarp; ++r) {
    const int rg = warp + kAttnWarps * r;
    if (rg >= rows) break;
    const int64_t t = t0 + rg / g, h = kh * g + rg % g;
    if (L.nsplit > 1) {
      float* dst = L.part + ((t * n_q + h) * L.nsplit + split) * (HD + 2);
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) dst[lane * kDimsPerLane + e] = acc[r][e];
      if (lane == 0) dst[HD] = m[r], dst[HD + 1] = l[r];
    } else {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // a row that sees no key is 0
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) store_float(p.out.ptr(t, h, lane * kDimsPerLane + e), acc[r][e] * inv);
      if (lane == 0 && p.lse.data) p.lse(t, h) = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
    }
  }
}

// grid (tokens, n_q), block HD: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the
// splits that saw a key.
template <class T, int HD>
__global__ void __launch_bounds__(HD) attention_merge_kernel(const AttentionParams<T> p, const float* part, int nsplit) {
  const int64_t t = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const float* rows = part + (t * p.q.shape[1] + h) * nsplit * (HD + 2);
  float M = -INFINITY;
  for (int sp = 0; sp < nsplit; ++sp)
    if (rows[sp * (HD + 2) + HD + 1] > 0.f) M = fmaxf(M, rows[sp * (HD + 2) + HD]);
  float sum = 0.f, acc = 0.f;
  if (M != -INFINITY) {
    for (int sp = 0; sp < nsplit; ++sp) {
      const float* r = rows + sp * (HD + 2);
      if (!(r[HD + 1] > 0.f)) continue;
      const float w = expf(r[HD] - M);
      sum += w * r[HD + 1];
      acc += w * r[d];
    }
  }
  store_float(p.out.ptr(t, h, d), sum > 0.f ? acc / sum : 0.f);
  if (d == 0 && p.lse.data) p.lse(t, h) = sum > 0.f ? M + logf(sum) : -INFINITY;
}

}  // namespace detail
}  // namespace cuda
}  // namespace recurformer
