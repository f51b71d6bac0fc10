// recurformer/cpu/linear.hpp: CPU linear layer (ops/linear.hpp).
//
// Few tokens (<= LinearBlocking::kGemvMaxTokens = 16): GEMV, output rows split into one contiguous
// block per thread so each thread streams its own part of W once per kGemvTokens tokens (up to four
// passes still cost less than packing 16-bit W into fp32 panels: batched decode). More tokens: blocked GEMM over
// (kMC tokens x kNC outputs) tasks handed out dynamically, each thread packing W into its own
// slice of the workspace. Kernel bodies: cpu/detail/gemm_kernels.hpp. linear(p, blocks, ...) reads
// the weights from a matrix's GGUF blocks (BlockWeight) instead of its dense view; with
// ActivationMath::int8 the GEMV of Q4_0 / Q4_1 / Q8_0 takes cpu/detail/gemv_q8_kernels.hpp.
//
// linear_backward: the dx GEMM (tokens x in, k = out) and the dweight GEMM (out x in, k = tokens)
// are cut into (MC x NC) C blocks handed out together in one exec.for_each, each thread packing into
// its own slice of the workspace; dbias is a parallel_for over dy's columns.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/cpu/detail/gemm_kernels.hpp"
#include "recurformer/cpu/detail/gemv_q8_kernels.hpp"
#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/ops/linear.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {

/// Scratch bytes linear(p, exec, ...) needs for these shapes and this many threads (0 when the
/// GEMV path is taken). A buffer sized for the largest token count serves every smaller call.
template <class TX, class TW>
size_t linear_workspace_bytes(const LinearParams<TX, TW>& p, CpuExec exec) {
  check(p);
  using B = cpu::detail::LinearBlocking;
  const int64_t tokens = p.x.shape[0];
  if (tokens <= B::kGemvMaxTokens) return 0;
  const int64_t per_thread = cpu::detail::gemm_thread_floats<TX>(tokens, p.x.shape[1], p.weight.shape[0]);
  return size_t(per_thread * exec.threads()) * sizeof(float) + 64;  // + 64: alignment slack
}

