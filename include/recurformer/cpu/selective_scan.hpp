// recurformer/cpu/selective_scan.hpp: selective_scan and selective_state_update on the CPU.
//
// Work is split into tasks of (sequence, group, block of 1-4 vector widths of channels); each task
// runs the whole sequence for its channels (cpu/detail/scan_kernels.hpp), so the state never leaves
// the task and no cross-thread combination is needed. Tasks are handed out dynamically
// (exec.for_each), which balances uneven sequence lengths. Decode (one token per slot) has its own
// kernel, vectorised over the state dimension and updating the slot in place; its state is
// bit-identical to a scan over the same tokens, its y equal up to summation order.
#pragma once

#include <algorithm>
#include <cstdint>

#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/scan_kernels.hpp"
#include "recurformer/cpu/detail/scan_sequences.hpp"
#include "recurformer/ops/selective_scan.hpp"

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

}  // namespace detail
}  // namespace cpu

template <class T>
void selective_scan(const SelectiveScanParams<T>& p, CpuExec exec) {
  check(p);
  cpu::detail::run_selective_scan(p, detail::ScanMode::scan, exec);
}

template <class T>
void selective_state_update(const SelectiveScanParams<T>& p, CpuExec exec) {
  check_state_update(p);
  cpu::detail::run_state_update(p, exec);
}

}  // namespace recurformer
