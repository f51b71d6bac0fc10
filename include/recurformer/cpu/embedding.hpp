// recurformer/cpu/embedding.hpp: CPU embedding lookup (ops/embedding.hpp).
//
// A gather of table rows: a plain copy when the types match, a vector conversion otherwise, a
// block decoding per row for a GGUF block-quantised table.
// Tokens are split into one contiguous block per thread.
// Backward: rows of dtable zeroed in parallel (unless accumulating), then the columns split into
// blocks of 16 floats (one 64-byte line) across threads, each adding every token's slice in token
// order: deterministic and free of races (ops/embedding.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "recurformer/ops/embedding.hpp"
#include "recurformer/cpu/support.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

// out[t, :] = table[ids[t], :] converted to T, for t in [0, tokens).
template <class V, class T, class TW>
void embedding_rows(int64_t tokens, int64_t d, const TW* table, int64_t ldt, const int32_t* ids,
                    int64_t ids_stride, T* out, int64_t ldo) {
  constexpr int W = V::width;
  for (int64_t t = 0; t < tokens; ++t) {
    const TW* src = table + int64_t(ids[t * ids_stride]) * ldt;
    T* dst = out + t * ldo;
    int64_t i = 0;
    for (; i + W <= d; i += W) V::load(src + i).store(dst + i);
    if (i < d) V::load_partial(src + i, int(d - i)).store_partial(dst + i, int(d - i));
  }
}

template <class T, class TW>
void embedding_scalar(int64_t tokens, int64_t d, const TW* table, int64_t ldt, const int32_t* ids,
                      int64_t ids_stride, T* out, int64_t ldo) {
  embedding_rows<simd::F32x1>(tokens, d, table, ldt, ids, ids_stride, out, ldo);
}
#if RF_HAVE_X86_SIMD
template <class T, class TW>
RF_KERNEL_AVX2 void embedding_avx2(int64_t tokens, int64_t d, const TW* table, int64_t ldt,
                                   const int32_t* ids, int64_t ids_stride, T* out, int64_t ldo) {
  embedding_rows<simd::F32x8>(tokens, d, table, ldt, ids, ids_stride, out, ldo);
}
template <class T, class TW>
RF_KERNEL_AVX512 void embedding_avx512(int64_t tokens, int64_t d, const TW* table, int64_t ldt,
                                       const int32_t* ids, int64_t ids_stride, T* out, int64_t ldo) {
  embedding_rows<simd::F32x16>(tokens, d, table, ldt, ids, ids_stride, out, ldo);
}
#endif

// dtable[ids[t], c0:c1] += dout[t, c0:c1] for t in [0, tokens), in order.
template <class V>
void embedding_bwd_cols(int64_t tokens, int64_t c0, int64_t c1, const int32_t* ids,
                        int64_t ids_stride, const float* dout, int64_t ldo, float* dtable,
                        int64_t ldt) {
  constexpr int W = V::width;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* src = dout + t * ldo;
    float* dst = dtable + int64_t(ids[t * ids_stride]) * ldt;
    int64_t i = c0;
    for (; i + W <= c1; i += W) (V::load(dst + i) + V::load(src + i)).store(dst + i);
    if (i < c1) {
      const int n = int(c1 - i);
      (V::load_partial(dst + i, n) + V::load_partial(src + i, n)).store_partial(dst + i, n);
    }
  }
}

inline void embedding_bwd_cols_scalar(int64_t tokens, int64_t c0, int64_t c1, const int32_t* ids,
                                      int64_t ids_stride, const float* dout, int64_t ldo,
                                      float* dtable, int64_t ldt) {
  embedding_bwd_cols<simd::F32x1>(tokens, c0, c1, ids, ids_stride, dout, ldo, dtable, ldt);
}
#if RF_HAVE_X86_SIMD
RF_KERNEL_AVX2 inline void embedding_bwd_cols_avx2(int64_t tokens, int64_t c0, int64_t c1,
                                                   const int32_t* ids, int64_t ids_stride,
                                                   const float* dout, int64_t ldo, float* dtable,
                                                   int64_t ldt) {
  embedding_bwd_cols<simd::F32x8>(tokens, c0, c1, ids, ids_stride, dout, ldo, dtable, ldt);
}
RF_KERNEL_AVX512 inline void embedding_bwd_cols_avx512(int64_t tokens, int64_t c0, int64_t c1,
                                                       const int32_t* ids, int64_t ids_stride,
                                                       const float* dout, int64_t ldo,
                                                       float* dtable, int64_t ldt) {
  embedding_bwd_cols<simd::F32x16>(tokens, c0, c1, ids, ids_stride, dout, ldo, dtable, ldt);
}
#endif

