// The runner's jobs (examples/runner_jobs.hpp, what build/bin/recurformer calls): the main job end
// to end on a random model, generation (greedy = argmax of the model's logits, seeded sampling
// reproducible), calibrate -> convert -> generate through files, perplexity's output format, and
// the one-line errors (bad path, prompt longer than the context, tokenizer / vocabulary mismatch).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>

#include "../examples/runner_chat.hpp"
#include "../examples/runner_jobs.hpp"
#include "support/chat_model.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

namespace fs = std::filesystem;
using namespace recurformer;

namespace {
using TmpDir = rftest::TempDir;

RandomModelSpec tiny() {
  RandomModelSpec s;
  s.n_layers = 2, s.d_model = 64, s.ffn = 96, s.n_q = 4, s.n_kv = 2;
  return s;
}

runner::Args args(std::vector<std::string> v) {
  v.insert(v.begin(), "recurformer");
  std::vector<char*> argv;
  for (auto& s : v) argv.push_back(s.data());
  return runner::parse_args(int(argv.size()), argv.data());
}

// dir/m (the tiny random model), dir/text.txt and its scores dir/s.json (and s.svg) from `calibrate`.
void write_calibrated_tiny_model(const TmpDir& dir, std::ostream& out, std::ostream& err) {
  write_random_model(dir / "m", tiny());
  {
    std::ofstream f(dir / "text.txt");
    for (int i = 0; i < 6; ++i) f << runner::builtin_text() << "\n";
  }
  REQUIRE(runner::run_calibrate(args({"calibrate", "-m", dir / "m", "-f", dir / "text.txt", "-o", dir / "s.json", "-c", "64",
                                      "-t", "1"}),
                                out, err) == 0);
}
}  // namespace

TEST_CASE("the main job runs end to end and says the weights are random", "[runner]") {
  TmpDir dir("rf_runner_main_");
  runner::Args a = args({"-n", "8"});
  std::ostringstream out, err;
  REQUIRE(runner::run_main_job(a, dir / "home", out, err) == 0);
  const std::string o = out.str();
  CHECK_THAT(o, Catch::Contains("RANDOM"));
  CHECK_THAT(o, Catch::Contains("--- original Llama ---"));
  CHECK_THAT(o, Catch::Contains("--- RecurFormer (4 of 8 KV groups recurrent) ---"));
  CHECK_THAT(o, Catch::Contains("tokens/s"));
  CHECK_THAT(o, Catch::Contains("recurrent 67.0 KiB"));  // 4 groups x (64 x 64 x 4 + 3 x 64 x 4) bytes
  CHECK(fs::exists(dir / "home/recurformer/config.json"));
  CHECK(fs::exists(dir / "home/scores.svg"));
  // a second run reuses the model
  std::ostringstream out2, err2;
  REQUIRE(runner::run_main_job(a, dir / "home", out2, err2) == 0);
  CHECK_THAT(out2.str(), Catch::Contains("using the random Llama"));
}

