// Continual training (model/finetune.hpp, model/finetune_train.hpp, `recurformer finetune`): the
// training forward against LlamaModel::forward on a converted tiny model with attention, recurrent,
// streaming and windowed groups (alpha made nonzero); the loss's gradient against central finite differences, tensor by tensor, with
// and without the KL term; the trainer end to end (loss falls, checkpoint loads and generates, only
// trainable tensors change, resume = uninterrupted run bit for bit); the one-line errors.
#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>

#include "../examples/runner_jobs.hpp"
#include "recurformer/model/finetune.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {
runner::Args args(std::vector<std::string> v) {
  v.insert(v.begin(), "recurformer");
  std::vector<char*> argv;
  for (auto& s : v) argv.push_back(s.data());
  return runner::parse_args(int(argv.size()), argv.data());
}

/// A tiny random model and its RecurFormer with every kind (3 KV groups per layer), a streaming
/// window short enough for the mask to matter, and the windowed groups' alpha (0 at conversion)
/// set to random values so that their recurrent part counts.
struct Tiny {
  rftest::TempDir dir{"rf_finetune_"};
  std::string orig, rf;
  explicit Tiny(DType dtype = DType::f32, bool tie = true) {
    RandomModelSpec s;
    s.n_layers = 2, s.d_model = 48, s.ffn = 40, s.n_q = 6, s.n_kv = 3, s.head_dim = 64;
    s.weight_dtype = dtype, s.tie_embeddings = tie;
    orig = dir / "m", rf = dir / "rf";
    write_random_model(orig, s);
    ConvertOptions o;
    o.layout.layers = {LayerLayout{{HeadKind::attention, HeadKind::recurrent, HeadKind::windowed}},
                       LayerLayout{{HeadKind::streaming, HeadKind::windowed, HeadKind::recurrent}}};
    o.streaming.sink = 2, o.streaming.window = 3;
    o.recurrent.dt_rank = 3;
    const std::string converted = dir / "rf0";
    convert_to_recurformer(Checkpoint::open(orig), o, converted);
    std::filesystem::create_directory(rf);
    for (const auto& e : std::filesystem::directory_iterator(converted))
      if (e.path().filename() != "model.safetensors") std::filesystem::copy_file(e.path(), std::filesystem::path(rf) / e.path().filename());
    const Checkpoint ck = Checkpoint::open(converted);
    std::vector<TensorRef> tensors;
    std::deque<std::vector<float>> alphas;
    std::mt19937 gen(11);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (const std::string& n : ck.tensor_names()) {
      TensorRef t = ck.tensor(n);
      if (n.find(".alpha") != std::string::npos) {
        REQUIRE(t.dtype == DType::f32);
        alphas.emplace_back(size_t(t.numel()));
        for (float& a : alphas.back()) a = u(gen);
        t.data = alphas.back().data();
      }
      tensors.push_back(t);
    }
    REQUIRE(alphas.size() == 2);
    write_safetensors(rf + "/model.safetensors", tensors, {{"format", "pt"}});
  }
};

std::vector<int32_t> random_tokens(int64_t n, int vocab, std::mt19937& g) {
  std::uniform_int_distribution<int> u(0, vocab - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = u(g);
  return t;
}
}  // namespace

