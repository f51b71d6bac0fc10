// src/model/convert.cpp: turning a Llama into a RecurFormer checkpoint (see recurformer/model/convert.hpp).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "recurformer/model/convert.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/config.hpp"
#include "recurformer/model/fit_init.hpp"
#include "model/detail/llama_weights.hpp"
#include "recurformer/model/random_model.hpp"
#include "recurformer/model/safetensors.hpp"
#include "recurformer/model/tokenizer.hpp"

namespace recurformer {

std::string fit_report_json(const std::vector<FitGroupError>& e, const ConvertOptions& o) {
  nlohmann::ordered_json groups = nlohmann::ordered_json::array();
  for (const FitGroupError& g : e)
    groups.push_back({{"layer", g.layer}, {"group", g.group}, {"fit_error", g.fit_error}, {"default_error", g.default_error}});
  nlohmann::ordered_json r;
  r["init"] = "fit";
  r["window"] = o.recency_window;
  r["delta_rule"] = "dt_up = 0, D = 1, delta = 1 / (window * min_n exp(A_log[c, n])): the slowest state decays to 1/e over the window";
  r["error"] = "||y - y_attn|| / ||y_attn|| over the group's query heads, calibration tokens and channels";
  r["groups"] = groups;
  return r.dump(2) + "\n";
}

namespace detail {
void copy_file(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  RF_CHECK(in, from, ": cannot open for reading");
  std::ofstream out(to, std::ios::binary);
  RF_CHECK(out, to, ": cannot open for writing");
  out << in.rdbuf();
  RF_CHECK(out, to, ": write error");
}

/// Refuses an output directory a conversion would clobber by accident, before any long work: a
/// non-directory, a non-empty directory unless `replace`, one holding the input model (replace
/// would delete it), or a parent that cannot be written.
void check_output_dir(const std::string& out_dir, const std::filesystem::path& input, bool replace) {
  namespace fs = std::filesystem;
  RF_CHECK(!out_dir.empty(), "convert: no output directory");
  std::error_code ec;
  const fs::path out = fs::absolute(out_dir);
  if (fs::exists(out, ec)) {
    RF_CHECK(fs::is_directory(out, ec), "convert: ", out_dir, " exists and is not a directory");
    const std::string in = fs::canonical(input, ec).string(), o = fs::canonical(out, ec).string();
    RF_CHECK(in != o && in.compare(0, o.size() + 1, o + "/") != 0, "convert: the output directory ", out_dir,
             " holds the input model ", input.string());
    RF_CHECK(replace || fs::is_empty(out, ec), "convert: ", out_dir,
             " exists and is not empty (--force replaces it whole)");
  }
  make_dirs(out.parent_path().string());
  RF_CHECK(::access(out.parent_path().c_str(), W_OK) == 0, "convert: cannot write in ", out.parent_path().string());
}

/// A sibling directory the output is written into, renamed over the destination when complete,
/// and removed (with whatever it holds) when the conversion fails, so a failure leaves no partial
/// model and a success leaves no stale file of an earlier one.
StagingDir::StagingDir(std::string dest) : dest_(std::move(dest)), path_(dest_ + ".partial-" + std::to_string(::getpid())) {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
  make_dirs(path_);
}

StagingDir::~StagingDir() {
  std::error_code ec;
  if (!committed_) std::filesystem::remove_all(path_, ec);
}

void StagingDir::commit() {
  std::error_code ec;
  std::filesystem::remove_all(dest_, ec);
  RF_CHECK(!ec, "convert: cannot replace ", dest_, " (", ec.message(), ")");
  std::filesystem::rename(path_, dest_, ec);
  RF_CHECK(!ec, "convert: cannot rename ", path_, " to ", dest_, " (", ec.message(), ")");
  committed_ = true;
}

}  // namespace detail

/// The RecurFormer config a conversion with these options writes.
RecurFormerConfig convert_config(const ModelConfig& c, const ConvertOptions& o) {
  RecurFormerConfig rf;
  rf.recurrent = o.recurrent;
  if (rf.recurrent.d_state == 0) rf.recurrent.d_state = c.head_dim;
  rf.recency_window = o.recency_window;
  rf.streaming = o.streaming;
  rf.layout = o.layout;
  rf.recency_scores = o.recency_scores;
  detail::check_recurformer(rf, c, "convert");
  return rf;
}

/// Writes the RecurFormer checkpoint of `ck` (a HF directory or a GGUF file) into `out_dir`. With init fit, returns
/// the errors per recurrent group (also written to out_dir/fit_report.json); `exec` runs the fit. The
/// directory appears complete or not at all (detail::StagingDir); an existing non-empty one is
/// refused unless o.replace.
std::vector<FitGroupError> convert_to_recurformer(const Checkpoint& ck, const ConvertOptions& o,
                                                  const std::string& final_dir, CpuExec exec) {
  const ModelConfig& c = ck.config();
  const bool gguf = ck.format() == Checkpoint::Format::gguf;
  RF_CHECK(!gguf || !ck.has("rope_freqs.weight"), "convert: ", ck.path().string(),
           " carries its RoPE scaling as rope_freqs.weight, which a HF config.json cannot express yet");
  RF_CHECK(!c.recurformer, "convert: ", ck.path().string(), " is already a RecurFormer (its config has a recurformer object)");
  o.layout.check(c.n_layers, c.n_kv);
  const RecurFormerConfig rf = convert_config(c, o);
  const int64_t d = c.d_model, hd = c.head_dim, r = rf.recurrent.dt_rank, N = rf.recurrent.d_state,
                Kc = rf.recurrent.conv_kernel;
  const bool fit = o.init == ConvertInit::fit;
  RF_CHECK(!fit || int64_t(o.fit_data.size()) == rf.layout.count_state_groups(), "convert: --init fit has data for ",
           o.fit_data.size(), " groups, the layout has ", rf.layout.count_state_groups(), " recurrent and windowed groups");
  std::vector<FitGroupError> errors;
  detail::check_output_dir(final_dir, ck.path(), o.replace);
  detail::StagingDir staging(final_dir);
  const std::string& out_dir = staging.path();
  std::vector<TensorRef> tensors;
  std::deque<std::vector<uint8_t>> owned_bytes;  // re-stored or un-permuted original tensors
  const bool unpermute = gguf && c.rope_layout == RopeLayout::interleaved;
  for (const std::string& name : ck.tensor_names()) {
    TensorRef t = ck.tensor(name);
    const bool is_qk = unpermute && t.shape.size() == 2 &&
                       (name.find("self_attn.q_proj.weight") != std::string::npos ||
                        name.find("self_attn.k_proj.weight") != std::string::npos);
    const DType to = o.weight_dtype ? *o.weight_dtype : t.dtype;
    if (!is_qk && to == t.dtype) {
      tensors.push_back(t);
      continue;
    }
    owned_bytes.emplace_back(size_t(t.numel()) * size_t(dtype_size(to)));
    uint8_t* dst = owned_bytes.back().data();
    if (to == t.dtype) {
      std::memcpy(dst, t.data, t.nbytes());
    } else {
      dispatch_dtype("convert: weight dtype", to, [&](auto tag) {
        using T = typename decltype(tag)::type;
        detail::convert_values(t.data, t.dtype, t.numel(), reinterpret_cast<T*>(dst));
      });
    }
    if (is_qk) {
      const int64_t rows = t.shape[0], row_bytes = t.shape[1] * int64_t(dtype_size(to));
      std::vector<uint8_t> stored(dst, dst + rows * row_bytes);
      detail::unpermute_interleaved_heads(stored.data(), dst, rows / c.head_dim, c.head_dim, size_t(row_bytes));
    }
    t.dtype = to;
    t.data = dst;
    tensors.push_back(t);
  }
  std::deque<std::vector<float>> owned;
  std::mt19937_64 g(o.seed);
  auto uniform = [&] { return double(g() >> 11) * (1.0 / 9007199254740992.0); };
  auto add = [&](const std::string& name, std::vector<int64_t> shape, std::vector<float> v) {
    owned.push_back(std::move(v));
    tensors.push_back({name, DType::f32, std::move(shape), owned.back().data()});
  };
  for (int l = 0; l < c.n_layers; ++l) {
    for (int j : rf.layout.layers[size_t(l)].state_groups()) {
      const std::string p = "model.layers." + std::to_string(l) + ".self_attn.recurrent." + std::to_string(j) + ".";
      if (rf.layout.layers[size_t(l)].groups[size_t(j)] == HeadKind::windowed)  // starts as a streaming group
        add(p + "alpha", {c.n_q / c.n_kv}, std::vector<float>(size_t(c.n_q / c.n_kv), 0.f));
      std::vector<float> down(size_t(r * d));
      const double a = std::sqrt(3.0 / double(d));
      for (auto& x : down) x = float((2 * uniform() - 1) * a);
      add(p + "dt_down.weight", {r, d}, std::move(down));
      add(p + "dt_up.weight", {hd, r}, std::vector<float>(size_t(hd * r), 0.f));
      std::vector<float> bias(static_cast<size_t>(hd));
      const double lo = std::log(double(o.dt_min)), hi = std::log(double(o.dt_max));
      for (auto& x : bias) x = float(detail::softplus_inverse(std::exp(lo + (hi - lo) * uniform())));
      if (fit) {
        const FitGroupData& fd = o.fit_data[errors.size()];
        RF_CHECK(fd.layer == l && fd.group == j, "convert: fit data for layer ", fd.layer, " group ", fd.group,
                 " where layer ", l, " group ", j, " was expected");
        FitResult fr = fit_recurrent_group(fd, hd, c.n_q / c.n_kv, bias, FitOptions{int(Kc), o.recency_window}, exec);
        errors.push_back({l, j, fr.fit_error, fr.default_error});
        if (o.progress) o.progress(int64_t(errors.size()), int64_t(o.fit_data.size()));
        add(p + "dt_bias", {hd}, std::move(fr.dt_bias));
        add(p + "A_log", {hd, N}, std::move(fr.A_log));
        add(p + "D", {hd}, std::move(fr.D));
        add(p + "conv1d.weight", {hd, Kc}, std::move(fr.conv_weight));
        add(p + "conv1d.bias", {hd}, std::move(fr.conv_bias));
        continue;
      }
      add(p + "dt_bias", {hd}, std::move(bias));
      std::vector<float> A_log(size_t(hd * N));
      for (int64_t ch = 0; ch < hd; ++ch)
        for (int64_t n = 0; n < N; ++n) A_log[size_t(ch * N + n)] = float(std::log(double(n + 1)));
      add(p + "A_log", {hd, N}, std::move(A_log));
      add(p + "D", {hd}, std::vector<float>(static_cast<size_t>(hd), 0.f));
      std::vector<float> conv(size_t(hd * Kc), 0.f);
      for (int64_t ch = 0; ch < hd; ++ch) conv[size_t(ch * Kc + Kc - 1)] = 1.f;
      add(p + "conv1d.weight", {hd, Kc}, std::move(conv));
      add(p + "conv1d.bias", {hd}, std::vector<float>(static_cast<size_t>(hd), 0.f));
    }
  }
  write_safetensors(out_dir + "/model.safetensors", tensors, {{"format", "pt"}});
  if (gguf) {
    const GgufVocab* v = ck.gguf_tokenizer();
    RF_CHECK(v, "convert: ", ck.path().string(), " has no tokenizer metadata (tokenizer.ggml.*) to write");
    const GgufValue* tmpl = ck.gguf()->find("tokenizer.chat_template");
    const std::string chat = tmpl && tmpl->type == GgufValueType::string ? tmpl->s : std::string();
    detail::write_text(out_dir + "/tokenizer.json", detail::gguf_to_hf_tokenizer_json(*v));
    detail::write_text(out_dir + "/tokenizer_config.json",
                       detail::gguf_to_hf_tokenizer_config_json(*v, chat, c.max_position_embeddings));
    ModelConfig hf = c;
    hf.rope_layout = RopeLayout::rotate_half;  // the rows are in HF order now
    const DType wd = o.weight_dtype ? *o.weight_dtype : ck.tensor("model.layers.0.self_attn.q_proj.weight").dtype;
    hf.torch_dtype = wd == DType::f32 ? "float32" : wd == DType::f16 ? "float16" : "bfloat16";
    hf.recurformer.reset();
    detail::write_text(out_dir + "/config.json", config_json_with_recurformer(model_config_to_json(hf), rf));
  } else {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json", "tokenizer.model"}) {
      const std::string src = (ck.path() / f).string();
      if (detail::path_exists(src)) detail::copy_file(src, out_dir + "/" + f);
    }
    detail::write_text(out_dir + "/config.json", config_json_with_recurformer(ck.config_json_text(), rf));
  }
  if (fit) detail::write_text(out_dir + "/fit_report.json", fit_report_json(errors, o));
  staging.commit();
  return errors;
}

}  // namespace recurformer