namespace cpu {
namespace detail {

// linear with x multiplied as x_math says (int8 only changes the GEMV of kQ8DotBlock types).
template <class TX, class TW>
void linear_run(const LinearParams<TX, TW>& p, CpuExec exec, void* workspace, size_t workspace_bytes,
                ActivationMath x_math) {
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
  const bool int8_x = kQ8DotBlock<TW> && x_math == ActivationMath::int8;
  [[maybe_unused]] const bool vnni = int8_x && cpu::has_avx512_vnni();  // read on x86 only

  if (a.tokens <= B::kGemvMaxTokens) {
    // Each pass streams W once for up to kGemvTokens tokens.
    for (int64_t t0 = 0; t0 < a.tokens; t0 += B::kGemvTokens) {
      const int nt = int(std::min<int64_t>(B::kGemvTokens, a.tokens - t0));
      dispatch_value("linear: GEMV token group", ValueList<1, 2, 3, 4>{}, nt, [&](auto c) {
        constexpr int NT = decltype(c)::value;
        static_assert(NT <= B::kGemvTokens, "token groups up to kGemvTokens");
        exec.parallel_for(a.out, [&](int64_t o0, int64_t o1, int) {
          if constexpr (kQ8DotBlock<TW>) {
            if (int8_x) {
              switch (isa) {
#if RF_HAVE_X86_SIMD
                case cpu::Isa::avx512:
                  if (vnni) return cpu::detail::gemv_q8_vnni<NT>(&a, t0, o0, o1);
                  return cpu::detail::gemv_q8_avx2<NT>(&a, t0, o0, o1);
                case cpu::Isa::avx2: return cpu::detail::gemv_q8_avx2<NT>(&a, t0, o0, o1);
#endif
                default: return cpu::detail::gemv_q8_scalar<NT>(&a, t0, o0, o1);
              }
            }
          }
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

}  // namespace detail
}  // namespace cpu

/// y = x W^T + b. Throws Error, before writing, on invalid params or when
/// workspace_bytes < linear_workspace_bytes(p, exec).
template <class TX, class TW>
void linear(const LinearParams<TX, TW>& p, CpuExec exec, void* workspace, size_t workspace_bytes) {
  cpu::detail::linear_run(p, exec, workspace, workspace_bytes, ActivationMath::fp32);
}

/// Whether linear has register kernels for this block type's GEMV with x as x_math says (fp32 x:
/// Q8_0, Q4_0, Q4_1; int8 x: every block type): only then is multiplying by the blocks faster than
/// by their fp32 decoding. With fp32 x the other types decode a block at a time on the stack, 10-25x
/// slower than fp32 weights (benchmarks.md): correct, not fast.
inline bool linear_blocks_are_fast(GgmlType t, ActivationMath x_math) {
  if (!is_quantized(t)) return false;
  if (x_math == ActivationMath::int8) return true;  // kQ8DotBlock: every block type
  return dispatch_quant(t, [](auto tag) {
    using B = typename decltype(tag)::type;
    return cpu::detail::kNibbleBlock<B> || std::is_same_v<B, BlockQ8_0>;
  });
}

/// Whether linear(p, blocks, CpuExec, ...) runs.
template <class TW>
Support supports(const LinearParams<float, TW>& p, BlockWeight blocks, CpuExec) {
  return detail::support_of([&] { check(p, blocks); });
}

/// y = x W^T + b with W read from `blocks` when present, else from p.weight (which gives the shape
/// either way): the one switch from a run-time block type to its kernels. Workspace as for p.
template <class TW>
void linear(const LinearParams<float, TW>& p, BlockWeight blocks, CpuExec exec, void* workspace,
            size_t workspace_bytes) {
  check(p, blocks);
  if (!blocks.present()) return linear(p, exec, workspace, workspace_bytes);
  dispatch_quant(blocks.type, [&](auto tag) {
    using B = typename decltype(tag)::type;
    LinearParams<float, B> q;
    q.x = p.x;
    q.weight = make_view(static_cast<const B*>(blocks.data), {p.weight.shape[0], p.weight.shape[1] / B::size});
    if constexpr (std::is_same_v<TW, float>) q.bias = p.bias;
    q.y = p.y;
    cpu::detail::linear_run(q, exec, workspace, workspace_bytes, blocks.x_math);
  });
}

namespace cpu {
namespace detail {

/// The two GEMMs of linear_backward: dx = dy W (m tokens, k out) and dweight = dy^T x (m out,
/// k tokens), both with n = in.
template <class TX, class TW>
struct LinearBackwardGemms {
  GemmNNArgs<TW> dx;
  GemmNNArgs<TX> dw;
  int64_t per_thread = 0;  // floats of scratch per thread

  explicit LinearBackwardGemms(const LinearBackwardParams<TX, TW>& p) {
    const int64_t tokens = p.x.shape[0], in = p.x.shape[1], out = p.weight.shape[0];
    dx = {p.dy.data, p.dy.stride[0], false, p.weight.data, p.weight.stride[0],
          p.dx.data, p.dx.stride[0], tokens, in, out, p.accumulate};
    dw = {p.dy.data, p.dy.stride[0], true, p.x.data, p.x.stride[0],
          p.dweight.data, p.dweight.stride[0], out, in, tokens, p.accumulate};
    if (p.dx.present() && tokens > 0)
      per_thread = std::max(per_thread, gemm_nn_thread_floats(tokens, in, out, false));
    if (p.dweight.present() && tokens > 0)
      per_thread = std::max(per_thread, gemm_nn_thread_floats(out, in, tokens, true));
  }
};

/// How one GEMM is cut into C blocks: rows of mc (smaller when there are too few blocks for the
/// threads, as in the forward), columns of kNC.
struct GemmTiling {
  int64_t mc = 0, m_blocks = 0, n_blocks = 0;
  GemmTiling(int64_t m, int64_t n, int threads) {
    using B = LinearBlocking;
    n_blocks = (n + B::kNC - 1) / B::kNC;
    mc = B::kMC;
    if (n_blocks * ((m + mc - 1) / mc) < threads) {
      const int64_t m_parts = (threads + n_blocks - 1) / n_blocks;
      mc = std::min(B::kMC, round_up((m + m_parts - 1) / m_parts, B::kMR));
    }
    m_blocks = m > 0 ? (m + mc - 1) / mc : 0;
  }
  int64_t tasks() const { return m_blocks * n_blocks; }
};

template <class TB>
void run_gemm_nn_task(cpu::Isa isa, const GemmNNArgs<TB>& g, const GemmTiling& tl, int64_t task,
                      float* ws) {
  using B = LinearBlocking;
  const int64_t mb = task / tl.n_blocks, nb = task % tl.n_blocks;
  const int64_t m0 = mb * tl.mc, m1 = std::min(g.m, m0 + tl.mc);
  const int64_t n0 = nb * B::kNC, n1 = std::min(g.n, n0 + B::kNC);
  switch (isa) {
#if RF_HAVE_X86_SIMD
    case cpu::Isa::avx512: return gemm_nn_avx512(&g, m0, m1, n0, n1, ws);
    case cpu::Isa::avx2: return gemm_nn_avx2(&g, m0, m1, n0, n1, ws);
#endif
    default: return gemm_nn_scalar(&g, m0, m1, n0, n1, ws);
  }
}

}  // namespace detail
}  // namespace cpu

/// Scratch bytes linear_backward(p, exec, ...) needs for these shapes, outputs and threads. A
/// buffer sized for the largest token count serves every smaller call with the same outputs.
template <class TX, class TW>
size_t linear_backward_workspace_bytes(const LinearBackwardParams<TX, TW>& p, CpuExec exec) {
  check(p);
  const cpu::detail::LinearBackwardGemms<TX, TW> g(p);
  if (g.per_thread == 0) return 0;
  return size_t(g.per_thread * exec.threads()) * sizeof(float) + 64;  // + 64: alignment slack
}

/// dx, dweight, dbias of linear. Throws Error, before writing, on invalid params
/// or when workspace_bytes < linear_backward_workspace_bytes(p, exec).
template <class TX, class TW>
void linear_backward(const LinearBackwardParams<TX, TW>& p, CpuExec exec, void* workspace,
                     size_t workspace_bytes) {
  check(p);
  const size_t need = linear_backward_workspace_bytes(p, exec);
  RF_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr), "linear_backward: workspace has ",
           workspace_bytes, " bytes", workspace ? "" : " (null)", ", expected at least ", need,
           " (linear_backward_workspace_bytes)");
  const cpu::detail::LinearBackwardGemms<TX, TW> g(p);
  const int64_t tokens = p.x.shape[0], in = p.x.shape[1], out = p.weight.shape[0];
  const cpu::Isa isa = cpu::active_isa();

  if (p.dbias.present()) {
    exec.parallel_for(out, [&](int64_t o0, int64_t o1, int) {
      float* db = p.dbias.data;
      const float* dy = p.dy.data;
      const int64_t ldy = p.dy.stride[0];
      switch (isa) {
#if RF_HAVE_X86_SIMD
        case cpu::Isa::avx512: return cpu::detail::column_sums_avx512(dy, ldy, tokens, o0, o1, db, p.accumulate);
        case cpu::Isa::avx2: return cpu::detail::column_sums_avx2(dy, ldy, tokens, o0, o1, db, p.accumulate);
#endif
        default: return cpu::detail::column_sums_scalar(dy, ldy, tokens, o0, o1, db, p.accumulate);
      }
    });
  }
  if (tokens == 0) {  // no rows of dx; dweight is an empty sum
    if (p.dweight.present() && !p.accumulate)
      for (int64_t o = 0; o < out; ++o) std::fill_n(p.dweight.data + o * p.dweight.stride[0], in, 0.f);
    return;
  }
  // Both GEMMs in one job: dx blocks first (task < dx_tasks), then dweight blocks.
  const cpu::detail::GemmTiling dx_tiles(tokens, in, exec.threads()), dw_tiles(out, in, exec.threads());
  const int64_t dx_tasks = p.dx.present() ? dx_tiles.tasks() : 0;
  const int64_t dw_tasks = p.dweight.present() ? dw_tiles.tasks() : 0;
  float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t(63));
  exec.for_each(dx_tasks + dw_tasks, [&](int64_t task, int thread) {
    float* mine = ws + g.per_thread * thread;
    if (task < dx_tasks)
      cpu::detail::run_gemm_nn_task(isa, g.dx, dx_tiles, task, mine);
    else
      cpu::detail::run_gemm_nn_task(isa, g.dw, dw_tiles, task - dx_tasks, mine);
  });
}

}  // namespace recurformer
