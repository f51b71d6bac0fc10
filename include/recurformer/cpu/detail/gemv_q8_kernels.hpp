// recurformer/cpu/detail/gemv_q8_kernels.hpp: GEMV on Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q6_K weights
// with x quantised to 8 bits (ActivationMath::int8), the integer path llama.cpp takes for these types.
//
// x is quantised per token and per 32 values (quantize_x_q8): d = max|x| / 127,
// q = round-half-even(x * (1 / d)), and s = d * sum(q) is kept beside d (llama.cpp's q8_1). A weight
// block is w = dw * u + c with u its codes (Q4_0: nibbles, c = -8 dw; Q4_1: nibbles, c = m; Q5_0 /
// Q5_1: nibbles plus a fifth bit from qh, c = -16 dw / m; Q8_0: signed bytes, c = 0; Q4_K: eight
// such sub-blocks of 32 nibbles per block, dw = d sc_j, c = -dmin m_j; Q6_K: 6-bit codes less 32,
// signed, with a scale per 16 weights, so a sub-block's integer sum is taken per half), so
//   sum_i w_i (d q_i) = dw d sum_i u_i q_i + c s,
// where the integer sum is exact: AVX-512 VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd (nibbles
// 5- or 6-bit codes times |q| <= 127 cannot saturate a 16-bit pair: 2 * 63 * 127 < 2^15). Q8_0's signed codes enter as |w| and sign(q, w),
// so the unsigned operand stays non-negative (|w| <= 128: a pair is at most 2 * 128 * 127).
// One block is one 256-bit vector on both ISAs: the unpacked block is exactly 32 bytes, and
// 256-bit integer ops issue on three ports where 512-bit ones issue on two.
//
// A block of x holding a NaN or an infinity quantises to d = NaN, so the y it meets is NaN, as with
// fp32 x. Each thread quantises the x it reads itself, kQ8Chunk values at a time into a stack buffer (no
// workspace, nothing shared: the repeated work is threads / out of the whole), and walks its rows
// once per chunk, adding into y after the first. The scalar body is the portable fallback and the
// tests' reference for the SIMD ones (same quantisation, bit for bit; same integer sums).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "recurformer/core/config.hpp"
#include "recurformer/core/quant.hpp"
#include "recurformer/cpu/detail/gemm_kernels.hpp"

#if RF_HAVE_X86_SIMD
#include <immintrin.h>
#endif

