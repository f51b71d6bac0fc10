// recurformer/ops/block_weight.hpp: a weight table's GGUF blocks, beside its dense view, for the ops
// that read them (linear: cpu/linear.hpp; embedding: cpu/embedding.hpp).
#pragma once

#include <cstdint>

#include "recurformer/core/quant.hpp"

namespace recurformer {

/// How linear multiplies x by block weights.
///   fp32: x as it is, times the decoded weights (the fp32 product of the dequantised matrix).
///   int8: on the GEMV path (at most LinearBlocking::kGemvMaxTokens tokens) x is first quantised
///         per 32 values to 8 bits (scale max|x| / 127, round half to even) and the dot products are
///         integer, as llama.cpp computes them: faster, and off by x's rounding (at most half a
///         step, max|x| / 254, per value). Elsewhere x stays fp32.
enum class ActivationMath : uint8_t { fp32, int8 };

/// A matrix's GGUF blocks ([rows, cols / block] blocks of `type`), for callers that hold it both as
/// a dense view (which gives the shape) and as the blocks it was decoded from, and read the blocks
/// (2.6-8.5 bits per weight instead of 16-32): linear(p, blocks, ...) multiplies by them,
/// embedding(p, blocks, ...) gathers rows of them. x_math is linear's.
struct BlockWeight {
  const void* data = nullptr;
  GgmlType type = GgmlType::f32;
  ActivationMath x_math = ActivationMath::fp32;
  bool present() const { return data != nullptr; }
};

namespace detail {
/// Error unless `blocks` is a GGUF block type whose blocks tile rows of `cols` values.
inline void check_blocks(const char* op, const char* cols_name, int64_t cols, const BlockWeight& blocks) {
  RF_CHECK(is_quantized(blocks.type), op, ": block weights of type ", ggml_type_name(blocks.type),
           " are not a GGUF block type");
  const int64_t block = ggml_type_traits(blocks.type).block;
  RF_CHECK(cols % block == 0, op, ": ", cols_name, " = ", cols, " is not whole ", ggml_type_name(blocks.type),
           " blocks of ", block);
}
}  // namespace detail

}  // namespace recurformer