TEST_CASE("the main job on a fetched GGUF model, and its offline fallback", "[runner]") {
  // The real job fetches SmolLM2 with scripts/fetch-smollm2.sh; here a stand-in script "fetches"
  // the tiny llama_gqa GGUF, so the whole path (GGUF load, calibrate, convert --init fit from the
  // GGUF, generation, depth benchmark, perplexity) runs without a network.
  TmpDir dir("rf_runner_real_");
  const std::string gguf = std::string(RECURFORMER_TEST_DATA_DIR) + "/models/llama_gqa/model-f32.gguf";
  const std::string text_dir = std::string(RECURFORMER_TEST_DATA_DIR) + "/../../examples/data";
  recurformer::detail::write_text(dir / "fetch.sh", "echo '" + gguf + "'\n");
  recurformer::detail::write_text(dir / "offline.sh", "echo 'no registry' >&2; exit 2\n");
  const runner::MainJobFiles files{dir / "fetch.sh", text_dir + "/calibration.txt", text_dir + "/heldout.txt"};
  runner::Args a = args({"-n", "6", "-t", "2"});
  std::ostringstream out, err;
  REQUIRE(runner::run_main_job(a, dir / "home", files, out, err) == 0);
  const std::string o = out.str();
  CHECK_THAT(o, Catch::Contains("[1/6] model " + gguf));
  CHECK_THAT(o, Catch::Contains("converted 1 of 2 KV groups to recurrent"));
  CHECK_THAT(o, Catch::Contains("fit: relative error of the recurrent groups"));
  CHECK_THAT(o, Catch::Contains("--- RecurFormer (1 of 2 KV groups recurrent) ---"));
  CHECK_THAT(o, Catch::Contains("RecurFormer / original: decode at 2K tokens"));
  CHECK_THAT(err.str(), Catch::Contains("convert: fitting recurrent groups: 1/1"));
  CHECK(fs::exists(dir / "home/smollm2/recurformer/tokenizer.json"));
  CHECK(fs::exists(dir / "home/smollm2/recurformer-fit/fit_report.json"));
  CHECK(fs::exists(dir / "home/smollm2/recurformer/distill_report.json"));
  CHECK_THAT(o, Catch::Contains("distill: held-out relative error of the 1 converted groups"));
  CHECK_THAT(o, Catch::Contains("after the short distillation"));
  CHECK_THAT(o, !Catch::Contains("RANDOM"));
  // A script that cannot reach the registry: one line, then the random model.
  const runner::MainJobFiles offline{dir / "offline.sh", files.calibration_text, files.heldout_text};
  std::ostringstream out2, err2;
  REQUIRE(runner::run_main_job(args({"-n", "4"}), dir / "home2", offline, out2, err2) == 0);
  CHECK_THAT(out2.str(), Catch::StartsWith("recurformer: SmolLM2 could not be fetched (offline?)"));
  CHECK_THAT(out2.str(), Catch::Contains("RANDOM"));
  // --offline does not even try.
  std::ostringstream out3, err3;
  REQUIRE(runner::run_main_job(args({"-n", "4", "--offline"}), dir / "home3", files, out3, err3) == 0);
  CHECK_THAT(out3.str(), Catch::Contains("RANDOM"));
  CHECK_THAT(out3.str(), !Catch::Contains("could not be fetched"));
}

TEST_CASE("generate: greedy is the argmax of the logits; sampling is seeded", "[runner]") {
  TmpDir dir("rf_runner_gen_");
  write_random_model(dir / "m", tiny());
  const runner::Loaded m = runner::load(dir / "m");
  ThreadPool pool(2);
  const CpuExec exec{&pool};
  const SamplingParams greedy{0.f, 40, 0.95f, 1};
  const auto g = runner::generate(m, "the cat", 6, 64, 3, greedy, exec, nullptr);
  REQUIRE(g.generated >= 1);
  // replay: each greedy token is the argmax of the model's logits after the tokens before it
  std::vector<int32_t> ids = m.tok->encode("the cat", true);
  for (size_t i = 0; i < g.ids.size(); ++i) {
    LlamaSession s(*m.model, 1, 64, exec, 64);
    const auto& l = s.prefill(0, ids.data(), int64_t(ids.size()));
    CHECK(g.ids[i] == argmax(l.data(), int64_t(l.size())));
    ids.push_back(g.ids[i]);
  }
  const SamplingParams sp{1.f, 20, 0.9f, 42};
  const auto s1 = runner::generate(m, "the cat", 12, 64, 4, sp, exec, nullptr);
  const auto s2 = runner::generate(m, "the cat", 12, 64, 4, sp, exec, nullptr);
  CHECK(s1.ids == s2.ids);
  CHECK(s1.text == s2.text);
  CHECK(s1.cache.total > 0);
  CHECK_THROWS_WITH(runner::generate(m, std::string(200, 'x'), 4, 16, 4, sp, exec, nullptr),
                    Catch::Contains("more than the context"));
}

