// Attention transfer (model/distill.hpp): the group model's gradient against finite differences of
// its own loss, block by block; `distill` end to end on the tiny random model (the training error
// falls, the checkpoint keeps its format, only the recurrent groups' rows change, the written
// tensors reproduce the reported error, the model generates); AdamW against a hand-computed step;
// and the one-line errors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "../examples/runner_jobs.hpp"
#include "recurformer/train/adamw.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

using namespace recurformer;
using recurformer::detail::DistillGroupModel;
using recurformer::detail::DistillLayout;

namespace {
runner::Args args(std::vector<std::string> v) {
  v.insert(v.begin(), "recurformer");
  std::vector<char*> argv;
  for (auto& s : v) argv.push_back(s.data());
  return runner::parse_args(int(argv.size()), argv.data());
}

std::vector<float> uniform(size_t n, float lo, float hi, std::mt19937& g) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(g);
  return v;
}

/// Random inputs and targets for one group: sequences of the given lengths.
void random_recording(const DistillLayout& L, const std::vector<int64_t>& lengths, LayerInputs& in, FitGroupData& d,
                      std::mt19937& g) {
  for (int64_t T : lengths) {
    in.x.push_back(uniform(size_t(T * L.d), -1.f, 1.f, g));
    FitSequence s;
    s.tokens = T;
    s.y_attn = uniform(size_t(T * L.g * L.hd), -0.5f, 0.5f, g);
    if (L.windowed) s.y_stream = uniform(size_t(T * L.g * L.hd), -0.5f, 0.5f, g);
    d.sequences.push_back(std::move(s));
  }
}

/// The tiny random model (2 layers of 2 KV groups) in dir/m, a text in dir/text.txt, its recency
/// scores in dir/s.json.
void calibrated_tiny_model(const rftest::TempDir& dir) {
  RandomModelSpec s;
  s.n_layers = 2, s.d_model = 64, s.ffn = 96, s.n_q = 4, s.n_kv = 2;
  write_random_model(dir / "m", s);
  {
    std::ofstream f(dir / "text.txt");
    f << runner::builtin_text() << "\n" << runner::builtin_text() << "\n";
  }
  std::ostringstream out, err;
  REQUIRE(runner::run_calibrate(args({"calibrate", "-m", dir / "m", "-f", dir / "text.txt", "-o", dir / "s.json", "-c",
                                      "32", "-t", "1"}),
                                out, err) == 0);
}

/// Random parameters in ranges the model meets: small weights, Δ around softplus(0), decays of 1..e.
std::vector<float> random_theta(const DistillLayout& L, std::mt19937& g) {
  std::vector<float> th = uniform(size_t(L.total), -0.3f, 0.3f, g);
  for (int64_t i = 0; i < L.hd * L.N; ++i) th[size_t(L.A_log + i)] = uniform(1, 0.f, 1.f, g)[0];
  return th;
}
}  // namespace

