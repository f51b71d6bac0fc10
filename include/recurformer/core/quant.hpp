// recurformer/core/quant.hpp: the ggml / GGUF quantised weight blocks, and their runtime tag.
//
// Each block struct is byte for byte ggml's block_* (sizes asserted below), so a row of a GGUF
// tensor of that type is a plain array of blocks and an [out, in] matrix a View<const Block, 2> of
// shape [out, in / Block::size]. `dequantize(out)` writes the block's `size` weights as fp32 with
// exactly the float operations, in the order, of the `gguf` Python package
// (gguf.quants.dequantize): the tests compare bit for bit on fixtures it wrote. (Keep it that way:
// written as separate products and sums so that the baseline x86-64 build, which has no FMA,
// rounds each step as numpy does.)
//
//   type     weights/block  bytes  value of weight i
//   Q4_0     32             18     d * (q - 8),            q 4-bit
//   Q4_1     32             20     d * q + m,              q 4-bit
//   Q5_0     32             22     d * (q - 16),           q 5-bit (high bits in qh)
//   Q5_1     32             24     d * q + m,              q 5-bit
//   Q8_0     32             34     d * q,                  q int8
//   Q2_K     256            84     d*sc * q - dmin*mn,     16 sub-blocks of 16, 4-bit sc/mn, q 2-bit
//   Q3_K     256            110    d*(sc - 32) * (q - 4h), 16 sub-blocks of 16, 6-bit sc, q 2+1 bit
//   Q4_K     256            144    d*sc * q - dmin*mn,     8 sub-blocks of 32, 6-bit sc/mn, q 4-bit
//   Q5_K     256            176    d*sc * q - dmin*mn,     8 sub-blocks of 32, 6-bit sc/mn, q 5-bit
//   Q6_K     256            210    d*sc * (q - 32),        16 sub-blocks of 16, int8 sc, q 6-bit
//   IQ4_NL   32             18     d * kv[q],              q 4-bit index into a non-linear table
//   IQ4_XS   256            136    d*(sc - 32) * kv[q],    8 sub-blocks of 32, 6-bit sc
//
// `GgmlType` numbers every storage type as ggml does (the GGUF tensor type field); dispatch_quant()
// turns a runtime value into its block type, the one place that switch is written.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "recurformer/core/config.hpp"
#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"

namespace recurformer {

/// Storage types by ggml's numbering (the GGUF tensor type field). Only the ones named are read.
enum class GgmlType : uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8,
  q2_k = 10, q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, iq4_nl = 20, iq4_xs = 23, bf16 = 30,
};