TEST_CASE("finetune: the training forward's logits equal LlamaModel::forward's", "[finetune]") {
  Tiny m;
  auto ck = std::make_shared<const Checkpoint>(Checkpoint::open(m.rf));
  LlamaModel ref(ck);
  FinetuneModel ft(ck, FinetuneTrain::recurrent);
  std::mt19937 gen(3);
  const std::vector<int64_t> lens = {11, 1, 7};  // past the streaming window (sink 2 + window 3)
  std::vector<int32_t> tokens, cu = {0};
  for (int64_t n : lens) {
    const auto t = random_tokens(n, 288, gen);
    tokens.insert(tokens.end(), t.begin(), t.end());
    cu.push_back(int32_t(tokens.size()));
  }
  const int64_t T = int64_t(tokens.size()), V = 288;
  ThreadPool pool(2);
  std::vector<float> got(size_t(T * V));
  ft.logits({make_view<const int32_t>(tokens.data(), {T}), make_view<const int32_t>(cu.data(), {int64_t(cu.size())})},
            make_view(got.data(), {T, V}), CpuExec{&pool});
  double max_err = 0, max_ref = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    LlamaSession sess(ref, 1, 64, CpuExec{&pool});
    std::vector<float> want;
    sess.prefill(0, tokens.data() + cu[s], lens[s], &want);
    for (int64_t i = 0; i < lens[s] * V; ++i) {
      max_err = std::max(max_err, double(std::abs(want[size_t(i)] - got[size_t(cu[s] * V + i)])));
      max_ref = std::max(max_ref, double(std::abs(want[size_t(i)])));
    }
  }
  CAPTURE(max_err, max_ref);
  // fp32 throughout, the same ops in the same order except the packing (three sequences at once)
  // and the GEMM blocking: differences are rounding, ~1e-6 of the logits' size
  CHECK(max_err <= 1e-4 * max_ref);
  CHECK(max_ref > 0.1);
}

TEST_CASE("finetune: the loss's gradient matches finite differences, tensor by tensor (--train all, +- KL)", "[finetune]") {
  Tiny m;
  auto ck = std::make_shared<const Checkpoint>(Checkpoint::open(m.rf));
  auto tck = std::make_shared<const Checkpoint>(Checkpoint::open(m.orig));
  FinetuneModel ft(ck, FinetuneTrain::all);
  FinetuneModel teacher(tck, FinetuneTrain::none);
  REQUIRE(teacher.num_params() == 0);
  ft.set_teacher_head(finetune_lm_head(*tck));
  std::mt19937 gen(5);
  std::vector<int32_t> tokens = random_tokens(17, 288, gen), cu = {0, 9, 17}, targets;
  const FinetuneBatch b{make_view<const int32_t>(tokens.data(), {17}), make_view<const int32_t>(cu.data(), {3})};
  next_token_targets(b, targets);
  const auto tv = make_view<const int32_t>(targets.data(), {17});
  std::vector<float> th(size_t(17 * 48));
  teacher.hidden(b, make_view(th.data(), {17, 48}));
  const auto thv = make_view<const float>(th.data(), {17, 48});
  ThreadPool pool(2);
  const CpuExec exec{&pool};
  // The default init has dt_up = 0 (dt_down would get no gradient) and slow decays: recurrent
  // tensors in the ranges a trained model meets, so every tensor moves the loss
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  for (const FinetuneParam& p : ft.params()) {
    auto has = [&](const char* s) { return p.name.find(s) != std::string::npos; };
    for (int64_t i = 0; i < p.rows * p.cols; ++i) {
      float& x = ft.theta()[size_t(p.offset + i)];
      if (has("dt_up")) x = 0.5f * uni(gen);
      if (has("A_log")) x = 0.5f * uni(gen);
      if (has("dt_bias")) x = uni(gen);
      if (has("alpha")) x = uni(gen);
    }
  }
  ft.sync();
  for (float kl : {0.f, 0.7f}) {
    CAPTURE(kl);
    const View<const float, 2> tvh = kl > 0 ? thv : View<const float, 2>{};
    const std::vector<float> theta0 = ft.theta();
    std::vector<float> grad(theta0.size(), 0.f);
    const auto r = ft.loss(b, tv, &grad, 1.f, exec, tvh, kl);
    CHECK(r.count == 15);
    if (kl > 0) CHECK(r.kl > 0);
    auto loss_at = [&](const std::vector<float>& t) {
      ft.theta() = t;
      ft.sync();
      return ft.loss(b, tv, nullptr, 1.f, exec, tvh, kl).loss;
    };
    int checked = 0;
    for (const FinetuneParam& p : ft.params()) {
      CAPTURE(p.name);
      const int64_t n = p.rows * p.cols;
      std::vector<float> v(static_cast<size_t>(n));
      std::uniform_real_distribution<float> u(-1.f, 1.f);
      // half along the gradient, half random: the derivative is large enough for the check to bite
      // in every tensor, and a wrong gradient still disagrees with the difference along v
      double rn = 0, gn = 0, vn = 0, gv = 0;
      for (int64_t i = 0; i < n; ++i) {
        v[size_t(i)] = u(gen), rn += double(v[size_t(i)]) * v[size_t(i)];
        gn += double(grad[size_t(p.offset + i)]) * grad[size_t(p.offset + i)];
      }
      for (int64_t i = 0; i < n; ++i) {
        v[size_t(i)] = float(v[size_t(i)] / std::sqrt(rn) + grad[size_t(p.offset + i)] / std::sqrt(gn + 1e-30));
        vn += double(v[size_t(i)]) * v[size_t(i)];
      }
      for (int64_t i = 0; i < n; ++i) v[size_t(i)] /= float(std::sqrt(vn)), gv += double(grad[size_t(p.offset + i)]) * v[size_t(i)];
      const double h = 1e-2;
      std::vector<float> tp = theta0, tm = theta0;
      for (int64_t i = 0; i < n; ++i) tp[size_t(p.offset + i)] += float(h) * v[size_t(i)], tm[size_t(p.offset + i)] -= float(h) * v[size_t(i)];
      const double fd = (loss_at(tp) - loss_at(tm)) / (2 * h);
      CAPTURE(gv, fd);
      // the loss is an fp32 forward (~1e-6 relative rounding of a loss ~6: ~1e-4 after dividing by
      // 2h) plus O(h^2) curvature; a wrong chain factor (a missing 1/sqrt(hd), a transposed view, a
      // lost residual) is off by far more than 2% + 3e-4
      CHECK(std::abs(gv - fd) <= 2e-2 * std::abs(fd) + 3e-4);
      CHECK(std::abs(gv) > 3e-3);  // 10x the absolute tolerance: a zero or tiny gradient would fail
      ++checked;
    }
    ft.theta() = theta0;
    ft.sync();
    CHECK(checked >= 30);
  }
}

