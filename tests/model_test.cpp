// The full forward pass against the golden fixtures (tests/data/models, tools/README.md): each HF
// fixture and the GGUF copies reproduce transformers' logits, the RecurFormer checkpoint its float64
// reference; chunked prefill, decode and packed batches agree with one long prefill; conversion
// writes spec section 7 exactly, and a layout without recurrent groups reproduces the original.
#include <algorithm>
#include <cmath>
#include <deque>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <unistd.h>

#include "recurformer/model/convert.hpp"
#include "recurformer/model/llama.hpp"
#include "recurformer/model/random_model.hpp"
#include "recurformer/model/tokenizer.hpp"
#include "recurformer/model/gguf.hpp"
#include "support/npy.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

using namespace recurformer;
namespace fs = std::filesystem;

namespace {

std::string model_dir(const std::string& name) { return std::string(RECURFORMER_TEST_DATA_DIR) + "/models/" + name; }

struct Golden {
  std::vector<int32_t> ids;
  std::vector<float> logits;
  double max_abs = 0;
};
Golden golden(const std::string& name) {
  Golden g;
  g.ids = rftest::npy::load(model_dir(name) + "/golden/ids.npy").as<int32_t>();
  g.logits = rftest::npy::load(model_dir(name) + "/golden/logits.npy").as<float>();
  for (float x : g.logits) g.max_abs = std::max(g.max_abs, double(std::fabs(x)));
  return g;
}

// Every row of logits for `ids` as one sequence, prefilled in chunks of `chunk`.
std::vector<float> all_logits(const LlamaModel& m, const std::vector<int32_t>& ids, int64_t chunk, CpuExec exec) {
  LlamaSession s(m, 1, int64_t(ids.size()) + 4, exec, chunk);
  std::vector<float> all;
  s.prefill(0, ids.data(), int64_t(ids.size()), &all);
  return all;
}

// The tolerance of the fixtures' meta.json for an fp32 forward: rel 1e-4 and abs 1e-4 * max|logit|
// (the RecurFormer reference: 1e-4 * max|logit| too, its scan and softmax run in fp32 here).
void check_logits(const std::string& what, const std::vector<float>& got, const Golden& g, double abs_factor = 1e-4) {
  REQUIRE(got.size() == g.logits.size());
  std::vector<double> want(g.logits.begin(), g.logits.end());
  rftest::check_close(what, got, want, 1e-4, abs_factor * g.max_abs);
}

ThreadPool& pool() {
  static ThreadPool p(2);
  return p;
}

}  // namespace

TEST_CASE("every HF fixture reproduces its golden logits", "[model]") {
  const CpuExec exec{&pool()};
  for (const char* name : {"llama_gqa", "llama3_rope", "llama_tied", "qwen2_bias", "recurformer_mixed"}) {
    INFO("model " << name);
    const Golden g = golden(name);
    const LlamaModel m = LlamaModel::open(model_dir(name));
    // recurformer_mixed's reference is a float64 implementation of spec sections 3 and 7; its
    // meta.json allows 1e-4 * max|logit| for the deeper fp32 path (scan, streaming softmax).
    check_logits(std::string(name) + " one prefill", all_logits(m, g.ids, 256, exec), g);
    rftest::for_each_isa([&] { check_logits(std::string(name) + " chunks of 7", all_logits(m, g.ids, 7, exec), g); });
  }
}

TEST_CASE("the GGUF copies give the same logits", "[model]") {
  const CpuExec exec{&pool()};
  const Golden g = golden("llama_gqa");
  const LlamaModel f32 = LlamaModel::open(model_dir("llama_gqa") + "/model-f32.gguf");
  CHECK(f32.weight_dtype() == DType::f32);
  check_logits("model-f32.gguf", all_logits(f32, g.ids, 16, exec), g);
  const LlamaModel f16 = LlamaModel::open(model_dir("llama_gqa") + "/model-f16.gguf");
  CHECK(f16.weight_dtype() == DType::f16);
  // meta.json: the F16 rounding of the weights moves the logits by up to 2e-2 * max|logit|.
  check_logits("model-f16.gguf", all_logits(f16, g.ids, 16, exec), g, 2e-2);
}