namespace detail {
RF_HOST_DEVICE inline float half_field(half h) { return half_bits_to_float(h.bits); }
RF_HOST_DEVICE inline uint32_t load_u32_le(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
/// The eight 6-bit scales and mins of a Q4_K / Q5_K block's sub-blocks (ggml's get_scale_min_k4
/// for j = 0..7), a 32-bit word at a time: bytes 0-3 hold scales 0-3 and the high bits of scales 4-7, bytes 4-7 mins 0-3 and
/// the high bits of mins 4-7, bytes 8-11 the low nibbles of scales 4-7 (low) and mins 4-7 (high).
RF_HOST_DEVICE inline void k4_scales_mins(const uint8_t* s, uint8_t (&sc)[8], uint8_t (&mn)[8]) {
  const uint32_t w0 = load_u32_le(s), w1 = load_u32_le(s + 4), w2 = load_u32_le(s + 8);
  const uint32_t lo6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, top2 = 0x03030303u;
  const uint32_t words[4] = {w0 & lo6, (w2 & lo4) | ((w0 >> 6) & top2) << 4, w1 & lo6,
                             ((w2 >> 4) & lo4) | ((w1 >> 6) & top2) << 4};
  for (int i = 0; i < 4; ++i) {
    sc[i] = uint8_t(words[0] >> (8 * i)), sc[i + 4] = uint8_t(words[1] >> (8 * i));
    mn[i] = uint8_t(words[2] >> (8 * i)), mn[i + 4] = uint8_t(words[3] >> (8 * i));
  }
}
/// The sixteen signed 6-bit scales of a Q3_K block's 16-weight sub-blocks, less 32: scale k's low
/// four bits are nibble k / 8 of byte k % 8, its high two bit pair k / 4 of byte 8 + k % 4 (ggml's
/// kmask unpacking). A 32-bit word at a time: scales 4i..4i+3 take the low or high nibbles of
/// bytes 0-3 or 4-7 and bit pair i of bytes 8-11.
RF_HOST_DEVICE inline void k3_scales(const uint8_t* s, int (&sc)[16]) {
  const uint32_t w0 = load_u32_le(s), w1 = load_u32_le(s + 4), w2 = load_u32_le(s + 8);
  const uint32_t lo4 = 0x0f0f0f0fu, top2 = 0x03030303u;
  const uint32_t words[4] = {(w0 & lo4) | (w2 & top2) << 4, (w1 & lo4) | ((w2 >> 2) & top2) << 4,
                             ((w0 >> 4) & lo4) | ((w2 >> 4) & top2) << 4, ((w1 >> 4) & lo4) | ((w2 >> 6) & top2) << 4};
  for (int k = 0; k < 16; ++k) sc[k] = int((words[k / 4] >> (8 * (k % 4))) & 0xff) - 32;
}
/// The signed 6-bit scale of 32-weight sub-block j (0..7) of an IQ4_XS block, less 32.
RF_HOST_DEVICE inline int iq4xs_scale(uint16_t scales_h, const uint8_t* scales_l, int j) {
  // nibble j % 2 of byte j / 2 is nibble j of the little-endian word
  return int(((load_u32_le(scales_l) >> (4 * j)) & 0x0F) | ((uint32_t(scales_h) >> (2 * j)) & 3) << 4) - 32;
}
/// The non-linear 4-bit code book of IQ4_NL and IQ4_XS.
RF_HOST_DEVICE inline int8_t iq4_value(int q) {
  constexpr int8_t kv[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  return kv[q];
}
}  // namespace detail

struct alignas(2) BlockQ4_0 {
  static constexpr int64_t size = 32;
  static constexpr GgmlType type = GgmlType::q4_0;
  half d;
  uint8_t qs[16];  ///< weight i < 16 in the low nibble of qs[i], weight i + 16 in its high nibble
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d);
    for (int i = 0; i < 16; ++i) {
      out[i] = df * float(int(qs[i] & 0x0F) - 8);
      out[i + 16] = df * float(int(qs[i] >> 4) - 8);
    }
  }
};

struct alignas(2) BlockQ4_1 {
  static constexpr int64_t size = 32;
  static constexpr GgmlType type = GgmlType::q4_1;
  half d, m;
  uint8_t qs[16];
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d), mf = detail::half_field(m);
    for (int i = 0; i < 16; ++i) {
      const float lo = df * float(qs[i] & 0x0F), hi = df * float(qs[i] >> 4);
      out[i] = lo + mf;
      out[i + 16] = hi + mf;
    }
  }
};

struct alignas(2) BlockQ5_0 {
  static constexpr int64_t size = 32;
  static constexpr GgmlType type = GgmlType::q5_0;
  half d;
  uint8_t qh[4];   ///< bit i (little-endian u32): the fifth bit of weight i
  uint8_t qs[16];  ///< low four bits, as Q4_0
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d);
    const uint32_t h = detail::load_u32_le(qh);
    for (int i = 0; i < 16; ++i) {
      const int lo = (qs[i] & 0x0F) | int((h >> i) & 1) << 4, hi = (qs[i] >> 4) | int((h >> (i + 16)) & 1) << 4;
      out[i] = df * float(lo - 16);
      out[i + 16] = df * float(hi - 16);
    }
  }
};

