// recurformer/model/finetune_train.hpp: the continual-training loop over a FinetuneModel
// (model/finetune.hpp): next-token cross-entropy (+ kl_weight * KL to a teacher), AdamW with warmup +
// cosine, global-norm clipping, gradient accumulation over micro-batches, checkpoints and resume.
//
// Data: the token stream is cut into sequences of `ctx` tokens; the last `holdout` fraction (at
// least one) is held out and its mean CE (and perplexity) reported before and after. Training draws
// sequences in an order that is a pure function of (seed, sample index): sample i of the run is
// position i % n of the permutation of epoch i / n, so a resumed run sees exactly what the
// uninterrupted one would have. With `repeat` > 0, that fraction of the samples (chosen by the same
// pure function) are recall practice: the sequence's first ctx - ctx/2 tokens followed by a verbatim
// copy of their first ctx/2, so the copy is predictable only by looking ctx - ctx/2 tokens back,
// beyond any window (the long-range probe's task, on training text; held-out sequences stay plain).
// Checkpoint (every save_every steps and at the end): the HF directory as distill writes it
// (model.safetensors with the trained tensors written back in their stored dtype, every other
// file of the student copied), plus optimizer.safetensors (the fp32 master values "theta" and the
// AdamW moments "m", "v") and trainer.json (step, schedule, what trains). Resuming loads the fp32
// master from optimizer.safetensors, not the rounded tensors, so a run split as k + (N - k) steps
// ends with the same bits as an uninterrupted one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "recurformer/core/exec.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/finetune.hpp"

namespace recurformer {

struct FinetuneOptions {
  int64_t ctx = 512;        ///< tokens per sequence
  int steps = 100;          ///< optimiser steps of the whole schedule
  int batch_seqs = 1;       ///< sequences per micro-batch
  int accum = 1;            ///< micro-batches per step
  float lr = 1e-4f;         ///< peak learning rate
  float weight_decay = 0.f; ///< decoupled, weight matrices only
  double warmup = 0.05;     ///< fraction of the steps
  double clip = 1.0;        ///< global gradient-norm clip (0: none)
  double holdout = 0.05;    ///< fraction of the sequences held out (at least one)
  FinetuneTrain train = FinetuneTrain::recurrent;
  float kl_weight = 0.f;    ///< > 0 needs a teacher
  int save_every = 0;       ///< checkpoint every N steps (0: only at the end)
  int stop_after = 0;       ///< > 0: stop (with a checkpoint) after this step, to be resumed later
  double repeat = 0;        ///< fraction of the training samples that are a passage and its copy (see the top)
  uint64_t seed = 1;
  /// After each step: (step, steps, loss, training tokens/s of this run, seconds left).
  std::function<void(int, int, double, double, double)> progress;
};

struct FinetuneResult {
  double heldout_before = 0, heldout_after = 0;  ///< mean CE on the held-out sequences
  double first_loss = 0, last_loss = 0;          ///< training loss of the first and last step of this run
  int start_step = 0, end_step = 0;              ///< this run's steps: (start, end]
  int64_t train_sequences = 0, heldout_sequences = 0, params = 0;
  double seconds = 0, tokens_per_second = 0;
};

const char* finetune_train_name(FinetuneTrain t);

/// Whether training sample i of a run seeded `seed` is a repeat sample (a pure function, so a resumed
/// run draws the same ones).
bool finetune_repeat_sample(uint64_t seed, int64_t i, double repeat);

/// Appends sample `seq` of `tokens` cut into sequences of ctx: the sequence itself, or as a repeat
/// sample its first ctx - ctx/2 tokens and then a copy of their first ctx/2 (ctx tokens either way).
void append_finetune_sample(const std::vector<int32_t>& tokens, int64_t seq, int64_t ctx, bool repeat,
                            std::vector<int32_t>& out);

/// Continual training of `student` (a HF directory; a RecurFormer or a plain model) on `tokens`,
/// written to `out_dir` (a non-empty one is refused unless `replace`, or unless it is `resume_dir`).
/// With `teacher` and o.kl_weight > 0 the loss adds kl_weight * KL(teacher || student). With
/// `resume_dir`, the run continues from the checkpoint there (same student, same trained set).
FinetuneResult finetune(std::shared_ptr<const Checkpoint> student, std::shared_ptr<const Checkpoint> teacher,
                        const std::vector<int32_t>& tokens, const FinetuneOptions& o, const std::string& out_dir,
                        bool replace, const std::string& resume_dir = "", CpuExec exec = {});

}  // namespace recurformer
