// recurformer/cpu/recency_score.hpp: CPU implementation of recency_score (ops/recency_score.hpp).
//
// Work items are (token block, KV head, head sub-block) over the scored queries [w, T), handed out
// dynamically (causal rows grow with t). Each row's three statistics land in a per-call buffer and
// are summed per head in token order afterwards, so the result does not depend on which thread
// ran what. The buffer (T * n_q * 3 doubles) is allocated per call: this is a calibration pass, not
// a hot loop.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "recurformer/cpu/detail/recency_kernel.hpp"
#include "recurformer/ops/recency_score.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

template <int HD, class T>
void recency_run(const RecencyScoreParams<T>& p, CpuExec exec) {
  const int64_t T_ = p.q.shape[0], n_q = p.q.shape[1], n_kv = p.k.shape[1], g = n_q / n_kv;
  const int64_t first = p.window;  // scored queries: [w, T)
  if (T_ <= first) return;
  const int64_t head_block = std::min<int64_t>(g, kAttnRows);
  const int64_t head_blocks = (g + head_block - 1) / head_block;
  const int64_t tok_block = std::max<int64_t>(1, kAttnRows / head_block);
  const int64_t tok_blocks = (T_ - first + tok_block - 1) / tok_block;
  const float scale = p.scale > 0 ? p.scale : float(1.0 / std::sqrt(double(HD)));
  const Isa isa = active_isa();
  std::vector<double> rows(size_t(T_ * n_q * 3), 0.0);  // [T][n_q][3]
  // Later token blocks have more keys: hand them out first.
  exec.for_each(tok_blocks * n_kv * head_blocks, [&](int64_t item, int) {
    const int64_t hb = item % head_blocks;
    const int64_t kh = (item / head_blocks) % n_kv;
    const int64_t tb = tok_blocks - 1 - item / (head_blocks * n_kv);
    const int64_t t0 = first + tb * tok_block, t1 = std::min(T_, t0 + tok_block);
    const int64_t h0 = kh * g + hb * head_block, h1 = std::min(kh * g + g, h0 + head_block);
    // Rows of the block are (token, head) pairs written to a contiguous scratch, then scattered.
    double out[kAttnRows * 3];
    RecencyBlock b{};
    b.q = p.q.ptr(t0, h0, 0);
    b.q_tok_stride = p.q.stride[0];
    b.q_head_stride = p.q.stride[1];
    b.n_tok = int(t1 - t0);
    b.n_head = int(h1 - h0);
    b.t0 = t0;
    b.k = p.k.ptr(0, kh, 0);
    b.k_stride = p.k.stride[0];
    b.scale = scale;
    b.window = p.window;
    b.sink_tokens = p.sink_tokens;
    b.out = out;
    recency_block_dispatch<HD, T>(isa, &b);
    for (int r = 0; r < b.n_tok * b.n_head; ++r) {
      const int64_t t = t0 + r / b.n_head, h = h0 + r % b.n_head;
      for (int c = 0; c < 3; ++c) rows[size_t((t * n_q + h) * 3 + c)] = out[3 * r + c];
    }
  });
  for (int64_t h = 0; h < n_q; ++h) {
    RecencyHeadStats& st = p.stats(h);
    for (int64_t t = first; t < T_; ++t) {
      const double* r = &rows[size_t((t * n_q + h) * 3)];
      st.recency_sum += r[0];
      st.sink_sum += r[1];
      st.distance_sum += r[2];
    }
    st.queries += T_ - first;
  }
}

}  // namespace detail
}  // namespace cpu

/// Adds one sequence's statistics to p.stats. Calls check(p) first;
/// head_dim must be in AttentionHeadDims. Deterministic for a given thread count and ISA.
template <class T>
void recency_score(const RecencyScoreParams<T>& p, CpuExec exec) {
  check(p);
  detail::dispatch_attention_head_dim("recency_score: head_dim", p.q.shape[2],
                                      [&](auto hd) { cpu::detail::recency_run<decltype(hd)::value>(p, exec); });
}

}  // namespace recurformer