struct alignas(2) BlockQ5_1 {
  static constexpr int64_t size = 32;
  static constexpr GgmlType type = GgmlType::q5_1;
  half d, m;
  uint8_t qh[4];
  uint8_t qs[16];
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d), mf = detail::half_field(m);
    const uint32_t h = detail::load_u32_le(qh);
    for (int i = 0; i < 16; ++i) {
      const int lo = (qs[i] & 0x0F) | int((h >> i) & 1) << 4, hi = (qs[i] >> 4) | int((h >> (i + 16)) & 1) << 4;
      const float a = df * float(lo), b = df * float(hi);
      out[i] = a + mf;
      out[i + 16] = b + mf;
    }
  }
};

struct alignas(2) BlockQ8_0 {
  static constexpr int64_t size = 32;
  static constexpr GgmlType type = GgmlType::q8_0;
  half d;
  int8_t qs[32];
  /// Weight i of the block as fp32.
  RF_HOST_DEVICE float value(int64_t i) const { return float(d) * float(qs[i]); }
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d);
    for (int i = 0; i < 32; ++i) out[i] = float(qs[i]) * df;
  }
};

struct alignas(2) BlockQ2_K {
  static constexpr int64_t size = 256;
  static constexpr GgmlType type = GgmlType::q2_k;
  uint8_t scales[16];  ///< sub-block j: scale in the low nibble, min in the high nibble
  uint8_t qs[64];      ///< weight 128 g + 32 s + b: bits 2s..2s+1 of qs[32 g + b]
  half d, dmin;
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d), mf = detail::half_field(dmin);
    for (int i = 0; i < 256; ++i) {
      const int j = i / 16, g = i / 128, s = (i / 32) % 4, b = i % 32;
      const float dl = df * float(scales[j] & 0x0F), ml = mf * float(scales[j] >> 4);
      const float v = dl * float((qs[32 * g + b] >> (2 * s)) & 3);
      out[i] = v - ml;
    }
  }
};

struct alignas(2) BlockQ3_K {
  static constexpr int64_t size = 256;
  static constexpr GgmlType type = GgmlType::q3_k;
  uint8_t hmask[32];   ///< weight 32 s + b: its high bit is bit s of hmask[b] (set: no -4 offset)
  uint8_t qs[64];      ///< low two bits, laid out as Q2_K
  uint8_t scales[12];  ///< 16 six-bit scales: low nibbles in bytes 0..7, high pairs in 8..11
  half d;
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d);
    int sc[16];
    detail::k3_scales(scales, sc);
    float dl[16];
    for (int k = 0; k < 16; ++k) dl[k] = df * float(sc[k]);
    for (int i = 0; i < 256; ++i) {
      const int g = i / 128, s = (i / 32) % 4, b = i % 32;
      const int low = (qs[32 * g + b] >> (2 * s)) & 3, high = ((hmask[b] >> (i / 32)) & 1) ^ 1;
      out[i] = dl[i / 16] * float(low - (high << 2));
    }
  }
};

struct alignas(2) BlockQ4_K {
  static constexpr int64_t size = 256;
  static constexpr GgmlType type = GgmlType::q4_k;
  half d, dmin;
  uint8_t scales[12];  ///< eight 6-bit scales and mins (detail::k4_scales_mins)
  uint8_t qs[128];     ///< weight 64 g + 32 s + b: nibble s of qs[32 g + b]
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d), mf = detail::half_field(dmin);
    uint8_t sc[8], mn[8];
    detail::k4_scales_mins(scales, sc, mn);
    for (int j = 0; j < 8; ++j) {
      const float dl = df * float(sc[j]), ml = mf * float(mn[j]);
      for (int b = 0; b < 32; ++b) {
        const float v = dl * float((qs[32 * (j / 2) + b] >> (4 * (j % 2))) & 0x0F);
        out[32 * j + b] = v - ml;
      }
    }
  }
};

struct alignas(2) BlockQ5_K {
  static constexpr int64_t size = 256;
  static constexpr GgmlType type = GgmlType::q5_k;
  half d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];   ///< weight 32 j + b: its fifth bit is bit j of qh[b]
  uint8_t qs[128];  ///< low four bits, laid out as Q4_K
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d), mf = detail::half_field(dmin);
    uint8_t sc[8], mn[8];
    detail::k4_scales_mins(scales, sc, mn);
    for (int j = 0; j < 8; ++j) {
      const float dl = df * float(sc[j]), ml = mf * float(mn[j]);
      for (int b = 0; b < 32; ++b) {
        const int q = ((qs[32 * (j / 2) + b] >> (4 * (j % 2))) & 0x0F) | ((qh[b] >> j) & 1) << 4;
        const float v = dl * float(q);
        out[32 * j + b] = v - ml;
      }
    }
  }
};

