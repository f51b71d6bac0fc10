// recurformer/cpu/detail/gemv_q8_kernels.hpp: GEMV on every GGUF block type (Q4_0 .. Q8_0, Q2_K ..
// Q6_K, IQ4_NL, IQ4_XS) with x quantised to 8 bits (ActivationMath::int8), the integer path llama.cpp
// takes for these types.
//
// x is quantised per token and per 32 values (quantize_x_q8): d = max|x| / 127,
// q = round-half-even(x * (1 / d)), and s = d * sum(q) is kept beside d (llama.cpp's q8_1). Every
// weight type is read 32 weights at a time (a block, or a sub-block of a 256-weight one), each half
// of 16 as w = dw_h (u - z) + c_h with u its codes:
//   Q4_0 / Q4_1: nibbles, c = -8 dw / m;  Q5_0 / Q5_1: nibbles plus a fifth bit from qh, c = -16 dw / m;
//   Q4_K / Q5_K: eight such sub-blocks per block, dw = d sc_j, c = -dmin m_j;
//   Q2_K: 2-bit codes, a scale and a min per 16 weights (dw_h = d sc, c_h = -dmin m);
//   Q3_K: 3-bit codes (two bits plus hmask's), z = 4, a signed scale per 16;
//   Q6_K: 6-bit codes, z = 32, a signed scale per 16;
//   Q8_0, IQ4_NL, IQ4_XS: signed values (bytes, or the IQ4 code book), c = 0, one scale per 32;
// so with Q_h = sum over the half of q,
//   sum_i w_i (d q_i) = sum_h dw_h d (sum_i u_i q_i - z Q_h) + c d Q  (c_h d Q_h per half for Q2_K),
// where the integer sums are exact: AVX-512 VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd (codes of
// at most 6 bits times |q| <= 127 cannot saturate a 16-bit pair: 2 * 63 * 127 < 2^15). A 256-bit
// vector's 32-bit lanes 0-3 sum the first 16 weights and lanes 4-7 the second, so the halves come
// for free. Signed values enter as |w| and sign(q, w), so the unsigned operand stays non-negative
// (|w| <= 128: a pair is at most 2 * 128 * 127). One block is one 256-bit vector on both ISAs: the
// unpacked block is exactly 32 bytes, and 256-bit integer ops issue on three ports where 512-bit
// ones issue on two.
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

/// Block types with an integer GEMV against 8-bit x: all of them.
template <class TW>
constexpr bool kQ8DotBlock = is_quant_block_v<TW>;
template <class TW>
constexpr bool kQ5Block = std::is_same_v<TW, BlockQ5_0> || std::is_same_v<TW, BlockQ5_1>;
template <class TW>
constexpr bool kK4Block = std::is_same_v<TW, BlockQ4_K> || std::is_same_v<TW, BlockQ5_K>;
template <class TW>
constexpr bool kIq4Block = std::is_same_v<TW, BlockIQ4_NL> || std::is_same_v<TW, BlockIQ4_XS>;
/// Codes that are signed values (taken as |w| and sign(q, w)).
template <class TW>
constexpr bool kQ8Signed = std::is_same_v<TW, BlockQ8_0> || kIq4Block<TW>;
/// log2 of the zero point z of unsigned codes (w = dw (u - z) + c), 0 for none.
template <class TW>
constexpr int kQ8ZeroShift = std::is_same_v<TW, BlockQ6_K> ? 5 : std::is_same_v<TW, BlockQ3_K> ? 2 : 0;
template <class TW>
constexpr int kQ8Zero = kQ8ZeroShift<TW> ? 1 << kQ8ZeroShift<TW> : 0;
/// A scale per 16 weights, so a sub-block's integer sum is scaled per half.
template <class TW>
constexpr bool kQ8HalfScales =
    std::is_same_v<TW, BlockQ2_K> || std::is_same_v<TW, BlockQ3_K> || std::is_same_v<TW, BlockQ6_K>;
/// A min per 16 weights (Q2_K): c_h d Q_h per half, from the sums of q.
template <class TW>
constexpr bool kQ8HalfMins = std::is_same_v<TW, BlockQ2_K>;
/// One offset c per 32 weights: c s.
template <class TW>
constexpr bool kQ8BlockMin = std::is_same_v<TW, BlockQ4_0> || std::is_same_v<TW, BlockQ4_1> || kQ5Block<TW> ||
                             kK4Block<TW>;

