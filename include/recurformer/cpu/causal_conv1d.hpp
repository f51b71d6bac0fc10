// recurformer/cpu/causal_conv1d.hpp: causal_conv1d and causal_conv1d_update on the CPU.
//
// Tasks are (sequence, block of one vector width of channels), handed out dynamically; each runs
// its sequence start to end with the window in registers (cpu/detail/conv_kernels.hpp). The width
// K becomes a template argument here, in the one dispatch of that axis. Prefill and the one-token
// update run the same kernel, so they agree bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/cpu/detail/conv_kernels.hpp"
#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/scan_sequences.hpp"
#include "recurformer/ops/causal_conv1d.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

using ConvWidths = ValueList<2, 3, 4, 5, 6, 7, 8>;  // = kCausalConv1dMinWidth..kCausalConv1dMaxWidth

template <class T>
void run_causal_conv1d(const char* op, const CausalConv1dParams<T>& p,
                       recurformer::detail::ScanMode mode, CpuExec exec) {
  const Isa isa = active_isa();
  const int width = isa == Isa::avx512 ? 16 : isa == Isa::avx2 ? 8 : 1;
  const PackedSequences seqs{mode, p.x.shape[0], p.cu_seqlens, p.state_slots};
  const int64_t dch = p.x.shape[1], blocks = (dch + width - 1) / width;
  dispatch_value(op, ConvWidths{}, p.weight.shape[1], [&](auto k) {
    constexpr int K = decltype(k)::value;
    exec.for_each(seqs.count() * blocks, [&](int64_t task, int) {
      const int64_t s = task / blocks, c0 = task % blocks * width;
      const int64_t slot = seqs.slot(s);
      if (slot < 0) return;  // padding
      ConvBlock<T> a;
      a.x = p.x.data + c0;
      a.y = p.y.data + c0;
      a.w = p.weight.data + c0 * p.weight.stride[0];
      a.bias = p.bias.data ? p.bias.data + c0 : nullptr;
      a.state = p.conv_state.data ? p.conv_state.data + slot * p.conv_state.stride[0] + c0 : nullptr;
      a.sx = p.x.stride[0];
      a.sy = p.y.stride[0];
      a.sw = p.weight.stride[0];
      a.s_state = p.conv_state.stride[1];
      a.t0 = seqs.begin(s);
      a.t1 = seqs.end(s);
      a.nc = int(std::min<int64_t>(width, dch - c0));
      a.silu = p.activation == ConvActivation::silu;
      a.use_initial_state = p.use_initial_state;
      switch (isa) {
#if RF_HAVE_X86_SIMD
        case Isa::avx512: conv_block_avx512<K>(a); break;
        case Isa::avx2: conv_block_avx2<K>(a); break;
#endif
        default: conv_block_scalar<K>(a); break;
      }
    });
  });
}

}  // namespace detail
}  // namespace cpu

template <class T>
void causal_conv1d(const CausalConv1dParams<T>& p, CpuExec exec) {
  check(p);
  cpu::detail::run_causal_conv1d("causal_conv1d", p, detail::ScanMode::scan, exec);
}

template <class T>
void causal_conv1d_update(const CausalConv1dParams<T>& p, CpuExec exec) {
  check_conv_update(p);
  cpu::detail::run_causal_conv1d("causal_conv1d_update", p, detail::ScanMode::state_update, exec);
}

}  // namespace recurformer
