// src/model/llama.cpp: LlamaModel's implementation (see recurformer/model/llama.hpp).
//
// The weight dtype is a run-time property of the file; it becomes the template argument TW here,
// once, through dispatch_dtype (LlamaModel's constructor). The cache's storage type arrives as
// TC, the alternative held by a LlamaCacheRef and is visited once per call. Every op runs on the
// caller's exec; parallelism is inside the ops.
#include <algorithm>
#include <cstring>
#include <variant>

#include "recurformer/model/llama.hpp"
#include "recurformer/cpu/embedding.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/rmsnorm.hpp"
#include "recurformer/cpu/swiglu.hpp"
#include "recurformer/cpu/hybrid_head_attention.hpp"
#include "model/detail/llama_weights.hpp"
#include "recurformer/ops/rope.hpp"

namespace recurformer {
namespace detail {

/// The step's workspace: a caller's buffer (data, bytes), or a vector the forward grows to the need.
struct StepWorkspace {
  void* data = nullptr;
  size_t bytes = 0;
  std::vector<unsigned char>* grow = nullptr;
};

class LlamaImplBase {
 public:
  virtual ~LlamaImplBase() = default;
  virtual DType weight_dtype() const = 0;
  virtual int64_t matrix_bytes() const = 0;
  virtual size_t workspace_bytes(const LlamaBatch& b, LlamaCacheRef cache, LogitsRows rows, CpuExec exec) const = 0;
  virtual void forward(const LlamaBatch& b, LlamaCacheRef cache, View<float, 2> logits, LogitsRows rows, CpuExec exec,
                       StepWorkspace ws, const LayerInputHook& hook) const = 0;
};

/// Carves aligned float buffers out of the workspace (or only counts, when base is null).
struct WorkspaceCarver {
  unsigned char* base = nullptr;
  size_t used = 0;
  template <class E>
  E* take(int64_t n) {
    used = (used + 63) & ~size_t(63);
    E* p = base ? reinterpret_cast<E*>(base + used) : nullptr;
    used += size_t(n) * sizeof(E);
    return p;
  }
};

/// y = x W^T for a model matrix, from its blocks when it is served from them.
template <class TW>
void linear_weight(View<const float, 2> x, const MatrixWeight<TW>& w, View<float, 2> y, CpuExec exec, void* ws,
                   size_t ws_bytes) {
  linear(LinearParams<float, TW>{x, w.dense, {}, y}, w.blocks, exec, ws, ws_bytes);
}

template <class TW>
class LlamaImpl final : public LlamaImplBase {
 public:
  template <class Ckpt>
  LlamaImpl(const Ckpt& ck, const ModelConfig& c, const LlamaModelOptions& opt) : cfg_(c) {
    bind_llama_weights<TW>(ck, c, opt.serve_blocks, opt.activations, w_);
    inv_freq_ = ck.rope_inv_freq();  // the config's scaling, or a GGUF's rope_freqs.weight
  }
  DType weight_dtype() const override { return dtype_of<TW>(); }

  int64_t matrix_bytes() const override {
    auto dense = [](const View<const TW, 2>& v) { return v.shape[0] * v.shape[1] * int64_t(sizeof(TW)); };
    auto bytes = [&](const MatrixWeight<TW>& m) {
      if (!m.blocks.present()) return dense(m.dense);
      const GgmlTypeTraits tt = ggml_type_traits(m.blocks.type);
      return m.dense.shape[0] * m.dense.shape[1] / tt.block * tt.bytes;
    };
    int64_t total = bytes(w_.lm_head);
    for (const LlamaLayerWeights<TW>& L : w_.layers) {
      total += bytes(L.wq) + bytes(L.wk) + bytes(L.wv) + bytes(L.wo) + bytes(L.gate) + bytes(L.up) + bytes(L.down);
      for (const RecurrentGroupWeights<TW>& g : L.recurrent) total += dense(g.dt_down) + dense(g.dt_up);
    }
    return total;
  }

