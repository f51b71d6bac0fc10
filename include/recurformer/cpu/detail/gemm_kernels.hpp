// recurformer/cpu/detail/gemm_kernels.hpp: the bodies behind cpu/linear.hpp.
//
// y[t, o] = bias[o] + sum_k x[t, k] * w[o, k], with W stored [out, in] (HF layout), fp32 accumulation.
//
// GEMV (decode, a few tokens): memory-bound, so W is streamed exactly once per group of up to
// kGemvTokens tokens. Each step loads one vector of gemv_rows_for(tokens) weight rows (converted to
// fp32 in registers) and uses it for every token, accumulating along k; the row sums are reduced at
// the end. One token walks one row at a time: each thread then reads W as one sequential stream,
// which the hardware prefetchers follow; several rows side by side share x's loads but, with rows
// as short as a small model's (a Q4_1 row of 576 weights is 360 bytes), defeat them.
//
// GEMM (prefill): compute-bound. BLIS-style blocking: a task is an (MC tokens x NC outputs) block of
// y; for each KC slice of k it packs W[o-block, k-slice] transposed into fp32 micro-panels
// [NC/NR][KC][NR] (so the micro-kernel reads NR consecutive outputs per k as whole vectors) and runs
// an MR x NR register tile (MR tokens broadcast from x rows, NR = 2 vectors of outputs) over it.
// fp32 x is read in place; 16-bit x is converted into a fp32 block first. Partial sums live in y
// itself when y is fp32, else in a fp32 block converted to TX at the end.
//
// GGUF block weights (core/quant.hpp), GEMV: Q8_0 sums x * q over each 32-weight block and applies
// the block's scale once; Q4_0 / Q4_1 unpack their nibbles in registers and use
// w = d q + c (c = -8 d or m), so per block y += d * sum(x q) + c * sum(x), with sum(x) shared by
// every row; the other types dequantise one block per row into a stack buffer (block.dequantize,
// the bit-exact decoder) and dot it with x. The GEMM pack dequantises any block type into the same
// fp32 panels (prefill is bound by the micro-kernel, not by the unpacking).
//
// Backward (linear_backward): dx = dy W and dweight = dy^T x are both C[M, N] (+)= A[M, K] B[K, N]
// with B row-major (W: K = out; x: K = tokens) and A = dy (read in place: its rows run along K) or
// dy^T (packed per task into [KC][MR] panels, copying runs of MR floats along dy's rows). B slices are packed row by row into the same
// [NC/NR][KC][NR] panels, so the forward's micro-kernel runs unchanged. A task owns a C block and
// sums its whole K range in order: deterministic, no cross-thread reduction. dbias sums dy's columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "recurformer/core/config.hpp"
#include "recurformer/core/dtype.hpp"
#include "recurformer/core/quant.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "recurformer/ops/linear.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

/// Blocking of the linear layer (one place, so benchmarks can read it).
struct LinearBlocking {
  static constexpr int kGemvTokens = 4;     // tokens per pass over W in the GEMV
  static constexpr int kGemvRows = 4;       // weight rows per GEMV step for 2+ tokens
  // Rows per GEMV step for NT tokens: 1 for one token (one sequential stream per thread: a
  // SmolLM2 decode step's GEMVs ran 1.2-2x faster than with 4 on AMD Zen 4, benchmarks.md).
  static constexpr int gemv_rows_for(int tokens) { return tokens == 1 ? 1 : kGemvRows; }
  static constexpr int64_t kGemvMaxTokens = 16;  // at most this many tokens take the GEMV path (passes of kGemvTokens)
  static constexpr int kMR = 8;             // GEMM tile: tokens
  static constexpr int kNRVectors = 2;      // GEMM tile: outputs = kNRVectors * vector width
  static constexpr int64_t kNRMax = 32;     // the widest NR (AVX-512)
  static constexpr int64_t kMC = 256;       // tokens per task
  static constexpr int64_t kNC = 128;       // outputs per task (multiple of kNRMax)
  static constexpr int64_t kKC = 128;       // k per packed slice
};