TEST_CASE("calibrate -> convert -> generate through files; perplexity prints llama.cpp's lines", "[runner]") {
  TmpDir dir("rf_runner_files_");
  std::ostringstream out, err;
  write_calibrated_tiny_model(dir, out, err);
  const auto scores = runner::parse_calibration_scores(runner::read_file(dir / "s.json"), "s.json");
  REQUIRE(scores.group_mean.size() == 2);
  REQUIRE(scores.group_mean[0].size() == 2);
  for (const auto& row : scores.group_mean)
    for (double v : row) {
      CHECK(v >= 0.0);
      CHECK(v <= 1.0 + 1e-9);
    }
  CHECK_THAT(runner::read_file(dir / "s.svg"), Catch::StartsWith("<svg"));
  // a scores file must list groups in order with scores in [0, 1]: a lying one is refused, naming the place
  const auto scores_error = [](const std::string& text) {
    try {
      runner::parse_calibration_scores(text, "bad.json");
    } catch (const recurformer::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(scores_error(R"({"layers": [{"groups": [{"group": 0, "mean": 0.5}, {"group": 7, "mean": 0.2}]}]})") ==
        "bad.json: layer 0 lists group 7 at position 1 (expected groups 0, 1, ... in order)");
  CHECK(scores_error(R"({"layers": [{"groups": [{"mean": 0.5}]}, {"groups": [{"mean": 1.5}]}]})") ==
        "bad.json: layer 1 group 0 has mean 1.5, a recency score is in [0, 1]");
  CHECK_THAT(scores_error(R"({"window": -3, "layers": []})"), Catch::Contains("window = -3 is out of range"));
  CHECK(scores_error(R"({"window": 8, "layers": [{"groups": [{"group": 0, "mean": 0.25}]}]})").empty());
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0", "-o",
                                    dir / "rf"}),
                              out, err) == 0);
  CHECK_THAT(out.str(), Catch::Contains("converted 4 of 4 KV groups"));
  // the same output again: refused before any work unless --force
  CHECK_THROWS_WITH(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0",
                                              "-o", dir / "rf"}),
                                        out, err),
                    Catch::Contains("exists and is not empty (--force replaces it whole)"));
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0", "-o",
                                    dir / "rf", "--force"}),
                              out, err) == 0);
  // calibrate refuses an output it cannot write before it runs
  CHECK_THROWS_WITH(runner::run_calibrate(args({"calibrate", "-m", dir / "m", "-f", dir / "text.txt", "-o",
                                                dir / "no_such_dir/s.json"}),
                                          out, err),
                    Catch::Contains("is not a writable directory"));
  CHECK_THAT(out.str(), Catch::Contains("at 32K tokens"));
  std::ostringstream gout;
  REQUIRE(runner::run_generate(args({"generate", "-m", dir / "rf", "-p", "hello", "-n", "5", "--temp", "0"}), gout, err) == 0);
  std::ostringstream pout, perr;
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "m", "-f", dir / "text.txt", "-c", "128"}), pout, perr) == 0);
  CHECK_THAT(pout.str(), Catch::StartsWith("[1]"));
  CHECK_THAT(pout.str(), Catch::Contains("Final estimate: PPL = "));
  CHECK_THAT(pout.str(), Catch::Contains(" +/- "));
  std::ostringstream bout;
  std::ostringstream berr;
  REQUIRE(runner::run_bench(args({"bench", "-m", dir / "rf", "-c", "64,96", "-b", "16", "-n", "4"}), bout, berr) == 0);
  CHECK_THAT(bout.str(), Catch::Contains("synthetic"));
  CHECK_THAT(berr.str(), Catch::Contains("bench: context 96: prefill 16 tokens, decode 4 steps"));  // -n is heard
  // --cache-type: the same greedy text from a bf16 cache on this tiny model, at half the K/V bytes
  std::ostringstream g16, e16, e32;
  REQUIRE(runner::run_generate(args({"generate", "-m", dir / "m", "-p", "hello", "-n", "5", "--temp", "0", "--cache-type",
                                     "bf16"}),
                               g16, e16) == 0);
  std::ostringstream g32;
  REQUIRE(runner::run_generate(args({"generate", "-m", dir / "m", "-p", "hello", "-n", "5", "--temp", "0"}), g32, e32) == 0);
  CHECK(g16.str() == g32.str());
  // 9 tokens x 2 layers x 2 groups x (K, V) x head_dim 64 x 2 bytes
  CHECK_THAT(e16.str(), Catch::Contains("cache (9 tokens, bf16): attention 9.0 KiB"));
  CHECK_THAT(e32.str(), Catch::Contains("cache (9 tokens, f32): attention 18.0 KiB"));
  std::ostringstream b16;
  REQUIRE(runner::run_bench(args({"bench", "-m", dir / "rf", "-c", "64", "-b", "16", "-n", "4", "--cache-type", "f16"}), b16,
                            err) == 0);
  CHECK_THAT(b16.str(), Catch::Contains("cache (f16)"));
  std::ostringstream p16;
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "rf", "-f", dir / "text.txt", "-c", "128", "--cache-type",
                                       "f16"}),
                                 p16, perr) == 0);
  CHECK_THAT(p16.str(), Catch::Contains("Final estimate: PPL = "));
  // --page-size: paged K/V gives the contiguous cache's results exactly (text, perplexity lines)
  std::ostringstream gp, ep, pp, pc;
  REQUIRE(runner::run_generate(args({"generate", "-m", dir / "m", "-p", "hello", "-n", "5", "--temp", "0", "--page-size",
                                     "3"}),
                               gp, ep) == 0);
  CHECK(gp.str() == g32.str());
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "rf", "-f", dir / "text.txt", "-c", "128", "--page-size",
                                       "16"}),
                                 pp, perr) == 0);
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "rf", "-f", dir / "text.txt", "-c", "128"}), pc, perr) ==
          0);
  CHECK(pp.str() == pc.str());
  std::ostringstream bp;
  REQUIRE(runner::run_bench(args({"bench", "-m", dir / "rf", "-c", "64", "-b", "16", "-n", "4", "--page-size", "16"}), bp,
                            err) == 0);
  CHECK_THAT(bp.str(), Catch::Contains("synthetic"));
  CHECK_THROWS_WITH(runner::run_generate(args({"generate", "-m", dir / "m", "-p", "hi", "-c", "8", "--page-size", "9"}),
                                         gp, ep),
                    Catch::Contains("--page-size 9 is larger than the context of 8 tokens"));
}

