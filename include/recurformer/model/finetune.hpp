// recurformer/model/finetune.hpp: the training forward and backward of a whole Llama / RecurFormer
// over packed sequences (no cache), for continual training of a converted checkpoint with next-token
// cross-entropy and an optional KL to the original model (model/finetune_train.hpp is the trainer).
//
// The forward computes what LlamaModel::forward computes for the checkpoint when every sequence starts
// at position 0 (src/model/llama.cpp, layers/detail/hybrid_head_attention_run.hpp):
//   x = embed(tokens)
//   per layer: xn = rmsnorm(x);  q, k, v = xn Wq^T (+b), ...
//     attention group j:  RoPE(q_j), RoPE(k_j), causal softmax attention
//     streaming group j:  the same with the sink/window mask
//     recurrent group j:  u = conv(v_j), Δ = dt_up (dt_down xn), scan(u, Δ, A = -exp(A_log),
//                         B = k_j, C = q_j / sqrt(hd), D, dt_bias)          (before RoPE; spec section 3)
//     windowed group j:   the streaming group's output + alpha_h x the recurrent group's output y_h
//     x += Wo concat(heads);  x += down(swiglu(gate(h), up(h))), h = rmsnorm(x)
//   h_final = rmsnorm(x);  loss = cross_entropy(h_final, lm_head, next tokens [, teacher])
// Memory: only each layer's input x is kept during the forward ([T, d] per layer); the backward
// recomputes one layer's forward from its input, then runs that layer's backward (activation
// checkpointing per layer: one more forward, ~1/3 more work, for layer buffers that exist once
// instead of n_layers times; at SmolLM2's shape and 512 tokens a layer's activations are ~20 MB).
//
// Parameters: what trains is a set of row ranges of checkpoint tensors (FinetuneParam), laid out in
// one flat fp32 master buffer (theta) that the optimiser updates (train/adamw.hpp); the gradient has
// the same layout and is accumulated into (+=), so micro-batches add up. FinetuneTrain::recurrent
// trains the converted groups: the recurrent and windowed groups' tensors (alpha included) and the
// own rows of Wq/Wk/Wv (and biases) of every recurrent, windowed and streaming group;
// ::all trains every tensor; ::none is a frozen model (the teacher). A tensor any row of which trains
// is held in fp32 (its frozen rows converted exactly); the others are used as stored (TW, the
// dtype of layer 0's q_proj, as LlamaModel does). Weight gradients are computed only for trained
// rows (linear_backward on the row range, its dy a column view).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "recurformer/core/exec.hpp"
#include "recurformer/core/view.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/config.hpp"
#include "recurformer/ops/cross_entropy.hpp"

namespace recurformer {

/// What trains.
enum class FinetuneTrain : uint8_t {
  none,       ///< nothing (a frozen model: the teacher)
  recurrent,  ///< the converted groups: recurrent and windowed tensors, and every converted group's
              ///< own rows of Wq/Wk/Wv (+ biases), streaming groups' included
  all,        ///< every tensor
};

/// Rows [row0, row0 + rows) of the checkpoint tensor `name` ([*, cols]; a vector has cols = 1),
/// at `offset` in the flat parameter buffer.
struct FinetuneParam {
  std::string name;
  int64_t row0 = 0, rows = 0, cols = 1, offset = 0;
  bool matrix = false;  ///< a weight matrix (weight decay applies), not a vector
};

/// A batch of packed sequences, each from position 0.
struct FinetuneBatch {
  View<const int32_t, 1> tokens;      // [T]
  View<const int32_t, 1> cu_seqlens;  // [S+1] sequence s = tokens [cu[s], cu[s+1])
};

namespace detail {
class FinetuneImplBase;
}  // namespace detail

/// The training view of a checkpoint (see the top of this file). The checkpoint must outlive it.
class FinetuneModel {
 public:
  FinetuneModel(std::shared_ptr<const Checkpoint> ck, FinetuneTrain train);
  ~FinetuneModel();
  FinetuneModel(FinetuneModel&&) noexcept;
  FinetuneModel& operator=(FinetuneModel&&) noexcept;
  const Checkpoint& checkpoint() const { return *ck_; }
  const ModelConfig& config() const { return ck_->config(); }
  /// The trained row ranges, in flat-buffer order.
  const std::vector<FinetuneParam>& params() const;
  int64_t num_params() const;
  /// The fp32 master copy of the trained values; after changing it, call sync().
  std::vector<float>& theta();
  void sync();

  /// Final hidden states (after the final norm) [T, d] of the batch.
  void hidden(const FinetuneBatch& b, View<float, 2> h, CpuExec exec = {});
  /// Logits of every token [T, vocab] (what LlamaModel::forward writes with LogitsRows::all).
  void logits(const FinetuneBatch& b, View<float, 2> out, CpuExec exec = {});
  /// The teacher's lm_head for the KL term (converted once to the student's lm_head type).
  void set_teacher_head(const TensorRef& lm_head);
  /// Mean CE over the counted targets (+ kl_weight * KL when teacher_h is given); with grad (the
  /// flat layout, num_params values), adds d(grad_scale * loss)/d(theta) into it.
  CrossEntropyResult loss(const FinetuneBatch& b, View<const int32_t, 1> targets, std::vector<float>* grad = nullptr,
                          float grad_scale = 1.f, CpuExec exec = {}, View<const float, 2> teacher_h = {},
                          float kl_weight = 0.f);

 private:
  std::shared_ptr<const Checkpoint> ck_;
  std::unique_ptr<detail::FinetuneImplBase> impl_;
};

/// The teacher's lm_head tensor (the embedding when tied).
const TensorRef& finetune_lm_head(const Checkpoint& ck);

/// Next-token targets of packed sequences: targets[t] = tokens[t + 1] inside a sequence, -1 at its end.
void next_token_targets(const FinetuneBatch& b, std::vector<int32_t>& targets);

}  // namespace recurformer