TEST_CASE("distill: the group model's gradient matches finite differences of its loss, block by block", "[distill]") {
  std::mt19937 gen(7);
  // variant 3: a windowed group whose streaming attention is recomputed from its rows (they train),
  // sink 1 + window 3 over sequences of up to 9 tokens, so the mask cuts; head_dim 64, the attention
  // op's smallest
  const recurformer::detail::DistillAttention att{rope_inv_freq(64, 10000.f), RopeLayout::rotate_half, 1, 3};
  for (int variant = 0; variant < 4; ++variant) {
    const bool bias = variant == 1, windowed = variant >= 2, live = variant == 3;
    CAPTURE(bias, windowed, live);
    const int64_t hd = live ? 64 : 6;
    const DistillLayout L0(13, hd, 2, 3, hd, 4, bias);  // d, hd, g, r, N, K
    const DistillLayout L = windowed ? L0.windowed_group() : L0;
    LayerInputs in;
    FitGroupData data;
    random_recording(L, {5, 1, 9}, in, data, gen);
    ThreadPool pool(2);
    DistillGroupModel model(L, in, data, CpuExec{&pool}, live ? &att : nullptr);
    std::vector<float> theta = random_theta(L, gen), grad;
    const std::vector<int> seqs = {0, 1, 2};
    model.run(theta, seqs, &grad);
    REQUIRE(int64_t(grad.size()) == L.total);
    const int64_t d = L.d;
    struct Block { const char* name; int64_t begin, end; };
    std::vector<Block> blocks = {{"Wq rows", 0, L.k_col() * d},         {"Wk rows", L.k_col() * d, L.v_col() * d},
                                 {"Wv rows", L.v_col() * d, L.z_col() * d}, {"dt_down", L.z_col() * d, L.b},
                                 {"dt_up", L.dt_up, L.dt_bias},           {"dt_bias", L.dt_bias, L.A_log},
                                 {"A_log", L.A_log, L.D},                 {"D", L.D, L.conv_w},
                                 {"conv weight", L.conv_w, L.conv_b},     {"conv bias", L.conv_b, L.conv_b + L.hd}};
    if (windowed) blocks.push_back({"alpha", L.alpha, L.total});
    if (bias) blocks.push_back({"q/k/v bias", L.b, L.b + L.z_col()});
    auto loss = [&](const std::vector<float>& th) {
      const auto s = model.run(th, seqs, nullptr);
      return s.sse / s.energy;
    };
    for (const Block& b : blocks) {
      CAPTURE(b.name);
      // the directional derivative g . v against a central difference, along the block's own gradient
      // (the largest: it must really move the loss) and along a random direction inside the block
      for (int rep = 0; rep < 2; ++rep) {
        std::vector<float> v(size_t(L.total), 0.f);
        double vn = 0, gv = 0;
        for (int64_t i = b.begin; i < b.end; ++i)
          v[size_t(i)] = rep == 0 ? grad[size_t(i)] : uniform(1, -1.f, 1.f, gen)[0], vn += v[size_t(i)] * v[size_t(i)];
        for (int64_t i = b.begin; i < b.end; ++i) v[size_t(i)] /= float(std::sqrt(vn)), gv += double(grad[size_t(i)]) * v[size_t(i)];
        const double h = 1e-2;
        std::vector<float> tp = theta, tm = theta;
        for (int64_t i = b.begin; i < b.end; ++i) tp[size_t(i)] += float(h) * v[size_t(i)], tm[size_t(i)] -= float(h) * v[size_t(i)];
        const double fd = (loss(tp) - loss(tm)) / (2 * h);
        CAPTURE(gv, fd);
        // fp32 forward: the difference carries ~1e-7 / h of rounding and h^2 of curvature; a wrong factor
        // in the chain (a missing 1/sqrt(hd), dA/dA_log or a transposed view) is off by far more
        CHECK(std::abs(gv - fd) <= 1e-2 * std::abs(fd) + 1e-7);
        if (rep == 0) CHECK(std::abs(gv) > 1e-5);  // the block moves the loss, 100x the tolerance: the check can fail
      }
    }
    // the bias entries of dt_down do not exist: their gradient stays 0
    if (bias)
      for (int64_t i = L.b + L.z_col(); i < L.dt_up; ++i) CHECK(grad[size_t(i)] == 0.f);
  }
}

