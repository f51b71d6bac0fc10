// recurformer/model/llama.hpp: the Llama / RecurFormer forward pass over a Checkpoint.
//
//   x = embed(tokens)
//   per layer: x += HybridHeadAttention(rmsnorm(x))      (any head layout, reads/appends the cache)
//              x += down(swiglu(gate(h), up(h))),  h = rmsnorm(x)
//   logits = lm_head(rmsnorm(x))  for the last token of each sequence (decode) or every token
//
// Activations are fp32; weights are used as stored (f32, f16 or bf16; TW below, dispatched once
// when the model is opened; the MLP and lm_head of a block-quantised GGUF in their blocks). The cache's storage type is the caller's choice, like llama.cpp's
// -ctk/-ctv: K, V and conv states in float, half or bfloat16 (HybridCache<T>; the SSM state is fp32
// whatever T), one model serving all three. A batch is
// a set of packed sequences, each with its own cache slot (continuous batching): a prefill chunk,
// a decode step of many slots, or a mix. The caller owns the workspace (forward_workspace_bytes);
// LlamaSession below keeps one and only grows it, so steady-state decode allocates nothing.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "recurformer/cache/hybrid_cache.hpp"
#include "recurformer/core/dispatch.hpp"
#include "recurformer/core/exec.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/ops/linear.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/config.hpp"

namespace recurformer {

/// The cache a LlamaModel reads and appends: K/V and conv states in T (float, half, bfloat16).
using LlamaCache = HybridCache<float>;

/// A batch of packed sequences.
struct LlamaBatch {
  View<const int32_t, 1> tokens;      // [T] token ids, sequence s = [cu[s], cu[s+1])
  View<const int32_t, 1> cu_seqlens;  // [S+1]
  View<const int32_t, 1> slots;       // [S] cache slot of each sequence (distinct)
};

/// Which rows of logits forward() writes.
enum class LogitsRows : uint8_t {
  last,  ///< [S, vocab]: the last token of each sequence (generation)
  all,   ///< [T, vocab]: every token (perplexity, tests)
};

/// Called once per layer with the RMS-normalised input of its attention block ([T, d_model]), before
/// the layer runs: calibration computes q and k from it.
using LayerInputHook = std::function<void(int layer, View<const float, 2> x_normed, const LlamaBatch& batch)>;

namespace detail {
class LlamaImplBase;
}

/// The cache storage types a LlamaModel serves (the one place a cache type is dispatched from a
/// run-time value is the runner's --cache-type; the model takes any of these).
using LlamaCacheRef = std::variant<HybridCache<float>*, HybridCache<half>*, HybridCache<bfloat16>*>;

/// How a LlamaModel binds its weights.
struct LlamaModelOptions {
  /// Multiply by the projections, MLP and lm_head of a block-quantised GGUF in their blocks, reading
  /// 4.5-8.5 bits per weight per token, rather than by their fp32 decoding (32 bits), for the
  /// types the CPU linear has register kernels for (Q4_0, Q4_1, Q8_0; with int8 activations every
  /// GGUF block type; the others use the decoding). The same weights either way; with fp32
  /// activations only the summation order differs (~1e-6 relative).
  bool serve_blocks = true;
  /// How x meets the blocks served: int8 (the default, llama.cpp's way) quantises x to 8 bits per
  /// 32 values in decode steps (the GEMV of every block type; prefill keeps fp32 x) for integer dot
  /// products, 1.26-1.54x faster per matrix here (docs/benchmarks.md) and off by x's rounding; fp32
  /// keeps the exact products.
  ActivationMath activations = ActivationMath::int8;
};

class LlamaModel {
 public:
  /// Opens a HF directory or a .gguf file (Checkpoint::open) and binds its weights.
  static LlamaModel open(const std::string& path, const LlamaModelOptions& options = {});
  /// Binds the weights of an opened checkpoint, which the model keeps alive.
  explicit LlamaModel(std::shared_ptr<const Checkpoint> checkpoint, const LlamaModelOptions& options = {});

  const ModelConfig& config() const;
  const Checkpoint& checkpoint() const { return *ckpt_; }
  DType weight_dtype() const;
  /// Bytes of the matrices one decode step reads, each once (projections, MLP, lm_head; as served:
  /// blocks or dense): the memory traffic that bounds decode speed at short context.
  int64_t matrix_bytes() const;
  /// The head layout served (all attention for a plain Llama).
  HeadLayout head_layout() const { return config().head_layout(); }

  /// A cache config for `slots` sequences of up to `capacity` tokens each; page_size > 0 pages the
  /// attention groups' K/V (a pool for every slot's capacity: set kv_pages for a smaller one).
  HybridCacheConfig cache_config(int slots, int64_t capacity, int64_t page_size = 0) const;
  /// A cache with K, V and conv states stored in T (float, half or bfloat16).
  template <class T = float>
  HybridCache<T> make_cache(int slots, int64_t capacity, int64_t page_size = 0) const {
    return HybridCache<T>(cache_config(slots, capacity, page_size));
  }

  /// Workspace forward() needs for this batch at the cache's current lengths.
  template <class T>
  size_t forward_workspace_bytes(const LlamaBatch& batch, const HybridCache<T>& cache, LogitsRows rows,
                                 CpuExec exec) const {
    return forward_workspace_bytes(batch, LlamaCacheRef(const_cast<HybridCache<T>*>(&cache)), rows, exec);
  }