namespace {

// Plain block quantisers for test files (valid blocks, not ggml's error-minimising rounding).
std::vector<BlockQ4_1> quantize_q4_1(const float* x, int64_t n) {
  std::vector<BlockQ4_1> out(size_t(n / 32));
  for (size_t b = 0; b < out.size(); ++b, x += 32) {
    const float lo = *std::min_element(x, x + 32), hi = *std::max_element(x, x + 32);
    const float d = (hi - lo) / 15;
    out[b].d = half(d), out[b].m = half(lo);
    for (int i = 0; i < 16; ++i) {
      auto code = [&](float v) { return uint8_t(std::clamp(int(std::lround(d > 0 ? (v - lo) / d : 0)), 0, 15)); };
      out[b].qs[i] = uint8_t(code(x[i]) | code(x[i + 16]) << 4);
    }
  }
  return out;
}
std::vector<BlockQ4_0> quantize_q4_0(const float* x, int64_t n) {
  std::vector<BlockQ4_0> out(size_t(n / 32));
  for (size_t b = 0; b < out.size(); ++b, x += 32) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 7;
    out[b].d = half(d);
    for (int i = 0; i < 16; ++i) {
      auto code = [&](float v) { return uint8_t(std::clamp(int(std::lround(d > 0 ? v / d : 0)) + 8, 0, 15)); };
      out[b].qs[i] = uint8_t(code(x[i]) | code(x[i + 16]) << 4);
    }
  }
  return out;
}

}  // namespace