TEST_CASE("AdamW: first step moves each parameter by lr against the gradient's sign; segments scale and freeze", "[distill]") {
  std::vector<float> p = {1.f, -2.f, 3.f, 0.5f}, g = {0.1f, -4.f, 2.f, 7.f};
  AdamW opt(4, AdamWConfig{0.01f}, {{2, 3, 0.f, 0.f}, {3, 4, 0.5f, 0.1f}});
  opt.step(p, g, 1.0);
  // m/(1-b1) = g and sqrt(v/(1-b2)) = |g|: the step is lr * sign(g) (up to eps)
  CHECK(p[0] == Approx(1.f - 0.01f).epsilon(1e-5));
  CHECK(p[1] == Approx(-2.f + 0.01f).epsilon(1e-5));
  CHECK(p[2] == 3.f);                                                  // frozen
  CHECK(p[3] == Approx(0.5f - 0.005f * (1.f + 0.1f * 0.5f)).epsilon(1e-5));  // half lr, decoupled decay
  CHECK(warmup_cosine(0, 10, 100) == Approx(1.0 / 11));
  CHECK(warmup_cosine(10, 10, 100) == Approx(1.0));
  CHECK(warmup_cosine(100, 10, 100, 0.1) == Approx(0.1));
  std::vector<float> big = {3.f, 4.f};
  CHECK(clip_grad_norm(big, 1.0) == Approx(5.0));
  CHECK(std::hypot(big[0], big[1]) == Approx(1.0).epsilon(1e-5));
  CHECK_THROWS_WITH(AdamW(2, AdamWConfig{}, {{1, 3, 1.f, 0.f}}), Catch::Contains("segment [1, 3) is outside the 2 parameters"));
}

TEST_CASE("distill end to end on the tiny random model", "[distill]") {
  rftest::TempDir dir("rf_distill_");
  std::ostringstream out, err;
  calibrated_tiny_model(dir);
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--ratio", "0.5", "--init",
                                    "fit", "-f", dir / "text.txt", "-c", "32", "-t", "1", "-o", dir / "rf"}),
                              out, err) == 0);
  std::ostringstream dout, derr;
  REQUIRE(runner::run_distill(args({"distill", "-m", dir / "rf", "--teacher", dir / "m", "-f", dir / "text.txt", "-c", "32",
                                    "--steps", "60", "--batch-seqs", "2", "--lr", "0.03", "--lr-proj", "0.003", "-t", "2", "-o", dir / "dist"}),
                              dout, derr) == 0);
  CHECK_THAT(dout.str(), Catch::Contains("held-out error"));
  CHECK_THAT(derr.str(), Catch::Contains("distill: training recurrent groups: 2/2"));
  const auto report = nlohmann::json::parse(runner::read_file(dir / "dist/distill_report.json"));
  REQUIRE(report["groups"].size() == 2);
  for (const auto& g : report["groups"]) {
    CHECK(g["train_after"].get<double>() < 0.98 * g["train_before"].get<double>());  // a random model's attention is hard to imitate: training must still help
    CHECK(std::isfinite(g["heldout_after"].get<double>()));
  }
  // the format does not change: same config, names, shapes and dtypes; attention groups untouched
  CHECK(runner::read_file(dir / "dist/config.json") == runner::read_file(dir / "rf/config.json"));
  CHECK(std::filesystem::exists(dir / "dist/fit_report.json"));
  const Checkpoint a = Checkpoint::open(dir / "dist"), b = Checkpoint::open(dir / "rf");
  REQUIRE(a.tensor_names() == b.tensor_names());
  const ModelConfig& c = a.config();
  const int64_t hd = c.head_dim, g = c.n_q / c.n_kv, d = c.d_model;
  bool any_changed = false;
  for (const std::string& n : a.tensor_names()) {
    const TensorRef &ta = a.tensor(n), &tb = b.tensor(n);
    CHECK(ta.shape == tb.shape);
    CHECK(ta.dtype == tb.dtype);
    const bool qkv = n.find("q_proj.weight") != std::string::npos || n.find("k_proj.weight") != std::string::npos ||
                     n.find("v_proj.weight") != std::string::npos;
    if (!qkv && n.find(".recurrent.") == std::string::npos) {
      CHECK(std::memcmp(ta.data, tb.data, ta.nbytes()) == 0);
      continue;
    }
    if (!qkv) continue;
    const int layer = std::stoi(n.substr(13));
    const int64_t rows_per_group = n.find("q_proj") != std::string::npos ? g * hd : hd;
    const size_t row_bytes = size_t(d) * dtype_size(ta.dtype);
    for (int j = 0; j < c.n_kv; ++j) {
      const bool rec = c.recurformer->layout.layers[size_t(layer)].groups[size_t(j)] == HeadKind::recurrent;
      const size_t off = size_t(j * rows_per_group) * row_bytes, len = size_t(rows_per_group) * row_bytes;
      const bool same = std::memcmp(static_cast<const char*>(ta.data) + off, static_cast<const char*>(tb.data) + off, len) == 0;
      CHECK(same != rec);  // only a recurrent group's own rows train
      any_changed = any_changed || !same;
    }
  }
  CHECK(any_changed);
  // the written tensors give exactly the reported held-out error (nothing lost on the way out)
  const runner::Loaded teacher = runner::load(dir / "m");
  std::vector<LayerInputs> inputs;
  const std::vector<FitGroupData> data =
      record_fit_data(*teacher.model, teacher.tok->encode(runner::read_file(dir / "text.txt"), true), 32,
                      c.recurformer->layout, c.recurformer->streaming, c.recurformer->recurrent.conv_kernel, CpuExec{},
                      {}, &inputs);
  const DistillLayout L(d, hd, g, c.recurformer->recurrent.dt_rank, c.recurformer->recurrent.d_state,
                        c.recurformer->recurrent.conv_kernel, c.attention_bias);
  const int n_seq = int(data[0].sequences.size()), n_hold = report["heldout_sequences"].get<int>();
  std::vector<int> held;
  for (int i = n_seq - n_hold; i < n_seq; ++i) held.push_back(i);
  for (size_t gi = 0; gi < data.size(); ++gi) {
    const auto in = std::find_if(inputs.begin(), inputs.end(), [&](const LayerInputs& x) { return x.layer == data[gi].layer; });
    DistillGroupModel m(L, *in, data[gi], CpuExec{});
    const double e = m.run(recurformer::detail::distill_initial(a, L, data[gi].layer, data[gi].group), held, nullptr).error();
    CHECK(e == Approx(report["groups"][gi]["heldout_after"].get<double>()).epsilon(1e-5));
  }
  std::ostringstream gout;
  REQUIRE(runner::run_generate(args({"generate", "-m", dir / "dist", "-p", "hello", "-n", "4", "--temp", "0", "-t", "1"}),
                               gout, err) == 0);
}