namespace {
std::string write_text_file(const rftest::TempDir& dir) {
  const std::string path = dir / "text.txt";
  std::ofstream f(path);
  f << runner::builtin_text() << "\n" << runner::builtin_text() << "\n";
  return path;
}
std::vector<unsigned char> file_bytes(const std::string& p) {
  const std::string s = runner::read_file(p);
  return std::vector<unsigned char>(s.begin(), s.end());
}
}  // namespace

TEST_CASE("finetune end to end: loss falls, only trainable tensors change, the checkpoint generates", "[finetune]") {
  Tiny m;
  const std::string text = write_text_file(m.dir);
  std::ostringstream out, err;
  REQUIRE(runner::run_finetune(args({"finetune", "-m", m.rf, "-f", text, "-c", "24", "--steps", "8", "--batch-seqs", "3",
                                     "--lr", "3e-3", "-t", "2", "-o", m.dir / "ft"}),
                               out, err) == 0);
  CHECK_THAT(err.str(), Catch::Contains("finetune: step 8/8, loss"));
  CHECK_THAT(err.str(), Catch::Contains("tokens/s, ETA"));
  CHECK_THAT(out.str(), Catch::Contains("held-out loss"));
  const auto tj = nlohmann::json::parse(runner::read_file(m.dir / "ft/trainer.json"));
  CHECK(tj["step"] == 8);
  CHECK(tj["train"] == "recurrent");
  // the training loss falls (lr 3e-3 on the recurrent groups of a tiny model: a clear drop)
  const double first = std::stod(out.str().substr(out.str().find("training loss ") + 14));
  const double last = std::stod(out.str().substr(out.str().find(" -> ", out.str().find("training loss ")) + 4));
  CAPTURE(out.str());
  CHECK(last < first - 0.05);
  // same format; only the converted groups' tensors and their own q/k/v rows (streaming groups' too) change
  CHECK(runner::read_file(m.dir / "ft/config.json") == runner::read_file(m.rf + "/config.json"));
  const Checkpoint a = Checkpoint::open(m.dir / "ft"), b = Checkpoint::open(m.rf);
  REQUIRE(a.tensor_names() == b.tensor_names());
  const ModelConfig& c = a.config();
  const int64_t hd = c.head_dim, g = c.n_q / c.n_kv, d = c.d_model;
  int changed = 0;
  for (const std::string& n : a.tensor_names()) {
    const TensorRef &ta = a.tensor(n), &tb = b.tensor(n);
    CHECK(ta.dtype == tb.dtype);
    const bool qkv = n.find("q_proj.weight") != std::string::npos || n.find("k_proj.weight") != std::string::npos ||
                     n.find("v_proj.weight") != std::string::npos;
    const bool same = std::memcmp(ta.data, tb.data, ta.nbytes()) == 0;
    if (n.find(".recurrent.") != std::string::npos) {
      changed += !same;
      CHECK(!same);
      continue;
    }
    if (!qkv) {
      CAPTURE(n);
      CHECK(same);
      continue;
    }
    const int layer = std::stoi(n.substr(13));
    const int64_t rows = n.find("q_proj") != std::string::npos ? g * hd : hd;
    const size_t row_bytes = size_t(d) * dtype_size(ta.dtype);
    for (int j = 0; j < c.n_kv; ++j) {
      const bool rec = c.recurformer->layout.layers[size_t(layer)].groups[size_t(j)] != HeadKind::attention;
      const size_t off = size_t(j * rows) * row_bytes, len = size_t(rows) * row_bytes;
      CHECK((std::memcmp(static_cast<const char*>(ta.data) + off, static_cast<const char*>(tb.data) + off, len) == 0) != rec);
    }
  }
  CHECK(changed == 30);  // 2 recurrent groups x 7 tensors + 2 windowed groups x 8 (alpha too)
  std::ostringstream gout, gerr;
  REQUIRE(runner::run_generate(args({"generate", "-m", m.dir / "ft", "-p", "hello", "-n", "4", "--temp", "0", "-t", "1"}),
                               gout, gerr) == 0);
  CHECK(!gout.str().empty());
}