TEST_CASE("block-quantised MLP and lm_head are served from their blocks", "[model][gguf][quant]") {
  // llama_gqa's F32 GGUF rewritten with ffn_gate / ffn_up / attn_q / attn_v in Q4_1, ffn_down /
  // attn_k in Q4_0 and the output and attn_output matrices in Q8_0. Served from the blocks (the
  // default), the model reads fewer bytes per token and gives the logits of the same weights
  // decoded to fp32, on the GEMV (decode) and GEMM paths.
  const CpuExec exec{&pool()};
  const GgufFile src = GgufFile::open(model_dir("llama_gqa") + "/model-f32.gguf");
  GgufWriter w;
  for (const auto& kv : src.metadata()) w.set(kv.first, kv.second);
  std::deque<std::vector<uint8_t>> kept;
  auto keep = [&](const auto& blocks) {
    const auto* p = reinterpret_cast<const uint8_t*>(blocks.data());
    return kept.emplace_back(p, p + blocks.size() * sizeof(blocks[0])).data();
  };
  int quantised = 0;
  for (const GgufTensorInfo& t : src.tensors()) {
    REQUIRE(t.type == GgmlType::f32);
    const float* x = reinterpret_cast<const float*>(t.data);
    auto is = [&](const char* part) { return t.name.find(part) != std::string::npos; };
    if (is("ffn_gate") || is("ffn_up") || is("attn_q") || is("attn_v")) {
      w.add_tensor(t.name, GgmlType::q4_1, t.ne, keep(quantize_q4_1(x, t.numel())));
    } else if (is("ffn_down") || is("attn_k")) {
      w.add_tensor(t.name, GgmlType::q4_0, t.ne, keep(quantize_q4_0(x, t.numel())));
    } else if (t.name == "output.weight" || is("attn_output")) {
      std::vector<uint8_t> q(size_t(t.numel() / 32 * kQ8_0BlockBytes));
      quantize_q8_0(x, t.numel(), q.data());
      w.add_tensor(t.name, GgmlType::q8_0, t.ne, kept.emplace_back(std::move(q)).data());
    } else {
      w.add_tensor(t.name, t.type, t.ne, t.data);
      continue;
    }
    ++quantised;
  }
  REQUIRE(quantised == 7 * 2 + 1);
  rftest::TempDir dir("rf_model_blocks_");
  w.write(dir / "q.gguf");
  LlamaModelOptions fp32_x;
  fp32_x.activations = ActivationMath::fp32;
  const LlamaModel blocks = LlamaModel::open(dir / "q.gguf", fp32_x);
  const LlamaModel int8_x = LlamaModel::open(dir / "q.gguf");  // the default: x quantised in decode
  LlamaModelOptions dense_opt;
  dense_opt.serve_blocks = false;
  const LlamaModel dense = LlamaModel::open(dir / "q.gguf", dense_opt);
  const ModelConfig& c = dense.config();
  const int64_t attn = c.n_layers * (2 * c.n_q + 2 * c.n_kv) * c.head_dim * c.d_model * 4;
  const int64_t mlp = c.n_layers * 3 * c.ffn * c.d_model, head = c.vocab_size * c.d_model;
  CHECK(dense.matrix_bytes() == attn + 4 * (mlp + head));
  const int64_t per_layer = (c.n_q * c.head_dim * c.d_model * (20 + 34) + c.n_kv * c.head_dim * c.d_model * (18 + 20) +
                             c.ffn * c.d_model * (2 * 20 + 18)) / 32;
  CHECK(blocks.matrix_bytes() == c.n_layers * per_layer + head / 32 * 34);
  const Golden g = golden("llama_gqa");
  for (int64_t chunk : {int64_t(1), int64_t(64)}) {  // GEMV per token; GEMM over the whole prompt
    INFO("chunk " << chunk);
    const std::vector<float> want = all_logits(dense, g.ids, chunk, exec);
    double max_abs = 0;
    for (float v : want) max_abs = std::max(max_abs, double(std::fabs(v)));
    rftest::for_each_isa([&] {
      rftest::check_close("blocks vs their fp32 decoding", all_logits(blocks, g.ids, chunk, exec),
                          std::vector<double>(want.begin(), want.end()), 1e-4, 1e-5 * max_abs);
      // int8 x: decode (chunk 1) is off by x's rounding (half a step of max|x| / 127 per 32
      // values, about 0.2% of a block's scale), prefill is the fp32 product.
      const std::vector<float> got = all_logits(int8_x, g.ids, chunk, exec);
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, double(std::fabs(got[i] - want[i])));
      INFO("int8 x: largest logit difference " << worst << " of " << max_abs);
      if (chunk == 1) {
        CHECK(worst > 1e-5 * max_abs);  // the integer path ran
        CHECK(worst < 2e-2 * max_abs);
      } else {
        CHECK(worst < 1e-4 * max_abs);
      }
    });
  }
  SECTION("a checkpoint that keeps no fp32 decodings serves the same model") {
    // Inference only (the runner's generate / chat / perplexity / bench): the quantised tensors
    // keep only their blocks; the model decodes what it does not serve from them (the embedding;
    // every matrix when blocks are off) and gives the same logits bit for bit.
    const auto lean = std::make_shared<const Checkpoint>(Checkpoint::open(dir / "q.gguf", CheckpointOptions{false}));
    const TensorRef& q0 = lean->tensor("model.layers.0.self_attn.q_proj.weight");
    CHECK(q0.data == nullptr);
    CHECK(q0.blocks != nullptr);
    REQUIRE_THROWS_WITH((q0.view<float, 2>()), Catch::Contains("its fp32 decoding was not kept"));
    CHECK(lean->tensor("model.norm.weight").data != nullptr);  // F32 tensors are the file's
    for (const auto& [opt, full] : {std::pair<LlamaModelOptions, const LlamaModel*>{fp32_x, &blocks},
                                    {LlamaModelOptions{}, &int8_x}, {dense_opt, &dense}}) {
      const LlamaModel m(lean, opt);
      CHECK(m.matrix_bytes() == full->matrix_bytes());
      for (int64_t chunk : {int64_t(1), int64_t(64)}) {
        const std::vector<float> want = all_logits(*full, g.ids, chunk, exec), got = all_logits(m, g.ids, chunk, exec);
        REQUIRE(got.size() == want.size());
        REQUIRE(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("decode and packed batches agree with one prefill", "[model]") {
  const CpuExec exec{&pool()};
  const char* name = "recurformer_mixed";  // every head kind
  const Golden g = golden(name);
  const LlamaModel m = LlamaModel::open(model_dir(name));
  const int64_t T = int64_t(g.ids.size()), V = m.config().vocab_size, P = 10;
  // prefill P tokens, then decode one at a time: each step's logits are row t of the golden set.
  LlamaSession s(m, 2, T, exec, 4);
  std::vector<float> got(size_t(T * V));
  std::vector<float> rows;
  s.prefill(0, g.ids.data(), P, &rows);
  std::copy(rows.begin(), rows.end(), got.begin());
  for (int64_t t = P; t < T; ++t) {
    const auto& l = s.decode(0, g.ids[size_t(t)]);
    std::copy(l.begin(), l.end(), got.begin() + t * V);
  }
  check_logits("prefill + decode", got, g);
  CHECK(s.cache().length(0) == T);
  // Two sequences in one packed batch (slot 1 gets a shorter, different prompt), then a batched
  // decode step of both slots: slot 0's rows must not depend on slot 1.
  LlamaCache cache = m.make_cache(2, T + 1);
  const int64_t n1 = 9;
  std::vector<int32_t> packed(g.ids.begin(), g.ids.end());
  packed.insert(packed.end(), g.ids.rbegin(), g.ids.rbegin() + n1);
  const int32_t cu[3] = {0, int32_t(T), int32_t(T + n1)}, slots[2] = {1, 0};
  LlamaBatch b{make_view<const int32_t>(packed.data(), {T + n1}), make_view(cu, {3}), make_view(slots, {2})};
  std::vector<float> all(size_t((T + n1) * V));
  std::vector<unsigned char> ws(m.forward_workspace_bytes(b, cache, LogitsRows::all, exec));
  m.forward(b, cache, make_view(all.data(), {T + n1, V}), LogitsRows::all, exec, ws.data(), ws.size());
  all.resize(size_t(T * V));
  check_logits("packed batch, first sequence", all, g);
  CHECK(cache.length(1) == T);
  CHECK(cache.length(0) == n1);
  // the second sequence alone
  std::vector<int32_t> second(g.ids.rbegin(), g.ids.rbegin() + n1);
  const auto alone = all_logits(m, second, 64, exec);
  std::vector<float> all2(size_t((T + n1) * V));
  LlamaCache cache2 = m.make_cache(2, T + 1);
  m.forward(b, cache2, make_view(all2.data(), {T + n1, V}), LogitsRows::all, exec, ws.data(), ws.size());
  rftest::check_close("packed batch, second sequence", std::vector<float>(all2.begin() + T * V, all2.end()),
                      std::vector<double>(alone.begin(), alone.end()), 1e-5, 1e-5 * g.max_abs);
  // A workspace the forward grows (the session's): from empty, too short for the step's plan, and
  // one byte short of the whole need, it gives the sized call's logits bit for bit.
  for (size_t start : {size_t(0), size_t(100), ws.size() - 1}) {
    std::vector<unsigned char> grown(start);
    std::vector<float> all3(all2.size());
    LlamaCache cache3 = m.make_cache(2, T + 1);
    m.forward(b, cache3, make_view(all3.data(), {T + n1, V}), LogitsRows::all, exec, grown);
    REQUIRE(all3 == all2);
    REQUIRE(grown.size() == ws.size());
  }
}

TEST_CASE("a paged cache gives the contiguous cache's logits bit for bit; a fork shares the prompt's pages",
          "[model]") {
  const CpuExec exec{&pool()};
  const char* name = "recurformer_mixed";  // every head kind
  const Golden g = golden(name);
  const LlamaModel m = LlamaModel::open(model_dir(name));
  const int64_t T = int64_t(g.ids.size()), V = m.config().vocab_size, P = 10;
  LlamaSession contiguous(m, 2, T, exec, 4), paged(m, 2, T, exec, 4, 3);
  std::vector<float> a, b;
  contiguous.prefill(0, g.ids.data(), P, &a);
  paged.prefill(0, g.ids.data(), P, &b);
  REQUIRE(a == b);
  // Fork the prompt into slot 1 and decode both slots together: the same token into each.
  contiguous.cache().copy(0, 1);
  paged.cache().copy(0, 1);
  REQUIRE(paged.cache().pages_used() == (P + 2) / 3);  // shared, not copied
  std::vector<float> got(size_t(T * V));
  std::copy(b.begin(), b.end(), got.begin());
  const int32_t slots[2] = {0, 1};
  for (int64_t t = P; t < T; ++t) {
    const int32_t tok[2] = {g.ids[size_t(t)], g.ids[size_t(t)]};
    const std::vector<float> want = contiguous.decode(slots, tok, 2);
    const std::vector<float>& l = paged.decode(slots, tok, 2);
    REQUIRE(l == want);
    REQUIRE(std::equal(l.begin(), l.begin() + V, l.begin() + V));
    std::copy(l.begin(), l.begin() + V, got.begin() + t * V);
  }
  check_logits("paged prefill + fork + decode", got, g);
  const int64_t shared_pages = P / 3, own_pages = (T + 2) / 3 - shared_pages;
  REQUIRE(paged.cache().pages_used() == shared_pages + 2 * own_pages);
}

TEST_CASE("a half or bfloat16 cache follows the fp32 one at half the bytes", "[model][cache-type]") {
  // q, k, v are rounded once to the cache type (unit roundoff 2^-11 for half, 2^-8 for bfloat16),
  // then attention, the conv and the scan read them so; the SSM state stays fp32. Tolerances on the
  // logits: 1e-2 * max|logit| for half (the golden F16-weights bound is 2e-2 for the same roundoff),
  // 8x that for bfloat16 (8x the roundoff).
  const CpuExec exec{&pool()};
  for (const char* name : {"llama_gqa", "recurformer_mixed"}) {
    const Golden g = golden(name);
    const LlamaModel m = LlamaModel::open(model_dir(name));
    const int64_t T = int64_t(g.ids.size()), V = m.config().vocab_size, P = 7;
    auto run = [&](auto tag, double abs_factor) {
      using T16 = typename decltype(tag)::type;
      INFO("model " << name << ", cache " << dtype_name(dtype_of<T16>()));
      BasicLlamaSession<T16> s(m, 1, T, exec, 4);
      std::vector<float> got(size_t(T * V)), rows;
      s.prefill(0, g.ids.data(), P, &rows);  // chunked prefill, then one-token decode steps
      std::copy(rows.begin(), rows.end(), got.begin());
      for (int64_t t = P; t < T; ++t) {
        const auto& l = s.decode(0, g.ids[size_t(t)]);
        std::copy(l.begin(), l.end(), got.begin() + t * V);
      }
      check_logits("prefill + decode", got, g, abs_factor);
      double dev = 0;  // the rounding is really there: the cache type is used, not ignored
      for (size_t i = 0; i < got.size(); ++i) dev = std::max(dev, std::fabs(double(got[i]) - g.logits[i]));
      CHECK(dev > 1e-6 * g.max_abs);
      LlamaSession f32(m, 1, T, exec, 4);
      f32.prefill(0, g.ids.data(), T);
      const CacheBytes b16 = s.cache().bytes().held, b32 = f32.cache().bytes().held;
      CHECK(b16.attention * 2 == b32.attention);
      CHECK(b16.streaming * 2 == b32.streaming);
      CHECK(b16.recurrent <= b32.recurrent);  // fp32 SSM state + half conv state
      CHECK(s.cache().allocated_bytes() == s.cache().bytes().capacity.total);
    };
    run(TypeTag<half>{}, 1e-2);
    run(TypeTag<bfloat16>{}, 8e-2);
  }
}

TEST_CASE("bad input throws and leaves the cache as it was", "[model]") {
  const CpuExec exec{&pool()};
  const LlamaModel m = LlamaModel::open(model_dir("recurformer_mixed"));
  LlamaSession s(m, 1, 8, exec, 4);
  const int32_t ok[3] = {1, 2, 3};
  s.prefill(0, ok, 3);
  const auto before = s.cache().bytes().held;
  const int32_t bad[2] = {5, 100000};
  REQUIRE_THROWS_WITH(s.prefill(0, bad, 2), Catch::Contains("outside the model's vocabulary"));
  CHECK(s.cache().length(0) == 3);
  const int32_t many[6] = {1, 2, 3, 4, 5, 6};
  REQUIRE_THROWS_WITH(s.prefill(0, many, 6), Catch::Contains("do not fit"));
  CHECK(s.cache().length(0) == 3);
  CHECK(s.cache().bytes().held == before);
  // the raw forward's own capacity check (the session's is bypassed)
  const int32_t cu[2] = {0, 6}, sl[1] = {0};
  LlamaBatch b{make_view(many, {6}), make_view(cu, {2}), make_view(sl, {1})};
  std::vector<float> logits(size_t(m.config().vocab_size));
  std::vector<unsigned char> ws(1 << 20);
  CHECK_THROWS_AS(m.forward(b, s.cache(), make_view(logits.data(), {1, int64_t(m.config().vocab_size)}),
                            LogitsRows::last, exec, ws.data(), ws.size()),
                  Error);
  CHECK(s.cache().length(0) == 3);
  CHECK_THROWS_WITH(LlamaModel::open(model_dir("no_such_model")), Catch::Contains("no_such_model"));
}

TEST_CASE("convert writes spec section 7; no recurrent groups reproduces the original", "[model][convert]") {
  const CpuExec exec{&pool()};
  const Golden g = golden("llama_gqa");
  const fs::path tmp = fs::temp_directory_path() / ("rf_model_test_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  const Checkpoint ck = Checkpoint::open(model_dir("llama_gqa"));
  const ModelConfig& c = ck.config();
  ConvertOptions none;
  none.layout = HeadLayout::uniform(c.n_layers, c.n_kv, HeadKind::attention);
  convert_to_recurformer(ck, none, (tmp / "none").string());
  const LlamaModel orig = LlamaModel::open(model_dir("llama_gqa"));
  const LlamaModel same = LlamaModel::open((tmp / "none").string());
  REQUIRE(same.config().recurformer.has_value());
  const auto a = all_logits(orig, g.ids, 8, exec), b = all_logits(same, g.ids, 8, exec);
  CHECK(a == b);  // bit for bit: the same tensors, the same kernels

  ConvertOptions half = none;
  half.layout.layers[1].groups[0] = HeadKind::recurrent;
  half.seed = 7;
  convert_to_recurformer(ck, half, (tmp / "half").string());
  convert_to_recurformer(ck, half, (tmp / "half2").string());
  {  // outputs: an existing non-empty directory is refused, or replaced whole; a failure leaves nothing
    const std::string dst = (tmp / "half2").string();
    CHECK_THROWS_WITH(convert_to_recurformer(ck, half, dst), "convert: " + dst + " exists and is not empty (--force replaces it whole)");
    detail::write_text(dst + "/model.safetensors.index.json", "{}");  // stale file of an earlier sharded model
    ConvertOptions again = half;
    again.replace = true;
    convert_to_recurformer(ck, again, dst);
    CHECK(fs::exists(dst + "/config.json"));
    CHECK(!fs::exists(dst + "/model.safetensors.index.json"));
    CHECK_THROWS_WITH(convert_to_recurformer(ck, again, model_dir("llama_gqa")), Catch::Contains("holds the input model"));
    ConvertOptions failing = half;  // the fit throws after the first files are written
    failing.init = ConvertInit::fit;
    failing.fit_data = {FitGroupData{1, 0, {}}};
    CHECK_THROWS_WITH(convert_to_recurformer(ck, failing, (tmp / "failed").string()),
                      Catch::Contains("no calibration sequences"));
    for (const auto& e : fs::directory_iterator(tmp)) CHECK(e.path().filename().string().rfind("failed", 0) != 0);
  }
  const Checkpoint out = Checkpoint::open((tmp / "half").string());
  REQUIRE(out.config().recurformer.has_value());
  CHECK(out.config().recurformer->layout.layers[1].groups[0] == HeadKind::recurrent);
  CHECK(out.config().recurformer->recurrent.d_state == c.head_dim);
  for (const std::string& n : ck.tensor_names()) {  // every original tensor, byte for byte
    const TensorRef &x = ck.tensor(n), &y = out.tensor(n);
    REQUIRE(x.shape == y.shape);
    CHECK(std::memcmp(x.data, y.data, x.nbytes()) == 0);
  }
  const std::string p = "model.layers.1.self_attn.recurrent.0.";
  const int64_t hd = c.head_dim, N = hd, Kc = 4, r = 8;
  CHECK(out.tensor(p + "dt_down.weight").shape == std::vector<int64_t>{r, c.d_model});
  const auto up = out.tensor(p + "dt_up.weight").view<float, 2>();
  for (int64_t i = 0; i < hd * r; ++i) CHECK(up.data[i] == 0.f);
  const auto bias = out.tensor(p + "dt_bias").view<float, 1>();
  for (int64_t i = 0; i < hd; ++i) {
    const double dt = std::log1p(std::exp(double(bias.data[i])));  // softplus(b) = Δ0 in [1e-3, 1e-1]
    CHECK(dt >= 1e-3 * (1 - 1e-5));
    CHECK(dt <= 1e-1 * (1 + 1e-5));
  }
  const auto A_log = out.tensor(p + "A_log").view<float, 2>();
  for (int64_t ch = 0; ch < hd; ++ch)
    for (int64_t n = 0; n < N; ++n) CHECK(A_log(ch, n) == float(std::log(double(n + 1))));
  const auto D = out.tensor(p + "D").view<float, 1>();
  const auto cw = out.tensor(p + "conv1d.weight").view<float, 2>();
  const auto cb = out.tensor(p + "conv1d.bias").view<float, 1>();
  for (int64_t ch = 0; ch < hd; ++ch) {
    CHECK(D(ch) == 0.f);
    CHECK(cb(ch) == 0.f);
    for (int64_t k = 0; k < Kc; ++k) CHECK(cw(ch, k) == (k == Kc - 1 ? 1.f : 0.f));
  }
  CHECK(!out.has("model.layers.0.self_attn.recurrent.0.A_log"));
  // deterministic for a seed
  std::ifstream f1(tmp / "half" / "model.safetensors", std::ios::binary), f2(tmp / "half2" / "model.safetensors", std::ios::binary);
  const std::string s1((std::istreambuf_iterator<char>(f1)), {}), s2((std::istreambuf_iterator<char>(f2)), {});
  CHECK(s1 == s2);
  // and the converted model runs: layer 0 is unchanged, so the logits move but stay finite
  const LlamaModel conv = LlamaModel::open((tmp / "half").string());
  const auto lc = all_logits(conv, g.ids, 5, exec);
  for (float x : lc) REQUIRE(std::isfinite(x));
  CHECK(all_logits(conv, g.ids, 31, exec) == all_logits(conv, g.ids, 31, exec));
  CHECK_THROWS_WITH(convert_to_recurformer(out, half, (tmp / "again").string()), Catch::Contains("already a RecurFormer"));
  fs::remove_all(tmp);
}

TEST_CASE("convert reads GGUF and writes the HF directory it came from", "[model][convert][gguf]") {
  const CpuExec exec{&pool()};
  const Golden g = golden("llama_gqa");
  const fs::path tmp = fs::temp_directory_path() / ("rf_model_gguf_test_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  const Checkpoint hf = Checkpoint::open(model_dir("llama_gqa"));
  const Checkpoint gg = Checkpoint::open(model_dir("llama_gqa") + "/model-f32.gguf");
  const ModelConfig& c = hf.config();
  ConvertOptions none;
  none.layout = HeadLayout::uniform(c.n_layers, c.n_kv, HeadKind::attention);
  convert_to_recurformer(gg, none, (tmp / "none").string());
  const Checkpoint out = Checkpoint::open((tmp / "none").string());
  CHECK(out.config().rope_layout == RopeLayout::rotate_half);
  CHECK(out.config().n_layers == c.n_layers);
  CHECK(out.config().tie_word_embeddings == c.tie_word_embeddings);
  // The GGUF's F32 tensors are llama.cpp's conversion of the HF ones: un-permuting the q/k rows
  // must give the HF bytes back exactly, and every other tensor is copied.
  REQUIRE(out.tensor_names() == hf.tensor_names());
  for (const std::string& n : hf.tensor_names()) {
    INFO(n);
    const TensorRef &x = hf.tensor(n), &y = out.tensor(n);
    REQUIRE(x.shape == y.shape);
    REQUIRE(y.dtype == DType::f32);
    CHECK(std::memcmp(x.data, y.data, x.nbytes()) == 0);
  }
  // The written directory runs as the GGUF does (golden logits; rotate_half on HF rows).
  check_logits("GGUF -> HF directory", all_logits(LlamaModel::open((tmp / "none").string()), g.ids, 16, exec), g);
  // Its tokenizer.json encodes as the GGUF vocabulary does, special tokens included.
  const Tokenizer a = Tokenizer::from_gguf(*gg.gguf_tokenizer()), b = Tokenizer::from_hf((tmp / "none").string());
  for (const char* text : {"The river ran past the old mill, 12345 times!", "  two  spaces\n\tand tabs",
                           "<|begin_of_text|>hello<|end_of_text|>", "caf\xc3\xa9 \xe2\x82\xac 42"}) {
    INFO(text);
    CHECK(a.encode(text, true) == b.encode(text, true));
    CHECK(a.encode(text, false) == b.encode(text, false));
  }
  CHECK(b.bos_id() == a.bos_id());
  CHECK(b.eos_id() == a.eos_id());

  // A RecurFormer from the GGUF is the one from the HF directory, byte for byte.
  ConvertOptions half = none;
  half.layout.layers[1].groups[0] = HeadKind::recurrent;
  half.seed = 7;
  convert_to_recurformer(gg, half, (tmp / "from_gguf").string());
  convert_to_recurformer(hf, half, (tmp / "from_hf").string());
  std::ifstream f1(tmp / "from_gguf" / "model.safetensors", std::ios::binary),
      f2(tmp / "from_hf" / "model.safetensors", std::ios::binary);
  const std::string s1((std::istreambuf_iterator<char>(f1)), {}), s2((std::istreambuf_iterator<char>(f2)), {});
  CHECK(s1 == s2);
  CHECK(Checkpoint::open((tmp / "from_gguf").string()).config().recurformer ==
        Checkpoint::open((tmp / "from_hf").string()).config().recurformer);

  // --dtype bf16: every original tensor re-stored in bfloat16, the new ones stay fp32.
  ConvertOptions bf = half;
  bf.weight_dtype = DType::bf16;
  convert_to_recurformer(gg, bf, (tmp / "bf16").string());
  const Checkpoint ob = Checkpoint::open((tmp / "bf16").string());
  const TensorRef& q = ob.tensor("model.layers.0.self_attn.q_proj.weight");
  REQUIRE(q.dtype == DType::bf16);
  const auto* qh = static_cast<const bfloat16*>(q.data);
  const auto* qf = static_cast<const float*>(hf.tensor("model.layers.0.self_attn.q_proj.weight").data);
  for (int64_t i = 0; i < q.numel(); ++i) REQUIRE(qh[i].bits == bfloat16(qf[i]).bits);
  CHECK(ob.tensor("model.layers.1.self_attn.recurrent.0.A_log").dtype == DType::f32);
  CHECK(ob.config().torch_dtype == "bfloat16");
  fs::remove_all(tmp);
}

TEST_CASE("a GGUF whose Llama 3 scaling lives only in rope_freqs.weight", "[model][gguf]") {
  // llama.cpp writes Llama-3 RoPE scaling not as metadata but as per-pair divisors of the base
  // frequencies in rope_freqs.weight. The llama3_rope fixture is written here as such a GGUF (q/k
  // rows permuted as llama.cpp does, no scaling metadata) and must give transformers' logits; the
  // same GGUF without the tensor must not (so the fixture's positions do feel the scaling).
  const CpuExec exec{&pool()};
  const Golden g = golden("llama3_rope");
  const Checkpoint hf = Checkpoint::open(model_dir("llama3_rope"));
  const ModelConfig& c = hf.config();
  REQUIRE(c.rope_scaling.type == RopeScaling::Type::llama3);
  const std::vector<float> plain = rope_inv_freq(c.head_dim, c.rope_theta),
                           scaled = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
  std::vector<float> div(plain.size());
  for (size_t i = 0; i < div.size(); ++i) div[i] = plain[i] / scaled[i];
  std::deque<std::vector<float>> permuted;
  auto write = [&](const std::string& path, bool with_freqs) {
    GgufWriter w;
    w.set("general.architecture", GgufValue::str("llama"));
    w.set("llama.embedding_length", GgufValue::u32(uint32_t(c.d_model)));
    w.set("llama.block_count", GgufValue::u32(uint32_t(c.n_layers)));
    w.set("llama.feed_forward_length", GgufValue::u32(uint32_t(c.ffn)));
    w.set("llama.attention.head_count", GgufValue::u32(uint32_t(c.n_q)));
    w.set("llama.attention.head_count_kv", GgufValue::u32(uint32_t(c.n_kv)));
    w.set("llama.attention.key_length", GgufValue::u32(uint32_t(c.head_dim)));
    w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(c.rms_eps));
    w.set("llama.rope.freq_base", GgufValue::f32(c.rope_theta));
    w.set("llama.vocab_size", GgufValue::u32(uint32_t(c.vocab_size)));
    for (const std::string& name : hf.tensor_names()) {
      const TensorRef& t = hf.tensor(name);
      REQUIRE(t.dtype == DType::f32);
      std::string gname = name == "model.embed_tokens.weight" ? "token_embd.weight"
                          : name == "model.norm.weight"       ? "output_norm.weight"
                          : name == "lm_head.weight"          ? "output.weight"
                                                              : "";
      const void* data = t.data;
      if (gname.empty()) {
        const size_t dot = name.find('.', 13);  // "model.layers.L.part.weight"
        const std::string layer = name.substr(13, dot - 13), part = name.substr(dot + 1);
        static const std::pair<const char*, const char*> map[] = {
            {"self_attn.q_proj.weight", "attn_q.weight"},   {"self_attn.k_proj.weight", "attn_k.weight"},
            {"self_attn.v_proj.weight", "attn_v.weight"},   {"self_attn.o_proj.weight", "attn_output.weight"},
            {"mlp.gate_proj.weight", "ffn_gate.weight"},    {"mlp.up_proj.weight", "ffn_up.weight"},
            {"mlp.down_proj.weight", "ffn_down.weight"},    {"input_layernorm.weight", "attn_norm.weight"},
            {"post_attention_layernorm.weight", "ffn_norm.weight"}};
        for (const auto& m : map)
          if (part == m.first) gname = "blk." + layer + "." + m.second;
        REQUIRE(!gname.empty());
        const bool q = part == "self_attn.q_proj.weight", k = part == "self_attn.k_proj.weight";
        if (q || k) {  // llama.cpp's row order: stored row 2i + s of a head is HF row s hd/2 + i
          const int64_t heads = q ? c.n_q : c.n_kv, hd = c.head_dim, in = t.shape[1];
          const float* src = static_cast<const float*>(t.data);
          std::vector<float>& dst = permuted.emplace_back(size_t(t.numel()));
          for (int64_t h = 0; h < heads; ++h)
            for (int64_t i = 0; i < hd / 2; ++i)
              for (int64_t s = 0; s < 2; ++s)
                std::copy_n(src + (h * hd + s * (hd / 2) + i) * in, in, dst.data() + (h * hd + 2 * i + s) * in);
          data = dst.data();
        }
      }
      w.add_tensor(gname, GgmlType::f32, std::vector<int64_t>(t.shape.rbegin(), t.shape.rend()), data);
    }
    if (with_freqs) w.add_tensor("rope_freqs.weight", GgmlType::f32, {int64_t(div.size())}, div.data());
    w.write(path);
  };
  rftest::TempDir dir("rf_model_rope_freqs_");
  write(dir / "scaled.gguf", true);
  write(dir / "plain.gguf", false);
  const LlamaModel scaled_model = LlamaModel::open(dir / "scaled.gguf");
  CHECK(scaled_model.config().rope_scaling.type == RopeScaling::Type::none);  // the scaling is only in the tensor
  check_logits("GGUF with rope_freqs.weight", all_logits(scaled_model, g.ids, 5, exec), g);
  const auto unscaled = all_logits(LlamaModel::open(dir / "plain.gguf"), g.ids, 5, exec);
  double dev = 0;
  for (size_t i = 0; i < unscaled.size(); ++i) dev = std::max(dev, std::fabs(double(unscaled[i]) - g.logits[i]));
  CHECK(dev > 1e-3 * g.max_abs);
}

TEST_CASE("the random model is deterministic and loads", "[model]") {
  const fs::path tmp = fs::temp_directory_path() / ("rf_random_model_" + std::to_string(::getpid()));
  RandomModelSpec s;
  s.n_layers = 2, s.d_model = 64, s.ffn = 96, s.n_q = 2, s.n_kv = 1;
  write_random_model((tmp / "a").string(), s);
  write_random_model((tmp / "b").string(), s);
  std::ifstream f1(tmp / "a" / "model.safetensors", std::ios::binary), f2(tmp / "b" / "model.safetensors", std::ios::binary);
  const std::string s1((std::istreambuf_iterator<char>(f1)), {}), s2((std::istreambuf_iterator<char>(f2)), {});
  CHECK(s1 == s2);
  CHECK_FALSE(ensure_random_model((tmp / "a").string(), s));
  s.weight_dtype = DType::bf16;
  write_random_model((tmp / "c").string(), s);
  const LlamaModel m = LlamaModel::open((tmp / "c").string());
  CHECK(m.weight_dtype() == DType::bf16);
  const CpuExec exec{&pool()};
  const auto l = all_logits(m, {278, 72, 101, 108}, 2, exec);
  for (float x : l) REQUIRE(std::isfinite(x));
  fs::remove_all(tmp);
}
