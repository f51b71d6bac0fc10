// Tokenizer throughput: encode (and decode) of ~300 KB of mixed text (English prose, code, numbers,
// Cyrillic, CJK, emoji and 20000 pseudo-words, drawn Zipf-like as in real prose) with the
// committed fixtures: Llama 3 / Qwen2 byte-level BPE and Llama 2 SentencePiece BPE from
// tokenizer.json, and the Llama 2 one through the GGUF path (score-ordered merges). Reported as
// text bytes/s and tokens/s on one thread (encode of one text is sequential; batches parallelise
// over texts). The fixtures have ~700-800 tokens, far fewer than the real 32K-152K: more merges
// per word, so these figures are a lower bound for real vocabularies' merge work.
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "recurformer/model/tokenizer.hpp"

namespace {

// The committed fixtures, found from this file's path (CMake compiles it by absolute path);
// RECURFORMER_TEST_DATA_DIR in the environment overrides.
std::string fixture_dir(const char* name) {
  if (const char* e = std::getenv("RECURFORMER_TEST_DATA_DIR")) return std::string(e) + "/tokenizers/" + name;
  const std::string here = __FILE__;
  return here.substr(0, here.rfind('/')) + "/../tests/data/tokenizers/" + name;
}

const std::string& bench_text() {
  static const std::string text = [] {
    const std::vector<std::string> words = {
        "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
        "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
        "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more",
        "when", "will", "would", "who", "so", "no", "recurrent", "attention", "selective", "scan", "model",
        "tokenizer", "throughput", "language", "inference", "memory", "bandwidth", "Llama", "Mamba",
        "It's", "don't", "they're", "I'll", "WE'VE", "1", "42", "2024", "3.14159", "1,000,000", "(x)",
        "x[i]", "+=", "->", "==", "\"quoted\"", "e-mail", "https://example.com/a?b=c", "#include",
        "Привет", "мир", "язык", "модель", "你好", "世界", "语言", "模型", "日本語", "テキスト", "😀", "👍🏽",
        "naïve", "café", "Straße", "Ελληνικά", "\t", "\n", "\n\n", "    "};
    // Plus 20000 pseudo-words (random syllables), all drawn Zipf-like (rank ~ u^3), so a word cache
    // sees roughly the repetition of real prose rather than a 100-word loop.
    std::mt19937 g(7);
    const char* syll[] = {"ka", "ro", "mi", "ten", "sa", "lu", "ver", "no", "di", "qua", "ex", "tor", "ph", "ing", "ly"};
    std::vector<std::string> all = words;
    for (int i = 0; i < 20000; ++i) {
      std::string w;
      for (unsigned k = 0, n = 1 + g() % 4; k < n; ++k) w += syll[g() % 15];
      all.push_back(g() % 5 == 0 ? std::string(1, char('A' + g() % 26)) + w : w);
    }
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::string t;
    while (t.size() < 300 * 1024) {
      const double r = u(g);
      t += all[size_t(r * r * r * double(all.size())) % all.size()];
      t += (g() % 11 == 0) ? ". " : " ";
    }
    return t;
  }();
  return text;
}

/// The Llama 2 fixture as GGUF metadata (vocabulary order = score order, as Llama 2's GGUF).
recurformer::GgufVocab llama2_gguf() {
  std::ifstream f(fixture_dir("llama2_spm") + "/tokenizer.json");
  const auto j = nlohmann::json::parse(f);
  recurformer::GgufVocab v;
  v.model = "llama";
  const auto& vocab = j["model"]["vocab"];
  v.tokens.resize(vocab.size());
  v.token_types.assign(vocab.size(), 1);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) v.tokens[it.value().get<size_t>()] = it.key();
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    v.scores.push_back(-float(i));
    if (v.tokens[i].rfind("<0x", 0) == 0) v.token_types[i] = 6;
  }
  v.token_types[0] = 2, v.token_types[1] = v.token_types[2] = 3;
  v.unk = 0, v.bos = 1, v.eos = 2, v.add_bos = true;
  return v;
}

const recurformer::Tokenizer& tokenizer(int which) {
  static const recurformer::Tokenizer toks[] = {
      recurformer::Tokenizer::from_hf(fixture_dir("llama3_bpe")), recurformer::Tokenizer::from_hf(fixture_dir("qwen2_bpe")),
      recurformer::Tokenizer::from_hf(fixture_dir("llama2_spm")), recurformer::Tokenizer::from_gguf(llama2_gguf())};
  return toks[which];
}
const char* const kNames[] = {"llama3_bpe", "qwen2_bpe", "llama2_spm", "llama2_gguf"};

}  // namespace

// Arg: 0 llama3_bpe, 1 qwen2_bpe, 2 llama2_spm (tokenizer.json), 3 llama2 via GgufVocab.
static void BM_TokenizerEncode(benchmark::State& st) {
  const auto& tok = tokenizer(int(st.range(0)));
  const std::string& text = bench_text();
  size_t n_tokens = 0;
  for (auto _ : st) {
    auto ids = tok.encode(text, false);
    n_tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  st.SetLabel(kNames[st.range(0)]);
  rfbench::set_rate(st, "bytes/s", double(text.size()));
  rfbench::set_rate(st, "tokens/s", double(n_tokens));
}
BENCHMARK(BM_TokenizerEncode)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);  // one thread: CPU time

static void BM_TokenizerDecode(benchmark::State& st) {
  const auto& tok = tokenizer(int(st.range(0)));
  const auto ids = tok.encode(bench_text(), false);
  for (auto _ : st) {
    auto text = tok.decode(ids);
    benchmark::DoNotOptimize(text.data());
  }
  st.SetLabel(kNames[st.range(0)]);
  rfbench::set_rate(st, "bytes/s", double(bench_text().size()));
  rfbench::set_rate(st, "tokens/s", double(ids.size()));
}
BENCHMARK(BM_TokenizerDecode)->Arg(0)->Arg(2)->Unit(benchmark::kMillisecond);  // one thread: CPU time
