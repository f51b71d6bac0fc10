// recurformer/core/q8_0.hpp: the GGUF / ggml Q8_0 weight block, a weight type of the linear op.
//
// 32 consecutive weights of a row share one fp16 scale: weight i = float(d) * qs[i]. The struct is
// byte-for-byte ggml's block_q8_0 (34 bytes, 2-byte aligned), so a row of a GGUF Q8_0 tensor is a
// plain array of blocks and a [out, in] matrix is a View<const BlockQ8_0, 2> of shape [out, in/32].
#pragma once

#include <cstdint>
#include <type_traits>

#include "recurformer/core/config.hpp"
#include "recurformer/core/dtype.hpp"

namespace recurformer {

struct alignas(2) BlockQ8_0 {
  static constexpr int64_t size = 32;  ///< weights per block
  half d;                              ///< scale
  int8_t qs[size];                     ///< quantised weights

  /// Weight i of the block as fp32.
  RF_HOST_DEVICE float value(int64_t i) const { return float(d) * float(qs[i]); }
};

static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 blocks are ggml's 34-byte block_q8_0");
static_assert(std::is_trivially_copyable<BlockQ8_0>::value, "Q8_0 blocks are plain bytes");

}  // namespace recurformer
