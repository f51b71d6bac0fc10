// The `fit` initialisation (model/fit_init.hpp, spec section 3): exact recovery of a known conv
// through the scan, the spec's "attend to the previous token" head, convert --init fit end to end on
// the tiny random model (checkpoint loads, same tensors as `default`, fit error <= default error),
// and the one-line errors.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "../examples/runner_jobs.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
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

/// Random v, k, q for `n` sequences of T tokens (y_attn left to the caller).
FitGroupData random_group(int64_t hd, int64_t g, int64_t T, int n) {
  FitGroupData d;
  for (int i = 0; i < n; ++i) {
    FitSequence s;
    s.tokens = T;
    s.v = rftest::random_vector<float>(size_t(T * hd));
    s.k = rftest::random_vector<float>(size_t(T * hd));
    s.q = rftest::random_vector<float>(size_t(T * g * hd));
    s.y_attn.assign(size_t(T * g * hd), 0.f);
    d.sequences.push_back(std::move(s));
  }
  return d;
}
}  // namespace

TEST_CASE("fit recovers a known conv through the scan exactly", "[fit]") {
  const int64_t hd = 16, g = 2, T = 96, K = 4;
  const FitOptions o{int(K), 16};
  FitGroupData d = random_group(hd, g, T, 2);
  // the fit's Δ rule: A_log[c, n] = log(n + 1), the slowest |A| is 1, so Δ = 1 / w
  std::vector<float> A_log(size_t(hd * hd)), dt(size_t(hd), float(recurformer::detail::softplus_inverse(1.0 / o.window))),
      D(size_t(hd), 1.f);
  for (int64_t c = 0; c < hd; ++c)
    for (int64_t n = 0; n < hd; ++n) A_log[size_t(c * hd + n)] = float(std::log(double(n + 1)));
  const std::vector<float> taps = rftest::random_vector<float>(size_t(hd * K)), bias = rftest::random_vector<float>(size_t(hd));
  for (FitSequence& s : d.sequences) {
    std::vector<float> u(size_t(T * hd));
    CausalConv1dParams<float> cp;
    cp.x = make_view<const float>(s.v.data(), {T, hd});
    cp.weight = make_view<const float>(taps.data(), {hd, K});
    cp.bias = make_view<const float>(bias.data(), {hd});
    cp.y = make_view(u.data(), {T, hd});
    causal_conv1d(cp, CpuExec{});
    recurformer::detail::FitScan(s, hd, g, A_log).run(s, u.data(), dt, D, s.y_attn.data(), CpuExec{});
  }
  const FitResult r = fit_recurrent_group(d, hd, g, std::vector<float>(size_t(hd), -3.f), o, CpuExec{});
  CHECK(r.dt_bias == dt);
  CHECK(r.A_log == A_log);
  CHECK(r.D == D);
  double err = 0, norm = 0;
  for (size_t i = 0; i < taps.size(); ++i) err += std::pow(r.conv_weight[i] - taps[i], 2), norm += taps[i] * taps[i];
  for (size_t i = 0; i < bias.size(); ++i) err += std::pow(r.conv_bias[i] - bias[i], 2), norm += bias[i] * bias[i];
  CHECK(std::sqrt(err / norm) < 1e-5);
  CHECK(r.fit_error < 1e-5);
  CHECK(r.default_error > 0.1);

  SECTION("a windowed group is fitted to what its streaming output misses") {
    for (FitSequence& s : d.sequences) {  // y_attn = y_stream + the known scan
      s.y_stream = rftest::random_vector<float>(s.y_attn.size());
      for (size_t i = 0; i < s.y_attn.size(); ++i) s.y_attn[i] += s.y_stream[i];
    }
    const FitResult w = fit_recurrent_group(d, hd, g, std::vector<float>(size_t(hd), -3.f), o, CpuExec{});
    double werr = 0;
    for (size_t i = 0; i < taps.size(); ++i) werr += std::pow(w.conv_weight[i] - taps[i], 2);
    for (size_t i = 0; i < bias.size(); ++i) werr += std::pow(w.conv_bias[i] - bias[i], 2);
    CHECK(std::sqrt(werr / norm) < 1e-5);
    CHECK(w.fit_error < 1e-5);
    d.sequences[1].y_stream.pop_back();
    CHECK_THROWS_WITH(fit_recurrent_group(d, hd, g, std::vector<float>(size_t(hd), -3.f), o, CpuExec{}),
                      Catch::Contains("y_stream has"));
  }
}

