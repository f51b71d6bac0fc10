// Whole-model prefill and decode on a SmolLM2-135M-shaped random model (30 layers, d_model 576,
// 9 query / 3 KV heads, head_dim 64, ffn 1536, vocab 49152), F32 and BF16 weights, the original
// (all attention) against a RecurFormer with half of the KV groups recurrent (45 of 90, alternating
// so every layer keeps attention), at 4K and 32K tokens of context. The cache is filled to depth
// with synthetic keys, values and states (the runner's `bench` does the same), then:
//   BM_ModelDecode: one token per iteration at depth ~ctx (tokens/s, and cache bytes by kind)
//   BM_ModelPrefill: a 256-token chunk appended at depth ~ctx (tokens/s)
// The models are written once per process under $TMPDIR/recurformer-bench-models.
#include <filesystem>
#include <map>
#include <memory>

#include "../examples/runner_jobs.hpp"
#include "bench_util.hpp"

namespace {
using namespace recurformer;

const LlamaModel& bench_model(DType wt, bool recurformer) {
  static std::map<std::pair<int, bool>, std::unique_ptr<LlamaModel>> models;
  auto& slot = models[{int(wt), recurformer}];
  if (slot) return *slot;
  const std::string base = (std::filesystem::temp_directory_path() / "recurformer-bench-models").string();
  const std::string orig = base + "/smollm2-135m-" + dtype_name(wt);
  ensure_random_model(orig, RandomModelSpec::smollm2_135m(wt));
  std::string path = orig;
  if (recurformer) {
    path = orig + "-rf50";
    if (!detail::path_exists(path + "/config.json")) {
      const Checkpoint ck = Checkpoint::open(orig);
      ConvertOptions o;
      o.replace = true;  // a directory without config.json is a leftover of an interrupted run
      o.layout = HeadLayout::uniform(ck.config().n_layers, ck.config().n_kv, HeadKind::attention);
      int k = 0;
      for (auto& l : o.layout.layers)
        for (auto& g : l.groups) g = (k++ % 2 == 0) ? HeadKind::recurrent : HeadKind::attention;
      // 90 groups, 3 per layer: alternating gives 45 recurrent, 1 or 2 per layer.
      convert_to_recurformer(ck, o, path);
    }
  }
  slot = std::make_unique<LlamaModel>(LlamaModel::open(path));
  return *slot;
}

void set_labels(benchmark::State& st, const LlamaModel& m, const LlamaCache& cache) {
  const CacheBytes b = cache.bytes().held;
  st.counters["cache_MiB"] = double(b.total) / (1 << 20);
  st.counters["attn_MiB"] = double(b.attention) / (1 << 20);
  st.counters["rec_MiB"] = double(b.recurrent) / (1 << 20);
  st.SetLabel(std::string(dtype_name(m.weight_dtype())) + (m.config().recurformer ? " recurformer-50%" : " original"));
}

// args: weight dtype (0 f32, 2 bf16), recurformer (0/1), context
void BM_ModelDecode(benchmark::State& st) {
  const LlamaModel& m = bench_model(DType(st.range(0)), st.range(1) != 0);
  const int64_t ctx = st.range(2);
  LlamaSession s(m, 1, ctx + 4096, rfbench::cpu_exec(), 256);
  runner::fill_synthetic(s.cache(), 0, ctx, 7);
  int32_t tok = 17;
  s.decode(0, tok);  // warm: workspace sized
  for (auto _ : st) {
    const auto& l = s.decode(0, tok);
    tok = int32_t((tok * 31 + 7) % 49152);
    benchmark::DoNotOptimize(l.data());
    if (s.cache().length(0) + 2 >= s.cache().capacity()) {
      st.PauseTiming();
      s.cache().reset(0);
      runner::fill_synthetic(s.cache(), 0, ctx, 7);
      st.ResumeTiming();
    }
  }
  rfbench::set_rate(st, "tokens/s", 1.0);
  set_labels(st, m, s.cache());
}

void BM_ModelPrefill(benchmark::State& st) {
  const LlamaModel& m = bench_model(DType(st.range(0)), st.range(1) != 0);
  const int64_t ctx = st.range(2), chunk = 256;
  LlamaSession s(m, 1, ctx + chunk, rfbench::cpu_exec(), chunk);
  std::vector<int32_t> toks(static_cast<size_t>(chunk));
  for (int64_t i = 0; i < chunk; ++i) toks[size_t(i)] = int32_t((i * 7919) % 49152);
  runner::fill_synthetic(s.cache(), 0, ctx - chunk, 7);
  auto snap = s.cache().snapshot(0);
  for (auto _ : st) {
    s.prefill(0, toks.data(), chunk);
    st.PauseTiming();
    s.cache().restore(0, snap);
    st.ResumeTiming();
  }
  rfbench::set_rate(st, "tokens/s", double(chunk));
  set_labels(st, m, s.cache());
}

void model_args(benchmark::internal::Benchmark* b) {
  for (int64_t wt : {int64_t(DType::f32), int64_t(DType::bf16)})
    for (int64_t rf : {0, 1})
      for (int64_t ctx : {4096, 32768}) b->Args({wt, rf, ctx});
  b->ArgNames({"dtype", "rf", "ctx"})->Unit(benchmark::kMillisecond)->UseRealTime();
}
}  // namespace

BENCHMARK(BM_ModelDecode)->Apply(model_args)->MinTime(2.0);
BENCHMARK(BM_ModelPrefill)->Apply(model_args)->Iterations(2);
