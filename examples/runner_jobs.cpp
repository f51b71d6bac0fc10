// examples/runner_jobs.cpp: what each runner command does (the functions runner_jobs.hpp declares).
#include "runner_jobs.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <optional>
#include <sstream>
#include <thread>

namespace runner {

using Clock = std::chrono::steady_clock;

namespace {
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string human_bytes(int64_t b) {
  char buf[32];
  if (b >= (int64_t(1) << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", double(b) / double(int64_t(1) << 30));
  else if (b >= (1 << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", double(b) / double(1 << 20));
  else if (b >= (1 << 10)) std::snprintf(buf, sizeof buf, "%.1f KiB", double(b) / double(1 << 10));
  else std::snprintf(buf, sizeof buf, "%lld B", (long long)b);
  return buf;
}
std::string bytes_by_kind(const CacheBytes& c) {
  return "attention " + human_bytes(c.attention) + ", recurrent " + human_bytes(c.recurrent) + ", streaming " +
         human_bytes(c.streaming) + (c.windowed ? ", windowed " + human_bytes(c.windowed) : std::string()) + ", total " +
         human_bytes(c.total);
}
/// "45 recurrent" / "45 windowed" / "30 recurrent, 15 streaming": the non-attention groups of a layout.
std::string converted_groups(const HeadLayout& l) {
  std::string r;
  for (HeadKind k : {HeadKind::recurrent, HeadKind::streaming, HeadKind::windowed})
    if (l.count(k) > 0) r += (r.empty() ? "" : ", ") + std::to_string(l.count(k)) + " " + head_kind_name(k);
  return r.empty() ? "0 recurrent" : r;
}
}  // namespace

/// "1m 05s" / "12.3 s".
std::string human_seconds(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.1f s", s);
  else std::snprintf(buf, sizeof buf, "%dm %02ds", int(s) / 60, int(s) % 60);
  return buf;
}

namespace {
/// A progress line for long work, on stderr: what, how far, time so far and the ETA. At most one
/// line a second (and always the last), so a log stays short.
class Progress {
 public:
  Progress(std::ostream& err, std::string what) : err_(&err), what_(std::move(what)), t0_(Clock::now()) {}
  void operator()(int64_t done, int64_t total) {
    const double t = seconds_since(t0_);
    if (done < total && t - last_ < 1.0) return;
    last_ = t;
    *err_ << what_ << ": " << done << "/" << total << ", " << human_seconds(t);
    if (done < total && done > 0) *err_ << ", ETA " << human_seconds(t / double(done) * double(total - done));
    *err_ << "\n" << std::flush;
  }

 private:
  std::ostream* err_;
  std::string what_;
  Clock::time_point t0_;
  double last_ = -1;
};
}  // namespace

std::string read_file(const std::string& path) {
  RF_CHECK(!std::filesystem::is_directory(path), path, ": is a directory, not a file");
  std::ifstream f(path, std::ios::binary);
  RF_CHECK(f, path, ": cannot open for reading");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

Tokenizer tokenizer_of(const Checkpoint& ck) {
  if (const GgufVocab* g = ck.gguf_tokenizer()) return Tokenizer::from_gguf(*g);
  RF_CHECK(!ck.tokenizer_json().empty(), ck.path().string(), ": no tokenizer.json in the model directory");
  return Tokenizer::from_hf(ck.path().string());
}

LlamaModelOptions model_options(const Args& a) {
  LlamaModelOptions o;
  o.serve_blocks = !a.dense_weights;
  o.activations = a.fp32_activations ? ActivationMath::fp32 : ActivationMath::int8;
  return o;
}

Loaded load(const std::string& path, const LlamaModelOptions& options, const CheckpointOptions& ck_options) {
  RF_CHECK(!path.empty(), "no model given (-m PATH)");
  RF_CHECK(recurformer::detail::path_exists(path), path, ": no such file or directory");
  Loaded l;
  auto ck = std::make_shared<const Checkpoint>(Checkpoint::open(path, ck_options));
  l.tok = std::make_unique<Tokenizer>(tokenizer_of(*ck));
  RF_CHECK(l.tok->vocab_size() <= ck->config().vocab_size, path, ": the tokenizer has ", l.tok->vocab_size(),
           " tokens but the model's vocabulary has ", ck->config().vocab_size, ": they do not belong together");
  l.model = std::make_unique<LlamaModel>(ck, options);
  return l;
}

int threads_of(const Args& a) { return a.threads > 0 ? a.threads : int(std::max(1u, std::thread::hardware_concurrency())); }

namespace {
DType dtype_from_flag(const std::string& f) {
  return f == "f16" ? DType::f16 : f == "bf16" ? DType::bf16 : DType::f32;
}
}  // namespace
CacheOptions cache_options(const Args& a) { return {dtype_from_flag(a.cache_type), a.memory_limit_mib, a.page_size}; }

/// Fills the first `depth` tokens of a slot with synthetic keys, values and states (no forward
/// pass), so decode speed at depth can be measured at once.
template <class T>
void fill_synthetic(HybridCache<T>& cache, int slot, int64_t depth, uint64_t seed) {
  recurformer::detail::RandomStream rs(seed);
  const int64_t hd = cache.head_dim();
  const int32_t sl[1] = {slot}, cnt[1] = {int32_t(depth)};
  cache.reserve(make_view(sl, {1}), make_view(cnt, {1}));  // paged: the slot's pages
  // Token t of the slot: (row, t') of kv, a page and its row when paged.
  auto fill_kv = [&](View<T, 4> kv, int64_t n, bool paged) {
    for (int64_t g = 0; g < kv.shape[1]; ++g)
      for (int64_t t = 0; t < n; ++t) {
        const int64_t row = paged ? cache.page_of(slot, t) : slot, at = paged ? t % kv.shape[2] : t;
        for (int64_t i = 0; i < hd; ++i) kv(row, g, at, i) = from_float<T>(rs.uniform_std(0.5f));
      }
  };
  for (int l = 0; l < cache.n_layers(); ++l) {
    for (View<T, 4> kv : {cache.keys(l), cache.values(l)}) fill_kv(kv, depth, cache.paged());
    View<float, 4> st = cache.ssm_states(l);
    for (int64_t g = 0; g < st.shape[1]; ++g)
      for (int64_t c = 0; c < st.shape[2]; ++c)
        for (int64_t n = 0; n < st.shape[3]; ++n) st(slot, g, c, n) = rs.uniform_std(0.1f);
    for (View<T, 4> kv : {cache.stream_keys(l), cache.stream_values(l)}) fill_kv(kv, kv.shape[2], false);
  }
  cache.advance(make_view(sl, {1}), make_view(cnt, {1}));
}
template void fill_synthetic<float>(HybridCache<float>& cache, int slot, int64_t depth, uint64_t seed);
template void fill_synthetic<half>(HybridCache<half>& cache, int slot, int64_t depth, uint64_t seed);
template void fill_synthetic<bfloat16>(HybridCache<bfloat16>& cache, int slot, int64_t depth, uint64_t seed);

namespace {
/// The memory a new allocation may take: --memory-limit, else MemAvailable from /proc/meminfo
/// (what the kernel can give without swapping), else no limit (0).
int64_t memory_limit_bytes(int64_t limit_mib) {
  if (limit_mib > 0) return limit_mib << 20;
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib << 10;
  return 0;
}

/// Refuses a cache that would not fit before allocating it (a large -c fails at once with the
/// estimate instead of swapping or being killed).
void check_cache_fits(const LlamaModel& model, DType cache_type, int64_t capacity, int64_t limit_mib) {
  RF_CHECK(capacity >= 1 && capacity <= (int64_t(1) << 31), "context size ", capacity, " is out of range [1, 2^31]");
  const CacheBytes b = hybrid_cache_spec_bytes(model.cache_config(1, capacity), capacity, dtype_size(cache_type));
  const int64_t limit = memory_limit_bytes(limit_mib);
  RF_CHECK(limit == 0 || b.total <= limit, "a cache of ", capacity, " tokens (", dtype_name(cache_type), ") needs ",
           human_bytes(b.total), ", more than the ", human_bytes(limit),
           limit_mib > 0 ? " of --memory-limit" : " of memory available", " (lower -c, or --cache-type f16)");
}
}  // namespace

/// One sequence slot of a LlamaSession whose cache type is a run-time choice (--cache-type): the
/// runner's one dispatch from that value to the template argument. Checks that the cache fits in
/// memory before allocating it.
Session::Session(const LlamaModel& model, CacheOptions cache, int64_t capacity, CpuExec exec, int64_t chunk)
    : s_((check_cache_fits(model, cache.type, capacity, cache.memory_limit_mib),
          make(model, cache, capacity, exec, chunk))),
      type_(cache.type) {}
const std::vector<float>& Session::prefill(const int32_t* tokens, int64_t n, std::vector<float>* all_logits) {
  return std::visit([&](auto& s) -> const std::vector<float>& { return s.prefill(0, tokens, n, all_logits); }, s_);
}
const std::vector<float>& Session::decode(int32_t token) {
  return std::visit([&](auto& s) -> const std::vector<float>& { return s.decode(0, token); }, s_);
}
void Session::reset() {
  std::visit([](auto& s) { s.cache().reset(0); }, s_);
}
CacheReport Session::bytes() {
  return std::visit([](auto& s) { return s.cache().bytes(); }, s_);
}
void Session::fill_synthetic(int64_t depth, uint64_t seed) {
  std::visit([&](auto& s) { runner::fill_synthetic(s.cache(), 0, depth, seed); }, s_);
}

Session::Any Session::make(const LlamaModel& model, CacheOptions cache, int64_t capacity, CpuExec exec,
                          int64_t chunk) {
  RF_CHECK(cache.page_size <= capacity, "--page-size ", cache.page_size, " is larger than the context of ", capacity,
           " tokens");
  return dispatch_dtype("--cache-type", cache.type, [&](auto tag) {
    using S = BasicLlamaSession<typename decltype(tag)::type>;
    return Any(std::in_place_type<S>, model, 1, capacity, exec, chunk, cache.page_size);
  });
}

/// Tokenizes the prompt, prefills, then samples up to n tokens (stopping at EOS), streaming text.
GenerateStats generate(const Loaded& m, const std::string& prompt, int n, int64_t ctx, int chunk,
                       const SamplingParams& sp, CpuExec exec, std::ostream* stream, CacheOptions cache) {
  const ModelConfig& c = m.model->config();
  std::vector<int32_t> ids = m.tok->encode(prompt, true);
  RF_CHECK(!ids.empty(), "generate: the prompt is empty (and the tokenizer adds no BOS)");
  RF_CHECK(int64_t(ids.size()) <= ctx, "generate: the prompt has ", ids.size(), " tokens, more than the context of ",
           ctx, " (raise -c)");
  const int64_t budget = std::min<int64_t>(n, ctx - int64_t(ids.size()));
  Session s(*m.model, cache, ctx, exec, chunk);
  GenerateStats st;
  st.prompt_tokens = int64_t(ids.size());
  st.cache_type = cache.type;
  auto t0 = Clock::now();
  std::vector<float> logits = s.prefill(ids.data(), int64_t(ids.size()));
  st.prefill_s = seconds_since(t0);
  Sampler sampler(sp);
  StreamDecoder dec = m.tok->stream_decoder(true);
  auto emit = [&](const std::string& piece) {
    st.text += piece;
    if (stream) *stream << piece << std::flush;
  };
  auto t1 = Clock::now();
  for (int64_t i = 0; i < budget; ++i) {
    const int32_t next = sampler.sample(logits.data(), c.vocab_size);
    st.ids.push_back(next);
    ++st.generated;
    bool eos = next == m.tok->eos_id();
    for (int e : c.eos_token_ids) eos = eos || next == e;
    if (next < m.tok->vocab_size()) emit(dec.push(next));
    if (eos || i + 1 == budget) break;
    logits = s.decode(next);
  }
  emit(dec.flush());
  st.decode_s = seconds_since(t1);
  st.cache = s.bytes().held;
  return st;
}

namespace {
void print_generate_stats(std::ostream& out, const GenerateStats& st) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "prefill: %lld tokens in %.3f s (%.1f tokens/s); decode: %lld tokens in %.3f s (%.1f tokens/s)\n",
                (long long)st.prompt_tokens, st.prefill_s, double(st.prompt_tokens) / std::max(st.prefill_s, 1e-9),
                (long long)st.generated, st.decode_s,
                st.generated > 1 ? double(st.generated - 1) / std::max(st.decode_s, 1e-9) : 0.0);
  out << buf << "cache (" << st.prompt_tokens + st.generated - 1 << " tokens, " << dtype_name(st.cache_type)
      << "): " << bytes_by_kind(st.cache) << "\n";
}
}  // namespace

int run_generate(const Args& a, std::ostream& out, std::ostream& err) {
  std::string prompt = a.prompt;
  if (!a.file.empty()) prompt = read_file(a.file);
  RF_CHECK(!prompt.empty(), "generate: no prompt (-p TEXT or -f FILE)");
  Loaded m = load(a.model, model_options(a), kRunOnly);
  ThreadPool pool(threads_of(a));
  const auto st = generate(m, prompt, a.n_predict, a.ctx, a.batch, SamplingParams{a.temp, a.top_k, a.top_p, a.seed},
                           CpuExec{&pool}, &out, cache_options(a));
  out << "\n\n";
  print_generate_stats(err, st);
  return 0;
}

CalibrationResult calibrate_text(const Loaded& m, const std::string& text, int seq_len, int window, CpuExec exec,
                                 std::ostream& err) {
  const std::vector<int32_t> ids = m.tok->encode(text, true);
  CalibrationOptions o;
  o.seq_len = seq_len;
  o.window = window;
  Progress progress(err, "calibrate: sequences of " + std::to_string(seq_len) + " tokens");
  return calibrate(*m.model, ids, o, exec, std::ref(progress));
}

namespace {
std::string svg_path_for(const std::string& json_path) {
  const size_t dot = json_path.rfind('.');
  const size_t slash = json_path.rfind('/');
  return (dot != std::string::npos && (slash == std::string::npos || dot > slash) ? json_path.substr(0, dot) : json_path) +
         ".svg";
}

void write_calibration(const CalibrationResult& r, const std::string& model, const std::string& json_path,
                              std::ostream& out) {
  recurformer::detail::write_text(json_path, calibration_to_json(r, model));
  recurformer::detail::write_text(svg_path_for(json_path), calibration_to_svg(r));
  out << "scores of " << r.n_layers << " layers x " << r.n_kv << " KV groups over " << r.sequences << " sequences ("
      << r.tokens << " tokens, window " << r.window << ") -> " << json_path << ", heatmap -> " << svg_path_for(json_path)
      << "\n";
}

/// Fails at once (not after a long run) when `path` cannot be written: a directory, or a folder
/// where no file can be created.
void check_writable(const std::string& path) {
  namespace fs = std::filesystem;
  RF_CHECK(!fs::is_directory(path), path, ": is a directory, not a file");
  const fs::path dir = fs::absolute(path).parent_path();
  RF_CHECK(fs::is_directory(dir) && ::access(dir.c_str(), W_OK) == 0, path, ": cannot be written (",
           dir.string(), " is not a writable directory)");
}
}  // namespace

int run_calibrate(const Args& a, std::ostream& out, std::ostream& err) {
  RF_CHECK(!a.file.empty(), "calibrate: no text (-f FILE)");
  const std::string text = read_file(a.file);
  Loaded m = load(a.model, model_options(a));
  ThreadPool pool(threads_of(a));
  const std::string json_path = a.out.empty() ? "scores.json" : a.out;
  check_writable(json_path);
  check_writable(svg_path_for(json_path));
  const auto r = calibrate_text(m, text, a.ctx_set ? int(a.ctx) : 512, a.window, CpuExec{&pool}, err);
  write_calibration(r, a.model, json_path, out);
  return 0;
}

namespace {
/// Prints the cache of the original and the converted layout at 4K and 32K tokens.
void print_cache_saving(const ModelConfig& c, const RecurFormerConfig& rf, std::ostream& out,
                               DType cache_type = DType::f32) {
  HybridCacheConfig orig, conv;
  orig.n_layers = conv.n_layers = c.n_layers;
  orig.n_kv = conv.n_kv = c.n_kv;
  orig.head_dim = conv.head_dim = c.head_dim;
  orig.layout = HeadLayout::uniform(c.n_layers, c.n_kv, HeadKind::attention);
  conv.layout = rf.layout;
  conv.recurrent = rf.recurrent;
  conv.streaming = rf.streaming;
  for (int64_t T : {int64_t(4096), int64_t(32768)}) {
    const int64_t e = dtype_size(cache_type);
    const CacheBytes a = hybrid_cache_spec_bytes(orig, T, e), b = hybrid_cache_spec_bytes(conv, T, e);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f%%", 100.0 * double(b.total) / double(a.total));
    out << "cache per sequence at " << T / 1024 << "K tokens (" << dtype_name(cache_type) << "): original "
        << human_bytes(a.total)
        << ", RecurFormer " << human_bytes(b.total) << " (" << buf << ")\n";
  }
}
}  // namespace

/// Converts `model` with its scores as the flags say; prints the outcome (every group's fit error
/// when per_group, else their range) to `out` and progress to `err`. Returns the fit errors.
std::vector<FitGroupError> convert_model(const std::string& model, const CalibrationScores& scores, const Args& a,
                                         const std::string& out_dir, std::ostream& out, std::ostream& err,
                                         bool per_group) {
  RF_CHECK(a.init == "default" || a.init == "fit", "convert: --init ", a.init, " is not supported (default or fit)");
  const bool streaming = a.kind == "streaming";
  RF_CHECK(!streaming || a.init == "default", "convert: --init ", a.init,
           " fits recurrent groups; --kind streaming keeps the original weights (drop --init)");
  RF_CHECK(a.init != "fit" || !a.file.empty(), "convert: --init fit needs calibration text (-f TEXT)");
  RF_CHECK((a.ratio >= 0) != (a.threshold >= 0), "convert: give exactly one of --ratio R or --threshold X");
  RF_CHECK(!out_dir.empty(), "convert: no output directory (-o DIR)");
  const Checkpoint ck = Checkpoint::open(model);
  recurformer::detail::check_output_dir(out_dir, ck.path(), a.force);  // before the long work
  const ModelConfig& c = ck.config();
  RF_CHECK(int(scores.group_mean.size()) == c.n_layers, "convert: the scores have ", scores.group_mean.size(),
           " layers, the model ", c.n_layers, " (scores of another model?)");
  HeadSelection sel;
  if (a.ratio >= 0) sel.rule = HeadSelection::Rule::ratio, sel.ratio = a.ratio;
  else sel.rule = HeadSelection::Rule::threshold, sel.threshold = a.threshold;
  sel.min_attention_per_layer = a.min_attention_per_layer;
  ConvertOptions o;
  o.layout = select_head_layout(scores.group_mean, sel);
  o.recurrent.dt_rank = a.dt_rank;
  const HeadKind kind = a.kind == "streaming" ? HeadKind::streaming
                        : a.kind == "windowed" ? HeadKind::windowed : HeadKind::recurrent;
  if (has_stream_ring(kind)) {  // the same selection, served by a window of the original attention (+ alpha x recurrent)
    for (LayerLayout& l : o.layout.layers)
      for (HeadKind& g : l.groups)
        if (g == HeadKind::recurrent) g = kind;
    o.streaming.sink = a.sink;
    o.streaming.window = a.stream_window > 0 ? a.stream_window
                                             : streaming_window_matching_recurrent(c.head_dim, convert_config(c, o).recurrent,
                                                                                   a.sink, dtype_size(cache_options(a).type));
  }
  o.recency_window = scores.window;
  o.seed = a.seed;
  o.replace = a.force;
  if (!a.dtype.empty()) o.weight_dtype = dtype_from_flag(a.dtype);
  for (const auto& row : scores.group_mean) o.recency_scores.emplace_back(row.begin(), row.end());
  ThreadPool pool(threads_of(a));
  if (a.init == "fit") {
    const Loaded m = load(model);
    o.init = ConvertInit::fit;
    Progress record(err, "convert: recording attention on the calibration text, sequences");
    o.fit_data = record_fit_data(*m.model, m.tok->encode(read_file(a.file), true), a.ctx_set ? int(a.ctx) : 512,
                                 o.layout, o.streaming, o.recurrent.conv_kernel, CpuExec{&pool}, std::ref(record));
  }
  Progress fit_progress(err, "convert: fitting recurrent groups");
  if (a.init == "fit") o.progress = std::ref(fit_progress);
  const std::vector<FitGroupError> errors = convert_to_recurformer(ck, o, out_dir, CpuExec{&pool});
  out << "converted " << o.layout.count(kind) << " of " << c.n_layers * c.n_kv << " KV groups to "
      << head_kind_name(kind) << " -> " << out_dir << "\n";
  if (has_stream_ring(kind))
    out << head_kind_name(kind) << " heads keep the first " << o.streaming.sink << " and the last " << o.streaming.window
        << " tokens" << (kind == HeadKind::windowed ? " and a recurrent state (alpha = 0: the streaming model)\n" : "\n");
  char buf[160];
  if (per_group) {
    for (const FitGroupError& e : errors) {
      std::snprintf(buf, sizeof buf, "fit layer %d group %d: relative error %.4f (default init %.4f)\n", e.layer,
                    e.group, e.fit_error, e.default_error);
      out << buf;
    }
  } else if (!errors.empty()) {
    double lo = 1e300, hi = 0, sum = 0, dsum = 0;
    for (const FitGroupError& e : errors)
      lo = std::min(lo, e.fit_error), hi = std::max(hi, e.fit_error), sum += e.fit_error, dsum += e.default_error;
    std::snprintf(buf, sizeof buf, "fit: relative error of the recurrent groups %.3f..%.3f, mean %.3f (default init: mean %.3f)\n",
                  lo, hi, sum / double(errors.size()), dsum / double(errors.size()));
    out << buf;
  }
  if (!errors.empty()) out << "fit errors -> " << out_dir << "/fit_report.json\n";
  print_cache_saving(c, convert_config(c, o), out, cache_options(a).type);
  return errors;
}

/// Distils the converted model `student` against `teacher` on the text of -f (see `distill --help`);
/// prints the error range before and after (per group when per_group) to `out`, progress to `err`.
std::vector<DistillGroupResult> distill_model(const std::string& student, const std::string& teacher, const Args& a,
                                              const std::string& out_dir, std::ostream& out, std::ostream& err,
                                              bool per_group) {
  RF_CHECK(!a.file.empty(), "distill: no training text (-f TEXT)");
  RF_CHECK(!out_dir.empty(), "distill: no output directory (-o DIR)");
  RF_CHECK(!teacher.empty(), "distill: no teacher (--teacher ORIGINAL, the model the student was converted from)");
  const Checkpoint ck = Checkpoint::open(student);
  const ModelConfig& c = ck.config();
  RF_CHECK(c.recurformer, "distill: ", student, " is not a RecurFormer (convert it first)");
  recurformer::detail::check_output_dir(out_dir, ck.path(), a.force);  // before the long work
  const Loaded t = load(teacher);
  const ModelConfig& tc = t.model->config();
  RF_CHECK(tc.n_layers == c.n_layers && tc.d_model == c.d_model && tc.n_q == c.n_q && tc.n_kv == c.n_kv &&
               tc.head_dim == c.head_dim && tc.vocab_size == c.vocab_size,
           "distill: the teacher ", teacher, " (", tc.n_layers, " layers, d ", tc.d_model, ", ", tc.n_q, "/", tc.n_kv,
           " heads) is not the model ", student, " was converted from (", c.n_layers, " layers, d ", c.d_model, ", ",
           c.n_q, "/", c.n_kv, " heads)");
  RF_CHECK(!tc.recurformer, "distill: the teacher ", teacher, " is itself a RecurFormer; give the original model");
  const HeadLayout& layout = c.recurformer->layout;
  ThreadPool pool(threads_of(a));
  std::vector<LayerInputs> inputs;
  std::vector<FitGroupData> data;
  {
    Progress record(err, "distill: recording the teacher on the text, sequences");
    data = record_fit_data(*t.model, t.tok->encode(read_file(a.file), true), a.ctx_set ? int(a.ctx) : 512, layout,
                           c.recurformer->streaming, c.recurformer->recurrent.conv_kernel, CpuExec{&pool},
                           std::ref(record), &inputs);
  }
  for (FitGroupData& g : data)  // distillation reads only x, y_attn and y_stream: give back the fit's q, k, v
    for (FitSequence& s : g.sequences) s.q = {}, s.k = {}, s.v = {};
  DistillOptions o;
  o.steps = a.steps, o.batch = a.batch_seqs, o.lr = a.lr, o.lr_projection = a.lr_proj, o.seed = a.seed;
  Progress groups(err, "distill: training recurrent groups");
  o.progress = std::ref(groups);
  const std::vector<DistillGroupResult> res = distill_to_recurformer(ck, data, inputs, o, out_dir, a.force, CpuExec{&pool});
  char buf[200];
  double before = 0, after = 0, lo = 1e300, hi = 0;
  for (const DistillGroupResult& g : res) {
    if (per_group) {
      std::snprintf(buf, sizeof buf, "distill layer %d group %d: held-out error %.4f -> %.4f (train %.4f -> %.4f), %.1f s\n",
                    g.layer, g.group, g.heldout_before, g.heldout_after, g.train_before, g.train_after, g.seconds);
      out << buf;
    }
    before += g.heldout_before, after += g.heldout_after, lo = std::min(lo, g.heldout_after), hi = std::max(hi, g.heldout_after);
  }
  if (!res.empty()) {
    std::snprintf(buf, sizeof buf, "distill: held-out relative error of the %zu converted groups, mean %.3f -> %.3f (after: %.3f..%.3f)\n",
                  res.size(), before / double(res.size()), after / double(res.size()), lo, hi);
    out << buf;
  }
  out << "distilled -> " << out_dir << " (errors in " << out_dir << "/distill_report.json)\n";
  return res;
}

int run_distill(const Args& a, std::ostream& out, std::ostream& err) {
  RF_CHECK(!a.model.empty(), "distill: no model given (-m CONVERTED)");
  distill_model(a.model, a.teacher, a, a.out, out, err);
  return 0;
}

int run_convert(const Args& a, std::ostream& out, std::ostream& err) {
  RF_CHECK(!a.model.empty(), "convert: no model given (-m PATH)");
  RF_CHECK(!a.scores.empty(), "convert: no scores given (--scores S.json, written by `recurformer calibrate`)");
  convert_model(a.model, parse_calibration_scores(read_file(a.scores), a.scores), a, a.out, out, err);
  return 0;
}

/// llama.cpp's perplexity protocol over `text` in chunks of n_ctx; on_chunk(i, running ppl).
PerplexityResult measure_perplexity(const Loaded& m, const std::string& text, int n_ctx, int batch, CpuExec exec,
                                    CacheOptions cache, const std::function<void(int, double)>& on_chunk, bool repeat) {
  std::vector<int32_t> ids = m.tok->encode(text, true);
  if (repeat) ids = repeat_halves(ids, n_ctx);
  const int32_t bos = m.tok->add_bos() ? m.tok->bos_id() : -1;
  std::optional<Session> s;  // made at the first chunk, after perplexity() has checked the text's length
  std::vector<float> all;
  return perplexity(
      ids, n_ctx, m.model->config().vocab_size, bos,
      [&](const int32_t* t, int n, float* logits) {
        if (!s) s.emplace(*m.model, cache, n_ctx, exec, std::min(batch, n_ctx));
        s->reset();
        s->prefill(t, n, &all);
        std::copy(all.begin(), all.end(), logits);
      },
      on_chunk);
}

int run_perplexity(const Args& a, std::ostream& out, std::ostream& err) {
  RF_CHECK(!a.file.empty(), "perplexity: no text (-f FILE)");
  const std::string text = read_file(a.file);
  Loaded m = load(a.model, model_options(a), kRunOnly);
  ThreadPool pool(threads_of(a));
  const int n_ctx = a.ctx_set ? int(a.ctx) : 512;
  const size_t n_tokens = m.tok->encode(text, true).size();
  if (a.repeat)
    err << "perplexity: " << n_tokens << " tokens, " << n_tokens / size_t(n_ctx / 2) << " passages of " << n_ctx / 2
        << " tokens, each followed by its copy; the copies are scored\n";
  else
    err << "perplexity: " << n_tokens << " tokens, " << n_tokens / size_t(n_ctx) << " chunks of " << n_ctx << "\n";
  auto t0 = Clock::now();
  const auto r = measure_perplexity(m, text, n_ctx, a.batch, CpuExec{&pool}, cache_options(a), [&](int c, double ppl) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "[%d]%.4f,", c + 1, ppl);
    out << buf << std::flush;
  }, a.repeat);
  char buf[128];
  std::snprintf(buf, sizeof buf, "\nFinal estimate: PPL = %.4f +/- %.5f\n", r.ppl, r.ppl_error);
  out << buf;
  err << "perplexity: " << r.n_scored << " predictions in " << std::fixed << std::setprecision(1) << seconds_since(t0)
      << " s\n";
  return 0;
}

/// Prefill of `prefill` tokens and `decode` single-token steps ending at depth ctx.
BenchPoint bench_at(const LlamaModel& model, int64_t ctx, int prefill, int decode, CpuExec exec,
                    CacheOptions cache) {
  RF_CHECK(ctx >= prefill + decode + 1, "bench: context ", ctx, " cannot hold the ", prefill, " prefill + ", decode,
           " (+1 warm-up) decode tokens measured");
  Session s(model, cache, ctx, exec, prefill);
  s.fill_synthetic(ctx - prefill - decode - 1, 99);
  const int64_t V = model.config().vocab_size;
  std::vector<int32_t> toks(static_cast<size_t>(prefill));
  for (int i = 0; i < prefill; ++i) toks[size_t(i)] = int32_t((i * 7919) % V);
  BenchPoint p;
  p.ctx = ctx;
  auto t0 = Clock::now();
  s.prefill(toks.data(), prefill);
  p.prefill_tps = prefill / seconds_since(t0);
  s.decode(1);  // warm-up step (first-touch of the decode workspace), not timed
  auto t1 = Clock::now();
  for (int i = 0; i < decode; ++i) s.decode(int32_t((i * 31) % V));
  p.decode_tps = decode / seconds_since(t1);
  p.cache = s.bytes().held;
  return p;
}

int run_bench(const Args& a, std::ostream& out, std::ostream& err) {
  Loaded m = load(a.model, model_options(a), kRunOnly);
  ThreadPool pool(threads_of(a));
  const std::vector<int64_t> ctxs = a.contexts.empty() ? std::vector<int64_t>{512, 4096, 32768} : a.contexts;
  const ModelConfig& c = m.model->config();
  out << "model " << a.model << ": " << c.n_layers << " layers, d_model " << c.d_model << ", " << c.n_q << "/" << c.n_kv
      << " heads, weights " << dtype_name(m.model->weight_dtype()) << ", "
      << converted_groups(c.head_layout()) << " of " << c.n_layers * c.n_kv << " KV groups, "
      << threads_of(a) << " threads\n";
  out << "(the cache is filled to depth with synthetic keys, values and states, not a forward pass)\n";
  out << std::setw(8) << "context" << std::setw(16) << "prefill tok/s" << std::setw(16) << "decode tok/s"
      << "  cache (" << a.cache_type << ")\n";
  for (int64_t ctx : ctxs) {
    // llama-bench's pp<b> and tg<n>: at -c b + n + 1 the prefill starts at depth 0
    const int steps = int(std::min<int64_t>(a.n_decode, ctx / 4));
    const int pre = int(std::max<int64_t>(1, std::min<int64_t>(a.batch, ctx - steps - 1)));
    err << "bench: context " << ctx << ": prefill " << pre << " tokens, decode " << steps << " steps ...\n";
    const BenchPoint p = bench_at(*m.model, ctx, pre, steps, CpuExec{&pool}, cache_options(a));
    char buf[96];
    std::snprintf(buf, sizeof buf, "%8lld%16.1f%16.2f  ", (long long)ctx, p.prefill_tps, p.decode_tps);
    out << buf << bytes_by_kind(p.cache) << "\n";
  }
  return 0;
}

/// The built-in calibration text: plain English prose (public-domain style, written for this file).
const char* builtin_text() {
  return "The river ran past the old mill and under the stone bridge, where the children of the village "
         "came every evening to throw small boats of bark into the current. Some of the boats sank at once; "
         "others turned in slow circles near the bank before the water took them. The miller, who had watched "
         "this game for thirty years, said that a boat which survived the first bend would reach the sea. "
         "Nobody believed him, and everybody hoped he was right. In the spring the river rose and covered the "
         "lower fields, and the farmers moved their sheep to the hill behind the church. In the summer it fell "
         "so low that the wheel of the mill stood still for weeks, and the miller spent his days repairing "
         "the roof and reading the newspapers that arrived, a week late, with the post. In the autumn the "
         "leaves filled the channel and had to be raked out every morning. In the winter the surface froze "
         "near the banks, and the children walked on the ice as far as they dared, listening to the water "
         "moving underneath. Years later, when the mill had been turned into a house and the wheel into a "
         "decoration, one of those children came back and stood on the bridge for a long time. The river was "
         "the same; the boats, she thought, were somewhere in the sea, or at the bottom of the first bend, "
         "and it did not matter which. She took a piece of bark from the path and let it fall into the water.";
}

namespace {
/// Runs the fetch script (`bash SCRIPT DIR`, which prints the GGUF's path); "" when it fails.
std::string fetch_smollm2(const std::string& script, const std::string& dir) {
  const std::string cmd = "bash '" + script + "' '" + dir + "'";
  RF_CHECK(script.find('\'') == std::string::npos && dir.find('\'') == std::string::npos,
           "main job: paths with a single quote are not supported: ", dir);
  std::FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return "";
  std::string path;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) path += buf;
  const int status = ::pclose(p);
  while (!path.empty() && (path.back() == '\n' || path.back() == '\r')) path.pop_back();
  return status == 0 && recurformer::detail::path_exists(path) ? path : "";
}

/// The main job on SmolLM2: calibrate -> convert half of the KV groups (--init fit) -> distill them
/// (a short attention transfer on the same text) -> generate with both -> perplexity of the original,
/// the converted and the distilled model on held-out text, with speed and cache side by side.
int run_smollm2_job(const Args& a, const std::string& gguf, const MainJobFiles& f, const std::string& home,
                           std::ostream& out, std::ostream& err) {
  ThreadPool pool(threads_of(a));
  const CpuExec exec{&pool};
  const std::string fitted = home + "/recurformer-fit", conv = home + "/recurformer", scores = home + "/scores.json";
  recurformer::detail::make_dirs(home);
  out << "recurformer main job: SmolLM2-135M-Instruct (a real Llama), turned into a RecurFormer.\n"
      << "[1/6] model " << gguf << "\n";
  auto t0 = Clock::now();
  // Like for like: the converted directory stores F32, so the original runs on the fp32 decoding of
  // its blocks too (served from the blocks, as `generate -m` does, it decodes about 4x faster on 2 Zen 4 cores).
  LlamaModelOptions like_converted;
  like_converted.serve_blocks = false;
  Loaded m = load(gguf, like_converted);
  const ModelConfig& c = m.model->config();
  out << "      " << c.n_layers << " layers, d_model " << c.d_model << ", " << c.n_q << " query / " << c.n_kv
      << " KV heads, vocabulary " << c.vocab_size << "; loaded in " << human_seconds(seconds_since(t0)) << "\n"
      << "      (run on the fp32 decoding of its quantised weights, as the converted model stores F32;\n"
      << "      `recurformer generate -m` multiplies by the 4-bit blocks instead, reading a sixth of the\n"
      << "      bytes: about 4x faster decode on 2 Zen 4 cores, docs/benchmarks.md)\n";
  const std::string calib = read_file(f.calibration_text), heldout = read_file(f.heldout_text);
  out << "[2/6] calibrating recency on " << f.calibration_text << " (" << calib.size() / 1024 << " KB)\n";
  const int seq = 256;
  const auto r = calibrate_text(m, calib, seq, a.window, exec, err);
  write_calibration(r, gguf, scores, out);
  out << "[3/6] converting half of the KV groups (--ratio 0.5 --init fit, fitted on the same text)\n";
  Args ca = a;
  ca.ratio = 0.5, ca.threshold = -1, ca.init = "fit", ca.file = f.calibration_text, ca.ctx = seq, ca.ctx_set = true;
  ca.force = true;  // the job's own directory, rewritten each run
  t0 = Clock::now();
  convert_model(gguf, parse_calibration_scores(read_file(scores), scores), ca, fitted, out, err, false);
  out << "      converted in " << human_seconds(seconds_since(t0)) << "\n";
  // A short attention transfer: enough to show what it does (held-out perplexity about halves), not
  // what training recovers (docs/quality.md: distill + finetune on 1 MB of text).
  Args da = ca;
  da.steps = 40, da.batch_seqs = 2;
  out << "[4/6] distilling: each recurrent group learns to reproduce the attention it replaced (" << da.steps
      << " steps of " << da.batch_seqs << " x " << seq << " tokens per group, the same text)\n";
  t0 = Clock::now();
  distill_model(fitted, gguf, da, conv, out, err, false);
  out << "      distilled in " << human_seconds(seconds_since(t0)) << "\n";
  Loaded rf = load(conv);
  const std::string prompt = a.prompt.empty() ? "The three most important inventions of the nineteenth century were" : a.prompt;
  const SamplingParams greedy{0.f, 0, 1.f, a.seed};
  const int n = a.n_predict;
  out << "[5/6] generating " << n << " tokens from \"" << prompt << "\" (greedy)\n\n--- original ---\n" << prompt;
  const CacheOptions co = cache_options(a);
  const DType ct = co.type;
  const auto s1 = generate(m, prompt, n, a.ctx, a.batch, greedy, exec, &out, co);
  out << "\n";
  print_generate_stats(out, s1);
  const int recurrent = rf.model->head_layout().count(HeadKind::recurrent);
  out << "\n--- RecurFormer (" << recurrent << " of " << c.n_layers * c.n_kv << " KV groups recurrent) ---\n" << prompt;
  const auto s2 = generate(rf, prompt, n, a.ctx, a.batch, greedy, exec, &out, co);
  out << "\n";
  print_generate_stats(out, s2);
  out << "\n[6/6] perplexity on held-out text " << f.heldout_text << " (llama.cpp's protocol, chunks of " << seq
      << " tokens)\n";
  const double p1 = measure_perplexity(m, heldout, seq, a.batch, exec, co).ppl;
  const double p2 = measure_perplexity(rf, heldout, seq, a.batch, exec, co).ppl;
  const double p_fit = measure_perplexity(load(fitted), heldout, seq, a.batch, exec, co).ppl;
  const int64_t ctx = c.max_position_embeddings;
  out << "      and decode speed with the cache filled to " << ctx << " tokens (synthetic keys, values and states)\n";
  const BenchPoint d1 = bench_at(*m.model, ctx, 16, 32, exec, co), d2 = bench_at(*rf.model, ctx, 16, 32, exec, co);
  HybridCacheConfig orig_cache = m.model->cache_config(1, 1), rf_cache = rf.model->cache_config(1, 1);
  const CacheBytes b1 = hybrid_cache_spec_bytes(orig_cache, ctx, dtype_size(ct)),
                   b2 = hybrid_cache_spec_bytes(rf_cache, ctx, dtype_size(ct));
  char buf[256];
  const std::string deep = "at " + std::to_string(ctx / 1024) + "K tokens";
  const std::string cache_head = std::string("cache (") + dtype_name(ct) + ")";
  std::snprintf(buf, sizeof buf, "\n%-26s %12s %12s %16s %12s\n", "", "decode tok/s", "decode tok/s", cache_head.c_str(),
                "perplexity");
  out << buf;
  std::snprintf(buf, sizeof buf, "%-26s %12s %12s %16s %12s\n", "", "(above)", deep.c_str(), deep.c_str(), "(held-out)");
  out << buf;
  const auto row = [&](const char* name, const GenerateStats& st, const BenchPoint& d, const CacheBytes& b, double ppl) {
    const double tps = st.generated > 1 ? double(st.generated - 1) / std::max(st.decode_s, 1e-9) : 0.0;
    std::snprintf(buf, sizeof buf, "%-26s %12.1f %12.1f %16s %12.2f\n", name, tps, d.decode_tps,
                  human_bytes(b.total).c_str(), ppl);
    out << buf;
  };
  row("original", s1, d1, b1, p1);
  row("RecurFormer (half groups)", s2, d2, b2, p2);
  std::snprintf(buf, sizeof buf, "RecurFormer / original: decode %s %.2fx, cache %.1f%%, perplexity %+.1f%%\n",
                deep.c_str(), d2.decode_tps / d1.decode_tps, 100.0 * double(b2.total) / double(b1.total),
                100.0 * (p2 / p1 - 1));
  out << buf;
  std::snprintf(buf, sizeof buf, "(perplexity %.2f right after the conversion, %.2f after the short distillation)\n",
                p_fit, p2);
  out << buf
      << "(A recurrent group keeps a fixed state instead of every token's keys and values. This short\n"
      << "distillation on 4 KB of text recovers part of the quality; `recurformer distill` and `recurformer\n"
      << "finetune` on more text bring a converted SmolLM2 within 10% of the original's perplexity\n"
      << "(docs/quality.md).)\n";
  return 0;
}

int run_random_job(const Args& a, const std::string& home, std::ostream& out, std::ostream& err);
}  // namespace

/// The main job: SmolLM2 when the files say where to fetch it (and --offline is not given), else
/// the built-in random model.
int run_main_job(const Args& a, const std::string& home, const MainJobFiles& f, std::ostream& out,
                        std::ostream& err) {
  if (!a.offline && !f.fetch_script.empty()) {
    const std::string gguf = fetch_smollm2(f.fetch_script, home + "/smollm2");
    if (!gguf.empty()) return run_smollm2_job(a, gguf, f, home + "/smollm2", out, err);
    out << "recurformer: SmolLM2 could not be fetched (offline?), so the main job runs on the built-in random model.\n";
  }
  return run_random_job(a, home, out, err);
}
int run_main_job(const Args& a, const std::string& home, std::ostream& out, std::ostream& err) {
  return run_main_job(a, home, MainJobFiles{}, out, err);
}

namespace {
/// The main job on the random model: calibrate -> convert (ratio 0.5) -> generate with both.
int run_random_job(const Args& a, const std::string& home, std::ostream& out, std::ostream& err) {
  // One thread unless -t: the model is tiny, and fork-join over a busy machine only adds waiting.
  ThreadPool pool(a.threads > 0 ? a.threads : 1);
  const CpuExec exec{&pool};
  const std::string orig = home + "/llama", conv = home + "/recurformer", scores = home + "/scores.json";
  out << "recurformer: no model given (-m), so running the main job on a built-in model.\n"
      << "NOTE: its weights are RANDOM (seeded), so the generated text is gibberish; the point is the pipeline,\n"
      << "the speed and the cache. Use -m with a real Llama for real text (see --help).\n\n";
  if (ensure_random_model(orig, RandomModelSpec::default_model()))
    out << "[1/4] wrote the random Llama (4 layers, d_model 256, 4 query / 2 KV heads) to " << orig << "\n";
  else
    out << "[1/4] using the random Llama in " << orig << "\n";
  Loaded m = load(orig);
  out << "[2/4] calibrating on the built-in text\n";
  const auto r = calibrate_text(m, builtin_text(), 128, a.window, exec, err);
  write_calibration(r, orig, scores, out);
  out << "[3/4] converting half of the KV groups (--ratio 0.5)\n";
  Args ca = a;
  ca.ratio = 0.5, ca.threshold = -1;
  ca.force = true;  // the job's own directory, rewritten each run
  convert_model(orig, parse_calibration_scores(read_file(scores), scores), ca, conv, out, err);
  Loaded rf = load(conv);
  const std::string prompt = a.prompt.empty() ? "The river ran past the old mill and" : a.prompt;
  const int n = a.n_predict;
  const SamplingParams sp{a.temp, a.top_k, a.top_p, a.seed};
  out << "[4/4] generating " << n << " tokens from \"" << prompt << "\"\n\n--- original Llama ---\n" << prompt;
  const auto s1 = generate(m, prompt, n, a.ctx, a.batch, sp, exec, &out, cache_options(a));
  out << "\n";
  print_generate_stats(out, s1);
  out << "\n--- RecurFormer (" << rf.model->head_layout().count(HeadKind::recurrent) << " of "
      << m.model->config().n_layers * m.model->config().n_kv << " KV groups recurrent) ---\n" << prompt;
  const auto s2 = generate(rf, prompt, n, a.ctx, a.batch, sp, exec, &out, cache_options(a));
  out << "\n";
  print_generate_stats(out, s2);
  out << "\n";
  print_cache_saving(m.model->config(), *rf.model->config().recurformer, out, cache_options(a).type);
  return 0;
}
}  // namespace

}  // namespace runner
