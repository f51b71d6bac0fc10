// recurformer/model/convert.hpp: turning a Llama into a RecurFormer checkpoint (spec sections 3, 7).
//
// The output directory holds the original config.json with the "recurformer" object added, the
// tokenizer files copied, and model.safetensors with every original tensor (same names, dtypes and
// bytes) plus, per recurrent group, the seven new tensors (per windowed group also alpha, zeros). The new tensors are stored in fp32
// (they are small, and A_log / dt_bias lose meaning in 16 bits), initialised as spec section 3's
// `default`: dt_up = 0, dt_bias = softplus^-1(Δ0) with Δ0 log-uniform in [1e-3, 1e-1] (seeded),
// A_log[c, n] = log(n + 1), D = 0, conv identity (last tap 1), conv bias 0; dt_down is seeded
// uniform with std 1/sqrt(d_model) (it has no effect while dt_up is 0, and gives training a start).
// A GGUF input (any tensor type the reader takes; quantised ones arrive dequantised to fp32) is
// written as the HF directory it came from: HF tensor names, llama q/k rows un-permuted back to
// the rotate_half order (llama.cpp permutes them for interleaved RoPE), a full config.json, and
// tokenizer.json / tokenizer_config.json (with the GGUF's chat template) equivalent to its
// vocabulary. `weight_dtype` re-stores the original tensors (F32, F16 or BF16; default: as read).
// `fit` (model/fit_init.hpp) starts from the same tensors and replaces dt_bias, D and the conv with
// the least-squares fit to the recorded attention outputs; the per-group errors go to fit_report.json
// beside the checkpoint (spec section 7 lists the "recurformer" object exactly, so not there).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "recurformer/core/exec.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/config.hpp"
#include "recurformer/model/fit_init.hpp"

namespace recurformer {

enum class ConvertInit { default_init, fit };

struct ConvertOptions {
  HeadLayout layout;                          ///< n_layers x n_kv kinds
  RecurrentConfig recurrent{0, 8, 4};         ///< d_state 0: head_dim
  StreamingConfig streaming;
  int recency_window = 16;
  std::vector<std::vector<float>> recency_scores;  ///< optional [layers][n_kv]
  uint64_t seed = 0x5eed;
  float dt_min = 1e-3f, dt_max = 1e-1f;
  ConvertInit init = ConvertInit::default_init;
  std::vector<FitGroupData> fit_data;  ///< init fit: one entry per recurrent or windowed group (record_fit_data)
  std::optional<DType> weight_dtype;   ///< re-store the original tensors in this dtype (default: as read)
  std::function<void(int64_t, int64_t)> progress;  ///< init fit: (groups fitted, groups) after each group
  bool replace = false;  ///< an existing non-empty output directory is replaced whole (else refused)
};

/// The errors of one fitted group (relative to the original attention output).
struct FitGroupError {
  int layer = 0, group = 0;
  double fit_error = 0, default_error = 0;
};

std::string fit_report_json(const std::vector<FitGroupError>& e, const ConvertOptions& o);

namespace detail {
void copy_file(const std::string& from, const std::string& to);

/// Refuses an output directory a conversion would clobber by accident, before any long work: a
/// non-directory, a non-empty directory unless `replace`, one holding the input model (replace
/// would delete it), or a parent that cannot be written.
void check_output_dir(const std::string& out_dir, const std::filesystem::path& input, bool replace);

/// A sibling directory the output is written into, renamed over the destination when complete,
/// and removed (with whatever it holds) when the conversion fails, so a failure leaves no partial
/// model and a success leaves no stale file of an earlier one.
class StagingDir {
 public:
  explicit StagingDir(std::string dest);
  ~StagingDir();
  StagingDir(const StagingDir&) = delete;
  StagingDir& operator=(const StagingDir&) = delete;
  const std::string& path() const { return path_; }
  void commit();

 private:
  std::string dest_, path_;
  bool committed_ = false;
};

}  // namespace detail

/// The RecurFormer config a conversion with these options writes.
RecurFormerConfig convert_config(const ModelConfig& c, const ConvertOptions& o);

/// Writes the RecurFormer checkpoint of `ck` (a HF directory or a GGUF file) into `out_dir`. With init fit, returns
/// the errors per recurrent group (also written to out_dir/fit_report.json); `exec` runs the fit. The
/// directory appears complete or not at all (detail::StagingDir); an existing non-empty one is
/// refused unless o.replace.
std::vector<FitGroupError> convert_to_recurformer(const Checkpoint& ck, const ConvertOptions& o,
                                                  const std::string& final_dir, CpuExec exec = {});

}  // namespace recurformer
