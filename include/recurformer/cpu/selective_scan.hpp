// recurformer/cpu/selective_scan.hpp: selective_scan and selective_state_update on the CPU.
//
// Work is split into tasks of (sequence, group, block of 1-4 vector widths of channels); each task
// runs the whole sequence for its channels (cpu/detail/scan_kernels.hpp), so the state never leaves
// the task and no cross-thread combination is needed. Tasks are handed out dynamically
// (exec.for_each), which balances uneven sequence lengths. Decode (one token per slot) has its own
// kernel, vectorised over the state dimension and updating the slot in place; its state is
// bit-identical to a scan over the same tokens, its y equal up to summation order.
//
// The backward's tasks are (sequence, group, block of channels), handed out the same way; each
// recomputes its part of the forward in chunks (cpu/detail/scan_backward_kernels.hpp) in its
// thread's slice of the workspace. The blocks are 16 channels, or larger so that a group has at most
// kScanBwdMaxBlocks of them; the partition depends on the shapes only, not on the thread count or
// the ISA. What several tasks share is summed without atomics, in a fixed order: the first block of
// a group writes dB / dC rows directly and every further block its own partial rows, added after;
// dA, dD and ddelta_bias likewise per sequence (the first sequence writes the output). So the
// gradients are the same bits at any thread count (for one ISA).
#pragma once

#include <algorithm>
#include <cstdint>

#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/scan_backward_kernels.hpp"
#include "recurformer/cpu/detail/scan_kernels.hpp"
#include "recurformer/cpu/detail/scan_sequences.hpp"
#include "recurformer/ops/selective_scan.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

// Decode: tasks of (token row, kUpdateChannels channels), state updated in place in its slot.
template <class T>
void run_state_update(const SelectiveScanParams<T>& p, CpuExec exec) {
  const Isa isa = active_isa();
  const int64_t rows = p.u.shape[0], dch = p.u.shape[1];
  const int64_t chunks = (dch + kUpdateChannels - 1) / kUpdateChannels;
  exec.for_each(rows * chunks, [&](int64_t task, int) {
    const int64_t t = task / chunks, c0 = task % chunks * kUpdateChannels;
    const int64_t slot = p.state_slots.present() ? int64_t(p.state_slots(t)) : t;
    if (slot < 0) return;  // padding
    UpdateBlock<T> a;
    a.u = p.u.ptr(t, c0);
    a.delta = p.delta.ptr(t, c0);
    a.B = p.B.ptr(t, 0, 0);
    a.C = p.C.ptr(t, 0, 0, 0);
    a.z = p.z.data ? p.z.ptr(t, c0) : nullptr;
    a.y = p.y.ptr(t, 0, c0);
    a.A = p.A.ptr(c0, 0);
    a.D = p.D.data ? p.D.ptr(c0) : nullptr;
    a.delta_bias = p.delta_bias.data ? p.delta_bias.ptr(c0) : nullptr;
    a.state = p.state.ptr(slot, c0, 0);
    a.sB_g = p.B.stride[1];
    a.sC_g = p.C.stride[1];
    a.sC_r = p.C.stride[2];
    a.sy_r = p.y.stride[1];
    a.sA = p.A.stride[0];
    a.s_state = p.state.stride[1];
    a.c0 = c0;
    a.per_group = dch / p.B.shape[1];
    a.n_state = p.A.shape[1];
    a.readers = p.C.shape[2];
    a.nc = int(std::min<int64_t>(kUpdateChannels, dch - c0));
    a.softplus = p.delta_activation == DeltaActivation::softplus;
    a.use_initial_state = p.use_initial_state;
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case Isa::avx512: update_block_avx512(a); break;
      case Isa::avx2: update_block_avx2(a); break;
#endif
      default: update_block_scalar(a); break;
    }
  });
}

