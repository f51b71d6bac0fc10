// examples/runner_args.hpp: the runner's command line (llama.cpp-style flags) and help texts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace runner {

struct Args {
  std::string command;              // generate, calibrate, convert, perplexity, bench; "" = main job
  std::string model, prompt, file, out, scores, device = "cpu", init = "default";
  int n_predict = 64;
  int64_t ctx = 4096;
  bool ctx_set = false;
  int threads = 0;
  float temp = 0.8f, top_p = 0.95f;
  int top_k = 40;
  uint64_t seed = 0x5eed;
  int window = 16;
  double ratio = -1, threshold = -1;
  int min_attention_per_layer = 0;
  int dt_rank = 8;
  std::string kind = "recurrent";   // convert: what the selected groups become (recurrent | streaming | windowed)
  int sink = 4, stream_window = 0;  // convert --kind streaming|windowed: ring of sink + window (0 = same bytes as a state)
  int batch = 256;                  // prefill chunk
  std::vector<int64_t> contexts;    // bench -c list
  int n_decode = 32;                // bench decode tokens (-n sets it too; its own default)
  std::string dtype;                // convert: weight dtype of the written tensors ("" = as read)
  std::string cache_type = "f32";   // storage of K, V and conv states (llama.cpp's -ctk/-ctv)
  int64_t memory_limit_mib = 0;     // the most a cache may take; 0 = the machine's available memory
  int64_t page_size = 0;            // paged K/V: tokens per page; 0 = one contiguous block per sequence
  bool offline = false;             // main job: do not download SmolLM2
  bool dense_weights = false;       // multiply by a quantised GGUF's fp32 decoding, not its blocks
  bool fp32_activations = false;    // blocks meet fp32 x, not x quantised to 8 bits
  bool force = false;               // convert: replace a non-empty output directory
  bool help = false;
  bool chat = false;                // generate --chat: the prompt is a user turn (runner_chat.hpp)
  std::string system, chat_template;  // --chat: system message, template family override
  bool repeat = false;              // perplexity: the long-range probe (each half-chunk followed by its copy)
  std::string teacher;              // distill: the original model
  int steps = 100;                  // distill: optimiser steps per group
  int batch_seqs = 4;               // distill: sequences per step
  float lr = 3e-2f, lr_proj = 1e-2f;  // distill: peak learning rates (recurrent tensors, q/k/v rows)
  bool lr_set = false, batch_seqs_set = false;  // finetune: its own defaults when not given
  float kl = 0.f;                   // finetune: weight of KL(teacher || student)
  int accum = 1;                    // finetune: micro-batches per step
  std::string train = "recurrent";  // finetune: what trains (recurrent | all)
  int save_every = 0;               // finetune: checkpoint every N steps
  double repeat_fraction = 0;       // finetune: fraction of samples that are a passage and its copy
  std::string resume;               // finetune: continue from this checkpoint
};

/// The help text of a command (`recurformer COMMAND --help`); the main help for "" or an unknown one.
std::string command_help(const std::string& cmd);

/// Parses the command line (argv[1] may be a command); throws recurformer::Error on a bad flag or value.
Args parse_args(int argc, char** argv);

}  // namespace runner