/// Everything the kernels need, as plain pointers and element strides.
template <class TX, class TW>
struct LinearArgs {
  const TX* x;
  int64_t ldx;
  const TW* w;
  int64_t ldw;
  const typename LinearWeight<TW>::bias_type* bias;  // null: no bias
  TX* y;
  int64_t ldy;
  int64_t tokens, in, out;
};

inline constexpr int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

/// Floats of GEMM scratch one thread needs for these shapes (each region 64-byte aligned).
template <class TX>
int64_t gemm_thread_floats(int64_t tokens, int64_t in, int64_t out) {
  using B = LinearBlocking;
  const int64_t mc = std::min(B::kMC, round_up(tokens, B::kMR));
  const int64_t nc = std::min(B::kNC, round_up(out, B::kNRMax));
  const int64_t kc = std::min(B::kKC, in);
  int64_t n = round_up(kc * nc, 16) + nc + B::kNRMax * kc;  // packed W slice + fp32 bias row + row slices
  if (!std::is_same_v<TX, float>) n += round_up(mc * kc, 16) + mc * nc;  // fp32 x block + y block
  return round_up(n, 16);
}

// ---------------------------------------------------------------------------------------------
// Q8_0 helpers: widen int8 lanes to fp32; broadcast a block's fp16 scale (F16C where there is one).
inline void load_i8(simd::F32x1& v, const int8_t* p) { v.v = float(*p); }
inline void broadcast_half(simd::F32x1& v, half h) { v.v = float(h); }
#if RF_HAVE_X86_SIMD
RF_SIMD_AVX2 void load_i8(simd::F32x8& v, const int8_t* p) {
  v.v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
RF_SIMD_AVX2 void broadcast_half(simd::F32x8& v, half h) {
  v.v = _mm256_cvtph_ps(_mm_set1_epi16(short(h.bits)));
}
RF_SIMD_AVX512 void load_i8(simd::F32x16& v, const int8_t* p) {
  v.v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
RF_SIMD_AVX512 void broadcast_half(simd::F32x16& v, half h) {
  v.v = _mm512_cvtph_ps(_mm256_set1_epi16(short(h.bits)));
}
#endif

// Q4_0 / Q4_1 helpers: the codes of weights i .. i + W - 1 (lo: the low nibbles of qs[i ..]) and
// of weights 16 + i .. 16 + i + W - 1 (hi: their high nibbles), for i + W <= 16: one widening load
// serves both halves of the block.
inline void load_u4_pair(simd::F32x1& lo, simd::F32x1& hi, const uint8_t* qs, int i) {
  lo.v = float(qs[i] & 0x0F);
  hi.v = float(qs[i] >> 4);
}
#if RF_HAVE_X86_SIMD
RF_SIMD_AVX2 void load_u4_pair(simd::F32x8& lo, simd::F32x8& hi, const uint8_t* qs, int i) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + i)));
  lo.v = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x0F)));
  hi.v = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
RF_SIMD_AVX512 void load_u4_pair(simd::F32x16& lo, simd::F32x16& hi, const uint8_t* qs, int i) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + i)));
  lo.v = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
  hi.v = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#endif

/// Block types whose GEMV unpacks codes in registers (the rest dequantise per block).
template <class TW>
constexpr bool kNibbleBlock = std::is_same_v<TW, BlockQ4_0> || std::is_same_v<TW, BlockQ4_1>;

// dst[k] = row[k0 + k] as fp32 for k < n (one weight row's slice, for a packed panel): dense rows a
// vector at a time (16-bit weights through the ISA's conversion), block rows a block at a time.
template <class V, class TW, std::enable_if_t<!is_quant_block_v<TW>, int> = 0>
void unpack_row(const TW* row, int64_t k0, int64_t n, float* dst) {
  constexpr int W = V::width;
  int64_t k = 0;
  for (; k + W <= n; k += W) V::load(row + k0 + k).store(dst + k);
  if (k < n) V::load_partial(row + k0 + k, int(n - k)).store_partial(dst + k, int(n - k));
}
template <class V, class TW, std::enable_if_t<is_quant_block_v<TW>, int> = 0>
void unpack_row(const TW* row, int64_t k0, int64_t n, float* dst) {
  constexpr int64_t QB = TW::size;
  alignas(64) float buf[QB];
  for (int64_t k = 0; k < n;) {
    const int64_t i0 = (k0 + k) % QB;
    if (i0 == 0 && k + QB <= n) {  // a whole block: decode in place
      row[(k0 + k) / QB].dequantize(dst + k);
      k += QB;
      continue;
    }
    row[(k0 + k) / QB].dequantize(buf);
    for (int64_t i = i0; i < QB && k < n; ++i, ++k) dst[k] = buf[i];
  }
}