namespace recurformer {
namespace cpu {
namespace detail {

/// Block types with an integer GEMV against 8-bit x.
template <class TW>
constexpr bool kQ8DotBlock = std::is_same_v<TW, BlockQ4_0> || std::is_same_v<TW, BlockQ4_1> ||
                             std::is_same_v<TW, BlockQ5_0> || std::is_same_v<TW, BlockQ5_1> ||
                             std::is_same_v<TW, BlockQ8_0> || std::is_same_v<TW, BlockQ4_K> ||
                             std::is_same_v<TW, BlockQ6_K>;
template <class TW>
constexpr bool kQ5Block = std::is_same_v<TW, BlockQ5_0> || std::is_same_v<TW, BlockQ5_1>;

constexpr int kQ8Block = 32;         // x values per scale (the weight (sub-)block size of every kQ8DotBlock)
/// 32-weight sub-blocks per block (8 for Q4_K's 256).
template <class TW>
constexpr int64_t kQ8SubBlocks = TW::size / kQ8Block;
constexpr int64_t kQ8Chunk = 4096;   // x values quantised at a time per token (16 KB of codes for 4 tokens)

// A block holding a NaN or an infinity gets codes 0 and d = s = NaN, so every y it meets is NaN
// as with fp32 x (a silent finite result would hide a broken activation).
inline void q8_block_not_finite(int8_t* q, float* d, float* s) {
  std::fill_n(q, kQ8Block, int8_t(0));
  *d = *s = std::numeric_limits<float>::quiet_NaN();
}

/// x[0, n) quantised: codes q, per-32 scales d and d * sum(q) in s (n a multiple of 32).
inline void quantize_x_q8(const float* x, int64_t n, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    float amax = 0.f;
    bool finite = true;
    for (int i = 0; i < kQ8Block; ++i) {
      finite &= std::fabs(xb[i]) <= std::numeric_limits<float>::max();
      amax = std::max(amax, std::fabs(xb[i]));
    }
    if (!finite) {
      q8_block_not_finite(q + b * kQ8Block, d + b, s + b);
      continue;
    }
    const float db = amax / 127.f, id = db != 0.f ? 1.f / db : 0.f;
    int sum = 0;
    for (int i = 0; i < kQ8Block; ++i) {
      const int v = int(std::nearbyint(xb[i] * id));  // round half to even, as vcvtps2dq
      q[b * kQ8Block + i] = int8_t(v);
      sum += v;
    }
    d[b] = db;
    s[b] = db * float(sum);
  }
}

/// The quantised x of up to kGemvTokens tokens over one chunk of k.
struct XQ8Chunk {
  alignas(32) int8_t q[LinearBlocking::kGemvTokens][kQ8Chunk];
  float d[LinearBlocking::kGemvTokens][kQ8Chunk / kQ8Block];
  float s[LinearBlocking::kGemvTokens][kQ8Chunk / kQ8Block];
};

// y[t, o] = v (+ bias) on the first chunk, y[t, o] += v after it.
template <class TW>
void q8_store(const LinearArgs<float, TW>& a, float* y, int t, int64_t o, float v, bool first) {
  float& out = y[t * a.ldy + o];
  out = first ? v + (a.bias ? a.bias[o] : 0.f) : out + v;
}

// Sub-block j's scales dw for its first and its second 16 weights (the same but for Q6_K) and
// offset c (w = dw u + c), its fp16 fields read with to_f32.
template <class TW, class ToF32>
void q8_scales(const TW& b, int j, ToF32 to_f32, float (&dw)[2], float& c) {
  c = 0.f;
  if constexpr (std::is_same_v<TW, BlockQ6_K>) {
    const float d = to_f32(b.d);
    dw[0] = d * float(b.scales[2 * j]);
    dw[1] = d * float(b.scales[2 * j + 1]);
    return;
  } else if constexpr (std::is_same_v<TW, BlockQ4_K>) {
    uint8_t sc, mn;
    recurformer::detail::k4_scale_min(b.scales, j, sc, mn);
    dw[0] = to_f32(b.d) * float(sc);
    c = -(to_f32(b.dmin) * float(mn));
  } else {
    dw[0] = to_f32(b.d);
    if constexpr (std::is_same_v<TW, BlockQ4_1> || std::is_same_v<TW, BlockQ5_1>) c = to_f32(b.m);
    else if constexpr (std::is_same_v<TW, BlockQ4_0>) c = -8.f * dw[0];
    else if constexpr (std::is_same_v<TW, BlockQ5_0>) c = -16.f * dw[0];
  }
  dw[1] = dw[0];
}

// Sub-block j's 32 codes in weight order, as ints: u of w = dw u + c (Q6_K: the code less 32).
template <class TW>
void q8_codes(const TW& b, int j, int (&u)[kQ8Block]) {
  if constexpr (std::is_same_v<TW, BlockQ8_0>) {
    for (int i = 0; i < kQ8Block; ++i) u[i] = b.qs[i];
  } else if constexpr (std::is_same_v<TW, BlockQ4_K>) {
    for (int i = 0; i < kQ8Block; ++i) u[i] = (b.qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0x0F;
  } else if constexpr (std::is_same_v<TW, BlockQ6_K>) {  // weight 32 j + i: see BlockQ6_K
    const int g = j / 4, m = j % 4;
    for (int i = 0; i < kQ8Block; ++i)
      u[i] = (((b.ql[64 * g + 32 * (m % 2) + i] >> (4 * (m / 2))) & 0x0F) | (((b.qh[32 * g + i] >> (2 * m)) & 3) << 4)) -
             32;
  } else {
    for (int i = 0; i < 16; ++i) {
      u[i] = b.qs[i] & 0x0F;
      u[i + 16] = b.qs[i] >> 4;
    }
    if constexpr (kQ5Block<TW>) {
      const uint32_t h = recurformer::detail::load_u32_le(b.qh);
      for (int i = 0; i < kQ8Block; ++i) u[i] |= int((h >> i) & 1) << 4;
    }
  }
}

/// The portable body: integer sums in int, the rest as the SIMD bodies do it.
struct Q8DotScalar {
  static constexpr bool kSimd = false;
  static void quantize(const float* x, int64_t n, int8_t* q, float* d, float* s) { quantize_x_q8(x, n, q, d, s); }
};

template <class Dot, int NT, int R, class TW, std::enable_if_t<!Dot::kSimd, int> = 0>
void gemv_q8_tile(const LinearArgs<float, TW>& a, const XQ8Chunk& xc, int64_t k0, int64_t kc, float* y,
                  int64_t o) {
  constexpr int64_t kSub = kQ8SubBlocks<TW>;
  const TW* w = a.w + o * a.ldw + k0 / TW::size;
  float acc[NT][R] = {}, corr[NT][R] = {};
  for (int64_t blk = 0; blk < kc / kQ8Block; ++blk) {
    for (int r = 0; r < R; ++r) {
      const TW& b = w[r * a.ldw + blk / kSub];
      const int j = int(blk % kSub);
      gemv_prefetch_next_tile<R>(&b, a.ldw);
      int u[kQ8Block];
      q8_codes(b, j, u);
      float dw[2], c;
      q8_scales(b, j, [](half h) { return float(h); }, dw, c);
      for (int t = 0; t < NT; ++t) {
        const int8_t* xq = xc.q[t] + blk * kQ8Block;
        int sum[2] = {0, 0};
        for (int i = 0; i < kQ8Block; ++i) sum[i / 16] += u[i] * xq[i];
        acc[t][r] += float(sum[0]) * (dw[0] * xc.d[t][blk]) + float(sum[1]) * (dw[1] * xc.d[t][blk]);
        corr[t][r] += c * xc.s[t][blk];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) q8_store(a, y, t, o + r, acc[t][r] + corr[t][r], k0 == 0);
}

#if RF_HAVE_X86_SIMD
RF_SIMD_AVX2 float f16_to_f32(half h) { return _cvtsh_ss(h.bits); }

// quantize_x_q8 with 256-bit vectors; the same products and rounding, so the same codes and scales.
RF_SIMD_AVX2 void quantize_x_q8_avx2(const float* x, int64_t n, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(std::numeric_limits<float>::max());
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xb + 8 * j);
    __m256 a[4], bad = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_andnot_ps(sign, v[j]);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a[j], big, _CMP_NLE_UQ));  // NaN or inf
    }
    if (_mm256_movemask_ps(bad)) {
      q8_block_not_finite(q + b * kQ8Block, d + b, s + b);
      continue;
    }
    const __m256 m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float db = amax / 127.f, id = db != 0.f ? 1.f / db : 0.f;
    const __m256 mul = _mm256_set1_ps(id);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], mul));
    // the sum of the codes
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(s8, 1), _mm256_castsi256_si128(s8));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    // packs work per 128-bit lane: dwords come out as i0[0:4] i1[0:4] i2[0:4] i3[0:4] i0[4:8] ...
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQ8Block), ordered);
    d[b] = db;
    s[b] = db * float(_mm_cvtsi128_si32(s4));
  }
}