  size_t workspace_bytes(const LlamaBatch& b, LlamaCacheRef cache, LogitsRows rows, CpuExec exec) const override {
    return std::visit([&](auto* c) { return size_query(b, rows, *c, exec); }, cache);
  }

  void forward(const LlamaBatch& b, LlamaCacheRef cache, View<float, 2> logits, LogitsRows rows, CpuExec exec,
               StepWorkspace ws, const LayerInputHook& hook) const override {
    std::visit([&](auto* c) { run(b, *c, logits, rows, exec, ws, hook); }, cache);
  }

 private:
  template <class TC>
  void run(const LlamaBatch& b, HybridCache<TC>& cache, View<float, 2> logits, LogitsRows rows, CpuExec exec,
           StepWorkspace ws, const LayerInputHook& hook) const {
    const char* op = "model forward";
    check_batch(b, cache);
    const int64_t T = b.tokens.shape[0], S = b.slots.shape[0], V = cfg_.vocab_size, d = cfg_.d_model;
    const int64_t R = rows == LogitsRows::all ? T : S;
    detail::check_shape(op, "logits", logits, {R, V});
    detail::check_inner_contiguous(op, "logits", logits);
    for (int64_t t = 0; t < T; ++t)
      RF_CHECK(b.tokens(t) >= 0 && b.tokens(t) < V, op, ": token id ", b.tokens(t), " at ", t,
               " is outside the model's vocabulary [0, ", V, ")");
    counts_.resize(size_t(S));
    for (int64_t s = 0; s < S; ++s) counts_[size_t(s)] = b.cu_seqlens(s + 1) - b.cu_seqlens(s);
    const View<const int32_t, 1> counts = make_view<const int32_t>(counts_.data(), {S});
    cache.reserve(b.slots, counts);  // checks before anything is written; paged: the step's pages
    // One plan for the step (positions, key counts, slots: the same in every layer), made in the
    // workspace; every layer runs from it. A workspace that fits is planned into once; a short one
    // learns the whole need from that carve and is grown and planned into again, or refused.
    std::vector<unsigned char>* grow = ws.grow;
    RF_CHECK(ws.data || grow, op, ": workspace is null");
    Buffers buf;
    HybridStepPlan<TC, TW> plan;
    size_t ws_bytes = grow ? grow->size() : ws.bytes;
    size_t need = carve(b, rows, cache, exec, grow ? grow->data() : static_cast<unsigned char*>(ws.data), buf, plan,
                        ws_bytes);
    if (grow && ws_bytes < need) {
      grow->resize(need);
      ws_bytes = need;
      need = carve(b, rows, cache, exec, grow->data(), buf, plan, ws_bytes);
    }
    RF_CHECK(ws_bytes >= need, op, ": workspace of ", ws_bytes, " bytes, ", need, " needed");

    auto x = make_view(buf.x, {T, d});
    auto xn = make_view(buf.xn, {T, d});
    auto tmp = make_view(buf.tmp, {T, d});
    const int64_t F = cfg_.ffn;
    auto gate = make_view(buf.gate, {T, F});
    auto up = make_view(buf.up, {T, F});

    embedding(EmbeddingParams<float, TW>{w_.embed.dense, b.tokens, x}, w_.embed.blocks, exec);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const LlamaLayerWeights<TW>& L = w_.layers[size_t(l)];
      rmsnorm(RmsNormParams<float, float>{x, L.attn_norm, xn, cfg_.rms_eps}, exec);
      if (hook) hook(l, xn, b);
      hybrid_head_attention(layer_params(l, cache, xn, tmp), plan, exec, buf.layer_ws, buf.layer_ws_bytes);
      add_inplace(x, tmp, exec);
      rmsnorm(RmsNormParams<float, float>{x, L.mlp_norm, xn, cfg_.rms_eps}, exec);
      linear_weight(xn, L.gate, gate, exec, buf.lin_ws, buf.lin_ws_bytes);
      linear_weight(xn, L.up, up, exec, buf.lin_ws, buf.lin_ws_bytes);
      swiglu(SwigluParams<float>{gate, up, gate}, exec);
      linear_weight(gate, L.down, tmp, exec, buf.lin_ws, buf.lin_ws_bytes);
      add_inplace(x, tmp, exec);
    }
    cache.advance(b.slots, counts);
    // Final norm and lm_head on the rows asked for.
    View<float, 2> sel = xn;
    if (rows == LogitsRows::last) {
      sel = make_view(buf.sel, {S, d});
      for (int64_t s = 0; s < S; ++s)
        std::memcpy(sel.ptr(s, 0), x.ptr(b.cu_seqlens(s + 1) - 1, 0), size_t(d) * sizeof(float));
      rmsnorm(RmsNormParams<float, float>{sel, w_.final_norm, sel, cfg_.rms_eps}, exec);
    } else {
      rmsnorm(RmsNormParams<float, float>{x, w_.final_norm, xn, cfg_.rms_eps}, exec);
    }
    linear_weight(sel, w_.lm_head, logits, exec, buf.lin_ws, buf.lin_ws_bytes);
  }

