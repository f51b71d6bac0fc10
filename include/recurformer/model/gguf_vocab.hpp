// recurformer/model/gguf_vocab.hpp: the tokenizer metadata of a GGUF file as plain data, shared by
// the GGUF reader (which fills it) and the tokenizer (which builds from it), so neither header
// needs the other.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace recurformer {

/// The tokenizer metadata of a GGUF file (tokenizer.ggml.*), as plain data. The loader fills it;
/// tests build one by hand.
struct GgufVocab {
  std::string model;                // tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
  std::string pre;                  // tokenizer.ggml.pre: "llama-bpe" (Llama 3), "smollm", "qwen2",
                                    // "default" / "gpt2" / "" (GPT-2 regex)
  std::vector<std::string> tokens;  // [vocab] tokenizer.ggml.tokens (byte-level: GPT-2 unicode form)
  std::vector<float> scores;        // [vocab] tokenizer.ggml.scores ("llama": merge priority; may be empty for gpt2)
  std::vector<int32_t> token_types; // [vocab] tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control,
                                    // 4 user defined, 5 unused, 6 byte (empty: all normal)
  std::vector<std::string> merges;  // tokenizer.ggml.merges, "a b" ("gpt2" only)
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;
  bool add_bos = false, add_eos = false;
  bool add_space_prefix = true;     // tokenizer.ggml.add_space_prefix ("llama" only)
};

}  // namespace recurformer