// ---------------------------------------------------------------------------------------------
// A block GEMV tile of R > 1 rows (several tokens) walks R short rows side by side, then jumps to
// the next R: the hardware prefetchers barely train on streams that short, so each such tile asks
// for the same spot of the next tile's rows, R rows further on (with 4 rows for one token, on AMD
// Zen 4: 1.4-1.6x over a SmolLM2 decode step's block GEMVs, benchmarks.md). One row (R = 1) is a
// sequential stream the hardware follows, so it does not ask. Dense rows: no gain measured.
// -DRF_GEMV_PREFETCH_TILES=0 prefetches nothing new (the baseline of those figures).
#ifndef RF_GEMV_PREFETCH_TILES
#define RF_GEMV_PREFETCH_TILES 1
#endif
template <int R, class TW>
inline void gemv_prefetch_next_tile(const TW* p, int64_t ldw) {
  if constexpr (R > 1) {
    const uintptr_t ahead = uintptr_t(RF_GEMV_PREFETCH_TILES * R * ldw * int64_t(sizeof(TW)));
    __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + ahead));  // never faults
  }
}

// The GEMV tiles' accumulators, zeroed.
template <class V, int NT, int R>
void gemv_zero(V (&acc)[NT][R]) {
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = V::zero();
}

// y[t, o + r] = the row sums of acc plus the bias (fp32 for block weights).
template <int NT, int R, class V, class TX, class TW>
void gemv_store(const LinearArgs<TX, TW>& a, V (&acc)[NT][R], TX* y, int64_t o) {
  for (int r = 0; r < R; ++r) {
    const float bias = a.bias ? to_float(a.bias[o + r]) : 0.f;
    for (int t = 0; t < NT; ++t) y[t * a.ldy + o + r] = from_float<TX>(acc[t][r].reduce_add() + bias);
  }
}

// GEMV: y[t, o] for NT tokens and o in [o0, o1).
template <class V, int NT, int R, class TX, class TW, std::enable_if_t<!is_quant_block_v<TW>, int> = 0>
void gemv_tile(const LinearArgs<TX, TW>& a, const TX* x, TX* y, int64_t o) {
  constexpr int W = V::width;
  const int64_t k = a.in;
  const TW* w = a.w + o * a.ldw;
  V acc[NT][R];
  gemv_zero(acc);
  int64_t i = 0;
  for (; i + W <= k; i += W) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = V::load(w + r * a.ldw + i);
    for (int t = 0; t < NT; ++t) {
      const V xv = V::load(x + t * a.ldx + i);
      for (int r = 0; r < R; ++r) acc[t][r] = fma(xv, wv[r], acc[t][r]);
    }
  }
  if (i < k) {
    const int n = int(k - i);
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = V::load_partial(w + r * a.ldw + i, n);
    for (int t = 0; t < NT; ++t) {
      const V xv = V::load_partial(x + t * a.ldx + i, n);
      for (int r = 0; r < R; ++r) acc[t][r] = fma(xv, wv[r], acc[t][r]);
    }
  }
  gemv_store<NT, R>(a, acc, y, o);
}

