// recurformer/cpu/attention_backward.hpp: CPU implementation of ops/attention_backward.hpp (why two
// passes: see there).
//
// Pass 0: D[t, h] = <dout, out> into the workspace, split over the threads by rows.
// Pass 1 (dq): the forward's items (sequence, token block, KV head, head sub-block) from
//   plan_attention without key splits; each block walks its visible key tiles and writes its dq rows.
// Pass 2 (dk, dv): items (slot, KV head, block of kAttnKeys keys), handed out dynamically with the
//   earliest keys (most readers under a causal mask) first; each zeroes its fp32 accumulators, adds
//   every row block of every sequence that reads the slot, in a fixed order, and writes its keys
//   (zeros for keys nobody reads). No output has two writers, so no locks and no reduction, and the
//   bits do not depend on the thread count. Index arithmetic is int64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/detail/attention_backward_kernel.hpp"
#include "recurformer/ops/attention_backward.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

template <class T>
size_t attention_backward_scratch_bytes(const AttentionBackwardParams<T>& p) {
  return size_t(p.fwd.q.shape[0]) * size_t(p.fwd.q.shape[1]) * sizeof(float);  // D
}

/// The query rows [t0, t1) x heads [h0, h1) of sequence s into a block (keys and outputs left to the caller).
template <class T>
void fill_bwd_rows(const AttentionBackwardParams<T>& p, const float* D, int64_t t0, int64_t t1, int64_t h0,
                   int64_t h1, float scale, AttnBwdBlock& b) {
  const AttentionParams<T>& f = p.fwd;
  b.q = f.q.ptr(t0, h0, 0);
  b.q_tok_stride = f.q.stride[0];
  b.q_head_stride = f.q.stride[1];
  b.dout = p.dout.ptr(t0, h0, 0);
  b.do_tok_stride = p.dout.stride[0];
  b.do_head_stride = p.dout.stride[1];
  b.lse = f.lse.ptr(t0, h0);
  b.lse_tok_stride = f.lse.stride[0];
  b.lse_head_stride = f.lse.stride[1];
  b.d = D + t0 * f.q.shape[1] + h0;
  b.d_tok_stride = f.q.shape[1];
  b.n_tok = int(t1 - t0);
  b.n_head = int(h1 - h0);
  for (int64_t t = t0; t < t1; ++t) b.q_pos[t - t0] = f.q_positions(t);
  b.scale = scale;
  b.sink = f.sink;
  b.window = f.window;
}

/// The keys of slot sl and KV head kh into a block.
template <class T>
void fill_bwd_keys(const AttentionParams<T>& f, int64_t sl, int64_t kh, AttnBwdBlock& b) {
  b.k = f.k.ptr(sl, kh, 0, 0);
  b.v = f.v.ptr(sl, kh, 0, 0);
  b.k_stride = f.k.stride[2];
  b.v_stride = f.v.stride[2];
  b.k_pos = f.k_positions.present() ? f.k_positions.ptr(sl, 0) : nullptr;
  b.k_pos_stride = f.k_positions.present() ? f.k_positions.stride[1] : 0;
}