TEST_CASE("a previous-token head is fitted better than default, and closely when Δ is small", "[fit]") {
  const int64_t hd = 16, g = 2, T = 128;
  FitGroupData d = random_group(hd, g, T, 2);
  for (FitSequence& s : d.sequences)
    for (int64_t t = 1; t < T; ++t)
      for (int64_t q = 0; q < g; ++q)
        std::copy_n(s.v.data() + (t - 1) * hd, hd, s.y_attn.data() + (t * g + q) * hd);
  const std::vector<float> def(size_t(hd), float(recurformer::detail::softplus_inverse(0.01)));
  const FitResult r16 = fit_recurrent_group(d, hd, g, def, FitOptions{4, 16}, CpuExec{});
  CHECK(r16.fit_error < r16.default_error);
  const FitResult slow = fit_recurrent_group(d, hd, g, def, FitOptions{4, 1000}, CpuExec{});  // Δ = 1e-3
  CHECK(slow.fit_error < slow.default_error);
  CHECK(slow.fit_error < 0.05);
  // the taps found are "previous token": [0, 0, 1, 0]
  for (int64_t c = 0; c < hd; ++c) CHECK(slow.conv_weight[size_t(c * 4 + 2)] == Approx(1.0).margin(0.05));
}

TEST_CASE("convert --init fit on the tiny random model: loads, same tensors as default, fit <= default", "[fit]") {
  rftest::TempDir dir("rf_fit_e2e_");
  RandomModelSpec s;
  s.n_layers = 2, s.d_model = 64, s.ffn = 96, s.n_q = 4, s.n_kv = 2;
  write_random_model(dir / "m", s);
  {
    std::ofstream f(dir / "text.txt");
    f << runner::builtin_text() << "\n";
  }
  std::ostringstream out, err;
  REQUIRE(runner::run_calibrate(args({"calibrate", "-m", dir / "m", "-f", dir / "text.txt", "-o", dir / "s.json", "-c",
                                      "64", "-t", "1"}),
                                out, err) == 0);
  std::ostringstream fout;
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0", "--init",
                                    "fit", "-f", dir / "text.txt", "-c", "64", "-t", "1", "-o", dir / "fit"}),
                              fout, err) == 0);
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0", "-t", "1", "-o",
                                    dir / "def"}),
                              out, err) == 0);
  CHECK_THAT(fout.str(), Catch::Contains("fit layer 1 group 1: relative error"));
  const auto report = nlohmann::json::parse(runner::read_file(dir / "fit/fit_report.json"));
  REQUIRE(report["groups"].size() == 4);
  for (const auto& gr : report["groups"]) CHECK(gr["fit_error"].get<double>() <= gr["default_error"].get<double>());
  // spec section 7: the same config and the same tensor names, shapes and dtypes as `default`
  CHECK(runner::read_file(dir / "fit/config.json") == runner::read_file(dir / "def/config.json"));
  const Checkpoint a = Checkpoint::open(dir / "fit"), b = Checkpoint::open(dir / "def");
  REQUIRE(a.tensor_names() == b.tensor_names());
  for (const std::string& n : a.tensor_names()) {
    CHECK(a.tensor(n).shape == b.tensor(n).shape);
    CHECK(a.tensor(n).dtype == b.tensor(n).dtype);
  }
  CHECK(a.tensor("model.layers.0.self_attn.recurrent.0.D").view<float, 1>()(0) == 1.f);
  std::ostringstream gout;
  REQUIRE(runner::run_generate(args({"generate", "-m", dir / "fit", "-p", "hello", "-n", "4", "--temp", "0", "-t", "1"}), gout, err) == 0);
}

TEST_CASE("fit errors are one clear line", "[fit]") {
  rftest::TempDir dir("rf_fit_err_");
  std::ostringstream out, err;
  recurformer::detail::write_text(dir / "s.json", "{\"layers\": []}");
  CHECK_THROWS_WITH(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0",
                                              "--init", "fit", "-o", dir / "o"}),
                                        out, err),
                    Catch::Contains("needs calibration text (-f TEXT)"));
  CHECK_THROWS_WITH(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0",
                                              "--init", "fitt", "-o", dir / "o"}),
                                        out, err),
                    Catch::Contains("--init fitt is not supported"));
  const std::vector<float> def(8, 0.f);
  FitGroupData d = random_group(8, 2, 10, 1);
  d.sequences[0].y_attn.resize(7);
  CHECK_THROWS_WITH(fit_recurrent_group(d, 8, 2, def, FitOptions{}, CpuExec{}), Catch::Contains("needs v, k of 80 values"));
  CHECK_THROWS_WITH(fit_recurrent_group(FitGroupData{}, 8, 2, def, FitOptions{}, CpuExec{}),
                    Catch::Contains("no calibration sequences"));
  CHECK_THROWS_WITH(fit_recurrent_group(random_group(8, 2, 10, 1), 8, 2, std::vector<float>(3), FitOptions{}, CpuExec{}),
                    Catch::Contains("default dt_bias has 3 values"));
  // the convert library call with init fit but no recorded groups
  RandomModelSpec s;
  s.n_layers = 1, s.d_model = 64, s.ffn = 96, s.n_q = 4, s.n_kv = 2;
  write_random_model(dir / "m", s);
  ConvertOptions o;
  o.layout = HeadLayout::uniform(1, 2, HeadKind::recurrent);
  o.init = ConvertInit::fit;
  CHECK_THROWS_WITH(convert_to_recurformer(Checkpoint::open(dir / "m"), o, dir / "o"),
                    Catch::Contains("--init fit has data for 0 groups, the layout has 2"));
}
