// recurformer/cpu/hybrid_head_attention.hpp: the CPU layer core (layers/hybrid_attention_core.hpp)
// and the CPU layer (layers/hybrid_head_attention.hpp): the shared orchestration
// (layers/detail/hybrid_head_attention_run.hpp) over the CPU ops, with the data movement between
// them as loops over the thread pool. cuda/hybrid_head_attention.cuh is the same calls with CudaExec.
#pragma once

#include <algorithm>
#include <cstring>

#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/selective_scan.hpp"
#include "recurformer/layers/hybrid_head_attention.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace detail {
namespace hybrid {

template <>
struct HybridBackend<CpuExec> {
  static constexpr IndexMemory kIndex = IndexMemory::host;

  /// The executor for a copy loop of `work` elements: below a few tens of KB a fork-join costs
  /// more than the copy (decode), so it runs on the calling thread.
  static CpuExec for_work(CpuExec exec, int64_t work) { return work < (int64_t(1) << 15) ? CpuExec{} : exec; }

  // The metadata is filled in place: the workspace is host memory.
  static unsigned char* metadata_buffer(unsigned char* ws, size_t, CpuExec) { return ws; }
  static void upload_metadata(unsigned char*, const unsigned char*, size_t, CpuExec) {}
  static unsigned char* plan_staging(unsigned char* meta, const HybridPlanBuffers& buf) {
    RF_CHECK(buf.host_staging == nullptr, kCoreOp,
             ": host_staging is given on the CPU, where the plan fills its metadata in place: pass null");
    return meta;
  }
  static void upload_plan(unsigned char*, const unsigned char*, size_t, CpuExec) {}

  template <class T>
  static void check_attention(const AttentionParams<T>& ap) { check(ap); }
  template <class T>
  static void check_conv(const CausalConv1dParams<T>& cp, bool decode) {
    if (decode) check_conv_update(cp); else check(cp);
  }
  template <class T>
  static void check_scan(const SelectiveScanParams<T>& sp, bool decode) {
    if (decode) check_state_update(sp); else check(sp);
  }

  template <class T>
  static void to_storage(T* dst, const float* src, int64_t n, CpuExec exec) {
    for_work(exec, n).parallel_for(n, [&](int64_t e0, int64_t e1, int) {
      for (int64_t e = e0; e < e1; ++e) dst[e] = from_float<T>(src[e]);
    });
  }

  static void copy_floats(float* dst, const float* src, int64_t n, CpuExec) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
  }

