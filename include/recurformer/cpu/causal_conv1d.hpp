// recurformer/cpu/causal_conv1d.hpp: causal_conv1d and causal_conv1d_update on the CPU.
//
// Pass 1 splits the packed token rows evenly over the threads (exec.parallel_for); each thread runs
// the kernel over its rows, across sequence boundaries (cpu/detail/conv_kernels.hpp), reading
// history from the old conv_state. Pass 2, after every row has read it, writes each
// sequence's new conv_state. The width K becomes a template argument here, in the one dispatch of
// that axis. Prefill and the one-token update run the same code, so they agree bit for bit.
//
// causal_conv1d_backward splits the channels into panels of up to kConvBackwardPanel, handed out
// over the pool (exec.for_each); each panel's sums over tokens stay in one thread, in token order,
// so the gradients are the same for any number of threads (cpu/detail/conv_backward_kernels.hpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/cpu/detail/conv_backward_kernels.hpp"
#include "recurformer/cpu/detail/conv_kernels.hpp"
#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/scan_sequences.hpp"
#include "recurformer/ops/causal_conv1d.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

using ConvWidths = ValueList<2, 3, 4, 5, 6, 7, 8>;  // = kCausalConv1dMinWidth..kCausalConv1dMaxWidth

// The sequence that contains row t (sequences are sorted by their first row; empty ones skipped).
inline int64_t sequence_of_row(const PackedSequences& seqs, int64_t t) {
  int64_t lo = 0, hi = seqs.count() - 1;  // last s with begin(s) <= t and end(s) > t
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (seqs.begin(mid) <= t) lo = mid; else hi = mid - 1;
  }
  while (seqs.end(lo) <= t) ++lo;  // cannot happen for a valid table; kept for safety
  return lo;
}

template <class T>
void run_causal_conv1d(const char* op, const CausalConv1dParams<T>& p,
                       recurformer::detail::ScanMode mode, CpuExec exec) {
  const Isa isa = active_isa();
  const PackedSequences seqs{mode, p.x.shape[0], p.cu_seqlens, p.state_slots};
  const int64_t tokens = p.x.shape[0], dch = p.x.shape[1], k = p.weight.shape[1];
  const bool history = p.conv_state.present() && p.use_initial_state;
  dispatch_value(op, ConvWidths{}, k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    exec.parallel_for(tokens, [&](int64_t b, int64_t e, int) {
      ConvRows<T> a;
      a.x = p.x.data;
      a.y = p.y.data;
      a.w = p.weight.data;
      a.bias = p.bias.data;
      a.history = history ? p.conv_state.data : nullptr;
      a.seqs = &seqs;
      a.sx = p.x.stride[0];
      a.sy = p.y.stride[0];
      a.sw = p.weight.stride[0];
      a.s_hist_slot = p.conv_state.stride[0];
      a.s_hist = p.conv_state.stride[1];
      a.dch = dch;
      a.s0 = sequence_of_row(seqs, b);
      a.t0 = b;
      a.t1 = e;
      a.silu = p.activation == ConvActivation::silu;
      switch (isa) {
#if RF_HAVE_X86_SIMD
        case Isa::avx512: conv_rows_avx512<K>(a); break;
        case Isa::avx2: conv_rows_avx2<K>(a); break;
#endif
        default: conv_rows_scalar<K>(a); break;
      }
    });
  });
  if (!p.conv_state.present()) return;
  exec.for_each(seqs.count(), [&](int64_t s, int) {
    const int64_t slot = seqs.slot(s);
    if (slot < 0) return;
    write_conv_state(p.conv_state.data + slot * p.conv_state.stride[0], p.conv_state.stride[1],
                     p.x.data, p.x.stride[0], dch, k, seqs.begin(s), seqs.end(s), history);
  });
}

template <class T>
void run_causal_conv1d_backward(const CausalConv1dBackwardParams<T>& p, CpuExec exec) {
  const Isa isa = active_isa();
  const CausalConv1dParams<T>& f = p.fwd;
  const PackedSequences seqs{recurformer::detail::ScanMode::scan, f.x.shape[0], f.cu_seqlens,
                             f.state_slots};
  const int64_t dch = f.x.shape[1], k = f.weight.shape[1];
  const bool history = f.conv_state.present() && f.use_initial_state;
  // Panels of whole vectors, narrow enough that every thread gets one.
  const int64_t per_thread = (dch + exec.threads() - 1) / exec.threads();
  const int64_t panel = std::min(kConvBackwardPanel, (per_thread + 15) / 16 * 16);
  const int64_t panels = (dch + panel - 1) / panel;
  dispatch_value("causal_conv1d_backward", ConvWidths{}, k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    exec.for_each(panels, [&](int64_t task, int) {
      ConvBackwardPanel<T> a;
      a.x = f.x.data;
      a.dy = p.dy.data;
      a.dx = p.dx.data;
      a.w = f.weight.data;
      a.bias = f.bias.data;
      a.dw = p.dweight.data;
      a.db = p.dbias.data;
      a.history = history ? f.conv_state.data : nullptr;
      a.dhistory = history ? p.dconv_state.data : nullptr;
      a.seqs = &seqs;
      a.sx = f.x.stride[0];
      a.sdy = p.dy.stride[0];
      a.sdx = p.dx.stride[0];
      a.sw0 = f.weight.stride[0];
      a.sw1 = f.weight.stride[1];
      a.sdw0 = p.dweight.stride[0];
      a.sdw1 = p.dweight.stride[1];
      a.s_hist_slot = f.conv_state.stride[0];
      a.s_hist = f.conv_state.stride[1];
      a.s_dhist_slot = p.dconv_state.stride[0];
      a.s_dhist = p.dconv_state.stride[1];
      a.c0 = task * panel;
      a.c1 = std::min(dch, a.c0 + panel);
      a.silu = f.activation == ConvActivation::silu;
      switch (isa) {
#if RF_HAVE_X86_SIMD
        case Isa::avx512: conv_backward_avx512<K>(a); break;
        case Isa::avx2: conv_backward_avx2<K>(a); break;
#endif
        default: conv_backward_scalar<K>(a); break;
      }
    });
  });
}

}  // namespace detail
}  // namespace cpu

/// dL/d(inputs) of causal_conv1d, parallel over channels.
template <class T>
void causal_conv1d_backward(const CausalConv1dBackwardParams<T>& p, CpuExec exec) {
  check(p);
  cpu::detail::run_causal_conv1d_backward(p, exec);
}

/// Prefill over the packed sequences.
template <class T>
void causal_conv1d(const CausalConv1dParams<T>& p, CpuExec exec) {
  check(p);
  cpu::detail::run_causal_conv1d("causal_conv1d", p, detail::ScanMode::scan, exec);
}

/// Decode: token row t is a one-token sequence on slot state_slots[t] (absent: t).
template <class T>
void causal_conv1d_update(const CausalConv1dParams<T>& p, CpuExec exec) {
  check_conv_update(p);
  cpu::detail::run_causal_conv1d("causal_conv1d_update", p, detail::ScanMode::state_update, exec);
}

/// Whether causal_conv1d_update(p, CpuExec) runs (supports(p, exec) is the prefill's).
template <class T>
Support supports_update(const CausalConv1dParams<T>& p, CpuExec) {
  return detail::support_of([&] { check_conv_update(p); });
}

}  // namespace recurformer