template <class T>
void run_selective_scan(const SelectiveScanParams<T>& p, recurformer::detail::ScanMode mode,
                        CpuExec exec) {
  const Isa isa = active_isa();
  const int width = isa == Isa::avx512 ? 16 : isa == Isa::avx2 ? 8 : 1;
  const PackedSequences seqs{mode, p.u.shape[0], p.cu_seqlens, p.state_slots};
  const int64_t dch = p.u.shape[1], groups = p.B.shape[1], per_group = dch / groups;
  // Small N: interleave up to kScanMaxSubBlocks vector blocks per task (fewer passes over the rows),
  // as long as there are a few tasks per thread and the state buffer holds them.
  const int64_t n_state = p.A.shape[1];
  int64_t sub = std::max<int64_t>(1, std::min<int64_t>(kScanMaxSubBlocks, 64 / n_state));
  const int64_t vector_blocks = seqs.count() * groups * ((per_group + width - 1) / width);
  while (sub > 1 && (vector_blocks / sub < 4 * exec.threads() || sub * n_state > kSelectiveScanMaxState))
    sub /= 2;
  const int64_t block_channels = sub * width;
  const int64_t blocks = (per_group + block_channels - 1) / block_channels;
  const int64_t tasks_per_seq = groups * blocks;
  exec.for_each(seqs.count() * tasks_per_seq, [&](int64_t task, int) {
    const int64_t s = task / tasks_per_seq, g = task % tasks_per_seq / blocks,
                  c0 = g * per_group + task % blocks * block_channels;
    const int64_t slot = seqs.slot(s);
    if (slot < 0) return;  // padding
    ScanBlock<T> a;
    a.u = p.u.data + c0;
    a.delta = p.delta.data + c0;
    a.B = p.B.data + g * p.B.stride[1];
    a.C = p.C.data + g * p.C.stride[1];
    a.z = p.z.data ? p.z.data + c0 : nullptr;
    a.y = p.y.data + c0;
    a.A = p.A.data + c0 * p.A.stride[0];
    a.D = p.D.data ? p.D.data + c0 : nullptr;
    a.delta_bias = p.delta_bias.data ? p.delta_bias.data + c0 : nullptr;
    a.state = p.state.data + slot * p.state.stride[0] + c0 * p.state.stride[1];
    a.su = p.u.stride[0];
    a.sdelta = p.delta.stride[0];
    a.sB = p.B.stride[0];
    a.sC_t = p.C.stride[0];
    a.sC_r = p.C.stride[2];
    a.sz = p.z.stride[0];
    a.sy_t = p.y.stride[0];
    a.sy_r = p.y.stride[1];
    a.sA = p.A.stride[0];
    a.s_state = p.state.stride[1];
    a.t0 = seqs.begin(s);
    a.t1 = seqs.end(s);
    a.n_state = p.A.shape[1];
    a.readers = p.C.shape[2];
    a.nc = int(std::min<int64_t>(block_channels, (g + 1) * per_group - c0));
    a.softplus = p.delta_activation == DeltaActivation::softplus;
    a.use_initial_state = p.use_initial_state;
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case Isa::avx512: scan_block_avx512(a); break;
      case Isa::avx2: scan_block_avx2(a); break;
#endif
      default: scan_block_scalar(a); break;
    }
  });
}

// The backward's task partition and workspace layout (floats from the 64-byte aligned base).
struct ScanBwdPlan {
  int64_t seqs = 0, tokens = 0, dch = 0, n = 0, groups = 0, readers = 0, per_group = 0;
  int64_t blocks = 1, block_channels = 1;  // per group
  ScanBwdScratch scratch;                  // per thread
  int64_t threads = 1;
  int64_t db_part = 0, dc_part = 0;        // floats of one block's dB / dC partial rows
  int64_t seq_part = 0;                    // floats of one sequence's dA | dD | ddelta_bias partials
  int64_t off_db = 0, off_dc = 0, off_seq = 0, total = 0;
};

