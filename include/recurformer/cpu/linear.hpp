// recurformer/cpu/linear.hpp: CPU linear layer (ops/linear.hpp).
//
// Few tokens (<= LinearBlocking::kGemvMaxTokens = 16): GEMV, output rows split into one contiguous
// block per thread so each thread streams its own part of W once per kGemvTokens tokens (up to four
// passes still cost less than packing 16-bit W into fp32 panels: batched decode). More tokens: blocked GEMM over
// (kMC tokens x kNC outputs) tasks handed out dynamically, each thread packing W into its own
// slice of the workspace. Kernel bodies: cpu/detail/gemm_kernels.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/cpu/detail/gemm_kernels.hpp"
#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/ops/linear.hpp"

namespace recurformer {

template <class TX, class TW>
size_t linear_workspace_bytes(const LinearParams<TX, TW>& p, CpuExec exec) {
  check(p);
  using B = cpu::detail::LinearBlocking;
  const int64_t tokens = p.x.shape[0];
  if (tokens <= B::kGemvMaxTokens) return 0;
  const int64_t per_thread = cpu::detail::gemm_thread_floats<TX>(tokens, p.x.shape[1], p.weight.shape[0]);
  return size_t(per_thread * exec.threads()) * sizeof(float) + 64;  // + 64: alignment slack
}

template <class TX, class TW>
void linear(const LinearParams<TX, TW>& p, CpuExec exec, void* workspace, size_t workspace_bytes) {
  check(p);
  using B = cpu::detail::LinearBlocking;
  const size_t need = linear_workspace_bytes(p, exec);
  RF_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr), "linear: workspace has ",
           workspace_bytes, " bytes", workspace ? "" : " (null)", ", expected at least ", need,
           " (linear_workspace_bytes)");
  const cpu::detail::LinearArgs<TX, TW> a{p.x.data,    p.x.stride[0], p.weight.data,
                                          p.weight.stride[0], p.bias.data, p.y.data,
                                          p.y.stride[0], p.x.shape[0],  p.x.shape[1],
                                          p.weight.shape[0]};
  if (a.tokens == 0) return;
  const cpu::Isa isa = cpu::active_isa();

  if (a.tokens <= B::kGemvMaxTokens) {
    // Each pass streams W once for up to kGemvTokens tokens.
    for (int64_t t0 = 0; t0 < a.tokens; t0 += B::kGemvTokens) {
      const int nt = int(std::min<int64_t>(B::kGemvTokens, a.tokens - t0));
      dispatch_value("linear: GEMV token group", ValueList<1, 2, 3, 4>{}, nt, [&](auto c) {
        constexpr int NT = decltype(c)::value;
        static_assert(NT <= B::kGemvTokens, "token groups up to kGemvTokens");
        exec.parallel_for(a.out, [&](int64_t o0, int64_t o1, int) {
          switch (isa) {
#if RF_HAVE_X86_SIMD
            case cpu::Isa::avx512: return cpu::detail::gemv_avx512<NT>(&a, t0, o0, o1);
            case cpu::Isa::avx2: return cpu::detail::gemv_avx2<NT>(&a, t0, o0, o1);
#endif
            default: return cpu::detail::gemv_scalar<NT>(&a, t0, o0, o1);
          }
        });
      });
    }
    return;
  }

  // GEMM: per-thread scratch, 64-byte aligned.
  const int64_t per_thread = cpu::detail::gemm_thread_floats<TX>(a.tokens, a.in, a.out);
  float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t(63));
  const int64_t n_blocks = (a.out + B::kNC - 1) / B::kNC;
  // Few output blocks (a narrow projection such as dt_down): split the tokens finer so every
  // thread gets a task; any block height up to kMC fits the per-thread scratch.
  int64_t mc = B::kMC;
  if (n_blocks < exec.threads())
    mc = std::min(B::kMC, cpu::detail::round_up((a.tokens + exec.threads() - 1) / exec.threads(), B::kMR));
  const int64_t m_blocks = (a.tokens + mc - 1) / mc;
  exec.for_each(m_blocks * n_blocks, [&](int64_t task, int thread) {
    const int64_t mb = task / n_blocks, nb = task % n_blocks;
    const int64_t t0 = mb * mc, t1 = std::min(a.tokens, t0 + mc);
    const int64_t o0 = nb * B::kNC, o1 = std::min(a.out, o0 + B::kNC);
    float* mine = ws + per_thread * thread;
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512: return cpu::detail::gemm_avx512(&a, t0, t1, o0, o1, mine);
      case cpu::Isa::avx2: return cpu::detail::gemm_avx2(&a, t0, t1, o0, o1, mine);
#endif
      default: return cpu::detail::gemm_scalar(&a, t0, t1, o0, o1, mine);
    }
  });
}

}  // namespace recurformer