TEST_CASE("convert --kind streaming: the same selection as sink + window heads, sized to a state's bytes", "[runner]") {
  TmpDir dir("rf_runner_stream_");
  std::ostringstream out, err;
  write_calibrated_tiny_model(dir, out, err);
  // head_dim 64, d_state 64, conv 4, f32: a state is 64*64*4 + 3*64*4 = 17152 bytes = 33 tokens of K and V
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--ratio", "0.5", "--kind",
                                    "streaming", "-o", dir / "st"}),
                              out, err) == 0);
  CHECK_THAT(out.str(), Catch::Contains("converted 2 of 4 KV groups to streaming"));
  CHECK_THAT(out.str(), Catch::Contains("streaming heads keep the first 4 and the last 29 tokens"));
  const std::string cfg = runner::read_file(dir / "st/config.json");
  CHECK_THAT(cfg, Catch::Contains("\"window\": 29"));
  CHECK_THAT(cfg, Catch::Contains("\"recurrent\": []"));
  // a window longer than the text sees everything: the original's perplexity exactly
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--threshold", "0", "--kind",
                                    "streaming", "--sink", "2", "--stream-window", "200", "-o", dir / "wide"}),
                              out, err) == 0);
  std::ostringstream p_orig, p_wide, p_st, perr;
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "m", "-f", dir / "text.txt", "-c", "128", "-t", "1"}),
                                 p_orig, perr) == 0);
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "wide", "-f", dir / "text.txt", "-c", "128", "-t", "1"}),
                                 p_wide, perr) == 0);
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "st", "-f", dir / "text.txt", "-c", "128", "-t", "1"}),
                                 p_st, perr) == 0);
  CHECK(p_wide.str() == p_orig.str());
  CHECK(p_st.str() != p_orig.str());  // 29 + 4 of 128 tokens: the window forgets
  CHECK_THROWS_WITH(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--ratio", "0.5",
                                              "--kind", "streaming", "--init", "fit", "-f", dir / "text.txt", "-o",
                                              dir / "bad"}),
                                        out, err),
                    "convert: --init fit fits recurrent groups; --kind streaming keeps the original weights (drop --init)");
  CHECK_THROWS_WITH(args({"convert", "--kind", "mixed"}), "--kind: \"mixed\" is not one of recurrent, streaming, windowed");
  // windowed: the streaming heads plus alpha x a recurrent state, alpha = 0 at conversion: the streaming
  // model's perplexity exactly, with the state's bytes on top in the cache
  REQUIRE(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "--ratio", "0.5", "--kind",
                                    "windowed", "-o", dir / "w"}),
                              out, err) == 0);
  CHECK_THAT(out.str(), Catch::Contains("converted 2 of 4 KV groups to windowed"));
  CHECK_THAT(runner::read_file(dir / "w/config.json"), Catch::Contains("\"windowed\": ["));
  std::ostringstream p_w;
  REQUIRE(runner::run_perplexity(args({"perplexity", "-m", dir / "w", "-f", dir / "text.txt", "-c", "128", "-t", "1"}),
                                 p_w, perr) == 0);
  const auto ppl_line = [](const std::string& s) { return s.substr(s.find("Final estimate")); };
  CHECK(ppl_line(p_w.str()) == ppl_line(p_st.str()));
}