// A Q4 block's 32 codes in weight order: low nibbles (weights 0-15), then high nibbles (16-31).
RF_SIMD_AVX2 __m256i unpack_u4_block(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

// A Q5 block's fifth bits as 0x10 in byte i where bit i of qh is set (weight order, as the nibbles).
RF_SIMD_AVX2 __m256i unpack_q5_high_bits(const uint8_t* qh) {
  // byte i of the vector takes byte i / 8 of qh (each 128-bit lane holds all four), then its own bit
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(int(recurformer::detail::load_u32_le(qh))),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// Sub-block j's 32 unsigned codes in weight order, one byte each (Q6_K: 0..63, before the less 32),
// for every kQ8DotBlock type but Q8_0 (whose signed codes the tile takes as |w| and sign(q, w)).
template <class TW>
RF_SIMD_AVX2 __m256i q8_codes_avx2(const TW& b, int j) {
  if constexpr (std::is_same_v<TW, BlockQ4_K>) {  // 32 bytes: low nibbles for even j, high for odd
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * (j / 2)));
    return _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
  } else if constexpr (std::is_same_v<TW, BlockQ6_K>) {
    const int g = j / 4, m = j % 4;
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * g + 32 * (m % 2)));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * g));
    const __m256i lo4 = _mm256_and_si256(_mm256_srli_epi16(lo, 4 * (m / 2)), _mm256_set1_epi8(0x0F));
    const __m256i hi2 = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * m), _mm256_set1_epi8(0x03));
    return _mm256_or_si256(lo4, _mm256_slli_epi16(hi2, 4));
  } else {
    const __m256i u = unpack_u4_block(b.qs);
    if constexpr (kQ5Block<TW>) return _mm256_or_si256(u, unpack_q5_high_bits(b.qh));
    return u;
  }
}

/// AVX2: u8 x s8 pairs into 16 bits, then pairs of those into 32.
struct Q8DotAvx2 {
  static constexpr bool kSimd = true;
  RF_SIMD_AVX2 static __m256i dot(__m256i u, __m256i q) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1));
  }
  RF_SIMD_AVX2 static void quantize(const float* x, int64_t n, int8_t* q, float* d, float* s) {
    quantize_x_q8_avx2(x, n, q, d, s);
  }
};

/// AVX-512 VNNI: four u8 x s8 products into each 32-bit lane in one instruction.
struct Q8DotVnni {
  static constexpr bool kSimd = true;
  RF_SIMD_AVX512_VNNI static __m256i dot(__m256i u, __m256i q) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q);
  }
  RF_SIMD_AVX512_VNNI static void quantize(const float* x, int64_t n, int8_t* q, float* d, float* s) {
    quantize_x_q8_avx2(x, n, q, d, s);
  }
};

