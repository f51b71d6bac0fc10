// A downstream program over the compiled recurformer::model library: it writes the library's seeded
// random Llama to a directory, loads it and its tokenizer, and greedily continues a prompt. It
// checks linking and the model API as a user sees them, not the numbers (the tests do that).
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include <recurformer/model/llama.hpp>
#include <recurformer/model/random_model.hpp>
#include <recurformer/model/tokenizer.hpp>

int main(int argc, char** argv) try {
  using namespace recurformer;
  const std::string dir = argc > 1 ? argv[1] : "consumer-model";
  RandomModelSpec spec;  // d_model 256, 4 query / 2 KV heads of 64
  spec.n_layers = 2;
  write_random_model(dir, spec);

  const Tokenizer tok = Tokenizer::from_hf(dir);
  const LlamaModel model = LlamaModel::open(dir);
  LlamaSession session(model, /*slots=*/1, /*capacity=*/64, CpuExec{});
  const std::vector<int32_t> prompt = tok.encode("the cat sat on the");
  std::vector<float> logits = session.prefill(0, prompt.data(), int64_t(prompt.size()));
  std::vector<int32_t> out;
  for (int i = 0; i < 8; ++i) {
    int32_t next = 0;
    for (int32_t v = 1; v < int32_t(logits.size()); ++v) next = logits[size_t(v)] > logits[size_t(next)] ? v : next;
    out.push_back(next);
    logits = session.decode(0, next);
  }
  std::printf("%d layers, %zu prompt tokens -> \"%s\"\n", model.config().n_layers, prompt.size(),
              tok.decode(out).c_str());
  return out.size() == 8 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "model_example: %s\n", e.what());
  return 1;
}
