// src/model/perplexity.cpp: llama.cpp's perplexity protocol over any logits source, and the long-range
// probe's repeated token stream.
#include "recurformer/model/perplexity.hpp"

#include <algorithm>
#include <cmath>

namespace recurformer {

/// Runs the protocol. bos < 0: the tokenizer adds no BOS and the chunks are used as they are.
/// on_chunk(i, running_ppl) is called after each chunk (progress output).
PerplexityResult perplexity(const std::vector<int32_t>& tokens, int n_ctx, int64_t n_vocab,
                            int32_t bos, const ChunkLogitsFn& eval,
                            const std::function<void(int, double)>& on_chunk) {
  RF_CHECK(n_ctx >= 4, "perplexity: context size ", n_ctx, " is too small (need >= 4)");
  RF_CHECK(n_vocab >= 1, "perplexity: empty vocabulary");
  RF_CHECK(int64_t(tokens.size()) >= 2 * int64_t(n_ctx), "perplexity: the text has ", tokens.size(),
           " tokens; at least 2 * ctx-size = ", 2 * int64_t(n_ctx), " are needed");
  for (size_t i = 0; i < tokens.size(); ++i)
    RF_CHECK(tokens[i] >= 0 && tokens[i] < n_vocab, "perplexity: token id ", tokens[i], " at index ", i,
             " is outside the vocabulary of ", n_vocab);
  if (bos >= 0) RF_CHECK(bos < n_vocab, "perplexity: BOS id ", bos, " is outside the vocabulary of ", n_vocab);
  PerplexityResult r;
  r.n_chunks = int(int64_t(tokens.size()) / n_ctx);
  const int first = n_ctx / 2;
  std::vector<int32_t> chunk(static_cast<size_t>(n_ctx));
  std::vector<float> logits(size_t(n_ctx) * size_t(n_vocab));
  double nll = 0, nll2 = 0;
  for (int c = 0; c < r.n_chunks; ++c) {
    const int32_t* src = tokens.data() + int64_t(c) * n_ctx;
    chunk.assign(src, src + n_ctx);
    if (bos >= 0) chunk[0] = bos;
    eval(chunk.data(), n_ctx, logits.data());
    for (int j = first; j < n_ctx - 1; ++j) {
      const float* row = logits.data() + int64_t(j) * n_vocab;
      const int32_t next = src[j + 1];
      double mx = row[0];
      for (int64_t v = 1; v < n_vocab; ++v) mx = std::max(mx, double(row[v]));
      double z = 0;
      for (int64_t v = 0; v < n_vocab; ++v) z += std::exp(double(row[v]) - mx);
      const double l = -(double(row[next]) - mx - std::log(z));
      nll += l;
      nll2 += l * l;
      ++r.n_scored;
    }
    r.running_ppl.push_back(std::exp(nll / double(r.n_scored)));
    if (on_chunk) on_chunk(c, r.running_ppl.back());
  }
  r.mean_nll = nll / double(r.n_scored);
  r.ppl = std::exp(r.mean_nll);
  const double var = nll2 / double(r.n_scored) - r.mean_nll * r.mean_nll;
  r.ppl_error = var > 0 && r.n_scored > 1 ? std::sqrt(var / double(r.n_scored - 1)) * r.ppl : 0;
  return r;
}

/// The long-range probe's token stream: every block of n_ctx/2 tokens followed by itself, so each
/// chunk of the protocol is a passage and its verbatim copy and what it scores (positions n_ctx/2 ..
/// n_ctx-2) is exactly the copy. A model that can look n_ctx/2 tokens back predicts the copy almost
/// surely; one that cannot (a window, a state that forgets) scores it like new text. A tail shorter
/// than a block is dropped.
std::vector<int32_t> repeat_halves(const std::vector<int32_t>& tokens, int n_ctx) {
  RF_CHECK(n_ctx >= 4 && n_ctx % 2 == 0, "perplexity --repeat: the context size must be even and >= 4, got ", n_ctx);
  const size_t half = size_t(n_ctx / 2);
  std::vector<int32_t> out;
  out.reserve(tokens.size() / half * 2 * half);
  for (size_t b = 0; b + half <= tokens.size(); b += half)
    for (int copy = 0; copy < 2; ++copy) out.insert(out.end(), tokens.begin() + int64_t(b), tokens.begin() + int64_t(b + half));
  return out;
}

}  // namespace recurformer
