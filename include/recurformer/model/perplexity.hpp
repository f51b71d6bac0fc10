// recurformer/model/perplexity.hpp: llama.cpp's perplexity protocol, over any logits source.
//
// Protocol (llama.cpp examples/perplexity, "ppl" mode), so figures compare with its output:
// the whole text is tokenized once (with BOS when the tokenizer adds it); it is cut into
// floor(n_tokens / n_ctx) chunks of n_ctx tokens, each evaluated from an empty cache with its first
// token replaced by BOS (when BOS is added); in each chunk the logits at positions
// n_ctx/2 .. n_ctx-2 are scored against the next token. At least 2 * n_ctx tokens are needed.
// PPL = exp(mean NLL); its +/- is the standard error of the mean NLL times PPL.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "recurformer/core/error.hpp"

namespace recurformer {

/// Evaluates one fresh sequence: fills logits [n, n_vocab] row-major for tokens [n].
using ChunkLogitsFn = std::function<void(const int32_t* tokens, int n, float* logits)>;

struct PerplexityResult {
  double ppl = 0;         ///< exp(mean NLL)
  double ppl_error = 0;   ///< standard error of the mean NLL times ppl
  double mean_nll = 0;
  int64_t n_scored = 0;   ///< scored predictions
  int n_chunks = 0;
  std::vector<double> running_ppl;  ///< after each chunk, as llama.cpp prints them
};

/// Runs the protocol. bos < 0: the tokenizer adds no BOS and the chunks are used as they are.
/// on_chunk(i, running_ppl) is called after each chunk (progress output).
PerplexityResult perplexity(const std::vector<int32_t>& tokens, int n_ctx, int64_t n_vocab,
                            int32_t bos, const ChunkLogitsFn& eval,
                            const std::function<void(int, double)>& on_chunk = {});

/// The long-range probe's token stream: every block of n_ctx/2 tokens followed by itself, so each
/// chunk of the protocol is a passage and its verbatim copy and what it scores (positions n_ctx/2 ..
/// n_ctx-2) is exactly the copy. A model that can look n_ctx/2 tokens back predicts the copy almost
/// surely; one that cannot (a window, a state that forgets) scores it like new text. A tail shorter
/// than a block is dropped.
std::vector<int32_t> repeat_halves(const std::vector<int32_t>& tokens, int n_ctx);

}  // namespace recurformer