TEST_CASE("finetune: resume continues bit for bit (k + (N - k) steps = N steps), --train all with KL", "[finetune]") {
  Tiny m;
  const std::string text = write_text_file(m.dir);
  auto ck = std::make_shared<const Checkpoint>(Checkpoint::open(m.rf));
  auto tck = std::make_shared<const Checkpoint>(Checkpoint::open(m.orig));
  const std::vector<int32_t> tokens = runner::tokenizer_of(*ck).encode(runner::read_file(text), true);
  FinetuneOptions o;
  o.ctx = 20, o.steps = 5, o.batch_seqs = 2, o.accum = 2, o.lr = 2e-3f, o.train = FinetuneTrain::all, o.kl_weight = 0.5f;
  o.repeat = 0.5;  // the repeat samples must be drawn alike after a resume too
  ThreadPool pool(2);
  const FinetuneResult full = finetune(ck, tck, tokens, o, m.dir / "full", false, "", CpuExec{&pool});
  CHECK(full.end_step == 5);
  FinetuneOptions first = o;
  first.stop_after = 2;
  const FinetuneResult a = finetune(ck, tck, tokens, first, m.dir / "split", false, "", CpuExec{&pool});
  CHECK(a.end_step == 2);
  CHECK(nlohmann::json::parse(runner::read_file(m.dir / "split/trainer.json"))["step"] == 2);
  const FinetuneResult b = finetune(ck, tck, tokens, o, m.dir / "split", false, m.dir / "split", CpuExec{&pool});
  CHECK(b.start_step == 2);
  CHECK(b.end_step == 5);
  CHECK(b.last_loss == full.last_loss);
  CHECK(file_bytes(m.dir / "split/optimizer.safetensors") == file_bytes(m.dir / "full/optimizer.safetensors"));
  CHECK(file_bytes(m.dir / "split/model.safetensors") == file_bytes(m.dir / "full/model.safetensors"));
  CHECK(file_bytes(m.dir / "full/model.safetensors") != file_bytes(m.rf + "/model.safetensors"));
}