TEST_CASE("distill of windowed groups: alpha and the recurrent tensors learn what the window misses", "[distill]") {
  rftest::TempDir dir("rf_distill_w_");
  std::ostringstream out, err;
  calibrated_tiny_model(dir);
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--ratio", "0.5", "--kind",
                                    "windowed", "--sink", "2", "--stream-window", "6", "--init", "fit", "-f",
                                    dir / "text.txt", "-c", "32", "-t", "1", "-o", dir / "w"}),
                              out, err) == 0);
  CHECK_THAT(out.str(), Catch::Contains("converted 2 of 4 KV groups to windowed"));
  std::ostringstream dout, derr;  // first with the q/k/v rows frozen: the recorded streaming output
  REQUIRE(runner::run_distill(args({"distill", "-m", dir / "w", "--teacher", dir / "m", "-f", dir / "text.txt", "-c", "32",
                                    "--steps", "60", "--batch-seqs", "2", "--lr", "0.03", "--lr-proj", "0", "-t", "2",
                                    "-o", dir / "dist"}),
                              dout, derr) == 0);
  const auto report = nlohmann::json::parse(runner::read_file(dir / "dist/distill_report.json"));
  REQUIRE(report["groups"].size() == 2);
  const Checkpoint a = Checkpoint::open(dir / "dist"), b = Checkpoint::open(dir / "w");
  const ModelConfig& c = a.config();
  // before training alpha = 0: the error is the streaming heads' own, recomputed here from the recording
  const runner::Loaded teacher = runner::load(dir / "m");
  std::vector<LayerInputs> inputs;
  const std::vector<FitGroupData> data =
      record_fit_data(*teacher.model, teacher.tok->encode(runner::read_file(dir / "text.txt"), true), 32,
                      c.recurformer->layout, c.recurformer->streaming, c.recurformer->recurrent.conv_kernel, CpuExec{},
                      {}, &inputs);
  const int n_seq = int(data[0].sequences.size()), n_hold = report["heldout_sequences"].get<int>();
  for (size_t gi = 0; gi < data.size(); ++gi) {
    double sse = 0, energy = 0;
    for (int i = n_seq - n_hold; i < n_seq; ++i) {
      const FitSequence& fs = data[gi].sequences[size_t(i)];
      REQUIRE(fs.y_stream.size() == fs.y_attn.size());
      for (size_t k = 0; k < fs.y_attn.size(); ++k)
        sse += (double(fs.y_stream[k]) - fs.y_attn[k]) * (double(fs.y_stream[k]) - fs.y_attn[k]),
            energy += double(fs.y_attn[k]) * fs.y_attn[k];
    }
    const auto& g = report["groups"][gi];
    CHECK(g["heldout_before"].get<double>() == Approx(std::sqrt(sse / energy)).epsilon(1e-4));
    CHECK(g["heldout_before"].get<double>() > 0.01);  // the window (6 + sink 2 of 32 tokens) does miss something
    // a random model's attention beyond a window is mostly noise to a recurrence: a small but real gain
    CHECK(g["train_after"].get<double>() < 0.99 * g["train_before"].get<double>());
  }
  // alpha moved from 0; the projections (read by the streaming attention too) did not
  for (const std::string& n : a.tensor_names()) {
    const TensorRef &ta = a.tensor(n), &tb = b.tensor(n);
    const bool same = std::memcmp(ta.data, tb.data, ta.nbytes()) == 0;
    CAPTURE(n);
    if (n.find(".alpha") != std::string::npos) {
      CHECK(!same);
      for (int64_t i = 0; i < ta.numel(); ++i) CHECK(static_cast<const float*>(ta.data)[i] != 0.f);
    } else if (n.find(".recurrent.") == std::string::npos) {
      CHECK(same);
    }
  }
  std::ostringstream gout;
  REQUIRE(runner::run_generate(args({"generate", "-m", dir / "dist", "-p", "hello", "-n", "4", "--temp", "0", "-t", "1"}),
                               gout, err) == 0);

  // Then with the rows trained too: the streaming attention is recomputed from them every step.
  REQUIRE(runner::run_distill(args({"distill", "-m", dir / "w", "--teacher", dir / "m", "-f", dir / "text.txt", "-c", "32",
                                    "--steps", "60", "--batch-seqs", "2", "--lr", "0.03", "-t", "2", "-o", dir / "live"}),
                              dout, derr) == 0);
  const auto live = nlohmann::json::parse(runner::read_file(dir / "live/distill_report.json"));
  const Checkpoint l = Checkpoint::open(dir / "live");
  const recurformer::detail::DistillLayout L =
      recurformer::detail::DistillLayout(c.d_model, c.head_dim, c.n_q / c.n_kv, c.recurformer->recurrent.dt_rank,
                                         c.recurformer->recurrent.d_state, c.recurformer->recurrent.conv_kernel,
                                         c.attention_bias)
          .windowed_group();
  const recurformer::detail::DistillAttention att{l.rope_inv_freq(), l.config().rope_layout, c.recurformer->streaming.sink,
                                                  c.recurformer->streaming.window};
  std::vector<int> held;
  for (int i = n_seq - n_hold; i < n_seq; ++i) held.push_back(i);
  for (size_t gi = 0; gi < data.size(); ++gi) {
    const auto& g = live["groups"][gi];
    // the same start (the live streaming output is the recorded one), and training gains
    CHECK(g["heldout_before"].get<double>() == Approx(report["groups"][gi]["heldout_before"].get<double>()).epsilon(1e-4));
    CHECK(g["train_after"].get<double>() < 0.99 * g["train_before"].get<double>());
    // the written tensors reproduce the reported error through the live attention
    const auto in = std::find_if(inputs.begin(), inputs.end(), [&](const LayerInputs& x) { return x.layer == data[gi].layer; });
    DistillGroupModel m(L, *in, data[gi], CpuExec{}, &att);
    const double e = m.run(recurformer::detail::distill_initial(l, L, data[gi].layer, data[gi].group), held, nullptr).error();
    CHECK(e == Approx(g["heldout_after"].get<double>()).epsilon(1e-5));
  }
  // the windowed groups' own q/k/v rows changed, nobody else's
  const int64_t hd = c.head_dim, d = c.d_model, gq = c.n_q / c.n_kv;
  for (int layer = 0; layer < c.n_layers; ++layer)
    for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
      const std::string n = "model.layers." + std::to_string(layer) + ".self_attn." + proj + ".weight";
      const int64_t rows = proj[0] == 'q' ? gq * hd : hd;
      for (int j = 0; j < c.n_kv; ++j) {
        const bool w = c.recurformer->layout.layers[size_t(layer)].groups[size_t(j)] == HeadKind::windowed;
        const size_t off = size_t(j * rows * d) * 4, len = size_t(rows * d) * 4;
        CAPTURE(n, j);
        CHECK((std::memcmp(static_cast<const char*>(l.tensor(n).data) + off, static_cast<const char*>(b.tensor(n).data) + off,
                           len) == 0) != w);
      }
    }
}

