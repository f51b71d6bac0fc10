// src/model/finetune_train.cpp: the continual-training loop over a FinetuneModel (see
// recurformer/model/finetune_train.hpp): sample order, recall-practice samples, checkpoints and resume.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "recurformer/model/finetune_train.hpp"
#include "recurformer/core/dispatch.hpp"
#include "recurformer/model/config.hpp"
#include "recurformer/model/convert.hpp"
#include "recurformer/model/random_model.hpp"
#include "recurformer/model/safetensors.hpp"
#include "recurformer/train/adamw.hpp"

namespace recurformer {

const char* finetune_train_name(FinetuneTrain t) {
  return t == FinetuneTrain::all ? "all" : t == FinetuneTrain::recurrent ? "recurrent" : "none";
}

/// Whether training sample i of a run seeded `seed` is a repeat sample (a pure function, so a resumed
/// run draws the same ones).
bool finetune_repeat_sample(uint64_t seed, int64_t i, double repeat) {
  if (repeat <= 0) return false;
  uint64_t h = (seed + 0x632BE59BD9B4E019ull) * 0xD6E8FEB86659FD93ull ^ uint64_t(i) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 32, h *= 0xD6E8FEB86659FD93ull, h ^= h >> 32;  // mixed: consecutive i are independent draws
  return double(h >> 11) * 0x1.0p-53 < repeat;
}

/// Appends sample `seq` of `tokens` cut into sequences of ctx: the sequence itself, or as a repeat
/// sample its first ctx - ctx/2 tokens and then a copy of their first ctx/2 (ctx tokens either way).
void append_finetune_sample(const std::vector<int32_t>& tokens, int64_t seq, int64_t ctx, bool repeat,
                            std::vector<int32_t>& out) {
  const size_t at = out.size();
  const int64_t head = repeat ? ctx - ctx / 2 : ctx;
  out.resize(at + size_t(ctx));
  std::copy_n(tokens.begin() + seq * ctx, head, out.begin() + int64_t(at));
  std::copy_n(out.begin() + int64_t(at), ctx - head, out.begin() + int64_t(at) + head);  // the copy (repeat)
}

namespace detail {

/// Writes the checkpoint (see the top of recurformer/model/finetune_train.hpp) to `dir`, replacing it whole.
void write_finetune_checkpoint(const FinetuneModel& m, const std::vector<float>& theta, const AdamW& opt,
                               const std::string& dir, const nlohmann::ordered_json& trainer) {
  const Checkpoint& ck = m.checkpoint();
  std::map<std::string, std::vector<unsigned char>> replaced;  // trained tensors in their stored dtype
  for (const FinetuneParam& p : m.params()) {
    const TensorRef& t = ck.tensor(p.name);
    auto it = replaced.find(p.name);
    if (it == replaced.end()) {
      const auto* b = static_cast<const unsigned char*>(t.data);
      it = replaced.emplace(p.name, std::vector<unsigned char>(b, b + t.nbytes())).first;
    }
    std::vector<unsigned char>& bytes = it->second;
    dispatch_dtype("finetune: tensor dtype", t.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      T* dst = reinterpret_cast<T*>(bytes.data()) + p.row0 * p.cols;
      for (int64_t i = 0; i < p.rows * p.cols; ++i) dst[i] = T(theta[size_t(p.offset + i)]);
    });
  }
  StagingDir staging(dir);
  std::vector<TensorRef> tensors;
  for (const std::string& name : ck.tensor_names()) {
    TensorRef t = ck.tensor(name);
    const auto it = replaced.find(name);
    if (it != replaced.end()) t.data = it->second.data();
    tensors.push_back(t);
  }
  write_safetensors(staging.path() + "/model.safetensors", tensors, {{"format", "pt"}});
  const int64_t n = int64_t(theta.size());
  auto flat = [&](const char* name, const std::vector<float>& v) {
    TensorRef t;
    t.name = name, t.dtype = DType::f32, t.shape = {n}, t.data = v.data();
    return t;
  };
  write_safetensors(staging.path() + "/optimizer.safetensors",
                    {flat("theta", theta), flat("m", opt.first_moment()), flat("v", opt.second_moment())},
                    {{"step", std::to_string(opt.steps())}});
  namespace fs = std::filesystem;
  for (const fs::directory_entry& e : fs::directory_iterator(ck.path())) {
    const std::string f = e.path().filename().string();
    if (!e.is_regular_file() || f.find(".safetensors") != std::string::npos || f == "trainer.json" ||
        f == "finetune_report.json")
      continue;
    copy_file(e.path().string(), staging.path() + "/" + f);
  }
  write_text(staging.path() + "/trainer.json", trainer.dump(2) + "\n");
  staging.commit();
}

}  // namespace detail