template <class T>
ScanBwdPlan make_scan_bwd_plan(const SelectiveScanBackwardParams<T>& p, int threads) {
  const SelectiveScanParams<T>& f = p.fwd;
  ScanBwdPlan q;
  const PackedSequences seqs{recurformer::detail::ScanMode::scan, f.u.shape[0], f.cu_seqlens, f.state_slots};
  q.seqs = seqs.count();
  q.tokens = f.u.shape[0];
  q.dch = f.u.shape[1];
  q.n = f.A.shape[1];
  q.groups = f.B.shape[1];
  q.readers = f.C.shape[2];
  q.per_group = q.dch / q.groups;
  q.blocks = std::min(kScanBwdMaxBlocks, (q.per_group + kScanBwdBlockChannels - 1) / kScanBwdBlockChannels);
  q.block_channels = (q.per_group + q.blocks - 1) / q.blocks;
  q.blocks = (q.per_group + q.block_channels - 1) / q.block_channels;
  int64_t max_len = 0;  // padding sequences are only zero-filled
  for (int64_t s = 0; s < q.seqs; ++s)
    if (seqs.slot(s) >= 0) max_len = std::max(max_len, seqs.end(s) - seqs.begin(s));
  const int64_t chunks = (max_len + kScanBwdChunk - 1) / kScanBwdChunk;
  q.scratch = ScanBwdScratch::make(q.n, q.block_channels, q.readers, chunks);
  q.threads = threads;
  auto pad = [](int64_t x) { return scan_bwd_round_up(x, kScanBwdPad); };
  if (q.blocks > 1) {
    q.db_part = p.dB.present() ? pad(q.tokens * q.groups * q.n) : 0;
    q.dc_part = p.dC.present() ? pad(q.tokens * q.groups * q.readers * q.n) : 0;
  }
  if (q.seqs > 1)
    q.seq_part = pad((p.dA.present() ? q.dch * q.n : 0) + (p.dD.present() ? q.dch : 0) +
                     (p.ddelta_bias.present() ? q.dch : 0));
  q.off_db = q.threads * q.scratch.total;
  q.off_dc = q.off_db + (q.blocks - 1) * q.db_part;
  q.off_seq = q.off_dc + (q.blocks - 1) * q.dc_part;
  q.total = q.off_seq + std::max<int64_t>(q.seqs - 1, 0) * q.seq_part;
  return q;
}