TEST_CASE("distill errors are one clear line, before any long work", "[distill]") {
  rftest::TempDir dir("rf_distill_err_");
  RandomModelSpec s;
  s.n_layers = 2, s.d_model = 64, s.ffn = 96, s.n_q = 4, s.n_kv = 2;
  write_random_model(dir / "m", s);
  s.n_layers = 3;
  write_random_model(dir / "other", s);
  recurformer::detail::write_text(dir / "text.txt", runner::builtin_text());
  std::ostringstream out, err;
  REQUIRE(runner::run_calibrate(args({"calibrate", "-m", dir / "m", "-f", dir / "text.txt", "-o", dir / "s.json", "-c",
                                      "32", "-t", "1"}),
                                out, err) == 0);
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--ratio", "0.5", "-t", "1",
                                    "-o", dir / "rf"}),
                              out, err) == 0);
  auto distill = [&](std::vector<std::string> extra) {
    std::vector<std::string> v = {"distill", "-t", "1"};
    v.insert(v.end(), extra.begin(), extra.end());
    return runner::run_distill(args(v), out, err);
  };
  const std::string m = dir / "m", rf = dir / "rf", t = dir / "text.txt", o = dir / "o";
  CHECK_THROWS_WITH(distill({"-m", rf, "--teacher", m, "-o", o}), Catch::Contains("no training text (-f TEXT)"));
  CHECK_THROWS_WITH(distill({"-m", rf, "-f", t, "-o", o}), Catch::Contains("no teacher (--teacher ORIGINAL"));
  CHECK_THROWS_WITH(distill({"-m", m, "--teacher", m, "-f", t, "-o", o}), Catch::Contains("is not a RecurFormer"));
  CHECK_THROWS_WITH(distill({"-m", rf, "--teacher", dir / "other", "-f", t, "-o", o}),
                    Catch::Contains("is not the model"));
  CHECK_THROWS_WITH(distill({"-m", rf, "--teacher", rf, "-f", t, "-o", o}), Catch::Contains("is itself a RecurFormer"));
  CHECK_THROWS_WITH(distill({"-m", rf, "--teacher", m, "-f", t, "-o", rf}), Catch::Contains("holds the input model"));
  recurformer::detail::make_dirs(dir / "full");
  recurformer::detail::write_text(dir / "full/x", "x");
  CHECK_THROWS_WITH(distill({"-m", rf, "--teacher", m, "-f", t, "-o", dir / "full"}), Catch::Contains("exists and is not empty"));
  CHECK_THROWS_WITH(runner::parse_args(4, std::array<char*, 4>{const_cast<char*>("rf"), const_cast<char*>("distill"),
                                                               const_cast<char*>("--lr"), const_cast<char*>("2")}
                                              .data()),
                    Catch::Contains("--lr: 2 is out of range"));
  CHECK(!std::filesystem::exists(o));
}