  struct Buffers {
    float *x = nullptr, *xn = nullptr, *tmp = nullptr, *gate = nullptr, *up = nullptr, *sel = nullptr;
    void* layer_ws = nullptr;
    size_t layer_ws_bytes = 0;
    void* lin_ws = nullptr;
    size_t lin_ws_bytes = 0;
  };

  template <class TC>
  void check_batch(const LlamaBatch& b, const HybridCache<TC>& cache) const {
    const char* op = "model forward";
    detail::check_shape(op, "tokens", b.tokens, {-1});
    detail::check_shape(op, "cu_seqlens", b.cu_seqlens, {-1});
    const int64_t S = b.cu_seqlens.shape[0] - 1;
    RF_CHECK(S >= 1, op, ": cu_seqlens needs at least 2 entries");
    detail::check_shape(op, "slots", b.slots, {S});
    RF_CHECK(b.tokens.shape[0] >= 1, op, ": empty batch");
    RF_CHECK(b.cu_seqlens(0) == 0 && b.cu_seqlens(S) == b.tokens.shape[0], op,
             ": cu_seqlens must start at 0 and end at the token count ", b.tokens.shape[0]);
    for (int64_t s = 0; s < S; ++s)
      RF_CHECK(b.cu_seqlens(s + 1) > b.cu_seqlens(s), op, ": sequence ", s, " is empty (cu_seqlens must increase)");
    const HybridCacheConfig& cc = cache.config();
    RF_CHECK(cc.n_layers == cfg_.n_layers && cc.n_kv == cfg_.n_kv && cc.head_dim == cfg_.head_dim, op,
             ": the cache was made for another model shape");
  }

  template <class TC>
  HybridHeadAttentionParams<TC, TW> layer_params(int l, HybridCache<TC>& cache, View<const float, 2> x,
                                                View<float, 2> out) const {
    const LlamaLayerWeights<TW>& L = w_.layers[size_t(l)];
    HybridHeadAttentionParams<TC, TW> p;
    p.x = x;
    p.out = out;
    p.weights.wq = L.wq.dense, p.weights.wk = L.wk.dense, p.weights.wv = L.wv.dense, p.weights.wo = L.wo.dense;
    p.weights.wq_blocks = L.wq.blocks, p.weights.wk_blocks = L.wk.blocks;
    p.weights.wv_blocks = L.wv.blocks, p.weights.wo_blocks = L.wo.blocks;
    p.weights.bq = L.bq, p.weights.bk = L.bk, p.weights.bv = L.bv;
    p.weights.recurrent = L.recurrent.empty() ? nullptr : L.recurrent.data();
    p.weights.n_recurrent = int(L.recurrent.size());
    p.cache = &cache;
    p.layer = l;
    p.n_q = cfg_.n_q;
    p.inv_freq = make_view<const float>(inv_freq_.data(), {int64_t(inv_freq_.size())});
    p.rope_layout = cfg_.rope_layout;
    return p;
  }

