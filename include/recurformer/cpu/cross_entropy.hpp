// recurformer/cpu/cross_entropy.hpp: CPU fused lm_head + cross-entropy (+ KL) (ops/cross_entropy.hpp).
//
// Per chunk of chunk_tokens tokens:
//   1. z = h W^T into the workspace through linear() (its GEMM and workspace), the teacher's zt
//      likewise;
//   2. each token's row (tokens handed out dynamically): log-sum-exp, ce_t, kl_t and, backward,
//      dz written over z;
//   3. backward: dh = dz W with the columns of d split across threads, then dW (+)= dz^T h with
//      the vocab rows split across threads (kernels: cpu/detail/cross_entropy_kernels.hpp).
// Per-token losses are summed in double in token order on the calling thread. Every gradient
// element is written by one thread and summed in a fixed order (vocab for dh, tokens for dW), so
// the gradients do not depend on the thread count. Memory per chunk: W is streamed twice (logits,
// dh), dW read and written once.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "recurformer/cpu/detail/cross_entropy_kernels.hpp"
#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/ops/cross_entropy.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

/// Byte offsets of one call's scratch (every region 64-byte aligned from an aligned base).
struct CeLayout {
  int64_t chunk = 0;     // tokens per chunk actually used (<= chunk_tokens, <= tokens)
  int64_t ldz = 0;       // row stride of the logits blocks (vocab rounded up to 16 floats)
  size_t z = 0, zt = 0, losses = 0, lin = 0, lin_bytes = 0, total = 0;
};

inline size_t ce_align(size_t b) { return (b + 63) / 64 * 64; }

template <class TW>
CeLayout ce_layout(const CrossEntropyParams<TW>& p, CpuExec exec) {
  CeLayout l;
  const int64_t tokens = p.h.shape[0], vocab = p.weight.shape[0];
  if (tokens == 0) return l;
  l.chunk = std::min(p.chunk_tokens, tokens);
  l.ldz = (vocab + 15) / 16 * 16;
  const size_t block = ce_align(size_t(l.chunk * l.ldz) * sizeof(float));
  // The linear scratch for a chunk (a size query reads only shapes; y's pointer is never used).
  auto lin_need = [&](const View<const float, 2>& x, const View<const TW, 2>& w) {
    LinearParams<float, TW> lp;
    lp.x = make_strided_view(x.data, {l.chunk, x.shape[1]}, {x.stride[0], 1});
    lp.weight = w;
    lp.y = make_view(const_cast<float*>(x.data), {l.chunk, vocab});
    return linear_workspace_bytes(lp, exec);
  };
  l.lin_bytes = lin_need(p.h, p.weight);
  if (p.teacher_h.present()) l.lin_bytes = std::max(l.lin_bytes, lin_need(p.teacher_h, p.teacher_weight));
  l.z = 0;
  l.zt = block;
  l.losses = l.zt + (p.teacher_h.present() ? block : 0);
  l.lin = l.losses + ce_align(size_t(l.chunk) * 2 * sizeof(float));
  l.total = l.lin + ce_align(l.lin_bytes) + 64;  // + 64: slack to align the base
  return l;
}