TEST_CASE("runner errors are one clear line", "[runner]") {
  TmpDir dir("rf_runner_err_");
  CHECK_THROWS_WITH(args({"generat"}), Catch::Contains("unknown command"));
  CHECK_THROWS_WITH(args({"generate", "--temp"}), Catch::Contains("missing value"));
  CHECK_THROWS_WITH(args({"generate", "-n", "x"}), Catch::Contains("expected an integer"));
  CHECK_THROWS_WITH(args({"generate", "--device", "cuda"}), Catch::Contains("not built with CUDA"));
  CHECK_THROWS_WITH(args({"generate", "--bogus"}), Catch::Contains("unknown option"));
  CHECK_THROWS_WITH(args({"generate", "--cache-type", "q8_0"}), Catch::Contains("--cache-type: \"q8_0\" is not one of"));
  // flags outside their ranges say the range
  CHECK_THROWS_WITH(args({"generate", "--temp", "-1"}), "--temp: -1 is out of range [0, 1e+06]");
  CHECK_THROWS_WITH(args({"generate", "--top-p", "2"}), Catch::Contains("--top-p: 2 is out of range"));
  CHECK_THROWS_WITH(args({"generate", "--top-p", "0"}), Catch::Contains("--top-p: 0 is out of range"));
  CHECK_THROWS_WITH(args({"convert", "--ratio", "-0.5"}), "--ratio: -0.5 is out of range [0, 1]");
  CHECK_THROWS_WITH(args({"generate", "-n", std::string(100000, '7')}), Catch::Contains("expected an integer"));
  CHECK_THROWS_WITH(runner::load(dir / "nope"), Catch::Contains("no such file or directory"));
  // a config whose vocabulary the embedding does not have
  RandomModelSpec s = tiny();
  write_random_model(dir / "m", s);
  std::string cfg = runner::read_file(dir / "m/config.json");
  cfg.replace(cfg.find("\"vocab_size\": 288"), 17, "\"vocab_size\": 280");
  recurformer::detail::write_text(dir / "m/config.json", cfg);
  CHECK_THROWS_WITH(runner::load(dir / "m"), Catch::Contains("the config says vocab_size = 280 but"));
  std::ostringstream out, err;
  CHECK_THROWS_WITH(runner::run_convert(args({"convert", "-m", dir / "m", "--scores", dir / "s.json", "-o", dir / "o"}), out, err),
                    Catch::Contains("cannot open"));
  // -f on a directory; a context whose cache cannot fit, refused before it is allocated
  CHECK_THROWS_WITH(runner::run_generate(args({"generate", "-m", dir / "m", "-f", dir.path.string()}), out, err),
                    dir.path.string() + ": is a directory, not a file");
  write_random_model(dir / "ok", tiny());
  {
    std::ofstream f(dir / "short.txt");
    f << "a b";
  }
  CHECK_THROWS_WITH(
      runner::run_perplexity(args({"perplexity", "-m", dir / "ok", "-f", dir / "short.txt", "-c", "1048576"}), out, err),
      Catch::Contains("at least 2 * ctx-size = 2097152 are needed"));
  CHECK_THROWS_WITH(runner::run_bench(args({"bench", "-m", dir / "ok", "-c", "1073741824"}), out, err),
                    Catch::Contains("a cache of 1073741824 tokens (f32) needs 2048.00 GiB, more than the"));
  CHECK_THROWS_WITH(runner::run_generate(args({"generate", "-m", dir / "ok", "-p", "hi", "--memory-limit", "1", "-c",
                                               "8192"}),
                                         out, err),
                    "a cache of 8192 tokens (f32) needs 16.00 MiB, more than the 1.00 MiB of --memory-limit (lower -c, "
                    "or --cache-type f16)");
}