  template <class TC>
  size_t size_query(const LlamaBatch& b, LogitsRows rows, const HybridCache<TC>& cache, CpuExec exec) const {
    Buffers buf;
    HybridStepPlan<TC, TW> plan;
    return carve(b, rows, cache, exec, nullptr, buf, plan);
  }

  // The widest dt_up of any recurrent or windowed group (the step plan sizes its scratch).
  int64_t max_dt_rank() const {
    int64_t r = 0;
    for (const LlamaLayerWeights<TW>& L : w_.layers)
      for (const RecurrentGroupWeights<TW>& g : L.recurrent) r = std::max(r, g.dt_up.shape[1]);
    return r;
  }

  // Lays the buffers out from `base` (or only sizes them when base is null) and plans the step,
  // its metadata in the workspace (a size query plans into a buffer of its own); returns the bytes
  // the step needs. With a base, the plan is made only when the buffers before it fit in `bytes`
  // (else the need comes from a size query).
  template <class TC>
  size_t carve(const LlamaBatch& b, LogitsRows rows, const HybridCache<TC>& cache, CpuExec exec, unsigned char* base,
               Buffers& buf, HybridStepPlan<TC, TW>& plan, size_t bytes = 0) const {
    const int64_t T = b.tokens.shape[0], S = b.slots.shape[0], d = cfg_.d_model, F = cfg_.ffn;
    WorkspaceCarver c{base, 0};
    buf.x = c.take<float>(T * d);
    buf.xn = c.take<float>(T * d);
    buf.tmp = c.take<float>(T * d);
    buf.gate = c.take<float>(T * F);
    buf.up = c.take<float>(T * F);
    buf.sel = c.take<float>(S * d);
    // Sizes of the inner ops' scratch: shapes only (a dummy non-null pointer satisfies the checks;
    // the queries never dereference it).
    static float dummy[1];
    auto shaped = [](int64_t r, int64_t k) { return make_view(dummy, {r, k}); };
    const HybridStepShape shape = hybrid_step_shape(cache, cfg_.n_q, max_dt_rank());
    HybridStep step = hybrid_step(cache, b.cu_seqlens, b.slots);
    if (!base && cache.paged()) {  // a size query, maybe before reserve(): sizes depend on shapes only
      any_pages_.assign(size_t(S * cache.pages_per_slot()), 0);  // grows to the largest step, then reused
      step.page_table = make_view(const_cast<const int32_t*>(any_pages_.data()), {S, cache.pages_per_slot()});
    }
    const size_t meta_bytes = hybrid_step_metadata_bytes(shape, step, T);
    unsigned char* meta = c.take<unsigned char>(int64_t(meta_bytes));
    std::vector<unsigned char> own_meta;
    if (!base) {
      own_meta.resize(meta_bytes);
      meta = own_meta.data();
    } else if (c.used > bytes) {
      return size_query(b, rows, cache, exec);  // too small for the metadata: the whole need
    }
    plan = plan_hybrid_step<TC, TW>(shape, step, T, exec, HybridPlanBuffers{meta, nullptr, meta_bytes});
    size_t layer_ws = 0, lin_ws = 0;
    auto& mc = const_cast<HybridCache<TC>&>(cache);  // the query only reads the lengths
    for (int l = 0; l < cfg_.n_layers; ++l)
      layer_ws = std::max(layer_ws, hybrid_head_attention_workspace_bytes(
                                        layer_params(l, mc, shaped(T, d), shaped(T, d)), plan, exec));
    const LlamaLayerWeights<TW>& L0 = w_.layers[0];
    const int64_t R = rows == LogitsRows::all ? T : S;
    for (auto q : {LinearParams<float, TW>{shaped(T, d), L0.gate.dense, {}, shaped(T, F)},
                   LinearParams<float, TW>{shaped(T, F), L0.down.dense, {}, shaped(T, d)},
                   LinearParams<float, TW>{shaped(R, d), w_.lm_head.dense, {}, shaped(R, cfg_.vocab_size)}})
      lin_ws = std::max(lin_ws, linear_workspace_bytes(q, exec));
    buf.layer_ws = c.take<unsigned char>(int64_t(layer_ws));
    buf.layer_ws_bytes = layer_ws;
    buf.lin_ws = c.take<unsigned char>(int64_t(lin_ws));
    buf.lin_ws_bytes = lin_ws;
    return c.used + 64;
  }

