// model/detail/llama_weights.hpp (private to recurformer::model): the weights of a Llama / RecurFormer as views into a
// Checkpoint's mapped tensors (no copies for the large matrices).
//
// Matrices (embedding, projections, MLP, lm_head) are used in the dtype they are stored in, TW: the
// dtype of layer 0's q_proj; a matrix stored in another dtype is converted once into an owned
// buffer (GGUF files mix dtypes). A GGUF block-quantised tensor's dtype is its fp32 decoding; the
// projections, MLP and lm_head may be served from its blocks instead (MatrixWeight). Norm weights
// and the small per-recurrent-group tensors are converted to fp32 owned copies (the Δ projections
// dt_down / dt_up to TW), with A = -exp(A_log) precomputed (spec section 3).
#pragma once

#include <cmath>
#include <cstring>
#include <deque>
#include <string>
#include <type_traits>
#include <vector>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/error.hpp"
#include "recurformer/core/head_layout.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/hybrid_head_attention.hpp"
#include "recurformer/model/config.hpp"
#include "recurformer/model/safetensors.hpp"

namespace recurformer {
namespace detail {

/// Converts n values of dtype `src` to T.
template <class T>
void convert_values(const void* src, DType dt, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    float f;
    switch (dt) {
      case DType::f32: std::memcpy(&f, static_cast<const char*>(src) + 4 * i, 4); break;
      case DType::f16: f = float(static_cast<const half*>(src)[i]); break;
      default: f = float(static_cast<const bfloat16*>(src)[i]); break;
    }
    dst[i] = T(f);
  }
}

/// A matrix multiplied by as a whole: its dense view (TW) and, for a GGUF block-quantised tensor
/// served as stored, the blocks linear() reads instead.
template <class TW>
struct MatrixWeight {
  View<const TW, 2> dense;  // [out, in]
  BlockWeight blocks;       // [out, in / block], or absent
};

template <class TW>
struct LlamaLayerWeights {
  View<const float, 1> attn_norm, mlp_norm;  // [d]
  MatrixWeight<TW> wq, wk, wv, wo;           // [n_q hd, d], [n_kv hd, d] x2, [d, n_q hd]
  View<const TW, 1> bq, bk, bv;              // optional (Qwen2)
  MatrixWeight<TW> gate, up, down;           // [ffn, d], [ffn, d], [d, ffn]
  std::vector<RecurrentGroupWeights<TW>> recurrent;  // one per recurrent group, in group order
};

template <class TW>
struct LlamaWeights {
  MatrixWeight<TW> embed;      // [vocab, d], gathered from its blocks when served
  MatrixWeight<TW> lm_head;    // [vocab, d] (the embedding when tied)
  View<const float, 1> final_norm;  // [d]
  std::vector<LlamaLayerWeights<TW>> layers;
  // Owned conversions (deque: element addresses are stable while it grows).
  std::deque<std::vector<float>> owned_f32;
  std::deque<std::vector<TW>> owned_tw;
};

/// Binds every tensor the config needs; throws naming the tensor on a missing one or a bad shape.
template <class TW, class Ckpt>
void bind_llama_weights(const Ckpt& ck, const ModelConfig& c, bool serve_blocks, ActivationMath x_math,
                        LlamaWeights<TW>& w) {
  auto get = [&](const std::string& name, std::initializer_list<int64_t> shape) -> const TensorRef& {
    RF_CHECK(ck.has(name), "model: tensor ", name, " is missing from the checkpoint");
    const TensorRef& t = ck.tensor(name);
    const std::vector<int64_t> want(shape);
    if (t.shape != want) {
      std::string ws = "[";
      for (size_t i = 0; i < want.size(); ++i) ws += (i ? ", " : "") + std::to_string(want[i]);
      fail("model: tensor ", name, " has shape ", t.shape_str(), ", expected ", ws, "]");
    }
    return t;
  };
  // A tensor's values and their dtype; a block-quantised one whose fp32 decoding the checkpoint
  // did not keep (CheckpointOptions::decode_quantised) is decoded here, into scratch.
  std::vector<float> scratch;
  auto values = [&](const TensorRef& t) -> std::pair<const void*, DType> {
    if (t.data || t.numel() == 0) return {t.data, t.dtype};
    scratch.resize(size_t(t.numel()));
    dequantize_row(t.quant, t.blocks, t.numel(), scratch.data());
    return {scratch.data(), DType::f32};
  };
  auto converted = [&](const TensorRef& t, int64_t n) -> const TW* {
    w.owned_tw.emplace_back(size_t(n));
    TW* dst = w.owned_tw.back().data();
    if constexpr (std::is_same_v<TW, float>) {
      if (!t.data && n > 0) {  // straight from the blocks: no scratch copy
        dequantize_row(t.quant, t.blocks, n, dst);
        return dst;
      }
    }
    const auto [src, dt] = values(t);
    convert_values(src, dt, n, dst);
    return dst;
  };
  auto mat = [&](const std::string& name, int64_t r, int64_t k) -> View<const TW, 2> {
    const TensorRef& t = get(name, {r, k});
    if (t.data && t.dtype == dtype_of<TW>()) return make_view(static_cast<const TW*>(t.data), {r, k});
    return make_view<const TW>(converted(t, r * k), {r, k});
  };
  // With `serve_blocks`, the projections, MLP and lm_head are served from a GGUF tensor's blocks
  // when it has them and the CPU linear has register kernels for their type, x meeting them as
  // x_math says; the embedding is gathered from its blocks whatever the type (a row decoding).
  auto matrix = [&](const std::string& name, int64_t r, int64_t k, bool gathered = false) -> MatrixWeight<TW> {
    MatrixWeight<TW> m;
    const TensorRef& t = get(name, {r, k});
    if (serve_blocks && t.blocks && (gathered || linear_blocks_are_fast(t.quant, x_math)))
      m.blocks = BlockWeight{t.blocks, t.quant, x_math};
    // Served from its blocks without an fp32 decoding: the dense view gives the shape only (linear
    // and embedding read the blocks; the pointer is the blocks', never dereferenced as TW).
    m.dense = m.blocks.present() && !t.data ? make_view(static_cast<const TW*>(t.blocks), {r, k}) : mat(name, r, k);
    return m;
  };
  auto vec_tw = [&](const std::string& name, int64_t n) -> View<const TW, 1> {
    return make_view<const TW>(converted(get(name, {n}), n), {n});
  };
  auto f32 = [&](const std::string& name, std::initializer_list<int64_t> shape) -> std::vector<float>& {
    const TensorRef& t = get(name, shape);
    const auto [src, dt] = values(t);
    w.owned_f32.emplace_back(size_t(t.numel()));
    convert_values(src, dt, t.numel(), w.owned_f32.back().data());
    return w.owned_f32.back();
  };
  auto vec = [&](const std::string& name, int64_t n) { return make_view<const float>(f32(name, {n}).data(), {n}); };

  const int64_t d = c.d_model, hd = c.head_dim, nq = c.n_q, nkv = c.n_kv, V = c.vocab_size;
  w.embed = matrix("model.embed_tokens.weight", V, d, true);
  w.lm_head = matrix(c.tie_word_embeddings || !ck.has("lm_head.weight") ? "model.embed_tokens.weight" : "lm_head.weight",
                     V, d);
  w.final_norm = vec("model.norm.weight", d);
  const HeadLayout layout = c.head_layout();
  w.layers.resize(size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LlamaLayerWeights<TW>& L = w.layers[size_t(l)];
    L.attn_norm = vec(p + "input_layernorm.weight", d);
    L.mlp_norm = vec(p + "post_attention_layernorm.weight", d);
    L.wq = matrix(p + "self_attn.q_proj.weight", nq * hd, d);
    L.wk = matrix(p + "self_attn.k_proj.weight", nkv * hd, d);
    L.wv = matrix(p + "self_attn.v_proj.weight", nkv * hd, d);
    L.wo = matrix(p + "self_attn.o_proj.weight", d, nq * hd);
    if (c.attention_bias) {
      L.bq = vec_tw(p + "self_attn.q_proj.bias", nq * hd);
      L.bk = vec_tw(p + "self_attn.k_proj.bias", nkv * hd);
      L.bv = vec_tw(p + "self_attn.v_proj.bias", nkv * hd);
    }
    L.gate = matrix(p + "mlp.gate_proj.weight", c.ffn, d);
    L.up = matrix(p + "mlp.up_proj.weight", c.ffn, d);
    L.down = matrix(p + "mlp.down_proj.weight", d, c.ffn);
    if (!c.recurformer) continue;
    const RecurrentConfig& rc = c.recurformer->recurrent;
    const int64_t r = rc.dt_rank, N = rc.d_state, Kc = rc.conv_kernel;
    for (int j : layout.layers[size_t(l)].state_groups()) {
      const std::string q = p + "self_attn.recurrent." + std::to_string(j) + ".";
      RecurrentGroupWeights<TW> g;
      g.dt_down = mat(q + "dt_down.weight", r, d);
      g.dt_up = mat(q + "dt_up.weight", hd, r);
      g.dt_bias = vec(q + "dt_bias", hd);
      std::vector<float>& A = f32(q + "A_log", {hd, N});
      for (float& a : A) a = -std::exp(a);
      g.A = make_view<const float>(A.data(), {hd, N});
      g.D = vec(q + "D", hd);
      g.conv_weight = make_view<const float>(f32(q + "conv1d.weight", {hd, Kc}).data(), {hd, Kc});
      g.conv_bias = vec(q + "conv1d.bias", hd);
      if (layout.layers[size_t(l)].groups[size_t(j)] == HeadKind::windowed) g.alpha = vec(q + "alpha", nq / nkv);
      L.recurrent.push_back(g);
    }
  }
}

/// x += y row by row (the residual adds of the forward, and the gradient sums of the backward).
inline void add_inplace(View<float, 2> x, View<const float, 2> y, CpuExec exec) {
  const int64_t n = x.shape[1];
  exec.parallel_for(x.shape[0], [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      float* a = x.ptr(r, 0);
      const float* c = y.ptr(r, 0);
      for (int64_t i = 0; i < n; ++i) a[i] += c[i];
    }
  });
}

}  // namespace detail
}  // namespace recurformer