template <int HD, class T>
void attention_backward_run(const AttentionBackwardParams<T>& p, CpuExec exec, float* D) {
  const AttentionParams<T>& f = p.fwd;
  const Isa isa = active_isa();
  const float scale = f.scale > 0 ? f.scale : float(1.0 / std::sqrt(double(HD)));
  const AttnPlan pl = plan_attention(f, 1);  // the forward's row blocks, never split over keys
  const int64_t tokens = f.q.shape[0];
  auto seq_begin = [&](int64_t s) -> int64_t { return f.cu_seqlens.present() ? f.cu_seqlens(s) : 0; };
  auto seq_end = [&](int64_t s) -> int64_t { return f.cu_seqlens.present() ? f.cu_seqlens(s + 1) : tokens; };
  auto slot_of = [&](int64_t s) -> int64_t { return f.kv_slots.present() ? f.kv_slots(s) : s; };

  // Pass 0: D = rowsum(dout * out), in fp32 from the stored (rounded) out, as the forward returned it.
  exec.parallel_for(tokens * pl.n_q, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const T* o = f.out.ptr(row / pl.n_q, row % pl.n_q, 0);
      const T* g = p.dout.ptr(row / pl.n_q, row % pl.n_q, 0);
      float acc = 0.f;
      for (int c = 0; c < HD; ++c) acc += to_float(o[c]) * to_float(g[c]);
      D[row] = acc;
    }
  });

  // Pass 1: dq, one writer per row.
  if (p.dq.present()) {
    const int64_t n_items = pl.S * pl.max_tok_blocks * pl.n_kv * pl.head_blocks;
    exec.for_each(n_items, [&](int64_t item, int) {
      const int64_t hb = item % pl.head_blocks;
      const int64_t kh = item / pl.head_blocks % pl.n_kv;
      const int64_t tb = item / (pl.head_blocks * pl.n_kv) % pl.max_tok_blocks;
      const int64_t s = item / (pl.head_blocks * pl.n_kv * pl.max_tok_blocks);
      const int64_t t0 = seq_begin(s) + tb * pl.tok_block;
      if (t0 >= seq_end(s)) return;
      const int64_t t1 = std::min(seq_end(s), t0 + pl.tok_block);
      const int64_t h0 = kh * pl.g + hb * pl.head_block;
      const int64_t h1 = std::min(kh * pl.g + pl.g, h0 + pl.head_block);
      AttnBwdBlock b{};
      fill_bwd_rows(p, D, t0, t1, h0, h1, scale, b);
      fill_bwd_keys(f, slot_of(s), kh, b);
      int64_t keys = f.kv_lens(s);
      if (!b.k_pos) {  // with index positions no key past the block's last query position is visible
        const int32_t qmax = *std::max_element(b.q_pos, b.q_pos + b.n_tok);
        keys = std::max<int64_t>(0, std::min<int64_t>(keys, int64_t(qmax) + 1));
      }
      b.key_begin = 0;
      b.key_end = keys;
      b.dq = p.dq.ptr(t0, h0, 0);
      b.dq_tok_stride = p.dq.stride[0];
      b.dq_head_stride = p.dq.stride[1];
      attn_bwd_block_dispatch<AttnBwdPass::dq, HD, T>(isa, &b);
    });
  }

  // Pass 2: dk and dv, one writer per key.
  if (!p.dk.present() && !p.dv.present()) return;
  const int64_t slots = f.k.shape[0], cap = f.k.shape[2];
  const int64_t key_blocks = (cap + kAttnKeys - 1) / kAttnKeys;
  exec.for_each(key_blocks * slots * pl.n_kv, [&](int64_t item, int) {
    const int64_t kh = item % pl.n_kv;
    const int64_t sl = item / pl.n_kv % slots;
    const int64_t j0 = item / (pl.n_kv * slots) * kAttnKeys;
    const int n_block = int(std::min<int64_t>(kAttnKeys, cap - j0));
    alignas(64) float dk_acc[kAttnKeys][HD], dv_acc[kAttnKeys][HD];
    std::memset(dk_acc, 0, sizeof(dk_acc));
    std::memset(dv_acc, 0, sizeof(dv_acc));
    AttnBwdBlock b{};
    fill_bwd_keys(f, sl, kh, b);
    b.dk_acc = p.dk.present() ? &dk_acc[0][0] : nullptr;
    b.dv_acc = p.dv.present() ? &dv_acc[0][0] : nullptr;
    for (int64_t s = 0; s < pl.S; ++s) {
      if (slot_of(s) != sl) continue;
      const int64_t nk = std::min<int64_t>(n_block, int64_t(f.kv_lens(s)) - j0);
      if (nk <= 0) continue;
      b.key_begin = j0;
      b.key_end = j0 + nk;
      for (int64_t t0 = seq_begin(s); t0 < seq_end(s); t0 += pl.tok_block)
        for (int64_t h0 = kh * pl.g; h0 < (kh + 1) * pl.g; h0 += pl.head_block) {
          fill_bwd_rows(p, D, t0, std::min(seq_end(s), t0 + pl.tok_block), h0,
                        std::min((kh + 1) * pl.g, h0 + pl.head_block), scale, b);
          attn_bwd_block_dispatch<AttnBwdPass::dkdv, HD, T>(isa, &b);
        }
    }
    for (int i = 0; i < n_block; ++i) {
      if (p.dk.present()) std::memcpy(p.dk.ptr(sl, kh, j0 + i, 0), dk_acc[i], sizeof(dk_acc[i]));
      if (p.dv.present()) std::memcpy(p.dv.ptr(sl, kh, j0 + i, 0), dv_acc[i], sizeof(dv_acc[i]));
    }
  });
}

}  // namespace detail
}  // namespace cpu

/// Bytes of scratch attention_backward() needs (one float per (token, query head) row).
template <class T>
size_t attention_backward_workspace_bytes(const AttentionBackwardParams<T>& p, CpuExec exec) {
  check(p);
  (void)exec;  // the same for any thread count
  return cpu::detail::attention_backward_scratch_bytes(p);
}

/// Writes the requested gradients. Calls check(p) first; throws when
/// workspace_bytes is less than attention_backward_workspace_bytes(p, exec) or head_dim is not in
/// AttentionHeadDims. Deterministic: the same bits for any thread count.
template <class T>
void attention_backward(const AttentionBackwardParams<T>& p, CpuExec exec, void* workspace, size_t workspace_bytes) {
  check(p);
  const size_t need = cpu::detail::attention_backward_scratch_bytes(p);
  RF_CHECK(workspace_bytes >= need, "attention_backward: workspace has ", workspace_bytes, " bytes, expected at least ",
           need, " (attention_backward_workspace_bytes)");
  RF_CHECK(need == 0 || workspace != nullptr, "attention_backward: workspace is null");
  detail::dispatch_attention_head_dim("attention_backward: head_dim", p.fwd.q.shape[2], [&](auto hd) {
    cpu::detail::attention_backward_run<decltype(hd)::value>(p, exec, static_cast<float*>(workspace));
  });
}

}  // namespace recurformer
