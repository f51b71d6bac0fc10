// fuzz/config_fuzz.cpp: libFuzzer target for ModelConfig (config.json + the recurformer object).
//
// The bytes are a config.json text. Parsing must succeed or throw recurformer::Error; a parsed
// config is written back (the whole config and config_json_with_recurformer) and must parse again
// to the same recurformer object, or the fuzzer aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "recurformer/model/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace recurformer;
  const std::string text(reinterpret_cast<const char*>(data), size);
  ModelConfig c;
  try {
    c = parse_model_config(text, "fuzz.json");
  } catch (const Error&) {
    return 0;
  }
  const ModelConfig again = parse_model_config(model_config_to_json(c), "written.json");
  if (again.n_layers != c.n_layers || again.n_kv != c.n_kv || again.head_dim != c.head_dim ||
      bool(again.recurformer) != bool(c.recurformer) || (c.recurformer && *again.recurformer != *c.recurformer))
    std::abort();
  const ModelConfig kept = parse_model_config(config_json_with_recurformer(text, c.recurformer), "kept.json");
  if (bool(kept.recurformer) != bool(c.recurformer) || (c.recurformer && *kept.recurformer != *c.recurformer))
    std::abort();
  return 0;
}