constexpr int kQ8Block = 32;         // x values per scale (the weight (sub-)block size of every kQ8DotBlock)
/// 32-weight sub-blocks per block (8 for Q4_K's 256).
template <class TW>
constexpr int64_t kQ8SubBlocks = TW::size / kQ8Block;
constexpr int64_t kQ8Chunk = 4096;   // x values quantised at a time per token (16 KB of codes for 4 tokens)
static_assert(kQ8Chunk % 256 == 0, "a chunk of k starts on a block of every type");

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

/// Scales and offsets of every 32-weight sub-block of a block: w = dw (u - z) + c with dw and c of
/// the weight's half h (16 weights); row h = 1 is filled only where the halves differ.
template <class TW>
struct Q8BlockScales {
  static constexpr int kSub = int(kQ8SubBlocks<TW>);
  float dw[2][kSub];
  float c[2][kSub];
  float scale(int j, int h) const { return dw[kQ8HalfScales<TW> ? h : 0][j]; }
  float offset(int j, int h) const { return c[kQ8HalfMins<TW> ? h : 0][j]; }
};

// A block's scales and offsets, its fp16 fields read once with to_f32: a kernel decodes them once
// per row and block, not per sub-block (the scalar scale work is what bounds the K-quants in cache).
template <class TW, class ToF32>
void q8_block_scales(const TW& b, ToF32 to_f32, Q8BlockScales<TW>& out) {
  constexpr int kSub = Q8BlockScales<TW>::kSub;
  const float d = to_f32(b.d);
  if constexpr (kQ8HalfScales<TW>) {
    float dmin = 0.f;
    if constexpr (kQ8HalfMins<TW>) dmin = to_f32(b.dmin);
    [[maybe_unused]] int k3[16];
    if constexpr (std::is_same_v<TW, BlockQ3_K>) recurformer::detail::k3_scales(b.scales, k3);
    for (int k = 0; k < 2 * kSub; ++k) {  // 16-weight sub-block k: half k % 2 of 32-weight j = k / 2
      float& dw = out.dw[k % 2][k / 2];
      if constexpr (std::is_same_v<TW, BlockQ6_K>) {
        dw = d * float(b.scales[k]);
      } else if constexpr (std::is_same_v<TW, BlockQ3_K>) {
        dw = d * float(k3[k]);
      } else {  // Q2_K
        dw = d * float(b.scales[k] & 0x0F);
        out.c[k % 2][k / 2] = -(dmin * float(b.scales[k] >> 4));
      }
    }
  } else if constexpr (kK4Block<TW>) {
    uint8_t sc[8], mn[8];
    recurformer::detail::k4_scales_mins(b.scales, sc, mn);
    const float dmin = to_f32(b.dmin);
    for (int j = 0; j < 8; ++j) out.dw[0][j] = d * float(sc[j]), out.c[0][j] = -(dmin * float(mn[j]));
  } else if constexpr (std::is_same_v<TW, BlockIQ4_XS>) {
    for (int j = 0; j < kSub; ++j) out.dw[0][j] = d * float(recurformer::detail::iq4xs_scale(b.scales_h, b.scales_l, j));
  } else {
    out.dw[0][0] = d;
    if constexpr (std::is_same_v<TW, BlockQ4_1> || std::is_same_v<TW, BlockQ5_1>) out.c[0][0] = to_f32(b.m);
    else if constexpr (std::is_same_v<TW, BlockQ4_0>) out.c[0][0] = -8.f * d;
    else if constexpr (std::is_same_v<TW, BlockQ5_0>) out.c[0][0] = -16.f * d;
  }
}