struct alignas(2) BlockQ6_K {
  static constexpr int64_t size = 256;
  static constexpr GgmlType type = GgmlType::q6_k;
  uint8_t ql[128];    ///< weight 128 g + 64 s + b: nibble s of ql[64 g + b]
  uint8_t qh[64];     ///< weight 128 g + 32 s + b: bits 2s..2s+1 of qh[32 g + b]
  int8_t scales[16];  ///< one per 16 weights
  half d;
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d);
    for (int i = 0; i < 256; ++i) {
      const int g = i / 128, r = i % 128;
      const int lo = (ql[64 * g + r % 64] >> (4 * (r / 64))) & 0x0F, hi = (qh[32 * g + r % 32] >> (2 * (r / 32))) & 3;
      const float dl = df * float(scales[i / 16]);
      out[i] = dl * float(int(int8_t(uint8_t(lo | hi << 4))) - 32);
    }
  }
};

struct alignas(2) BlockIQ4_NL {
  static constexpr int64_t size = 32;
  static constexpr GgmlType type = GgmlType::iq4_nl;
  half d;
  uint8_t qs[16];  ///< code of weight i < 16 in the low nibble of qs[i], of i + 16 in the high one
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d);
    for (int i = 0; i < 16; ++i) {
      out[i] = df * float(detail::iq4_value(qs[i] & 0x0F));
      out[i + 16] = df * float(detail::iq4_value(qs[i] >> 4));
    }
  }
};

struct alignas(2) BlockIQ4_XS {
  static constexpr int64_t size = 256;
  static constexpr GgmlType type = GgmlType::iq4_xs;
  half d;
  uint16_t scales_h;   ///< bits 2j..2j+1: high bits of sub-block j's scale
  uint8_t scales_l[4]; ///< nibble j % 2 of byte j / 2: low bits of sub-block j's scale
  uint8_t qs[128];     ///< weight 32 j + 16 s + b: nibble s of qs[16 j + b]
  RF_HOST_DEVICE void dequantize(float* out) const {
    const float df = detail::half_field(d);
    for (int j = 0; j < 8; ++j) {
      const float dl = df * float(detail::iq4xs_scale(scales_h, scales_l, j));
      for (int b = 0; b < 32; ++b)
        out[32 * j + b] = dl * float(detail::iq4_value((qs[16 * j + b % 16] >> (4 * (b / 16))) & 0x0F));
    }
  }
};

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
                  sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34,
              "32-weight blocks are ggml's block_q4_0 .. block_q8_0");
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 &&
                  sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210,
              "K-quant blocks are ggml's block_q2_K .. block_q6_K (QK_K = 256)");
static_assert(sizeof(BlockIQ4_NL) == 18 && sizeof(BlockIQ4_XS) == 136, "IQ4 blocks are ggml's");

/// True for the block types above.
template <class T>
struct is_quant_block : std::false_type {};
#define RF_QUANT_BLOCK(B) \
  template <>             \
  struct is_quant_block<B> : std::true_type {}
RF_QUANT_BLOCK(BlockQ4_0);
RF_QUANT_BLOCK(BlockQ4_1);
RF_QUANT_BLOCK(BlockQ5_0);
RF_QUANT_BLOCK(BlockQ5_1);
RF_QUANT_BLOCK(BlockQ8_0);
RF_QUANT_BLOCK(BlockQ2_K);
RF_QUANT_BLOCK(BlockQ3_K);
RF_QUANT_BLOCK(BlockQ4_K);
RF_QUANT_BLOCK(BlockQ5_K);
RF_QUANT_BLOCK(BlockQ6_K);
RF_QUANT_BLOCK(BlockIQ4_NL);
RF_QUANT_BLOCK(BlockIQ4_XS);
#undef RF_QUANT_BLOCK
template <class T>
constexpr bool is_quant_block_v = is_quant_block<T>::value;

