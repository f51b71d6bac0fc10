// benchmarks/loader_bench.cpp: what loading costs. Opening a checkpoint is a memory map plus the
// validation of every header entry (the weights are paged in later, on first use), so it should
// take milliseconds whatever the model size; Q8_0 GGUF tensors are dequantised once at open, a
// memory-bound pass reported in bytes/s (Q8_0 read + fp32 written) against BM_MemoryCopy.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "recurformer/model/checkpoint.hpp"

namespace {

// A Llama-3.2-1B-shaped HF directory (bf16, 146 tensors, 2.47 GB) whose data section is a hole
// of a sparse file: the header is real, the disk cost is nothing.
std::string llama_1b_dir() {
  static std::string dir;
  if (!dir.empty()) return dir;
  dir = (std::filesystem::temp_directory_path() / ("rf-loader-bench-" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(dir);
  const int d = 2048, ffn = 8192, layers = 16, q = 32 * 64, kv = 8 * 64, vocab = 128256;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {{"model.embed_tokens.weight", {vocab, d}},
                                                                     {"model.norm.weight", {d}}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    shapes.push_back({p + "self_attn.q_proj.weight", {q, d}});
    shapes.push_back({p + "self_attn.k_proj.weight", {kv, d}});
    shapes.push_back({p + "self_attn.v_proj.weight", {kv, d}});
    shapes.push_back({p + "self_attn.o_proj.weight", {d, q}});
    shapes.push_back({p + "mlp.gate_proj.weight", {ffn, d}});
    shapes.push_back({p + "mlp.up_proj.weight", {ffn, d}});
    shapes.push_back({p + "mlp.down_proj.weight", {d, ffn}});
    shapes.push_back({p + "input_layernorm.weight", {d}});
    shapes.push_back({p + "post_attention_layernorm.weight", {d}});
  }
  nlohmann::ordered_json h;
  h["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (const auto& s : shapes) {
    uint64_t n = 2;
    for (int64_t x : s.second) n *= uint64_t(x);
    h[s.first] = {{"dtype", "BF16"}, {"shape", s.second}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::FILE* f = std::fopen((dir + "/model.safetensors").c_str(), "wb");
  const uint64_t len = text.size();
  std::fwrite(&len, 8, 1, f);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  std::filesystem::resize_file(dir + "/model.safetensors", 8 + len + off);
  f = std::fopen((dir + "/config.json").c_str(), "wb");
  const std::string cfg = R"({"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": true,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}})";
  std::fwrite(cfg.data(), 1, cfg.size(), f);
  std::fclose(f);
  std::atexit([] { std::filesystem::remove_all(dir); });
  return dir;
}

}  // namespace

static void BM_CheckpointOpen_Llama32_1B(benchmark::State& st) {
  const std::string dir = llama_1b_dir();
  size_t n = 0;
  for (auto _ : st) {
    const auto c = recurformer::Checkpoint::open(dir);
    n = c.tensor_names().size();
    benchmark::DoNotOptimize(&c);
  }
  rfbench::set_rate(st, "tensors/s", double(n));
}
BENCHMARK(BM_CheckpointOpen_Llama32_1B)->Unit(benchmark::kMillisecond)->UseRealTime();

// A Llama-3.2-1B MLP matrix [8192, 2048] in Q8_0, dequantised to fp32 (what Checkpoint does at open).
static void BM_DequantizeQ8_0(benchmark::State& st) {
  const int64_t n = int64_t(st.range(0)) * 2048;
  const auto x = rfbench::random_vector<float>(size_t(n));
  std::vector<uint8_t> q(size_t(n / recurformer::kQ8_0Block * recurformer::kQ8_0BlockBytes));
  recurformer::quantize_q8_0(x.data(), n, q.data());
  std::vector<float> y(static_cast<size_t>(n));
  for (auto _ : st) {
    recurformer::dequantize_q8_0(q.data(), n, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double(q.size()) + 4.0 * double(n));
  rfbench::set_rate(st, "weights/s", double(n));
}
BENCHMARK(BM_DequantizeQ8_0)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