  ModelConfig cfg_;
  LlamaWeights<TW> w_;
  std::vector<float> inv_freq_;
  mutable std::vector<int32_t> counts_;
  mutable std::vector<int32_t> any_pages_;  // a size query's stand-in page table (any page in the pool)
};

}  // namespace detail

LlamaModel::LlamaModel(std::shared_ptr<const Checkpoint> checkpoint, const LlamaModelOptions& options)
    : ckpt_(std::move(checkpoint)) {
  RF_CHECK(ckpt_, "LlamaModel: null checkpoint");
  const ModelConfig& c = ckpt_->config();
  RF_CHECK(c.n_layers >= 1, "LlamaModel: the model has no layers");
  const std::string q0 = "model.layers.0.self_attn.q_proj.weight";
  RF_CHECK(ckpt_->has(q0), "model: tensor ", q0, " is missing from the checkpoint");
  dispatch_dtype("model weights", ckpt_->tensor(q0).dtype, [&](auto tag) {
    using TW = typename decltype(tag)::type;
    impl_ = std::make_shared<detail::LlamaImpl<TW>>(*ckpt_, c, options);
  });
}

LlamaModel LlamaModel::open(const std::string& path, const LlamaModelOptions& options) {
  return LlamaModel(std::make_shared<const Checkpoint>(Checkpoint::open(path)), options);
}

const ModelConfig& LlamaModel::config() const { return ckpt_->config(); }
DType LlamaModel::weight_dtype() const { return impl_->weight_dtype(); }
int64_t LlamaModel::matrix_bytes() const { return impl_->matrix_bytes(); }

HybridCacheConfig LlamaModel::cache_config(int slots, int64_t capacity, int64_t page_size) const {
  const ModelConfig& c = config();
  HybridCacheConfig cc;
  cc.n_layers = c.n_layers;
  cc.n_kv = c.n_kv;
  cc.head_dim = c.head_dim;
  cc.layout = c.head_layout();
  if (c.recurformer) {
    cc.recurrent = c.recurformer->recurrent;
    cc.streaming = c.recurformer->streaming;
  }
  cc.slots = slots;
  cc.capacity = capacity;
  cc.page_size = page_size;
  return cc;
}

size_t LlamaModel::forward_workspace_bytes(const LlamaBatch& batch, LlamaCacheRef cache, LogitsRows rows,
                                                  CpuExec exec) const {
  return impl_->workspace_bytes(batch, cache, rows, exec);
}

void LlamaModel::forward(const LlamaBatch& batch, LlamaCacheRef cache, View<float, 2> logits, LogitsRows rows,
                                CpuExec exec, void* workspace, size_t workspace_bytes,
                                const LayerInputHook& hook) const {
  impl_->forward(batch, cache, logits, rows, exec, detail::StepWorkspace{workspace, workspace_bytes, nullptr}, hook);
}

void LlamaModel::forward(const LlamaBatch& batch, LlamaCacheRef cache, View<float, 2> logits, LogitsRows rows,
                         CpuExec exec, std::vector<unsigned char>& workspace, const LayerInputHook& hook) const {
  impl_->forward(batch, cache, logits, rows, exec, detail::StepWorkspace{nullptr, 0, &workspace}, hook);
}

}  // namespace recurformer