/// The forward (dz == nullptr) or forward and backward of one call.
template <class TW>
CrossEntropyResult ce_run(const char* op, const CrossEntropyParams<TW>& p,
                          const CrossEntropyBackwardParams<TW>* bp, CpuExec exec, void* workspace,
                          size_t workspace_bytes) {
  const CeLayout l = ce_layout(p, exec);
  RF_CHECK(workspace_bytes >= l.total && (l.total == 0 || workspace != nullptr), op, ": workspace has ",
           workspace_bytes, " bytes", workspace ? "" : " (null)", ", expected at least ", l.total,
           " (cross_entropy_workspace_bytes)");
  const int64_t tokens = p.h.shape[0], d = p.h.shape[1], vocab = p.weight.shape[0];
  const bool teacher = p.teacher_h.present();
  const bool want_dw = bp && bp->dweight.present();
  CrossEntropyResult res;
  for (int64_t t = 0; t < tokens; ++t) res.count += p.targets(t) >= 0;
  if (tokens == 0) {
    if (want_dw && !bp->accumulate)
      for (int64_t v = 0; v < vocab; ++v) std::fill_n(bp->dweight.ptr(v, 0), d, 0.f);
    return res;
  }
  unsigned char* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t(63));
  float* z = reinterpret_cast<float*>(base + l.z);
  float* zt = teacher ? reinterpret_cast<float*>(base + l.zt) : nullptr;
  float* losses = reinterpret_cast<float*>(base + l.losses);
  void* lin_ws = base + l.lin;

  const float lam = p.kl_weight;
  const float s = res.count ? (bp ? bp->grad_scale : 1.f) / float(res.count) : 0.f;
  const cpu::Isa isa = cpu::active_isa();
  double ce_sum = 0, kl_sum = 0;
  for (int64_t c0 = 0; c0 < tokens; c0 += l.chunk) {
    const int64_t n = std::min(l.chunk, tokens - c0);
    {
      LinearParams<float, TW> lp;
      lp.x = make_strided_view(p.h.ptr(c0, 0), {n, d}, {p.h.stride[0], 1});
      lp.weight = p.weight;
      lp.y = make_strided_view(z, {n, vocab}, {l.ldz, 1});
      linear(lp, exec, lin_ws, l.lin_bytes);
    }
    if (teacher) {
      LinearParams<float, TW> lp;
      lp.x = make_strided_view(p.teacher_h.ptr(c0, 0), {n, p.teacher_h.shape[1]}, {p.teacher_h.stride[0], 1});
      lp.weight = p.teacher_weight;
      lp.y = make_strided_view(zt, {n, vocab}, {l.ldz, 1});
      linear(lp, exec, lin_ws, l.lin_bytes);
    }
    exec.for_each(n, [&](int64_t i, int) {
      const int32_t target = p.targets(c0 + i);
      float* zi = z + i * l.ldz;
      if (target < 0) {  // ignored: no loss, no gradient
        losses[2 * i] = losses[2 * i + 1] = 0.f;
        if (bp) std::fill_n(zi, vocab, 0.f);
        return;
      }
      const float* zti = teacher ? zt + i * l.ldz : nullptr;
      float* g = bp ? zi : nullptr;
      switch (isa) {
#if RF_HAVE_X86_SIMD
        case cpu::Isa::avx512: return ce_row_avx512(vocab, zi, zti, target, lam, s, g, losses + 2 * i);
        case cpu::Isa::avx2: return ce_row_avx2(vocab, zi, zti, target, lam, s, g, losses + 2 * i);
#endif
        default: return ce_row_scalar(vocab, zi, zti, target, lam, s, g, losses + 2 * i);
      }
    });
    for (int64_t i = 0; i < n; ++i) {
      ce_sum += double(losses[2 * i]);
      kl_sum += double(losses[2 * i + 1]);
      if (p.nll.present()) p.nll(c0 + i) = losses[2 * i];
    }
    if (!bp) continue;

    // dh = dz W: columns split across threads in units of one register tile.
    const int64_t unit = isa == cpu::Isa::avx512 ? CeTile<simd::F32x16>::kNV * 16
                       : isa == cpu::Isa::avx2   ? CeTile<simd::F32x8>::kNV * 8
                                                 : CeTile<simd::F32x1>::kNV;
    const float* hc = p.h.ptr(c0, 0);
    float* dh = bp->dh.ptr(c0, 0);
    const int64_t ldh = p.h.stride[0], lddh = bp->dh.stride[0], ldw = p.weight.stride[0];
    exec.parallel_for((d + unit - 1) / unit, [&](int64_t b, int64_t e, int) {
      const int64_t a0 = b * unit, a1 = std::min(d, e * unit);
      switch (isa) {
#if RF_HAVE_X86_SIMD
        case cpu::Isa::avx512: return ce_dh_avx512(n, vocab, a0, a1, z, l.ldz, p.weight.data, ldw, dh, lddh);
        case cpu::Isa::avx2: return ce_dh_avx2(n, vocab, a0, a1, z, l.ldz, p.weight.data, ldw, dh, lddh);
#endif
        default: return ce_dh_scalar(n, vocab, a0, a1, z, l.ldz, p.weight.data, ldw, dh, lddh);
      }
    });
    if (!want_dw) continue;
    // dW (+)= dz^T h: vocab rows split across threads; the first chunk overwrites unless accumulating.
    const int zero = c0 == 0 && !bp->accumulate;
    float* dw = bp->dweight.data;
    const int64_t lddw = bp->dweight.stride[0];
    exec.parallel_for(vocab, [&](int64_t v0, int64_t v1, int) {
      switch (isa) {
#if RF_HAVE_X86_SIMD
        case cpu::Isa::avx512: return ce_dw_avx512(n, d, v0, v1, z, l.ldz, hc, ldh, dw, lddw, zero);
        case cpu::Isa::avx2: return ce_dw_avx2(n, d, v0, v1, z, l.ldz, hc, ldh, dw, lddw, zero);
#endif
        default: return ce_dw_scalar(n, d, v0, v1, z, l.ldz, hc, ldh, dw, lddw, zero);
      }
    });
  }
  if (res.count) {
    res.ce = ce_sum / double(res.count);
    res.kl = kl_sum / double(res.count);
    res.loss = res.ce + double(lam) * res.kl;
  }
  return res;
}

}  // namespace detail
}  // namespace cpu

/// Scratch bytes for p's shapes, chunk_tokens and exec's thread count (0 when there are no tokens).
/// A CrossEntropyBackwardParams needs the same as its forward part.
template <class TW>
size_t cross_entropy_workspace_bytes(const CrossEntropyParams<TW>& p, CpuExec exec) {
  check(p);
  return cpu::detail::ce_layout(p, exec).total;
}

/// The losses. Throws Error, before writing, on invalid params or a
/// workspace smaller than cross_entropy_workspace_bytes(p, exec).
template <class TW>
CrossEntropyResult cross_entropy(const CrossEntropyParams<TW>& p, CpuExec exec, void* workspace,
                                 size_t workspace_bytes) {
  check(p);
  return cpu::detail::ce_run<TW>("cross_entropy", p, nullptr, exec, workspace, workspace_bytes);
}

/// The losses and their gradients; same checks.
template <class TW>
CrossEntropyResult cross_entropy_backward(const CrossEntropyBackwardParams<TW>& p, CpuExec exec,
                                          void* workspace, size_t workspace_bytes) {
  check(p);
  return cpu::detail::ce_run<TW>("cross_entropy_backward", p, &p, exec, workspace, workspace_bytes);
}

}  // namespace recurformer