  // qf/kf/vf (fp32, head order) -> q/k/v of every kind slot that serves the group (T), recurrent q
  // scaled by c_scale.
  template <class T>
  static void gather_heads(const Plan& pl, const CallBuffers<T>& b, float c_scale, CpuExec exec) {
    const int64_t n_q = pl.n_q, n_kv = pl.n_kv, g = pl.g, hd = pl.hd;
    for_work(exec, pl.n * (n_q + 2 * n_kv) * hd).parallel_for(pl.n, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < n_kv; ++j)
          for (int kind : {kAttn, kRec, kStream}) {
            const int64_t i = b.group_local[j * 3 + kind], nk = pl.groups[kind];
            if (i < 0) continue;
            const float qs = kind == kRec ? c_scale : 1.f;
            const float* q_src = b.qf + t * pl.q_ld + j * g * hd;
            T* qd = b.q[kind] + (t * nk * g + i * g) * hd;
            for (int64_t e = 0; e < g * hd; ++e) qd[e] = from_float<T>(q_src[e] * qs);
            const float* ks = b.kf + t * pl.k_ld + j * hd;
            const float* vs = b.vf + t * pl.v_ld + j * hd;
            T* kd = b.k[kind] + (t * nk + i) * hd;
            T* vd = b.v[kind] + (t * nk + i) * hd;
            for (int64_t e = 0; e < hd; ++e) kd[e] = from_float<T>(ks[e]), vd[e] = from_float<T>(vs[e]);
          }
    });
  }

  // Head outputs per kind (T) -> head order (fp32, into heads): the sum over the kind slots serving
  // the group, the recurrent output weighted by alpha in a windowed group.
  template <class T>
  static void scatter_heads(const Plan& pl, const CallBuffers<T>& b, CpuExec exec) {
    const int64_t n_q = pl.n_q, n_kv = pl.n_kv, g = pl.g, hd = pl.hd;
    for_work(exec, pl.n * n_q * hd).parallel_for(pl.n, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < n_kv; ++j) {
          float* dst = b.heads + t * pl.out_ld + j * g * hd;
          std::fill(dst, dst + g * hd, 0.f);
          const bool windowed = b.group_local[j * 3 + kStream] >= 0 && b.group_local[j * 3 + kRec] >= 0;
          for (int kind : {kAttn, kRec, kStream}) {
            const int64_t i = b.group_local[j * 3 + kind], nk = pl.groups[kind];
            if (i < 0) continue;
            const T* src = b.o[kind] + (t * nk * g + i * g) * hd;
            for (int64_t r = 0; r < g; ++r) {
              const float wgt = kind == kRec && windowed ? b.alpha[i * g + r] : 1.f;
              for (int64_t e = 0; e < hd; ++e) dst[r * hd + e] += wgt * to_float(src[r * hd + e]);
            }
          }
        }
    });
  }

  // The chunk's attention-group keys and values into their slots (or pages) at the tokens' positions.
  template <class T>
  static void append_kv(const Plan& pl, const CallBuffers<T>& b, View<T, 4> K, View<T, 4> V, CpuExec exec) {
    const int64_t nA = pl.groups[kAttn], hd = pl.hd;
    const size_t row = size_t(hd) * sizeof(T);
    for_work(exec, pl.n * nA * hd * 2).parallel_for(pl.n, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t) {
        const KvRow at = kv_row(pl, b, t);
        for (int64_t i = 0; i < nA; ++i) {
          std::memcpy(K.ptr(at.page, i, at.row, 0), b.k[kAttn] + (t * nA + i) * hd, row);
          std::memcpy(V.ptr(at.page, i, at.row, 0), b.v[kAttn] + (t * nA + i) * hd, row);
        }
      }
    });
  }

  // Streaming scratch [S, nS, cap, hd]: each key from its ring entry or from the chunk (s_src).
  template <class T>
  static void stream_gather(const Plan& pl, const CallBuffers<T>& b, View<T, 4> RK, View<T, 4> RV,
                            View<T, 4> SK, View<T, 4> SV, CpuExec exec) {
    const int64_t nS = pl.groups[kStream], hd = pl.hd, cap = pl.stream_cap;
    const size_t row = size_t(hd) * sizeof(T);
    for_work(exec, pl.S * nS * cap * hd * 2).parallel_for(pl.S, [&](int64_t s0, int64_t s1, int) {
      for (int64_t s = s0; s < s1; ++s)
        for (int64_t i = 0; i < nS; ++i)
          for (int64_t m = 0; m < b.s_kv_lens[s]; ++m) {
            const int32_t src = b.s_src[s * cap + m];
            const T* k = src >= 0 ? RK.ptr(b.slots[s], i, src, 0) : b.k[kStream] + (int64_t(-src - 1) * nS + i) * hd;
            const T* v = src >= 0 ? RV.ptr(b.slots[s], i, src, 0) : b.v[kStream] + (int64_t(-src - 1) * nS + i) * hd;
            std::memcpy(SK.ptr(s, i, m, 0), k, row);
            std::memcpy(SV.ptr(s, i, m, 0), v, row);
          }
    });
  }

  // The chunk's streaming keys into the ring (only the tokens that keep their entry: ring_dst).
  template <class T>
  static void ring_write(const Plan& pl, const CallBuffers<T>& b, View<T, 4> RK, View<T, 4> RV, CpuExec exec) {
    const int64_t nS = pl.groups[kStream], hd = pl.hd;
    const size_t row = size_t(hd) * sizeof(T);
    for_work(exec, pl.n * nS * hd * 2).parallel_for(pl.n, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t) {
        if (b.ring_dst[t] < 0) continue;
        const int32_t slot = b.slots[b.tok_seq[t]];
        for (int64_t i = 0; i < nS; ++i) {
          std::memcpy(RK.ptr(slot, i, b.ring_dst[t], 0), b.k[kStream] + (t * nS + i) * hd, row);
          std::memcpy(RV.ptr(slot, i, b.ring_dst[t], 0), b.v[kStream] + (t * nS + i) * hd, row);
        }
      }
    });
  }
};

}  // namespace hybrid
}  // namespace detail

/// Scratch bytes hybrid_attention_core needs for this call (tokens, sequences, lengths, threads).
template <class T, class TW>
size_t hybrid_attention_core_workspace_bytes(const HybridAttentionCoreParams<T, TW>& p, CpuExec exec) {
  return detail::hybrid::core_workspace_bytes(p, exec);
}