namespace {
/// Rewrites model.safetensors' lm_head.weight (f32) with edit(head, d_model); nothing else changes.
void edit_lm_head(const std::string& path, const std::function<void(std::vector<float>&, size_t)>& edit) {
  const auto f = SafetensorsFile::open(path);
  std::vector<TensorRef> refs = f.tensors();
  std::vector<float> head;
  for (TensorRef& t : refs) {
    if (t.name != "lm_head.weight") continue;
    REQUIRE(t.dtype == DType::f32);
    head.resize(size_t(t.numel()));
    std::memcpy(head.data(), t.data, t.nbytes());
    edit(head, size_t(t.shape[1]));
    t.data = head.data();
  }
  REQUIRE_FALSE(head.empty());
  write_safetensors(path, refs, f.metadata());
}
/// Row `id` of [vocab, d].
float* row(std::vector<float>& head, size_t d, int id) { return head.data() + size_t(id) * d; }

runner::Chat greedy_chat(const runner::Loaded& m, CpuExec exec) {
  return runner::Chat(m, chat_template_for(m.model->checkpoint(), *m.tok), "", 256, 64, SamplingParams{0.f, 0, 1.f, 1},
                      exec);
}
}  // namespace

TEST_CASE("generate --chat: templated turns, the reply ends at <|im_end|> unprinted, one cache", "[runner][chat]") {
  // The ends of turn (<|im_end|>, the EOS) get zero lm_head rows, so a random model does not end
  // its turn by itself (a zero logit is below the best of the others). Then swapping <|im_end|>'s
  // row with that of the token greedy decoding picks at step k makes greedy decoding pick
  // <|im_end|> there instead, after the same k tokens.
  TmpDir dir("rf_runner_chat_");
  RandomModelSpec s = tiny();
  s.tie_embeddings = false;
  write_random_model(dir / "m", s);
  rftest::make_chat_model(dir / "m", rftest::chatml_template());
  edit_lm_head(dir / "m/model.safetensors", [](std::vector<float>& head, size_t d) {
    for (int id : {rftest::kImEndId, recurformer::detail::kRandomEosId}) std::fill(row(head, d, id), row(head, d, id + 1), 0.f);
  });
  const std::string prompt = "What is the capital of France?";
  ThreadPool pool(1);
  std::vector<int32_t> free_run;
  {
    const runner::Loaded m = runner::load(dir / "m");
    runner::Chat chat = greedy_chat(m, CpuExec{&pool});
    const runner::ChatReply r = chat.say(prompt, 12, nullptr);
    REQUIRE_FALSE(r.ended);
    REQUIRE(r.ids.size() == 12);
    // the prompt went through the template, default system message included
    const std::string rendered = "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n" +
                                 prompt + "<|im_end|>\n<|im_start|>assistant\n";
    CHECK(r.prompt_tokens == int64_t(m.tok->encode(rendered, false).size()));
    free_run = r.ids;
  }
  size_t k = 2;  // the first step from 2 on whose token is new
  while (k < free_run.size() && std::count(free_run.begin(), free_run.begin() + long(k), free_run[k]) > 0) ++k;
  REQUIRE(k < free_run.size());
  edit_lm_head(dir / "m/model.safetensors", [&](std::vector<float>& head, size_t d) {
    std::swap_ranges(row(head, d, free_run[k]), row(head, d, free_run[k] + 1), row(head, d, rftest::kImEndId));
  });

  const runner::Loaded m = runner::load(dir / "m");
  runner::Chat chat = greedy_chat(m, CpuExec{&pool});
  const runner::ChatReply r1 = chat.say(prompt, 12, nullptr);
  CHECK(r1.ended);
  CHECK(r1.ids == std::vector<int32_t>(free_run.begin(), free_run.begin() + long(k)));
  // the runner prints that reply and nothing of the end-of-turn token
  std::istringstream no_input;
  std::ostringstream out, err;
  REQUIRE(runner::run_chat(args({"generate", "--chat", "-m", dir / "m", "-p", prompt, "-n", "12", "--temp", "0", "-t", "1"}),
                           no_input, out, err) == 0);
  std::vector<int32_t> printable;  // the model's rows past the tokenizer's ids have no text
  std::copy_if(r1.ids.begin(), r1.ids.end(), std::back_inserter(printable), [&](int32_t id) { return id < m.tok->vocab_size(); });
  CHECK(out.str() == m.tok->decode(printable, true) + "\n");
  CHECK_THAT(err.str(), Catch::Contains("chatml format") && Catch::Contains("You are a tiny test model."));
  // the next turn prefills only its own text: the end of the last turn and the new user turn
  const ChatMessage next{"user", "And of Italy?"};
  const std::vector<ChatMessage> history = {{"user", prompt}, {"assistant", r1.text}};
  const runner::ChatReply r2 = chat.say(next.content, 4, nullptr);
  const std::string cont = chat.chat_template().continuation(history, next);
  CHECK(cont == "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n");
  CHECK(r2.prompt_tokens == int64_t(m.tok->encode(cont, false).size()));
  CHECK(chat.cached_tokens() == r1.prompt_tokens + int64_t(r1.ids.size()) + r2.prompt_tokens + int64_t(r2.ids.size()));
}

