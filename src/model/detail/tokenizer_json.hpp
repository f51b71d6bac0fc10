// src/model/detail/tokenizer_json.hpp (private to recurformer::model): the tokenizer.json skeleton
// that every byte-level BPE writer shares (the GGUF export and the random model's vocabulary).
#pragma once

#include <nlohmann/json.hpp>

namespace recurformer {
namespace detail {

/// A Hugging Face tokenizer.json for byte-level BPE: no normalizer, the ByteLevel decoder and the
/// BPE model, with the parts that differ between writers given by the caller. Keys are in the
/// order `tokenizers` writes them, so the files diff cleanly against its own.
nlohmann::ordered_json byte_level_bpe_tokenizer_json(nlohmann::ordered_json added_tokens,
                                                     nlohmann::ordered_json pre_tokenizer,
                                                     nlohmann::ordered_json post_processor,
                                                     nlohmann::ordered_json vocab,
                                                     nlohmann::ordered_json merges, bool ignore_merges);

}  // namespace detail
}  // namespace recurformer