// Sub-block j's 32 codes in weight order, as ints: u of w = dw (u - z) + c, or the signed value.
template <class TW>
void q8_codes(const TW& b, int j, int (&u)[kQ8Block]) {
  if constexpr (std::is_same_v<TW, BlockQ8_0>) {
    for (int i = 0; i < kQ8Block; ++i) u[i] = b.qs[i];
  } else if constexpr (kK4Block<TW>) {
    for (int i = 0; i < kQ8Block; ++i) u[i] = (b.qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0x0F;
    if constexpr (std::is_same_v<TW, BlockQ5_K>)
      for (int i = 0; i < kQ8Block; ++i) u[i] |= ((b.qh[i] >> j) & 1) << 4;
  } else if constexpr (std::is_same_v<TW, BlockQ2_K> || std::is_same_v<TW, BlockQ3_K>) {
    const int g = j / 4, m = j % 4;  // weight 128 g + 32 m + i: see BlockQ2_K
    for (int i = 0; i < kQ8Block; ++i) u[i] = (b.qs[32 * g + i] >> (2 * m)) & 3;
    if constexpr (std::is_same_v<TW, BlockQ3_K>)
      for (int i = 0; i < kQ8Block; ++i) u[i] |= ((b.hmask[i] >> j) & 1) << 2;
  } else if constexpr (std::is_same_v<TW, BlockQ6_K>) {  // weight 32 j + i: see BlockQ6_K
    const int g = j / 4, m = j % 4;
    for (int i = 0; i < kQ8Block; ++i)
      u[i] = ((b.ql[64 * g + 32 * (m % 2) + i] >> (4 * (m / 2))) & 0x0F) | (((b.qh[32 * g + i] >> (2 * m)) & 3) << 4);
  } else if constexpr (kIq4Block<TW>) {
    const uint8_t* qs = b.qs + (std::is_same_v<TW, BlockIQ4_XS> ? 16 * j : 0);
    for (int i = 0; i < 16; ++i) {
      u[i] = recurformer::detail::iq4_value(qs[i] & 0x0F);
      u[i + 16] = recurformer::detail::iq4_value(qs[i] >> 4);
    }
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
  Q8BlockScales<TW> scales[R];  // row r's current block (a chunk starts on a block)
  for (int64_t blk = 0; blk < kc / kQ8Block; ++blk) {
    for (int r = 0; r < R; ++r) {
      const TW& b = w[r * a.ldw + blk / kSub];
      const int j = int(blk % kSub);
      gemv_prefetch_next_tile<R>(&b, a.ldw);
      int u[kQ8Block];
      q8_codes(b, j, u);
      if (j == 0) q8_block_scales(b, [](half h) { return float(h); }, scales[r]);
      const Q8BlockScales<TW>& sc = scales[r];
      for (int t = 0; t < NT; ++t) {
        const int8_t* xq = xc.q[t] + blk * kQ8Block;
        const float xd = xc.d[t][blk];
        int sum[2] = {0, 0}, qsum[2] = {0, 0};
        for (int i = 0; i < kQ8Block; ++i) sum[i / 16] += u[i] * xq[i], qsum[i / 16] += xq[i];
        for (int h = 0; h < 2; ++h) {
          acc[t][r] += float(sum[h] - qsum[h] * kQ8Zero<TW>) * (sc.scale(j, h) * xd);
          if constexpr (kQ8HalfMins<TW>) corr[t][r] += float(qsum[h]) * (sc.offset(j, h) * xd);
        }
        if constexpr (kQ8BlockMin<TW>) corr[t][r] += sc.offset(j, 0) * xc.s[t][blk];
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

// Bit `bit` of each byte of the 32 bytes at p, moved to bit `to` (0 or 1 there).
RF_SIMD_AVX2 __m256i byte_bit_avx2(const uint8_t* p, int bit, int to) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(v, bit), _mm256_set1_epi8(1)), to);
}

// Sub-block j's 32 unsigned codes in weight order, one byte each (before the less z), for the
// unsigned types (the kQ8Signed ones come from q8_signed_codes_avx2).
template <class TW>
RF_SIMD_AVX2 __m256i q8_codes_avx2(const TW& b, int j) {
  if constexpr (kK4Block<TW>) {  // 32 bytes: low nibbles for even j, high for odd
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * (j / 2)));
    const __m256i u = _mm256_and_si256(_mm256_srli_epi16(v, 4 * (j % 2)), _mm256_set1_epi8(0x0F));
    if constexpr (std::is_same_v<TW, BlockQ5_K>) return _mm256_or_si256(u, byte_bit_avx2(b.qh, j, 4));
    return u;
  } else if constexpr (std::is_same_v<TW, BlockQ2_K> || std::is_same_v<TW, BlockQ3_K>) {
    const int g = j / 4, m = j % 4;
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * g));
    const __m256i u = _mm256_and_si256(_mm256_srli_epi16(v, 2 * m), _mm256_set1_epi8(3));
    if constexpr (std::is_same_v<TW, BlockQ3_K>) return _mm256_or_si256(u, byte_bit_avx2(b.hmask, j, 2));
    return u;
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

// The IQ4 code book in both 128-bit lanes (a vpshufb table); unused by the other types.
template <class TW>
RF_SIMD_AVX2 __m256i q8_code_book_avx2() {
  if constexpr (kIq4Block<TW>) {
    alignas(16) int8_t book[16];
    for (int i = 0; i < 16; ++i) book[i] = recurformer::detail::iq4_value(i);
    return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(book)));
  }
  return _mm256_setzero_si256();
}