TEST_CASE("finetune: repeat samples are a passage and its copy, drawn at the asked fraction", "[finetune]") {
  std::vector<int32_t> tokens(100);
  std::iota(tokens.begin(), tokens.end(), 0);
  std::vector<int32_t> out;
  append_finetune_sample(tokens, 2, 9, false, out);
  CHECK(out == std::vector<int32_t>{18, 19, 20, 21, 22, 23, 24, 25, 26});
  append_finetune_sample(tokens, 1, 9, true, out);  // appends: 5 tokens, then the first 4 again
  CHECK(out == std::vector<int32_t>{18, 19, 20, 21, 22, 23, 24, 25, 26, 9, 10, 11, 12, 13, 9, 10, 11, 12});
  for (const double f : {0.0, 0.25, 1.0}) {
    int64_t drawn = 0;
    const int64_t n = 20000;
    for (int64_t i = 0; i < n; ++i) drawn += finetune_repeat_sample(7, i, f);
    CAPTURE(f);
    CHECK(double(drawn) / n == Approx(f).margin(0.01));
  }
  int64_t differ = 0;  // another seed draws other samples
  for (int64_t i = 0; i < 1000; ++i) differ += finetune_repeat_sample(7, i, 0.5) != finetune_repeat_sample(8, i, 0.5);
  CHECK(differ > 400);
}

TEST_CASE("finetune: one-line errors", "[finetune]") {
  Tiny m;
  const std::string text = write_text_file(m.dir);
  RandomModelSpec other;
  other.n_layers = 1, other.d_model = 48, other.ffn = 40, other.n_q = 6, other.n_kv = 3;
  write_random_model(m.dir / "other", other);
  std::ostringstream out, err;
  auto fails = [&](std::vector<std::string> v, const std::string& msg) {
    CAPTURE(msg);
    CHECK_THROWS_WITH(runner::run_finetune(args(v), out, err), Catch::Contains(msg));
  };
  fails({"finetune", "-m", m.rf, "-o", m.dir / "o"}, "finetune: no training text (-f TEXT)");
  fails({"finetune", "-m", m.rf, "-f", text}, "finetune: no output directory (-o DIR)");
  fails({"finetune", "-f", text, "-o", m.dir / "o"}, "finetune: no model given (-m CONVERTED)");
  fails({"finetune", "-m", m.rf, "-f", text, "-o", m.dir / "o", "--kl", "1"}, "--kl needs --teacher");
  fails({"finetune", "-m", m.rf, "-f", text, "-o", m.dir / "o", "--teacher", m.dir / "other", "--kl", "1"},
        "is not the model");
  fails({"finetune", "-m", m.rf, "-f", text, "-o", m.dir / "o", "--teacher", m.rf, "--kl", "1"},
        "is itself a RecurFormer");
  fails({"finetune", "-m", m.rf, "-f", text, "-o", m.dir / "o", "--resume", m.rf}, "has no trainer.json");
  fails({"finetune", "-m", m.rf, "-f", text, "-o", m.dir / "o", "-c", "100000"}, "at least 2 are needed");
  fails({"finetune", "-m", m.orig, "-f", text, "-o", m.dir / "o"}, "nothing to train");
  fails({"finetune", "-m", m.rf, "-f", text, "-o", m.dir / "o", "--repeat-fraction", "1.5"}, "--repeat-fraction");
  fails({"finetune", "-m", m.rf, "-f", text, "-o", m.rf}, "");  // the input itself is refused
  CHECK_THROWS_WITH(args({"finetune", "--train", "some"}), Catch::Contains("--train: \"some\" is not one of recurrent, all"));
  CHECK(!std::filesystem::exists(m.dir / "o"));
}