TEST_CASE("generate --chat reads turns from stdin until EOF; unknown templates are a clear error", "[runner][chat]") {
  TmpDir dir("rf_runner_chat_in_");
  write_random_model(dir / "m", tiny());
  rftest::make_chat_model(dir / "m", rftest::chatml_template());
  std::istringstream in("Hello\n\nHow are you?\n");
  std::ostringstream out, err;
  REQUIRE(runner::run_chat(args({"generate", "--chat", "-m", dir / "m", "-n", "3", "--temp", "0", "-t", "1"}), in, out,
                           err) == 0);
  const std::string e = err.str();
  CHECK(std::count(e.begin(), e.end(), '>') == 4);  // a prompt per line read (the empty one too) and at EOF
  CHECK_THAT(e, Catch::Contains("(reply cut at -n 3 tokens)"));
  const std::string o = out.str();
  CHECK(std::count(o.begin(), o.end(), '\n') >= 2);
  // Zephyr's format is not one we render
  rftest::TempDir dir2("rf_runner_chat_bad_");
  write_random_model(dir2 / "m", tiny());
  rftest::make_chat_model(dir2 / "m", "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + "
                                      "message['content'] + eos_token }}{% endfor %}");
  std::istringstream none;
  CHECK_THROWS_WITH(runner::run_chat(args({"generate", "--chat", "-m", dir2 / "m", "-p", "hi"}), none, out, err),
                    Catch::Contains("unrecognised chat template") && Catch::Contains("--chat-template"));
  // ... unless named
  std::ostringstream out2;
  CHECK(runner::run_chat(args({"generate", "--chat", "-m", dir2 / "m", "-p", "hi", "-n", "2", "--chat-template", "chatml",
                               "-t", "1"}),
                         none, out2, err) == 0);
  CHECK_THROWS_WITH(args({"generate", "--chat-template", "chatml"}), Catch::Contains("need --chat"));
  CHECK_THROWS_WITH(args({"generate", "--chat", "--chat-template", "zephyr"}), Catch::Contains("\"zephyr\" is not one of"));
}