/// Continual training of `student` (a HF directory; a RecurFormer or a plain model) on `tokens`,
/// written to `out_dir` (a non-empty one is refused unless `replace`, or unless it is `resume_dir`).
/// With `teacher` and o.kl_weight > 0 the loss adds kl_weight * KL(teacher || student). With
/// `resume_dir`, the run continues from the checkpoint there (same student, same trained set).
FinetuneResult finetune(std::shared_ptr<const Checkpoint> student, std::shared_ptr<const Checkpoint> teacher,
                        const std::vector<int32_t>& tokens, const FinetuneOptions& o, const std::string& out_dir,
                        bool replace, const std::string& resume_dir, CpuExec exec) {
  RF_CHECK(student, "finetune: no student");
  RF_CHECK(student->format() == Checkpoint::Format::safetensors, "finetune: the model must be a HF directory (the one `convert` or `distill` wrote), not ",
           student->path().string());
  RF_CHECK(o.ctx >= 2 && o.steps >= 1 && o.batch_seqs >= 1 && o.accum >= 1, "finetune: ctx >= 2, steps, batch_seqs and accum >= 1 are required");
  RF_CHECK(o.lr > 0 && o.kl_weight >= 0 && o.holdout > 0 && o.holdout < 1, "finetune: lr > 0, kl_weight >= 0 and holdout in (0, 1) are required");
  RF_CHECK(o.repeat >= 0 && o.repeat <= 1, "finetune: the repeat fraction must be in [0, 1], got ", o.repeat);
  RF_CHECK(o.kl_weight == 0 || teacher, "finetune: a KL weight needs a teacher (--teacher ORIGINAL)");
  RF_CHECK(!out_dir.empty(), "finetune: no output directory");
  const ModelConfig& c = student->config();
  if (teacher)
    RF_CHECK(teacher->config().vocab_size == c.vocab_size, "finetune: the teacher ", teacher->path().string(), " has a vocabulary of ",
             teacher->config().vocab_size, " tokens, the student ", c.vocab_size, ": not the model it was converted from");
  namespace fs = std::filesystem;
  const bool same_dir = !resume_dir.empty() && fs::exists(out_dir) && fs::exists(resume_dir) && fs::equivalent(out_dir, resume_dir);
  if (!same_dir) detail::check_output_dir(out_dir, student->path(), replace);
  const int64_t n_seq = int64_t(tokens.size()) / o.ctx;
  RF_CHECK(n_seq >= 2, "finetune: the text has ", tokens.size(), " tokens, ", n_seq, " sequence(s) of ", o.ctx,
           "; at least 2 are needed (one held out)");
  const int64_t n_hold = std::max<int64_t>(1, int64_t(std::floor(double(n_seq) * o.holdout)));
  const int64_t n_train = n_seq - n_hold;
  for (int32_t t : tokens) RF_CHECK(t >= 0 && t < c.vocab_size, "finetune: token id ", t, " is outside the vocabulary");

  const auto t0 = std::chrono::steady_clock::now();
  FinetuneModel model(student, o.train);
  std::unique_ptr<FinetuneModel> tmodel;
  if (teacher && o.kl_weight > 0) {
    tmodel = std::make_unique<FinetuneModel>(teacher, FinetuneTrain::none);
    model.set_teacher_head(finetune_lm_head(*teacher));
  }
  const int64_t n = model.num_params();
  RF_CHECK(n > 0, "finetune: nothing to train (", student->path().string(), " has no converted group; use --train all)");
  std::vector<AdamWSegment> seg;
  for (const FinetuneParam& p : model.params())
    if (p.matrix) seg.push_back({p.offset, p.offset + p.rows * p.cols, 1.f, o.weight_decay});
  AdamW opt(n, AdamWConfig{o.lr}, seg);
  int start = 0;
  if (!resume_dir.empty()) {
    const std::string tj = resume_dir + "/trainer.json";
    RF_CHECK(fs::exists(tj), "finetune: --resume ", resume_dir, " has no trainer.json (not a finetune checkpoint)");
    const auto j = nlohmann::json::parse(detail::read_text_file(tj));
    RF_CHECK(j.value("train", std::string()) == finetune_train_name(o.train) && j.value("params", int64_t(-1)) == n,
             "finetune: --resume ", resume_dir, " trained ", j.value("train", std::string("?")), " (", j.value("params", int64_t(-1)),
             " parameters); this run trains ", finetune_train_name(o.train), " (", n, ")");
    start = j.value("step", 0);
    RF_CHECK(start >= 0 && start <= o.steps, "finetune: --resume ", resume_dir, " is at step ", start, " of a run of ", o.steps, " steps");
    const SafetensorsFile f = SafetensorsFile::open(resume_dir + "/optimizer.safetensors");
    auto get = [&](const char* name) {
      const TensorRef& t = f.tensor(name);
      RF_CHECK(t.dtype == DType::f32 && t.numel() == n, "finetune: ", resume_dir, "/optimizer.safetensors: ", name, " has ",
               t.numel(), " values, expected ", n, " fp32");
      const float* p = static_cast<const float*>(t.data);
      return std::vector<float>(p, p + n);
    };
    model.theta() = get("theta");
    model.sync();
    opt.restore(get("m"), get("v"), start);
  }

  FinetuneResult r;
  r.train_sequences = n_train, r.heldout_sequences = n_hold, r.params = n, r.start_step = start;
  std::vector<int32_t> btok, bcu, targets;
  std::vector<float> th;
  // seqs: (sequence, repeat sample?)
  auto pack = [&](const std::vector<std::pair<int64_t, bool>>& seqs) {
    btok.clear();
    bcu.assign(1, 0);
    for (const auto& [s, rep] : seqs) {
      append_finetune_sample(tokens, s, o.ctx, rep, btok);
      bcu.push_back(int32_t(btok.size()));
    }
    const FinetuneBatch b{make_view<const int32_t>(btok.data(), {int64_t(btok.size())}),
                          make_view<const int32_t>(bcu.data(), {int64_t(bcu.size())})};
    next_token_targets(b, targets);
    return b;
  };
  auto heldout_ce = [&]() {
    double sum = 0;
    int64_t count = 0;
    for (int64_t s = n_train; s < n_seq; s += o.batch_seqs) {
      std::vector<std::pair<int64_t, bool>> seqs;
      for (int64_t k = s; k < std::min(n_seq, s + o.batch_seqs); ++k) seqs.emplace_back(k, false);
      const FinetuneBatch b = pack(seqs);
      const auto res = model.loss(b, make_view<const int32_t>(targets.data(), {int64_t(targets.size())}), nullptr, 1.f, exec);
      sum += res.ce * double(res.count), count += res.count;
    }
    return count ? sum / double(count) : 0.0;
  };
  r.heldout_before = heldout_ce();

  // sample i -> sequence: position i % n_train of epoch (i / n_train)'s permutation
  std::vector<int64_t> perm;
  int64_t perm_epoch = -1;
  auto sample = [&](int64_t i) {
    const int64_t e = i / n_train;
    if (e != perm_epoch) {
      perm.resize(size_t(n_train));
      std::iota(perm.begin(), perm.end(), int64_t(0));
      std::mt19937_64 rng(o.seed * 0x9E3779B97F4A7C15ull + uint64_t(e));
      std::shuffle(perm.begin(), perm.end(), rng);
      perm_epoch = e;
    }
    return perm[size_t(i % n_train)];
  };
  auto trainer_json = [&](int step, double loss) {
    nlohmann::ordered_json j;
    j["step"] = step;
    j["steps"] = o.steps;
    j["train"] = finetune_train_name(o.train);
    j["params"] = n;
    j["ctx"] = o.ctx;
    j["batch_seqs"] = o.batch_seqs;
    j["accum"] = o.accum;
    j["lr"] = o.lr;
    j["weight_decay"] = o.weight_decay;
    j["kl_weight"] = o.kl_weight;
    j["repeat"] = o.repeat;
    j["seed"] = o.seed;
    j["loss"] = loss;
    j["heldout_ce_before"] = r.heldout_before;
    return j;
  };

  std::vector<float> grad(static_cast<size_t>(n));
  const int64_t warmup = int64_t(o.warmup * o.steps);
  const int end = o.stop_after > 0 ? std::min(o.steps, o.stop_after) : o.steps;
  int64_t trained_tokens = 0;
  const auto t_train = std::chrono::steady_clock::now();
  double loss = 0;
  for (int step = start; step < end; ++step) {
    std::fill(grad.begin(), grad.end(), 0.f);
    loss = 0;
    for (int m = 0; m < o.accum; ++m) {
      std::vector<std::pair<int64_t, bool>> seqs;
      for (int b = 0; b < o.batch_seqs; ++b) {
        const int64_t i = (int64_t(step) * o.accum + m) * o.batch_seqs + b;
        seqs.emplace_back(sample(i), finetune_repeat_sample(o.seed, i, o.repeat));
      }
      const FinetuneBatch b = pack(seqs);
      View<const float, 2> thv;
      if (tmodel) {
        th.resize(btok.size() * size_t(teacher->config().d_model));
        auto v = make_view(th.data(), {int64_t(btok.size()), int64_t(teacher->config().d_model)});
        tmodel->hidden(b, v, exec);
        thv = v;
      }
      const auto res = model.loss(b, make_view<const int32_t>(targets.data(), {int64_t(targets.size())}), &grad,
                                  1.f / float(o.accum), exec, thv, o.kl_weight);
      loss += res.loss / o.accum;
      trained_tokens += int64_t(btok.size());
    }
    clip_grad_norm(grad, o.clip);
    opt.step(model.theta(), grad, warmup_cosine(step, warmup, o.steps), exec);
    model.sync();
    if (step == start) r.first_loss = loss;
    r.last_loss = loss;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_train).count();
    r.tokens_per_second = el > 0 ? double(trained_tokens) / el : 0;
    if (o.progress)
      o.progress(step + 1, o.steps, loss, r.tokens_per_second, el / double(step + 1 - start) * double(end - step - 1));
    if (o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < end)
      detail::write_finetune_checkpoint(model, model.theta(), opt, out_dir, trainer_json(step + 1, loss));
  }
  r.end_step = std::max(start, end);
  r.heldout_after = heldout_ce();
  nlohmann::ordered_json j = trainer_json(r.end_step, loss);
  j["heldout_ce_after"] = r.heldout_after;
  detail::write_finetune_checkpoint(model, model.theta(), opt, out_dir, j);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace recurformer