template <class Dot, int NT, int R, class TW, std::enable_if_t<Dot::kSimd, int> = 0>
RF_SIMD_AVX2 void gemv_q8_tile(const LinearArgs<float, TW>& a, const XQ8Chunk& xc, int64_t k0, int64_t kc,
                               float* y, int64_t o) {
  constexpr bool kSigned = std::is_same_v<TW, BlockQ8_0>;
  constexpr int64_t kSub = kQ8SubBlocks<TW>;
  const TW* w = a.w + o * a.ldw + k0 / TW::size;
  simd::F32x8 acc[NT][R];
  gemv_zero(acc);
  float corr[NT][R] = {};
  for (int64_t blk = 0; blk < kc / kQ8Block; ++blk) {
    __m256i xq[NT];
    for (int t = 0; t < NT; ++t)
      xq[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xc.q[t] + blk * kQ8Block));
    for (int r = 0; r < R; ++r) {
      const TW& b = w[r * a.ldw + blk / kSub];
      const int j = int(blk % kSub);
      gemv_prefetch_next_tile<R>(&b, a.ldw);
      __m256i u, ws;
      if constexpr (kSigned) {
        ws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
        u = _mm256_abs_epi8(ws);
      } else {
        u = q8_codes_avx2(b, j);
      }
      float dw[2], c;
      q8_scales(b, j, f16_to_f32, dw, c);
      for (int t = 0; t < NT; ++t) {
        __m256i sum = Dot::dot(u, kSigned ? _mm256_sign_epi8(xq[t], ws) : xq[t]);
        if constexpr (std::is_same_v<TW, BlockQ6_K>) {
          // codes less 32, and a scale per 16 weights: lanes 0-3 sum the first 16, lanes 4-7 the rest
          sum = _mm256_sub_epi32(sum, Dot::dot(_mm256_set1_epi8(32), xq[t]));
          const float xd = xc.d[t][blk];
          const __m256 scale = _mm256_setr_m128(_mm_set1_ps(dw[0] * xd), _mm_set1_ps(dw[1] * xd));
          acc[t][r].v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[t][r].v);
        } else {
          acc[t][r].v =
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(dw[0] * xc.d[t][blk]), acc[t][r].v);
          if constexpr (!kSigned) corr[t][r] += c * xc.s[t][blk];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) q8_store(a, y, t, o + r, acc[t][r].reduce_add() + corr[t][r], k0 == 0);
}
#endif

// Rows [o0, o1) of tokens t0 .. t0 + NT - 1, a chunk of k at a time.
template <class Dot, int NT, class TW>
void gemv_q8_rows(const LinearArgs<float, TW>& a, int64_t t0, int64_t o0, int64_t o1) {
  // One row for one token (gemv_rows_for); fewer rows for 3-4 tokens: NT x R accumulators, codes and x
  // stay in registers.
  constexpr int R = NT <= 2 ? LinearBlocking::gemv_rows_for(NT) : 2;
  XQ8Chunk xc;
  float* y = a.y + t0 * a.ldy;
  for (int64_t k0 = 0; k0 < a.in; k0 += kQ8Chunk) {
    const int64_t kc = std::min(kQ8Chunk, a.in - k0);
    for (int t = 0; t < NT; ++t) Dot::quantize(a.x + (t0 + t) * a.ldx + k0, kc, xc.q[t], xc.d[t], xc.s[t]);
    int64_t o = o0;
    for (; o + R <= o1; o += R) gemv_q8_tile<Dot, NT, R>(a, xc, k0, kc, y, o);
    for (; o < o1; ++o) gemv_q8_tile<Dot, NT, 1>(a, xc, k0, kc, y, o);
  }
}

// ISA entry points.
template <int NT, class TW>
void gemv_q8_scalar(const LinearArgs<float, TW>* a, int64_t t0, int64_t o0, int64_t o1) {
  gemv_q8_rows<Q8DotScalar, NT>(*a, t0, o0, o1);
}
#if RF_HAVE_X86_SIMD
template <int NT, class TW>
RF_KERNEL_AVX2 void gemv_q8_avx2(const LinearArgs<float, TW>* a, int64_t t0, int64_t o0, int64_t o1) {
  gemv_q8_rows<Q8DotAvx2, NT>(*a, t0, o0, o1);
}
template <int NT, class TW>
RF_KERNEL_AVX512_VNNI void gemv_q8_vnni(const LinearArgs<float, TW>* a, int64_t t0, int64_t o0, int64_t o1) {
  gemv_q8_rows<Q8DotVnni, NT>(*a, t0, o0, o1);
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