// Sub-block j's 32 signed values in weight order, for the kQ8Signed types.
template <class TW>
RF_SIMD_AVX2 __m256i q8_signed_codes_avx2(const TW& b, int j, __m256i book) {
  if constexpr (std::is_same_v<TW, BlockQ8_0>) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
  } else {
    const uint8_t* qs = b.qs + (std::is_same_v<TW, BlockIQ4_XS> ? 16 * j : 0);
    return _mm256_shuffle_epi8(book, unpack_u4_block(qs));
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

// The float vector holding a in lanes 0-3 (the first 16 weights' sums) and b in lanes 4-7.
RF_SIMD_AVX2 __m256 q8_halves(float a, float b) { return _mm256_setr_m128(_mm_set1_ps(a), _mm_set1_ps(b)); }

template <class Dot, int NT, int R, class TW, std::enable_if_t<Dot::kSimd, int> = 0>
RF_SIMD_AVX2 void gemv_q8_tile(const LinearArgs<float, TW>& a, const XQ8Chunk& xc, int64_t k0, int64_t kc,
                               float* y, int64_t o) {
  constexpr int64_t kSub = kQ8SubBlocks<TW>;
  constexpr bool kQSums = kQ8ZeroShift<TW> != 0 || kQ8HalfMins<TW>;  // sums of q per 4 values
  const TW* w = a.w + o * a.ldw + k0 / TW::size;
  [[maybe_unused]] const __m256i book = q8_code_book_avx2<TW>();
  simd::F32x8 acc[NT][R];
  gemv_zero(acc);
  float corr[NT][R] = {};
  Q8BlockScales<TW> scales[R];  // row r's current block (a chunk starts on a block)
  for (int64_t blk = 0; blk < kc / kQ8Block; ++blk) {
    __m256i xq[NT], qsum[NT];
    for (int t = 0; t < NT; ++t) {
      xq[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xc.q[t] + blk * kQ8Block));
      if constexpr (kQSums) qsum[t] = Dot::dot(_mm256_set1_epi8(1), xq[t]);
    }
    for (int r = 0; r < R; ++r) {
      const TW& b = w[r * a.ldw + blk / kSub];
      const int j = int(blk % kSub);
      gemv_prefetch_next_tile<R>(&b, a.ldw);
      __m256i u, ws;
      if constexpr (kQ8Signed<TW>) {
        ws = q8_signed_codes_avx2(b, j, book);
        u = _mm256_abs_epi8(ws);
      } else {
        u = q8_codes_avx2(b, j);
      }
      if (j == 0) q8_block_scales(b, f16_to_f32, scales[r]);
      const Q8BlockScales<TW>& sc = scales[r];
      for (int t = 0; t < NT; ++t) {
        __m256i sum = Dot::dot(u, kQ8Signed<TW> ? _mm256_sign_epi8(xq[t], ws) : xq[t]);
        if constexpr (kQ8ZeroShift<TW> != 0) sum = _mm256_sub_epi32(sum, _mm256_slli_epi32(qsum[t], kQ8ZeroShift<TW>));
        const float xd = xc.d[t][blk];
        const __m256 scale = kQ8HalfScales<TW> ? q8_halves(sc.scale(j, 0) * xd, sc.scale(j, 1) * xd)
                                               : _mm256_set1_ps(sc.scale(j, 0) * xd);
        acc[t][r].v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[t][r].v);
        if constexpr (kQ8HalfMins<TW>)
          acc[t][r].v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qsum[t]),
                                        q8_halves(sc.offset(j, 0) * xd, sc.offset(j, 1) * xd), acc[t][r].v);
        if constexpr (kQ8BlockMin<TW>) corr[t][r] += sc.offset(j, 0) * xc.s[t][blk];
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