// Q8_0 rows: per block, sum x * q over its 32 weights, then scale once.
template <class V, int NT, int R, class TX, class TW, std::enable_if_t<std::is_same_v<TW, BlockQ8_0>, int> = 0>
void gemv_tile(const LinearArgs<TX, TW>& a, const TX* x, TX* y, int64_t o) {
  constexpr int W = V::width, J = int(BlockQ8_0::size) / W;
  const BlockQ8_0* w = a.w + o * a.ldw;
  V acc[NT][R];
  gemv_zero(acc);
  const int64_t blocks = a.in / BlockQ8_0::size;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * BlockQ8_0::size;
    for (int r = 0; r < R; ++r) {
      const BlockQ8_0& b = w[r * a.ldw + blk];
      gemv_prefetch_next_tile<R>(&b, a.ldw);
      V part[NT];
      for (int j = 0; j < J; ++j) {
        V q;
        load_i8(q, b.qs + j * W);
        for (int t = 0; t < NT; ++t) {
          const V xv = V::load(x + t * a.ldx + i0 + j * W);
          part[t] = j == 0 ? xv * q : fma(xv, q, part[t]);
        }
      }
      V d;
      broadcast_half(d, b.d);
      for (int t = 0; t < NT; ++t) acc[t][r] = fma(part[t], d, acc[t][r]);
    }
  }
  gemv_store<NT, R>(a, acc, y, o);
}

// Q4_0 / Q4_1 rows: w = d q + c per block, so y += d * sum(x q) + c * sum(x); sum(x) is summed
// once per block for all R rows (lane-wise: the lanes are reduced at the end anyway).
template <class V, int NT, int R, class TX, class TW, std::enable_if_t<kNibbleBlock<TW>, int> = 0>
void gemv_tile(const LinearArgs<TX, TW>& a, const TX* x, TX* y, int64_t o) {
  constexpr int W = V::width, J = 16 / W;  // J steps of W low-nibble and W high-nibble weights
  const TW* w = a.w + o * a.ldw;
  V acc[NT][R];
  gemv_zero(acc);
  const int64_t blocks = a.in / TW::size;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * TW::size;
    V xlo[NT][J], xhi[NT][J], sx[NT];
    for (int t = 0; t < NT; ++t) {
      for (int j = 0; j < J; ++j) {
        xlo[t][j] = V::load(x + t * a.ldx + i0 + j * W);
        xhi[t][j] = V::load(x + t * a.ldx + i0 + 16 + j * W);
        sx[t] = j == 0 ? xlo[t][j] + xhi[t][j] : sx[t] + xlo[t][j] + xhi[t][j];
      }
    }
    for (int r = 0; r < R; ++r) {
      const TW& b = w[r * a.ldw + blk];
      gemv_prefetch_next_tile<R>(&b, a.ldw);
      V part[NT];
      for (int j = 0; j < J; ++j) {
        V lo, hi;
        load_u4_pair(lo, hi, b.qs, j * W);
        for (int t = 0; t < NT; ++t)
          part[t] = fma(xhi[t][j], hi, j == 0 ? xlo[t][j] * lo : fma(xlo[t][j], lo, part[t]));
      }
      V d, c;
      broadcast_half(d, b.d);
      if constexpr (std::is_same_v<TW, BlockQ4_1>)
        broadcast_half(c, b.m);
      else
        c = d * V::broadcast(-8.f);
      for (int t = 0; t < NT; ++t) acc[t][r] = fma(sx[t], c, fma(part[t], d, acc[t][r]));
    }
  }
  gemv_store<NT, R>(a, acc, y, o);
}

// Any other block type: decode each row's block on the stack, then a dense dot with x.
template <class V, int NT, int R, class TX, class TW,
          std::enable_if_t<is_quant_block_v<TW> && !kNibbleBlock<TW> && !std::is_same_v<TW, BlockQ8_0>, int> = 0>
void gemv_tile(const LinearArgs<TX, TW>& a, const TX* x, TX* y, int64_t o) {
  constexpr int W = V::width;
  constexpr int64_t QB = TW::size;
  const TW* w = a.w + o * a.ldw;
  V acc[NT][R];
  gemv_zero(acc);
  alignas(64) float wbuf[QB];
  const int64_t blocks = a.in / QB;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * QB;
    for (int r = 0; r < R; ++r) {
      gemv_prefetch_next_tile<R>(&w[r * a.ldw + blk], a.ldw);
      w[r * a.ldw + blk].dequantize(wbuf);
      for (int64_t j = 0; j < QB; j += W) {
        const V wv = V::load(wbuf + j);
        for (int t = 0; t < NT; ++t) acc[t][r] = fma(V::load(x + t * a.ldx + i0 + j), wv, acc[t][r]);
      }
    }
  }
  gemv_store<NT, R>(a, acc, y, o);
}