/// Runs the core on the CPU (see the top of this file); cuda/hybrid_head_attention.cuh has the
/// same call with CudaExec over device views.
template <class T, class TW>
void hybrid_attention_core(const HybridAttentionCoreParams<T, TW>& p, CpuExec exec, void* workspace,
                           size_t workspace_bytes) {
  detail::hybrid::core_call(p, exec, workspace, workspace_bytes);
}

/// Plans one step for every layer of `shape`: checks the step (slots distinct and valid, every
/// sequence's tokens fit its K/V, pages in the pool), fills its metadata into buffers.metadata and
/// sizes the per-layer scratch (plan.workspace_bytes). T, TW: the layers' cache and weight types.
template <class T, class TW>
HybridStepPlan<T, TW> plan_hybrid_step(const HybridStepShape& shape, const HybridStep& step, int64_t tokens,
                                       CpuExec exec, const HybridPlanBuffers& buffers) {
  return detail::hybrid::plan_step<CpuExec, T, TW>(shape, step, tokens, exec, buffers);
}

/// Runs one layer of the planned step (p.step left empty; the layer's views and weights checked
/// against the plan's shape). workspace: at least plan.workspace_bytes, reusable by every layer.
template <class T, class TW>
void hybrid_attention_core(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan, CpuExec exec,
                           void* workspace, size_t workspace_bytes) {
  detail::hybrid::core_call(p, plan, exec, workspace, workspace_bytes);
}

/// The layer over a step plan (layers/hybrid_attention_core.hpp) made from hybrid_step(cache, ...):
/// p.cu_seqlens and p.slots stay empty (the plan holds the step), and the slots and capacity were
/// checked by the plan. A model plans once per step and runs every layer from it.
template <class T, class TW>
size_t hybrid_head_attention_workspace_bytes(const HybridHeadAttentionParams<T, TW>& p,
                                             const HybridStepPlan<T, TW>& plan, CpuExec exec) {
  return detail::hybrid::workspace_bytes(p, plan, exec);
}

template <class T, class TW>
void hybrid_head_attention(const HybridHeadAttentionParams<T, TW>& p, const HybridStepPlan<T, TW>& plan,
                           CpuExec exec, void* workspace, size_t workspace_bytes) {
  detail::hybrid::call(p, plan, exec, workspace, workspace_bytes);
}

/// Scratch bytes hybrid_head_attention needs for this call (it depends on the tokens, sequences,
/// the cache lengths and the thread count).
template <class T, class TW>
size_t hybrid_head_attention_workspace_bytes(const HybridHeadAttentionParams<T, TW>& p, CpuExec exec) {
  return detail::hybrid::workspace_bytes(p, exec);
}

/// Runs the layer (see the top of this file).
template <class T, class TW>
void hybrid_head_attention(const HybridHeadAttentionParams<T, TW>& p, CpuExec exec, void* workspace,
                           size_t workspace_bytes) {
  detail::hybrid::call(p, exec, workspace, workspace_bytes);
}

/// Whether hybrid_attention_core(p, CpuExec, ...) runs (core/support.hpp): every check of the call
/// (views, step, slots, capacity or pages, every inner op's params), reported instead of thrown.
template <class T, class TW>
Support supports(const HybridAttentionCoreParams<T, TW>& p, CpuExec exec) {
  return detail::support_of([&] { detail::hybrid::check_core_call(p, exec); });
}

/// Whether hybrid_head_attention(p, CpuExec, ...) runs: the same, with the projections and the
/// cache's capacity.
template <class T, class TW>
Support supports(const HybridHeadAttentionParams<T, TW>& p, CpuExec exec) {
  return detail::support_of([&] { detail::hybrid::check_layer_call(p, exec); });
}

/// Whether hybrid_attention_core(p, plan, CpuExec, ...) runs: the layer's views and weights against
/// the plan's shape and threads, and the core's dry run over the planned step (the step itself was
/// checked by plan_hybrid_step). The workspace is the caller's to size (plan.workspace_bytes).
template <class T, class TW>
Support supports(const HybridAttentionCoreParams<T, TW>& p, const HybridStepPlan<T, TW>& plan, CpuExec exec) {
  return detail::support_of([&] { detail::hybrid::check_core_plan_call(p, plan, exec); });
}

/// Whether hybrid_head_attention(p, plan, CpuExec, ...) runs: the same, with the projections.
template <class T, class TW>
Support supports(const HybridHeadAttentionParams<T, TW>& p, const HybridStepPlan<T, TW>& plan, CpuExec exec) {
  return detail::support_of([&] { detail::hybrid::check_layer_plan_call(p, plan, exec); });
}

}  // namespace recurformer