template <class T>
void run_selective_scan_backward(const SelectiveScanBackwardParams<T>& p, const ScanBwdPlan& q,
                                 CpuExec exec, float* ws) {
  const SelectiveScanParams<T>& f = p.fwd;
  const Isa isa = active_isa();
  const PackedSequences seqs{recurformer::detail::ScanMode::scan, q.tokens, f.cu_seqlens, f.state_slots};
  const int64_t N = q.n, R = q.readers, G = q.groups;
  // Where sequence s puts its dA | dD | ddelta_bias sums (channel-indexed rows).
  struct SeqTargets {
    float* dA;
    int64_t sdA;
    float* dD;
    float* ddb;
  };
  auto seq_targets = [&](int64_t s) -> SeqTargets {
    if (s == 0) return {p.dA.data, p.dA.stride[0], p.dD.data, p.ddelta_bias.data};
    float* base = ws + q.off_seq + (s - 1) * q.seq_part;
    float* dA = p.dA.present() ? base : nullptr;
    if (dA) base += q.dch * N;
    float* dD = p.dD.present() ? base : nullptr;
    if (dD) base += q.dch;
    return {dA, N, dD, p.ddelta_bias.present() ? base : nullptr};
  };
  if (q.seqs == 0) {  // no tokens to sum over
    for (int64_t c = 0; c < q.dch; ++c) {
      if (p.dA.present()) std::fill(p.dA.ptr(c, 0), p.dA.ptr(c, 0) + N, 0.f);
      if (p.dD.present()) p.dD(c) = 0.f;
      if (p.ddelta_bias.present()) p.ddelta_bias(c) = 0.f;
    }
    return;
  }
  const int64_t tasks_per_seq = G * q.blocks;
  exec.for_each(q.seqs * tasks_per_seq, [&](int64_t task, int thread) {
    const int64_t s = task / tasks_per_seq, g = task % tasks_per_seq / q.blocks, b = task % q.blocks;
    const int64_t c0 = g * q.per_group + b * q.block_channels;
    const int nc = int(std::min(q.block_channels, (g + 1) * q.per_group - c0));
    const int64_t slot = seqs.slot(s), t0 = seqs.begin(s), t1 = seqs.end(s);
    ScanBwdBlock<T> a{};
    // dB / dC rows: the output's for the group's first block, a partial for the others
    if (p.dB.present()) {
      a.dB = b == 0 ? p.dB.data + g * p.dB.stride[1] : ws + q.off_db + (b - 1) * q.db_part + g * N;
      a.sdB = b == 0 ? p.dB.stride[0] : G * N;
    }
    if (p.dC.present()) {
      a.dC = b == 0 ? p.dC.data + g * p.dC.stride[1] : ws + q.off_dc + (b - 1) * q.dc_part + g * R * N;
      a.sdC_t = b == 0 ? p.dC.stride[0] : G * R * N;
      a.sdC_r = b == 0 ? p.dC.stride[2] : N;
    }
    const SeqTargets st = seq_targets(s);
    a.dA = st.dA ? st.dA + c0 * st.sdA : nullptr;
    a.sdA = st.sdA;
    a.dD = st.dD ? st.dD + c0 : nullptr;
    a.ddelta_bias = st.ddb ? st.ddb + c0 : nullptr;
    a.du = p.du.present() ? p.du.data + c0 : nullptr;
    a.ddelta = p.ddelta.present() ? p.ddelta.data + c0 : nullptr;
    a.dz = p.dz.present() ? p.dz.data + c0 : nullptr;
    a.sdu = p.du.stride[0];
    a.sddelta = p.ddelta.stride[0];
    a.sdz = p.dz.stride[0];
    if (slot < 0) {  // padding: zero rows, nothing summed
      for (int64_t t = t0; t < t1; ++t) {
        if (a.du) std::fill(a.du + t * a.sdu, a.du + t * a.sdu + nc, 0.f);
        if (a.ddelta) std::fill(a.ddelta + t * a.sddelta, a.ddelta + t * a.sddelta + nc, 0.f);
        if (a.dz) std::fill(a.dz + t * a.sdz, a.dz + t * a.sdz + nc, 0.f);
        if (a.dB) std::fill(a.dB + t * a.sdB, a.dB + t * a.sdB + N, 0.f);
        for (int64_t r = 0; a.dC && r < R; ++r)
          std::fill(a.dC + t * a.sdC_t + r * a.sdC_r, a.dC + t * a.sdC_t + r * a.sdC_r + N, 0.f);
      }
      for (int c = 0; c < nc; ++c) {
        if (a.dA) std::fill(a.dA + c * a.sdA, a.dA + c * a.sdA + N, 0.f);
        if (a.dD) a.dD[c] = 0.f;
        if (a.ddelta_bias) a.ddelta_bias[c] = 0.f;
      }
      return;
    }
    a.u = f.u.data + c0;
    a.delta = f.delta.data + c0;
    a.B = f.B.data + g * f.B.stride[1];
    a.C = f.C.data + g * f.C.stride[1];
    a.z = f.z.present() ? f.z.data + c0 : nullptr;
    a.dy = p.dy.data + c0;
    a.A = f.A.data + c0 * f.A.stride[0];
    a.D = f.D.present() ? f.D.data + c0 : nullptr;
    a.delta_bias = f.delta_bias.present() ? f.delta_bias.data + c0 : nullptr;
    a.h0 = f.use_initial_state ? f.state.ptr(slot, c0, 0) : nullptr;
    a.dh0 = f.use_initial_state && p.dstate.present() ? p.dstate.ptr(slot, c0, 0) : nullptr;
    a.scratch = ws + thread * q.scratch.total;
    a.layout = q.scratch;
    a.su = f.u.stride[0];
    a.sdelta = f.delta.stride[0];
    a.sB = f.B.stride[0];
    a.sC_t = f.C.stride[0];
    a.sC_r = f.C.stride[2];
    a.sz = f.z.stride[0];
    a.sdy_t = p.dy.stride[0];
    a.sdy_r = p.dy.stride[1];
    a.sA = f.A.stride[0];
    a.s_h0 = f.state.stride[1];
    a.s_dh0 = p.dstate.stride[1];
    a.t0 = t0;
    a.t1 = t1;
    a.n_state = N;
    a.readers = R;
    a.nc = nc;
    a.softplus = f.delta_activation == DeltaActivation::softplus;
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case Isa::avx512: scan_bwd_block_avx512(a); break;
      case Isa::avx2: scan_bwd_block_avx2(a); break;
#endif
      default: scan_bwd_block_scalar(a); break;
    }
  });
  // Partial sums, added in block / sequence order.
  if (q.blocks > 1 && (p.dB.present() || p.dC.present()))
    exec.parallel_for(q.tokens, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t b = 1; p.dB.present() && b < q.blocks; ++b) {
            const float* src = ws + q.off_db + (b - 1) * q.db_part + (t * G + g) * N;
            float* dst = p.dB.ptr(t, g, 0);
            for (int64_t n = 0; n < N; ++n) dst[n] += src[n];
          }
          for (int64_t b = 1; p.dC.present() && b < q.blocks; ++b)
            for (int64_t r = 0; r < R; ++r) {
              const float* src = ws + q.off_dc + (b - 1) * q.dc_part + ((t * G + g) * R + r) * N;
              float* dst = p.dC.ptr(t, g, r, 0);
              for (int64_t n = 0; n < N; ++n) dst[n] += src[n];
            }
        }
    });
  if (q.seqs > 1 && q.seq_part > 0)
    exec.parallel_for(q.dch, [&](int64_t c0, int64_t c1, int) {
      for (int64_t s = 1; s < q.seqs; ++s) {
        const SeqTargets st = seq_targets(s);
        for (int64_t c = c0; c < c1; ++c) {
          if (st.dA)
            for (int64_t n = 0; n < N; ++n) p.dA(c, n) += st.dA[c * N + n];
          if (st.dD) p.dD(c) += st.dD[c];
          if (st.ddb) p.ddelta_bias(c) += st.ddb[c];
        }
      }
    });
}

}  // namespace detail
}  // namespace cpu