template <class V, int NT, class TX, class TW>
void gemv_rows(const LinearArgs<TX, TW>& a, int64_t t0, int64_t o0, int64_t o1) {
  constexpr int R = LinearBlocking::gemv_rows_for(NT);
  const TX* x = a.x + t0 * a.ldx;
  TX* y = a.y + t0 * a.ldy;
  int64_t o = o0;
  for (; o + R <= o1; o += R) gemv_tile<V, NT, R>(a, x, y, o);
  for (; o < o1; ++o) gemv_tile<V, NT, 1>(a, x, y, o);
}

// ---------------------------------------------------------------------------------------------
// GEMM micro-kernel: c[i, j] (+)= sum_k a[i, k] * bp[k, j] for i < rows, j < cols, MR x NR tile.
// a: MR rows of fp32 x with row stride lda (rows past `rows` re-read row 0 and are not stored),
// or with kPackedA a packed panel [kc][MR] (lda unused; the backward's dy^T);
// bp: packed [kc][NR]; init: fp32 row of NR initial values (bias) for the first k slice, else null
// to continue from c.
template <class V, int MR, int NV, bool kPackedA = false>
void gemm_micro(int64_t kc, const float* a, int64_t lda, int rows, const float* bp,
                const float* init, float* c, int64_t ldc, int cols) {
  constexpr int W = V::width, NR = NV * W;
  const float* ar[MR] = {};
  if constexpr (!kPackedA)
    for (int i = 0; i < MR; ++i) ar[i] = a + (i < rows ? i : 0) * lda;
  V acc[MR][NV];
  if (init) {
    for (int j = 0; j < NV; ++j) {
      const V b = V::load(init + j * W);
      for (int i = 0; i < MR; ++i) acc[i][j] = b;
    }
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j)
        acc[i][j] = i < rows ? V::load_partial(c + i * ldc + j * W, cols - j * W) : V::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    V b[NV];
    for (int j = 0; j < NV; ++j) b[j] = V::load(bp + k * NR + j * W);
    for (int i = 0; i < MR; ++i) {
      const V av = V::broadcast(kPackedA ? a[k * MR + i] : ar[i][k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = fma(av, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR && i < rows; ++i)
    for (int j = 0; j < NV; ++j) {
      if (cols >= (j + 1) * W)
        acc[i][j].store(c + i * ldc + j * W);
      else if (cols > j * W)
        acc[i][j].store_partial(c + i * ldc + j * W, cols - j * W);
    }
}

// bp[p][k][j] = w[p * NR + j, k0 + k] as fp32 for k < kc, zero for output rows past nc. Each panel's
// NR row slices are converted whole into `rows` [NR][kc], then transposed: converting a 16-bit weight
// one scalar at a time, on its way into the panel, took a third of an F16 prefill (Zen 4).
template <class V, int NR, class TW>
void gemm_pack_w(const TW* w, int64_t ldw, int64_t nc, int64_t k0, int64_t kc, float* rows, float* bp) {
  for (int64_t p = 0; p * NR < nc; ++p) {
    float* panel = bp + p * kc * NR;
    const int live = int(std::min<int64_t>(NR, nc - p * NR));
    for (int j = 0; j < live; ++j) unpack_row<V>(w + (p * NR + j) * ldw, k0, kc, rows + j * kc);
    for (int64_t k = 0; k < kc; ++k) {
      for (int j = 0; j < live; ++j) panel[k * NR + j] = rows[j * kc + k];
      for (int j = live; j < NR; ++j) panel[k * NR + j] = 0.f;
    }
  }
}

// dst[r, :n] = src[r, :n] converted, for r < rows.
template <class V, class S, class D>
void convert_block(int64_t rows, int64_t n, const S* src, int64_t lds, D* dst, int64_t ldd) {
  constexpr int W = V::width;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t i = 0;
    for (; i + W <= n; i += W) V::load(src + r * lds + i).store(dst + r * ldd + i);
    if (i < n) V::load_partial(src + r * lds + i, int(n - i)).store_partial(dst + r * ldd + i, int(n - i));
  }
}

// One GEMM task: y[t0:t1, o0:o1] with `ws` = gemm_thread_floats<TX>() floats of scratch.
template <class V, class TX, class TW>
void gemm_block(const LinearArgs<TX, TW>& a, int64_t t0, int64_t t1, int64_t o0, int64_t o1,
                float* ws) {
  using B = LinearBlocking;
  constexpr int MR = B::kMR, NV = B::kNRVectors, NR = NV * V::width;
  constexpr bool kFloatX = std::is_same_v<TX, float>;
  const int64_t mc = t1 - t0, nc = o1 - o0;
  const int64_t kc_max = std::min(B::kKC, a.in);
  float* bp = ws;
  float* bias = bp + round_up(kc_max * std::min(B::kNC, round_up(a.out, B::kNRMax)), 16);
  float* rows = bias + std::min(B::kNC, round_up(a.out, B::kNRMax));  // NR row slices being packed
  const int64_t nc_pad = round_up(nc, NR);
  for (int64_t j = 0; j < nc_pad; ++j) bias[j] = a.bias && j < nc ? to_float(a.bias[o0 + j]) : 0.f;
  // fp32 accumulator: y itself, or a block converted at the end
  float* c;
  int64_t ldc;
  float* xbuf = nullptr;
  if constexpr (kFloatX) {
    c = a.y + t0 * a.ldy + o0;
    ldc = a.ldy;
  } else {
    xbuf = rows + B::kNRMax * kc_max;
    c = xbuf + round_up(std::min(B::kMC, round_up(a.tokens, B::kMR)) * kc_max, 16);
    ldc = nc_pad;
  }
  for (int64_t k0 = 0; k0 < a.in; k0 += B::kKC) {
    const int64_t kc = std::min(B::kKC, a.in - k0);
    gemm_pack_w<V, NR>(a.w + o0 * a.ldw, a.ldw, nc, k0, kc, rows, bp);
    const float* xa;
    int64_t lda;
    if constexpr (kFloatX) {
      xa = a.x + t0 * a.ldx + k0;
      lda = a.ldx;
    } else {
      convert_block<V>(mc, kc, a.x + t0 * a.ldx + k0, a.ldx, xbuf, kc);
      xa = xbuf;
      lda = kc;
    }
    for (int64_t p = 0; p < nc_pad / NR; ++p) {
      const int cols = int(std::min<int64_t>(NR, nc - p * NR));
      for (int64_t i0 = 0; i0 < mc; i0 += MR) {
        const int rows = int(std::min<int64_t>(MR, mc - i0));
        gemm_micro<V, MR, NV>(kc, xa + i0 * lda, lda, rows, bp + p * kc * NR,
                              k0 == 0 ? bias + p * NR : nullptr, c + i0 * ldc + p * NR, ldc, cols);
      }
    }
  }
  if constexpr (!kFloatX) convert_block<V>(mc, nc, c, ldc, a.y + t0 * a.ldy + o0, a.ldy);
}

// ---------------------------------------------------------------------------------------------
// Backward GEMM: C[m, n] (+)= sum_k A[m, k] B[k, n].
template <class TB>
struct GemmNNArgs {
  const float* a;    // A[m, k] at a[m * lda + k] (dy, read in place) or, when a_transposed, at
  int64_t lda;       // a[k * lda + m] (dy^T: packed into [KC][MR] panels from MR-float runs of dy rows)
  bool a_transposed;
  const TB* b;       // B[k, n] at b[k * ldb + n]: W or x
  int64_t ldb;
  float* c;        // C[m, n] at c[m * ldc + n]
  int64_t ldc;
  int64_t m, n, k;
  bool accumulate;  // add to C, else overwrite it
};

/// Floats of scratch one thread needs for a GemmNNArgs problem of these sizes (64-byte regions).
inline int64_t gemm_nn_thread_floats(int64_t m, int64_t n, int64_t k, bool pack_a) {
  using B = LinearBlocking;
  const int64_t kc = std::min(B::kKC, k), nc = std::min(B::kNC, round_up(n, B::kNRMax));
  int64_t floats = round_up(kc * nc, 16);  // packed B slice
  if (pack_a) floats += round_up(std::min(B::kMC, round_up(m, B::kMR)) * kc, 16);  // A panels
  return floats;
}

// bp[p][k][j] = b[k, p * NR + j] as fp32 for k < kc, zero for columns past nc.
template <class V, int NR, class TB>
void gemm_pack_b_rows(const TB* b, int64_t ldb, int64_t kc, int64_t nc, float* bp) {
  constexpr int W = V::width, NV = NR / W;
  for (int64_t p = 0; p * NR < nc; ++p) {
    float* panel = bp + p * kc * NR;
    const int64_t cols = std::min<int64_t>(NR, nc - p * NR);
    const TB* src = b + p * NR;
    if (cols == NR) {
      for (int64_t k = 0; k < kc; ++k)
        for (int j = 0; j < NV; ++j) V::load(src + k * ldb + j * W).store(panel + k * NR + j * W);
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int j = 0; j < NV; ++j)
          V::load_partial(src + k * ldb + j * W, int(cols - j * W)).store(panel + k * NR + j * W);
    }
  }
}

// One task: C[m0:m1, n0:n1] over the whole k range, with `ws` = gemm_nn_thread_floats() floats.
template <class V, class TB>
void gemm_nn_block(const GemmNNArgs<TB>& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                   float* ws) {
  using B = LinearBlocking;
  constexpr int MR = B::kMR, NV = B::kNRVectors, NR = NV * V::width;
  const int64_t mc = m1 - m0, nc = n1 - n0, nc_pad = round_up(nc, NR);
  const int64_t kc_max = std::min(B::kKC, g.k);
  float* bp = ws;
  float* ap = bp + round_up(kc_max * std::min(B::kNC, round_up(g.n, B::kNRMax)), 16);
  alignas(64) float zero[B::kNRMax] = {};  // the initial C row when overwriting
  for (int64_t k0 = 0; k0 < g.k; k0 += B::kKC) {
    const int64_t kc = std::min(B::kKC, g.k - k0);
    gemm_pack_b_rows<V, NR>(g.b + k0 * g.ldb + n0, g.ldb, kc, nc, bp);
    if (g.a_transposed) {  // ap[i0 / MR][k][i] = A[m0 + i0 + i, k0 + k]: runs of MR floats of a dy row
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = g.a + (k0 + k) * g.lda + m0;
        int64_t i0 = 0;
        for (; i0 + MR <= mc; i0 += MR) std::memcpy(ap + i0 * kc + k * MR, src + i0, MR * sizeof(float));
        if (i0 < mc)
          for (int i = 0; i < MR; ++i) ap[i0 * kc + k * MR + i] = i0 + i < mc ? src[i0 + i] : 0.f;
      }
    }
    const float* init = k0 == 0 && !g.accumulate ? zero : nullptr;
    for (int64_t p = 0; p < nc_pad / NR; ++p) {
      const int cols = int(std::min<int64_t>(NR, nc - p * NR));
      for (int64_t i0 = 0; i0 < mc; i0 += MR) {
        const int rows = int(std::min<int64_t>(MR, mc - i0));
        float* c = g.c + (m0 + i0) * g.ldc + n0 + p * NR;
        if (g.a_transposed)
          gemm_micro<V, MR, NV, true>(kc, ap + i0 * kc, 0, rows, bp + p * kc * NR, init, c, g.ldc, cols);
        else
          gemm_micro<V, MR, NV>(kc, g.a + (m0 + i0) * g.lda + k0, g.lda, rows, bp + p * kc * NR, init, c,
                                g.ldc, cols);
      }
    }
  }
}

