// recurformer/cpu/attention.hpp: CPU implementation of ops/attention.hpp.
//
// Work items are (sequence, token block, KV head, head sub-block, key split). A token block holds
// up to kAttnRows / g tokens, so the g query heads of a KV group and those tokens share every K/V
// tile (cpu/detail/attention_kernel.hpp). Items are handed out dynamically (causal blocks are
// uneven). When the real items are fewer than 4 per thread (decode of a small batch, or few KV
// heads), each item's keys are split into up to that many ranges of at least kMinSplitKeys keys;
// the partial (out, max, sum) rows go to the workspace and a second pass merges them by
// log-sum-exp. Index arithmetic is int64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "recurformer/cpu/detail/attention_kernel.hpp"
#include "recurformer/ops/attention.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

constexpr int64_t kMinSplitKeys = 256;  // below this a split's merge costs more than it saves

/// How one attention call is cut into work items (a pure function of the params and threads).
struct AttnPlan {
  int64_t S = 1, n_q = 0, n_kv = 0, g = 0, hd = 0;
  int64_t head_block = 1, head_blocks = 1;  // query heads of a group per item / items per group
  int64_t tok_block = 1, max_tok_blocks = 0;
  int64_t real_items = 0, nsplit = 1;
  size_t workspace_bytes = 0;
};

template <class T>
AttnPlan plan_attention(const AttentionParams<T>& p, int threads) {
  AttnPlan pl;
  pl.S = recurformer::detail::attention_num_sequences(p);
  pl.n_q = p.q.shape[1];
  pl.n_kv = p.k.shape[1];
  pl.hd = p.q.shape[2];
  pl.g = pl.n_q / pl.n_kv;
  pl.head_block = std::min<int64_t>(pl.g, kAttnRows);
  pl.head_blocks = (pl.g + pl.head_block - 1) / pl.head_block;
  pl.tok_block = std::max<int64_t>(1, kAttnRows / pl.head_block);
  int64_t blocks = 0, max_keys = 0;
  for (int64_t s = 0; s < pl.S; ++s) {
    const int64_t len = p.cu_seqlens.present() ? p.cu_seqlens(s + 1) - p.cu_seqlens(s) : p.q.shape[0];
    const int64_t nb = (len + pl.tok_block - 1) / pl.tok_block;
    blocks += nb;
    pl.max_tok_blocks = std::max(pl.max_tok_blocks, nb);
    if (len > 0) max_keys = std::max<int64_t>(max_keys, p.kv_lens(s));
  }
  pl.real_items = blocks * pl.n_kv * pl.head_blocks;
  const int64_t want = 4 * int64_t(threads);
  if (threads > 1 && pl.real_items > 0 && pl.real_items < want) {
    pl.nsplit = std::min<int64_t>((want + pl.real_items - 1) / pl.real_items, max_keys / kMinSplitKeys);
    pl.nsplit = std::max<int64_t>(pl.nsplit, 1);
  }
  if (pl.nsplit > 1)
    pl.workspace_bytes = size_t(p.q.shape[0] * pl.n_q * pl.nsplit * (pl.hd + 2)) * sizeof(float);
  return pl;
}