/// ggml's name of a type number ("Q4_K"; "unknown" past the table).
inline const char* ggml_type_name(uint32_t t) {
  static const char* names[] = {"F32",  "F16",  "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1",
                                "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
                                "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
                                "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16"};
  return t < sizeof(names) / sizeof(names[0]) ? names[t] : "unknown";
}
inline const char* ggml_type_name(GgmlType t) { return ggml_type_name(uint32_t(t)); }

/// Tag passed by dispatch_quant: `typename decltype(tag)::type` is the block type.
template <class B>
struct QuantTag {
  using type = B;
};

/// Calls f(QuantTag<Block>{}) for a quantised type; Error naming the type for any other value.
template <class F>
decltype(auto) dispatch_quant(GgmlType t, F&& f) {
  switch (t) {
    case GgmlType::q4_0: return f(QuantTag<BlockQ4_0>{});
    case GgmlType::q4_1: return f(QuantTag<BlockQ4_1>{});
    case GgmlType::q5_0: return f(QuantTag<BlockQ5_0>{});
    case GgmlType::q5_1: return f(QuantTag<BlockQ5_1>{});
    case GgmlType::q8_0: return f(QuantTag<BlockQ8_0>{});
    case GgmlType::q2_k: return f(QuantTag<BlockQ2_K>{});
    case GgmlType::q3_k: return f(QuantTag<BlockQ3_K>{});
    case GgmlType::q4_k: return f(QuantTag<BlockQ4_K>{});
    case GgmlType::q5_k: return f(QuantTag<BlockQ5_K>{});
    case GgmlType::q6_k: return f(QuantTag<BlockQ6_K>{});
    case GgmlType::iq4_nl: return f(QuantTag<BlockIQ4_NL>{});
    case GgmlType::iq4_xs: return f(QuantTag<BlockIQ4_XS>{});
    default: break;
  }
  fail("quantised type ", ggml_type_name(t), " (", uint32_t(t), ") is not supported (supported: Q4_0, Q4_1, Q5_0, ",
       "Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)");
}

/// Whether t is one of the quantised types above.
inline bool is_quantized(GgmlType t) {
  switch (t) {
    case GgmlType::f32: case GgmlType::f16: case GgmlType::bf16: return false;
    default: break;
  }
  bool known = false;
  try {
    dispatch_quant(t, [&](auto) { known = true; });
  } catch (const Error&) {
  }
  return known;
}

/// Weights per block and bytes per block of a storage type (1 and the element size for F32, F16,
/// BF16); {0, 0} for a type this library does not read.
struct GgmlTypeTraits {
  int64_t block = 0, bytes = 0;
};
inline GgmlTypeTraits ggml_type_traits(GgmlType t) {
  switch (t) {
    case GgmlType::f32: return {1, 4};
    case GgmlType::f16: case GgmlType::bf16: return {1, 2};
    default: break;
  }
  if (!is_quantized(t)) return {};
  return dispatch_quant(t, [](auto tag) {
    using B = typename decltype(tag)::type;
    return GgmlTypeTraits{B::size, int64_t(sizeof(B))};
  });
}

/// Dequantises n weights (a multiple of the block size) of a row of blocks of type t to fp32.
inline void dequantize_row(GgmlType t, const void* blocks, int64_t n, float* out) {
  dispatch_quant(t, [&](auto tag) {
    using B = typename decltype(tag)::type;
    RF_CHECK(n % B::size == 0, "dequantize: ", n, " weights are not whole ", ggml_type_name(t), " blocks of ", B::size);
    const uint8_t* p = static_cast<const uint8_t*>(blocks);
    for (int64_t b = 0; b < n / B::size; ++b) {
      B blk;  // a copy: GGUF only promises the row start's alignment to the file's general.alignment
      std::memcpy(&blk, p + b * int64_t(sizeof(B)), sizeof(B));
      blk.dequantize(out + b * B::size);
    }
  });
}

}  // namespace recurformer