// db[o] (+)= sum_t dy[t, o] for o in [o0, o1), summed in token order.
template <class V>
void column_sums(const float* dy, int64_t ldy, int64_t tokens, int64_t o0, int64_t o1, float* db,
                 bool accumulate) {
  constexpr int W = V::width;
  constexpr int64_t kChunk = 512;  // columns per pass over the rows (2 KB of sums in L1)
  alignas(64) float acc[kChunk];
  for (int64_t c0 = o0; c0 < o1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, o1 - c0);
    for (int64_t j = 0; j < n; ++j) acc[j] = accumulate ? db[c0 + j] : 0.f;
    for (int64_t t = 0; t < tokens; ++t) {
      const float* row = dy + t * ldy + c0;
      int64_t j = 0;
      for (; j + W <= n; j += W) (V::load(acc + j) + V::load(row + j)).store(acc + j);
      for (; j < n; ++j) acc[j] += row[j];
    }
    for (int64_t j = 0; j < n; ++j) db[c0 + j] = acc[j];
  }
}

// ---------------------------------------------------------------------------------------------
// ISA entry points (vector values never cross them).
template <int NT, class TX, class TW>
void gemv_scalar(const LinearArgs<TX, TW>* a, int64_t t0, int64_t o0, int64_t o1) {
  gemv_rows<simd::F32x1, NT>(*a, t0, o0, o1);
}
template <class TX, class TW>
void gemm_scalar(const LinearArgs<TX, TW>* a, int64_t t0, int64_t t1, int64_t o0, int64_t o1, float* ws) {
  gemm_block<simd::F32x1>(*a, t0, t1, o0, o1, ws);
}
template <class TB>
void gemm_nn_scalar(const GemmNNArgs<TB>* g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* ws) {
  gemm_nn_block<simd::F32x1>(*g, m0, m1, n0, n1, ws);
}
inline void column_sums_scalar(const float* dy, int64_t ldy, int64_t tokens, int64_t o0, int64_t o1,
                               float* db, bool accumulate) {
  column_sums<simd::F32x1>(dy, ldy, tokens, o0, o1, db, accumulate);
}
#if RF_HAVE_X86_SIMD
template <int NT, class TX, class TW>
RF_KERNEL_AVX2 void gemv_avx2(const LinearArgs<TX, TW>* a, int64_t t0, int64_t o0, int64_t o1) {
  gemv_rows<simd::F32x8, NT>(*a, t0, o0, o1);
}
template <class TX, class TW>
RF_KERNEL_AVX2 void gemm_avx2(const LinearArgs<TX, TW>* a, int64_t t0, int64_t t1, int64_t o0, int64_t o1, float* ws) {
  gemm_block<simd::F32x8>(*a, t0, t1, o0, o1, ws);
}
template <class TB>
RF_KERNEL_AVX2 void gemm_nn_avx2(const GemmNNArgs<TB>* g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* ws) {
  gemm_nn_block<simd::F32x8>(*g, m0, m1, n0, n1, ws);
}
RF_KERNEL_AVX2 inline void column_sums_avx2(const float* dy, int64_t ldy, int64_t tokens, int64_t o0,
                                            int64_t o1, float* db, bool accumulate) {
  column_sums<simd::F32x8>(dy, ldy, tokens, o0, o1, db, accumulate);
}
template <int NT, class TX, class TW>
RF_KERNEL_AVX512 void gemv_avx512(const LinearArgs<TX, TW>* a, int64_t t0, int64_t o0, int64_t o1) {
  gemv_rows<simd::F32x16, NT>(*a, t0, o0, o1);
}
template <class TX, class TW>
RF_KERNEL_AVX512 void gemm_avx512(const LinearArgs<TX, TW>* a, int64_t t0, int64_t t1, int64_t o0, int64_t o1, float* ws) {
  gemm_block<simd::F32x16>(*a, t0, t1, o0, o1, ws);
}
template <class TB>
RF_KERNEL_AVX512 void gemm_nn_avx512(const GemmNNArgs<TB>* g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* ws) {
  gemm_nn_block<simd::F32x16>(*g, m0, m1, n0, n1, ws);
}
RF_KERNEL_AVX512 inline void column_sums_avx512(const float* dy, int64_t ldy, int64_t tokens, int64_t o0,
                                                int64_t o1, float* db, bool accumulate) {
  column_sums<simd::F32x16>(dy, ldy, tokens, o0, o1, db, accumulate);
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