/// Scratch bytes selective_scan_backward(p, exec, ...) needs: per thread, the chunk-boundary states
/// of its longest sequence and one chunk's recomputed states; plus the partial sums of dB / dC
/// (per block of channels) and of dA / dD / ddelta_bias (per sequence). It depends on the token and
/// sequence counts, the longest sequence and the thread count: a buffer sized for the largest call
/// serves every smaller one.
template <class T>
size_t selective_scan_backward_workspace_bytes(const SelectiveScanBackwardParams<T>& p, CpuExec exec) {
  check(p);
  return size_t(cpu::detail::make_scan_bwd_plan(p, exec.threads()).total) * sizeof(float) + 64;  // + 64: alignment
}

/// The gradients. Throws Error, before writing anything, on invalid params
/// or when workspace_bytes < selective_scan_backward_workspace_bytes(p, exec).
template <class T>
void selective_scan_backward(const SelectiveScanBackwardParams<T>& p, CpuExec exec, void* workspace,
                             size_t workspace_bytes) {
  check(p);
  const cpu::detail::ScanBwdPlan q = cpu::detail::make_scan_bwd_plan(p, exec.threads());
  const size_t need = size_t(q.total) * sizeof(float) + 64;
  RF_CHECK(workspace_bytes >= need && workspace != nullptr, "selective_scan_backward: workspace has ",
           workspace_bytes, " bytes", workspace ? "" : " (null)", ", expected at least ", need,
           " (selective_scan_backward_workspace_bytes)");
  float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t(63));
  cpu::detail::run_selective_scan_backward(p, q, exec, ws);
}

/// Prefill / chunked prefill over the packed sequences.
template <class T>
void selective_scan(const SelectiveScanParams<T>& p, CpuExec exec) {
  check(p);
  cpu::detail::run_selective_scan(p, detail::ScanMode::scan, exec);
}

/// Decode: token row t is a one-token sequence on slot state_slots[t] (absent: t), updated in place.
template <class T>
void selective_state_update(const SelectiveScanParams<T>& p, CpuExec exec) {
  check_state_update(p);
  cpu::detail::run_state_update(p, exec);
}

/// Whether selective_state_update(p, CpuExec) runs (supports(p, exec) is the prefill's).
template <class T>
Support supports_update(const SelectiveScanParams<T>& p, CpuExec) {
  return detail::support_of([&] { check_state_update(p); });
}

}  // namespace recurformer