template <int HD, class T>
void attention_run(const AttentionParams<T>& p, const AttnPlan& pl, CpuExec exec, float* part) {
  const Isa isa = active_isa();
  const float scale = p.scale > 0 ? p.scale : float(1.0 / std::sqrt(double(HD)));
  const int64_t n_items = pl.S * pl.max_tok_blocks * pl.n_kv * pl.head_blocks * pl.nsplit;
  const int64_t tokens = p.q.shape[0];
  const int64_t row_floats = HD + 2;
  exec.for_each(n_items, [&](int64_t item, int) {
    int64_t rest = item;
    const int64_t split = rest % pl.nsplit;
    rest /= pl.nsplit;
    const int64_t hb = rest % pl.head_blocks;
    rest /= pl.head_blocks;
    const int64_t kh = rest % pl.n_kv;
    rest /= pl.n_kv;
    const int64_t tb = rest % pl.max_tok_blocks;
    const int64_t s = rest / pl.max_tok_blocks;
    const int64_t seq_begin = p.cu_seqlens.present() ? p.cu_seqlens(s) : 0;
    const int64_t seq_end = p.cu_seqlens.present() ? p.cu_seqlens(s + 1) : tokens;
    const int64_t t0 = seq_begin + tb * pl.tok_block;
    if (t0 >= seq_end) return;
    const int64_t t1 = std::min(seq_end, t0 + pl.tok_block);
    const int64_t h0 = kh * pl.g + hb * pl.head_block;
    const int64_t h1 = std::min(kh * pl.g + pl.g, h0 + pl.head_block);
    const int64_t slot = p.kv_slots.present() ? p.kv_slots(s) : s;  // unread when paged
    AttnBlock b{};
    b.q = p.q.ptr(t0, h0, 0);
    b.q_tok_stride = p.q.stride[0];
    b.q_head_stride = p.q.stride[1];
    b.n_tok = int(t1 - t0);
    b.n_head = int(h1 - h0);
    int32_t qmax = INT32_MIN;
    for (int64_t t = t0; t < t1; ++t) {
      b.q_pos[t - t0] = p.q_positions(t);
      qmax = std::max(qmax, b.q_pos[t - t0]);
    }
    const bool paged = p.page_table.present();
    b.k = p.k.ptr(paged ? 0 : slot, kh, 0, 0);
    b.v = p.v.ptr(paged ? 0 : slot, kh, 0, 0);
    b.k_stride = p.k.stride[2];
    b.v_stride = p.v.stride[2];
    b.pages = paged ? p.page_table.ptr(s, 0) : nullptr;
    b.page_size = p.k.shape[2];
    b.k_page_stride = p.k.stride[0];
    b.v_page_stride = p.v.stride[0];
    b.k_pos = p.k_positions.present() ? p.k_positions.ptr(slot, 0) : nullptr;
    b.k_pos_stride = p.k_positions.present() ? p.k_positions.stride[1] : 0;
    // With index positions no key past the block's last query position is visible.
    int64_t keys = p.kv_lens(s);
    if (!b.k_pos) keys = std::min<int64_t>(keys, int64_t(qmax) + 1);
    keys = std::max<int64_t>(keys, 0);
    b.key_begin = keys * split / pl.nsplit;
    b.key_end = keys * (split + 1) / pl.nsplit;
    b.scale = scale;
    b.sink = p.sink;
    b.window = p.window;
    if (pl.nsplit > 1) {
      b.part = part + (t0 * pl.n_q + h0) * pl.nsplit * row_floats + split * row_floats;
      b.part_tok_stride = pl.n_q * pl.nsplit * row_floats;
      b.part_head_stride = pl.nsplit * row_floats;
    } else {
      b.out = p.out.ptr(t0, h0, 0);
      b.out_tok_stride = p.out.stride[0];
      b.out_head_stride = p.out.stride[1];
      if (p.lse.present()) {
        b.lse = p.lse.ptr(t0, h0);
        b.lse_tok_stride = p.lse.stride[0];
        b.lse_head_stride = p.lse.stride[1];
      }
    }
    attend_block_dispatch<HD, T>(isa, &b);
  });
  if (pl.nsplit == 1) return;
  // Merge the splits of every row: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
  exec.parallel_for(tokens * pl.n_q, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / pl.n_q, h = row % pl.n_q;
      const float* ps = part + row * pl.nsplit * row_floats;
      float M = -INFINITY;
      for (int64_t sp = 0; sp < pl.nsplit; ++sp)
        if (ps[sp * row_floats + HD + 1] > 0) M = std::max(M, ps[sp * row_floats + HD]);
      float acc[HD] = {};
      float L = 0;
      if (M != -INFINITY) {
        for (int64_t sp = 0; sp < pl.nsplit; ++sp) {
          const float* r = ps + sp * row_floats;
          if (!(r[HD + 1] > 0)) continue;
          const float w = std::exp(r[HD] - M);
          L += w * r[HD + 1];
          for (int c = 0; c < HD; ++c) acc[c] += w * r[c];
        }
      }
      const float inv = L > 0 ? 1.f / L : 0.f;
      T* dst = p.out.ptr(t, h, 0);
      for (int c = 0; c < HD; ++c) dst[c] = from_float<T>(acc[c] * inv);
      if (p.lse.present()) p.lse(t, h) = L > 0 ? M + std::log(L) : -INFINITY;
    }
  });
}

}  // namespace detail
}  // namespace cpu

/// Bytes of scratch attention() needs for these params on this executor (0 when it needs none).
/// It depends on the token count, the number of sequences, kv_lens and the thread count.
template <class T>
size_t attention_workspace_bytes(const AttentionParams<T>& p, CpuExec exec) {
  check(p);
  return cpu::detail::plan_attention(p, exec.threads()).workspace_bytes;
}

/// Runs attention. Calls check(p) first; throws when workspace_bytes is less
/// than attention_workspace_bytes(p, exec) or head_dim is not in AttentionHeadDims.
template <class T>
void attention(const AttentionParams<T>& p, CpuExec exec, void* workspace, size_t workspace_bytes) {
  check(p);
  const cpu::detail::AttnPlan pl = cpu::detail::plan_attention(p, exec.threads());
  RF_CHECK(workspace_bytes >= pl.workspace_bytes, "attention: workspace has ", workspace_bytes,
           " bytes, expected at least ", pl.workspace_bytes, " (attention_workspace_bytes)");
  RF_CHECK(pl.workspace_bytes == 0 || workspace != nullptr, "attention: workspace is null");
  detail::dispatch_attention_head_dim("attention: head_dim", p.q.shape[2], [&](auto hd) {
    cpu::detail::attention_run<decltype(hd)::value>(p, pl, exec, static_cast<float*>(workspace));
  });
}

}  // namespace recurformer