/// Columns per block of the backward: one 64-byte line of fp32.
constexpr int64_t kEmbeddingBwdCols = 16;

}  // namespace detail
}  // namespace cpu

/// out[t] = table[ids[t]] converted to T, tokens split across the pool.
template <class T, class TW>
void embedding(const EmbeddingParams<T, TW>& p, CpuExec exec) {
  check(p);
  const int64_t d = p.table.shape[1];
  if (d == 0) return;
  exec.parallel_for(p.ids.shape[0], [&](int64_t b, int64_t e, int) {
    const int32_t* ids = p.ids.data + b * p.ids.stride[0];
    T* out = p.out.data + b * p.out.stride[0];
    const int64_t ldt = p.table.stride[0], ldo = p.out.stride[0], ids_stride = p.ids.stride[0];
    if constexpr (std::is_same_v<T, TW>) {
      for (int64_t t = 0; t < e - b; ++t)
        std::memcpy(out + t * ldo, p.table.data + int64_t(ids[t * ids_stride]) * ldt,
                    size_t(d) * sizeof(T));
      return;
    }
    switch (cpu::active_isa()) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512:
        return cpu::detail::embedding_avx512(e - b, d, p.table.data, ldt, ids, ids_stride, out, ldo);
      case cpu::Isa::avx2:
        return cpu::detail::embedding_avx2(e - b, d, p.table.data, ldt, ids, ids_stride, out, ldo);
#endif
      default:
        return cpu::detail::embedding_scalar(e - b, d, p.table.data, ldt, ids, ids_stride, out, ldo);
    }
  });
}

/// Whether embedding(p, blocks, CpuExec) runs.
template <class TW>
Support supports(const EmbeddingParams<float, TW>& p, BlockWeight blocks, CpuExec) {
  return detail::support_of([&] { check(p, blocks); });
}

/// out[t] = table[ids[t]], the rows read from `blocks` when present (each row's blocks decoded
/// into out as dequantize() does: bit for bit the table's fp32 decoding), else from p.table.
template <class TW>
void embedding(const EmbeddingParams<float, TW>& p, BlockWeight blocks, CpuExec exec) {
  check(p, blocks);
  if (!blocks.present()) return embedding(p, exec);
  dispatch_quant(blocks.type, [&](auto tag) {
    using B = typename decltype(tag)::type;
    const int64_t per_row = p.table.shape[1] / B::size;
    const B* table = static_cast<const B*>(blocks.data);
    exec.parallel_for(p.ids.shape[0], [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) {
        const B* row = table + int64_t(p.ids(t)) * per_row;
        float* out = p.out.ptr(t, 0);
        for (int64_t k = 0; k < per_row; ++k) row[k].dequantize(out + k * B::size);
      }
    });
  });
}

/// dtable from dout.
inline void embedding_backward(const EmbeddingBackwardParams& p, CpuExec exec) {
  check(p);
  namespace D = cpu::detail;
  const int64_t vocab = p.dtable.shape[0], d = p.dtable.shape[1], tokens = p.ids.shape[0];
  if (d == 0) return;
  const int64_t ldt = p.dtable.stride[0];
  if (!p.accumulate)
    exec.parallel_for(vocab, [&](int64_t b, int64_t e, int) {
      for (int64_t v = b; v < e; ++v) std::fill_n(p.dtable.data + v * ldt, d, 0.f);
    });
  const cpu::Isa isa = cpu::active_isa();
  const int64_t blocks = (d + D::kEmbeddingBwdCols - 1) / D::kEmbeddingBwdCols;
  exec.parallel_for(blocks, [&](int64_t b, int64_t e, int) {
    const int64_t c0 = b * D::kEmbeddingBwdCols, c1 = std::min(d, e * D::kEmbeddingBwdCols);
    const int32_t* ids = p.ids.data;
    const int64_t is = p.ids.stride[0], ldo = p.dout.stride[0];
    switch (isa) {
#if RF_HAVE_X86_SIMD
      case cpu::Isa::avx512:
        return D::embedding_bwd_cols_avx512(tokens, c0, c1, ids, is, p.dout.data, ldo, p.dtable.data, ldt);
      case cpu::Isa::avx2:
        return D::embedding_bwd_cols_avx2(tokens, c0, c1, ids, is, p.dout.data, ldo, p.dtable.data, ldt);
#endif
      default:
        return D::embedding_bwd_cols_scalar(tokens, c0, c1, ids, is, p.dout.data, ldo, p.dtable.data, ldt);
    }
  });
}

}  // namespace recurformer
