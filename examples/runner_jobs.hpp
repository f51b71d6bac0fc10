// examples/runner_jobs.hpp: what each runner command does, as functions the tests can call.
// Output goes to `out` (results) and `err` (progress lines); errors are recurformer::Error.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <variant>
#include <vector>

#include "recurformer/model/calibrate.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/convert.hpp"
#include "recurformer/model/distill.hpp"
#include "recurformer/model/llama.hpp"
#include "recurformer/model/perplexity.hpp"
#include "recurformer/model/random_model.hpp"
#include "recurformer/model/sampling.hpp"
#include "recurformer/model/tokenizer.hpp"
#include "runner_args.hpp"

namespace runner {

using namespace recurformer;

/// "1m 05s" / "12.3 s".
std::string human_seconds(double s);

std::string read_file(const std::string& path);

/// A model and its tokenizer, checked against each other.
struct Loaded {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tok;
};

Tokenizer tokenizer_of(const Checkpoint& ck);

LlamaModelOptions model_options(const Args& a);

/// Opens a model and its tokenizer. The commands that only run it (generate, chat, perplexity,
/// bench) pass kRunOnly: a quantised GGUF then keeps only its map, not an fp32 copy of every tensor.
Loaded load(const std::string& path, const LlamaModelOptions& options = {}, const CheckpointOptions& ck = {});
inline constexpr CheckpointOptions kRunOnly{false};

int threads_of(const Args& a);

/// The cache a command allocates: its storage type and the memory it may take.
struct CacheOptions {
  DType type = DType::f32;
  int64_t memory_limit_mib = 0;  ///< 0: the memory available
  int64_t page_size = 0;         ///< paged K/V, tokens per page (0: contiguous)
};
CacheOptions cache_options(const Args& a);

/// Fills the first `depth` tokens of a slot with synthetic keys, values and states (no forward
/// pass), so decode speed at depth can be measured at once. T: float, half or bfloat16
/// (instantiated in runner_jobs.cpp).
template <class T>
void fill_synthetic(HybridCache<T>& cache, int slot, int64_t depth, uint64_t seed);

/// One sequence slot of a LlamaSession whose cache type is a run-time choice (--cache-type): the
/// runner's one dispatch from that value to the template argument. Checks that the cache fits in
/// memory before allocating it.
class Session {
 public:
  Session(const LlamaModel& model, CacheOptions cache, int64_t capacity, CpuExec exec, int64_t chunk);
  DType cache_type() const { return type_; }
  const std::vector<float>& prefill(const int32_t* tokens, int64_t n, std::vector<float>* all_logits = nullptr);
  const std::vector<float>& decode(int32_t token);
  void reset();
  CacheReport bytes();
  void fill_synthetic(int64_t depth, uint64_t seed);

 private:
  using Any = std::variant<BasicLlamaSession<float>, BasicLlamaSession<half>, BasicLlamaSession<bfloat16>>;
  static Any make(const LlamaModel& model, CacheOptions cache, int64_t capacity, CpuExec exec, int64_t chunk);
  Any s_;
  DType type_;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, generated = 0;
  double prefill_s = 0, decode_s = 0;
  CacheBytes cache;
  DType cache_type = DType::f32;
  std::vector<int32_t> ids;
  std::string text;
};

/// Tokenizes the prompt, prefills, then samples up to n tokens (stopping at EOS), streaming text.
GenerateStats generate(const Loaded& m, const std::string& prompt, int n, int64_t ctx, int chunk,
                       const SamplingParams& sp, CpuExec exec, std::ostream* stream, CacheOptions cache = {});

int run_generate(const Args& a, std::ostream& out, std::ostream& err);

CalibrationResult calibrate_text(const Loaded& m, const std::string& text, int seq_len, int window, CpuExec exec,
                                 std::ostream& err);

int run_calibrate(const Args& a, std::ostream& out, std::ostream& err);

/// Converts `model` with its scores as the flags say; prints the outcome (every group's fit error
/// when per_group, else their range) to `out` and progress to `err`. Returns the fit errors.
std::vector<FitGroupError> convert_model(const std::string& model, const CalibrationScores& scores, const Args& a,
                                         const std::string& out_dir, std::ostream& out, std::ostream& err,
                                         bool per_group = true);

/// Distils the converted model `student` against `teacher` on the text of -f (see `distill --help`);
/// prints the error range before and after (per group when per_group) to `out`, progress to `err`.
std::vector<DistillGroupResult> distill_model(const std::string& student, const std::string& teacher, const Args& a,
                                              const std::string& out_dir, std::ostream& out, std::ostream& err,
                                              bool per_group = true);

int run_distill(const Args& a, std::ostream& out, std::ostream& err);

int run_convert(const Args& a, std::ostream& out, std::ostream& err);

/// llama.cpp's perplexity protocol over `text` in chunks of n_ctx; on_chunk(i, running ppl).
PerplexityResult measure_perplexity(const Loaded& m, const std::string& text, int n_ctx, int batch, CpuExec exec,
                                    CacheOptions cache = {}, const std::function<void(int, double)>& on_chunk = {},
                                    bool repeat = false);

int run_perplexity(const Args& a, std::ostream& out, std::ostream& err);

struct BenchPoint {
  int64_t ctx = 0;
  double prefill_tps = 0, decode_tps = 0;
  CacheBytes cache;
};

/// Prefill of `prefill` tokens and `decode` single-token steps ending at depth ctx.
BenchPoint bench_at(const LlamaModel& model, int64_t ctx, int prefill, int decode, CpuExec exec,
                    CacheOptions cache = {});

int run_bench(const Args& a, std::ostream& out, std::ostream& err);

/// The built-in calibration text: plain English prose (public-domain style, written for this file).
const char* builtin_text();

/// What the main job needs beside the executable (examples/CMakeLists.txt passes the paths).
struct MainJobFiles {
  std::string fetch_script;      ///< scripts/fetch-smollm2.sh; empty: no download, the random model
  std::string calibration_text;  ///< examples/data/calibration.txt
  std::string heldout_text;      ///< examples/data/heldout.txt
};

/// The main job: SmolLM2 when the files say where to fetch it (and --offline is not given), else
/// the built-in random model.
int run_main_job(const Args& a, const std::string& home, const MainJobFiles& f, std::ostream& out, std::ostream& err);
int run_main_job(const Args& a, const std::string& home, std::ostream& out, std::ostream& err);

}  // namespace runner

#include "runner_train.hpp"  // finetune (uses the helpers above)
