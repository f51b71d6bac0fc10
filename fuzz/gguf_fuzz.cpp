// fuzz/gguf_fuzz.cpp: libFuzzer target for the GGUF reader and what Checkpoint builds on it.
//
// Input byte 0 picks the shape of the file: odd: the bytes are the whole file; even: a valid
// "GGUF" v3 prefix is put before the rest, so the fuzzer starts at the counts. A parsed file also
// goes through model_config_from_gguf, tokenizer_data, the HF name mapping and (for every quantised
// type) the block decoders, and every tensor's bytes are read, so ASan catches a validation gap. Only
// recurformer::Error may escape the parser.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "recurformer/model/checkpoint.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace recurformer;
  if (size == 0) return 0;
  std::vector<uint8_t> file;
  if (data[0] & 1) {
    file.assign(data + 1, data + size);
  } else {
    file = {'G', 'G', 'U', 'F', 3, 0, 0, 0};
    file.insert(file.end(), data + 1, data + size);
  }
  try {
    const GgufFile g = GgufFile::parse({file.data(), file.size()}, "fuzz.gguf");
    unsigned sum = 0;
    for (const auto& t : g.tensors()) {
      sum += unsigned(detail::hf_name_from_gguf(t.name).size());
      if (is_quantized(t.type) && t.numel() <= (int64_t(1) << 20)) {
        std::vector<float> out(size_t(t.numel()));
        dequantize_row(t.type, t.data, t.numel(), out.data());
        sum += unsigned(out.empty() ? 0 : out.back() != 0);
      } else {
        for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
      }
    }
    try {
      sum += unsigned(model_config_from_gguf(g).n_layers);
    } catch (const Error&) {
    }
    try {
      sum += unsigned(g.tokenizer_data().tokens.size());
    } catch (const Error&) {
    }
    volatile unsigned sink = sum;
    (void)sink;
  } catch (const Error&) {
  }
  return 0;
}