  /// Runs the batch, appends it to the cache (it reserves the step, all layers write, then the
  /// slots' lengths advance) and writes logits [S or T, vocab]. Throws before changing anything when
  /// a slot would overflow, the page pool is short, a token id is out of range or the batch is
  /// malformed (pages a failing call reserved stay with their slots: HybridCache::reserve).
  template <class T>
  void forward(const LlamaBatch& batch, HybridCache<T>& cache, View<float, 2> logits, LogitsRows rows,
               CpuExec exec, void* workspace, size_t workspace_bytes, const LayerInputHook& hook = {}) const {
    forward(batch, LlamaCacheRef(&cache), logits, rows, exec, workspace, workspace_bytes, hook);
  }
  /// forward() into a workspace it grows to the step's need (never shrinks). A step whose
  /// workspace already fits is planned once; the size query above plans too, so a caller that
  /// sizes before every step plans twice.
  template <class T>
  void forward(const LlamaBatch& batch, HybridCache<T>& cache, View<float, 2> logits, LogitsRows rows,
               CpuExec exec, std::vector<unsigned char>& workspace, const LayerInputHook& hook = {}) const {
    forward(batch, LlamaCacheRef(&cache), logits, rows, exec, workspace, hook);
  }
  // The same over a cache of any served type (the size query only reads the cache).
  size_t forward_workspace_bytes(const LlamaBatch& batch, LlamaCacheRef cache, LogitsRows rows, CpuExec exec) const;
  void forward(const LlamaBatch& batch, LlamaCacheRef cache, View<float, 2> logits, LogitsRows rows, CpuExec exec,
               void* workspace, size_t workspace_bytes, const LayerInputHook& hook = {}) const;
  void forward(const LlamaBatch& batch, LlamaCacheRef cache, View<float, 2> logits, LogitsRows rows, CpuExec exec,
               std::vector<unsigned char>& workspace, const LayerInputHook& hook = {}) const;

 private:
  std::shared_ptr<const Checkpoint> ckpt_;
  std::shared_ptr<const detail::LlamaImplBase> impl_;
};

/// A model, a cache (storage type T) and a workspace: the convenient way to run sequences.
template <class T>
class BasicLlamaSession {
 public:
  /// `chunk`: the most tokens one forward pass takes (longer prompts are prefilled in chunks);
  /// page_size > 0: paged K/V (HybridCacheConfig::page_size), so cache().copy() shares pages.
  BasicLlamaSession(const LlamaModel& model, int slots, int64_t capacity, CpuExec exec, int64_t chunk = 256,
                    int64_t page_size = 0)
      : model_(&model), cache_(model.make_cache<T>(slots, capacity, page_size)), exec_(exec), chunk_(chunk) {
    RF_CHECK(chunk >= 1, "LlamaSession: chunk must be >= 1");
  }
  const LlamaModel& model() const { return *model_; }
  HybridCache<T>& cache() { return cache_; }
  int64_t vocab() const { return model_->config().vocab_size; }

  /// Feeds tokens to one slot (appending to what it holds), in chunks; returns the logits of the
  /// last token [vocab] (valid until the next call). all_logits: every token's row, [n, vocab].
  const std::vector<float>& prefill(int slot, const int32_t* tokens, int64_t n, std::vector<float>* all_logits = nullptr,
                                    const LayerInputHook& hook = {}) {
    RF_CHECK(n >= 1, "prefill: no tokens");
    RF_CHECK(cache_.length(slot) + n <= cache_.capacity(), "prefill: ", n, " tokens do not fit in slot ", slot,
             " (holds ", cache_.length(slot), " of ", cache_.capacity(), " tokens; raise the context size)");
    if (all_logits) all_logits->resize(size_t(n * vocab()));
    for (int64_t b = 0; b < n; b += chunk_) {
      const int64_t m = std::min(chunk_, n - b);
      const int32_t cu[2] = {0, int32_t(m)}, sl[1] = {slot};
      LlamaBatch batch{make_view(tokens + b, {m}), make_view(cu, {2}), make_view(sl, {1})};
      const LogitsRows rows = all_logits ? LogitsRows::all : LogitsRows::last;
      float* out = all_logits ? all_logits->data() + b * vocab() : nullptr;
      run(batch, rows, rows == LogitsRows::all ? m : 1, out, hook);
    }
    return last_;
  }
  /// One decode step: token[i] appended to slots[i]; returns logits [n, vocab].
  const std::vector<float>& decode(const int32_t* slots, const int32_t* tokens, int n) {
    cu_.resize(size_t(n) + 1);
    for (int i = 0; i <= n; ++i) cu_[size_t(i)] = i;
    LlamaBatch batch{make_view(tokens, {int64_t(n)}), make_view<const int32_t>(cu_.data(), {int64_t(n) + 1}),
                     make_view(slots, {int64_t(n)})};
    run(batch, LogitsRows::last, n, nullptr, {});
    return last_;
  }
  const std::vector<float>& decode(int slot, int32_t token) { return decode(&slot, &token, 1); }

 private:
  void run(const LlamaBatch& batch, LogitsRows rows, int64_t n_rows, float* out, const LayerInputHook& hook) {
    float* dst = out;
    if (!dst) {
      last_.resize(size_t(n_rows * vocab()));
      dst = last_.data();
    }
    model_->forward(batch, cache_, make_view(dst, {n_rows, vocab()}), rows, exec_, ws_, hook);  // planned once
    if (out) last_.assign(out + (n_rows - 1) * vocab(), out + n_rows * vocab());
  }

  const LlamaModel* model_;
  HybridCache<T> cache_;
  CpuExec exec_;
  int64_t chunk_;
  std::vector<unsigned char> ws_;
  std::vector<float> last_;
  std::vector<int32_t> cu_;
};

/// The session with an fp32 cache.
using LlamaSession = BasicLlamaSession<float>;

}  // namespace recurformer
