// ModelConfig from real config.json texts (Llama-3.2-1B, SmolLM2-135M, TinyLlama, Qwen2.5-0.5B) and
// bad ones; the "recurformer" object round trip; Checkpoint over a HF directory (single file and
// shards) and over GGUF files (HF names, reversed extents, Q8_0 dequantised, RoPE layout), with
// the errors a user meets (missing tensor, wrong shape, bad index, unknown architecture).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "recurformer/model/checkpoint.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

namespace fs = std::filesystem;
using namespace recurformer;

namespace {

// Every TempDir of this file is named after it.
struct TempDir : rftest::TempDir {
  TempDir() : rftest::TempDir("rf-checkpoint") {}
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

std::string config_error(const std::string& text) {
  try {
    parse_model_config(text, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

const char* kLlama32_1B = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
  "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256})";

const char* kSmolLM2_135M = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 0,
  "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
  "intermediate_size": 1536, "is_llama_config": true, "max_position_embeddings": 8192, "model_type": "llama",
  "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
  "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true,
  "vocab_size": 49152})";

const char* kTinyLlama = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
  "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
  "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.35.0", "use_cache": true, "vocab_size": 32000})";

const char* kQwen25_05B = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
  "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
  "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})";

// A tiny llama config (2 layers, d 8, 2 query heads, 1 KV head of 4) with extra text spliced in.
std::string tiny_config(const std::string& extra = "") {
  return std::string(R"({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 12, "rms_norm_eps": 1e-5)") +
         extra + "}";
}

// tiny_config with some of its keys given other values (a key twice in one object is an error).
std::string tiny_config_with(const std::string& changes) {
  nlohmann::json o = nlohmann::json::parse(tiny_config());
  o.update(nlohmann::json::parse(changes));
  return o.dump();
}

}  // namespace

TEST_CASE("ModelConfig parses real Llama, SmolLM2, TinyLlama and Qwen2.5 configs", "[config]") {
  const ModelConfig l = parse_model_config(std::string(kLlama32_1B));
  CHECK(l.architecture == "llama");
  CHECK(l.vocab_size == 128256);
  CHECK(l.d_model == 2048);
  CHECK(l.n_layers == 16);
  CHECK(l.n_q == 32);
  CHECK(l.n_kv == 8);
  CHECK(l.group_size() == 4);
  CHECK(l.head_dim == 64);
  CHECK(l.ffn == 8192);
  CHECK(l.rms_eps == 1e-5f);
  CHECK(l.rope_theta == 500000.f);
  CHECK(l.rope_scaling.type == RopeScaling::Type::llama3);
  CHECK(l.rope_scaling.factor == 32.f);
  CHECK(l.rope_scaling.low_freq_factor == 1.f);
  CHECK(l.rope_scaling.high_freq_factor == 4.f);
  CHECK(l.rope_scaling.original_max_position == 8192);
  CHECK(l.rope_layout == RopeLayout::rotate_half);
  CHECK(l.tie_word_embeddings);
  CHECK(!l.attention_bias);
  CHECK(l.max_position_embeddings == 131072);
  CHECK(l.bos_token_id == 128000);
  CHECK(l.eos_token_ids == std::vector<int>{128001, 128008, 128009});
  CHECK(l.torch_dtype == "bfloat16");
  CHECK(!l.recurformer);
  CHECK(l.head_layout().count(HeadKind::attention) == 16 * 8);

  const ModelConfig s = parse_model_config(std::string(kSmolLM2_135M));
  CHECK(s.d_model == 576);
  CHECK(s.n_q == 9);
  CHECK(s.n_kv == 3);
  CHECK(s.head_dim == 64);  // hidden / heads
  CHECK(s.n_layers == 30);
  CHECK(s.rope_theta == 100000.f);
  CHECK(s.rope_scaling.type == RopeScaling::Type::none);
  CHECK(s.bos_token_id == 0);
  CHECK(s.eos_token_ids == std::vector<int>{0});
  CHECK(s.tie_word_embeddings);

  const ModelConfig t = parse_model_config(std::string(kTinyLlama));
  CHECK(t.n_kv == 4);
  CHECK(t.head_dim == 64);
  CHECK(t.ffn == 5632);
  CHECK(t.vocab_size == 32000);
  CHECK(!t.tie_word_embeddings);
  CHECK(t.max_position_embeddings == 2048);

  const ModelConfig q = parse_model_config(std::string(kQwen25_05B));
  CHECK(q.architecture == "qwen2");
  CHECK(q.attention_bias);  // qwen2 always has q/k/v biases
  CHECK(q.d_model == 896);
  CHECK(q.n_q == 14);
  CHECK(q.n_kv == 2);
  CHECK(q.head_dim == 64);
  CHECK(q.rms_eps == 1e-6f);
  CHECK(q.rope_theta == 1e6f);
  CHECK(q.tie_word_embeddings);
  CHECK(q.eos_token_ids == std::vector<int>{151643});
}

TEST_CASE("ModelConfig rejects bad configs with the file and the problem", "[config][bad]") {
  REQUIRE(config_error(tiny_config()).empty());
  CHECK(config_error(R"({"model_type": "gpt2", "vocab_size": 10})") ==
        "cfg.json: unknown architecture (model_type \"gpt2\"; supported: llama, mistral, qwen2)");
  CHECK(config_error(R"({"vocab_size": 10})") == "cfg.json: missing model_type");
  CHECK_THAT(config_error("{\"model_type\": \"llama\",,}"), Catch::StartsWith("cfg.json: malformed JSON in config"));
  CHECK_THAT(config_error("[1]"), Catch::Contains("config must be a JSON object"));
  CHECK(config_error(R"({"model_type": "llama", "vocab_size": 10})") == "cfg.json: missing hidden_size");
  CHECK_THAT(config_error(tiny_config_with(R"({"num_key_value_heads": 3, "num_attention_heads": 4, "head_dim": 2})")),
             Catch::Contains("num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"));
  CHECK_THAT(config_error(R"({"model_type": "llama", "vocab_size": 10, "hidden_size": 10, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "intermediate_size": 4})"),
             Catch::Contains("hidden_size = 10 is not a multiple of num_attention_heads = 4 and head_dim is absent"));
  CHECK_THAT(config_error(tiny_config(R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4.0})")),
             Catch::Contains("unsupported rope_scaling type \"yarn\""));
  CHECK_THAT(config_error(tiny_config(R"(, "rope_scaling": {"type": "linear", "factor": 4.0})")),
             Catch::Contains("unsupported rope_scaling type \"linear\""));
  CHECK_THAT(config_error(tiny_config(R"(, "rope_scaling": {"rope_type": "llama3", "factor": 4.0})")),
             Catch::Contains("missing rope_scaling.low_freq_factor"));
  CHECK_THAT(config_error(tiny_config_with(R"({"hidden_size": "8"})")), Catch::Contains("hidden_size must be an integer"));
  CHECK_THAT(config_error(tiny_config_with(R"({"hidden_size": -8})")), Catch::Contains("hidden_size = -8 is out of range"));
  CHECK_THAT(config_error(tiny_config(R"(, "eos_token_id": 10)")), Catch::Contains("eos_token_id = 10 is out of range"));
  CHECK_THAT(config_error(tiny_config(R"(, "mlp_bias": true)")), Catch::Contains("mlp_bias = true is not supported"));
  // 1e39 is finite as a double and infinite as the float the model keeps: every frequency would be 0
  CHECK_THAT(config_error(tiny_config_with(R"({"rope_theta": 1e39})")),
             Catch::Contains("rope_theta = inf must be positive and finite (as a float)"));
  CHECK_THAT(config_error(tiny_config_with(R"({"rope_theta": 0})")), Catch::Contains("rope_theta = 0 must be positive"));
  CHECK_THAT(config_error(R"({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 4, "use_sliding_window": true})"),
             Catch::Contains("use_sliding_window = true is not supported"));
}

TEST_CASE("JSON input rules: nesting depth, duplicate keys, short quotes, no UB casts", "[config][bad][hostile]") {
  // 10^5 nested lists used to overflow the stack in nlohmann's dump() on the error path (SIGSEGV).
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string e = config_error(tiny_config(", \"bos_token_id\": " + deep));
  CHECK_THAT(e, Catch::StartsWith("cfg.json: malformed JSON in config (nested deeper than 64 levels)"));
  CHECK(e.size() < 200);
  // 63 levels are fine (the error is about the value, quoted by its size only)
  const std::string ok_deep = std::string(62, '[') + std::string(62, ']');
  CHECK(config_error(tiny_config(", \"bos_token_id\": " + ok_deep)) == "cfg.json: bos_token_id must be an integer, got array a list of 1 elements");
  // a key twice: which one counts would be a guess
  CHECK(config_error(tiny_config(", \"num_hidden_layers\": 1")) ==
        "cfg.json: malformed JSON in config (key \"num_hidden_layers\" appears twice in one object)");
  // the same key in two different objects is fine
  CHECK(config_error(tiny_config(", \"rope_scaling\": {\"rope_type\": \"default\", \"factor\": 1.0}, \"factor\": 2")).empty());
  // a float far outside int64 is an error, not undefined behaviour (UBSan would flag the cast)
  CHECK_THAT(config_error(tiny_config(", \"bos_token_id\": 2.6e75")), Catch::Contains("bos_token_id must be an integer"));
  CHECK(config_error(tiny_config(", \"bos_token_id\": 3.0")).empty());
  // a long string value is quoted in at most 48 characters
  const std::string huge = "\"" + std::string(100000, 'x') + "\"";
  const std::string e2 = config_error(tiny_config(", \"bos_token_id\": " + huge));
  CHECK_THAT(e2, Catch::Contains("bos_token_id must be an integer, got string \"xxxx"));
  CHECK(e2.size() < 120);
}

TEST_CASE("The recurformer object round trips and is validated", "[config][recurformer]") {
  const std::string rf_text = R"(, "recurformer": {"version": 1, "d_state": 4, "dt_rank": 2, "conv_kernel": 3,
      "recency_window": 12, "streaming": {"sink": 2, "window": 16},
      "layers": [{"recurrent": [0], "streaming": []}, {"recurrent": [], "streaming": [0]}],
      "recency_scores": [[0.91], [0.42]]})";
  const ModelConfig c = parse_model_config(tiny_config(rf_text));
  REQUIRE(c.recurformer);
  const RecurFormerConfig& rf = *c.recurformer;
  CHECK(rf.recurrent.d_state == 4);
  CHECK(rf.recurrent.dt_rank == 2);
  CHECK(rf.recurrent.conv_kernel == 3);
  CHECK(rf.recency_window == 12);
  CHECK(rf.streaming.sink == 2);
  CHECK(rf.streaming.window == 16);
  CHECK(rf.layout.layers[0].groups == std::vector<HeadKind>{HeadKind::recurrent});
  CHECK(rf.layout.layers[1].groups == std::vector<HeadKind>{HeadKind::streaming});
  CHECK(rf.recency_scores == std::vector<std::vector<float>>{{0.91f}, {0.42f}});

  // serialize -> parse -> equal, keeping every other key of the original config
  const std::string written = config_json_with_recurformer(tiny_config(", \"custom_key\": [1, 2]"), rf);
  CHECK_THAT(written, Catch::Contains("\"custom_key\""));
  CHECK_THAT(written, Catch::Contains("0.91") && !Catch::Contains("0.9100000"));  // floats written short
  const ModelConfig back = parse_model_config(written);
  REQUIRE(back.recurformer);
  CHECK(*back.recurformer == rf);
  // The object's keys in the order of spec section 7.
  const std::string obj = recurformer_to_json(rf).dump();
  CHECK(obj.find("\"version\"") < obj.find("\"d_state\""));
  CHECK(obj.find("\"d_state\"") < obj.find("\"dt_rank\""));
  CHECK(obj.find("\"conv_kernel\"") < obj.find("\"recency_window\""));
  CHECK(obj.find("\"streaming\":{\"sink\":2,\"window\":16}") < obj.find("\"layers\""));
  CHECK(obj.find("\"layers\":[{\"recurrent\":[0],\"streaming\":[]},{\"recurrent\":[],\"streaming\":[0]}]") !=
        std::string::npos);
  // Removing the object gives a plain model back.
  CHECK(!parse_model_config(config_json_with_recurformer(written, std::nullopt)).recurformer);
  // A whole config written from a ModelConfig parses back to the same numbers.
  const ModelConfig l = parse_model_config(std::string(kLlama32_1B));
  const ModelConfig l2 = parse_model_config(model_config_to_json(l));
  CHECK(l2.d_model == l.d_model);
  CHECK(l2.n_kv == l.n_kv);
  CHECK(l2.rope_scaling.type == RopeScaling::Type::llama3);
  CHECK(l2.rope_scaling.factor == l.rope_scaling.factor);
  CHECK(l2.rms_eps == l.rms_eps);
  CHECK(l2.eos_token_ids == l.eos_token_ids);
  CHECK(l2.tie_word_embeddings);

  auto rf_error = [](const std::string& obj) { return config_error(tiny_config(", \"recurformer\": " + obj)); };
  const std::string head = R"({"version": 1, "d_state": 4, "dt_rank": 2, "conv_kernel": 4, )";
  CHECK(rf_error(head + R"("layers": [{}, {}]})").empty());
  CHECK_THAT(rf_error("[]"), Catch::Contains("recurformer must be an object"));
  CHECK_THAT(rf_error(R"({"version": 2, "d_state": 4, "dt_rank": 2, "conv_kernel": 4, "layers": [{}, {}]})"),
             Catch::Contains("recurformer.version = 2, only version 1 is supported"));
  CHECK_THAT(rf_error(R"({"version": 1, "dt_rank": 2, "conv_kernel": 4, "layers": [{}, {}]})"),
             Catch::Contains("missing recurformer.d_state"));
  CHECK_THAT(rf_error(R"({"version": 1, "d_state": 8, "dt_rank": 2, "conv_kernel": 4, "layers": [{}, {}]})"),
             Catch::Contains("recurformer.d_state = 8, expected head_dim = 4"));
  CHECK_THAT(rf_error(R"({"version": 1, "d_state": 4, "dt_rank": 2, "conv_kernel": 9, "layers": [{}, {}]})"),
             Catch::Contains("recurformer.conv_kernel = 9 is out of range [2, 8]"));
  CHECK_THAT(rf_error(head + R"("layers": [{}]})"), Catch::Contains("recurformer.layers has 1 entries, expected one per layer (2)"));
  CHECK_THAT(rf_error(head + R"("layers": [{"recurrent": [1]}, {}]})"),
             Catch::Contains("recurformer.layers[0].recurrent[0] = 1 is out of range [0, 0]"));
  CHECK_THAT(rf_error(head + R"("layers": [{"recurrent": [0], "streaming": [0]}, {}]})"),
             Catch::Contains("recurformer.layers[0]: KV group 0 is both recurrent and streaming"));
  CHECK_THAT(rf_error(head + R"("layers": [{"recurrent": [0, 0]}, {}]})"), Catch::Contains("KV group 0 is listed twice"));
  CHECK_THAT(rf_error(head + R"("layers": [{"recurrent": 0}, {}]})"), Catch::Contains("must be a list of KV-group indices"));
  CHECK_THAT(rf_error(head + R"("layers": [[], {}]})"), Catch::Contains("recurformer.layers[0] must be an object"));
  CHECK_THAT(rf_error(head + R"("layers": [{}, {}], "recency_scores": [[0.5]]})"),
             Catch::Contains("recurformer.recency_scores has 1 rows, expected 2"));
  CHECK_THAT(rf_error(head + R"("layers": [{}, {}], "recency_scores": [[0.5, 1], [0.5]]})"),
             Catch::Contains("recurformer.recency_scores[0] has 2 values, expected n_kv = 1"));
  CHECK_THAT(rf_error(head + R"("layers": [{}, {}], "streaming": {"sink": -1}})"),
             Catch::Contains("recurformer.streaming.sink = -1 is out of range"));
}

namespace {

// The tensors of the tiny llama (bf16), in HF naming.
struct TinyWeights {
  std::vector<std::pair<TensorRef, std::vector<bfloat16>>> t;
  TinyWeights() {
    auto add = [&](const std::string& name, std::vector<int64_t> shape) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      t.push_back({TensorRef{name, DType::bf16, shape, nullptr}, rftest::random_vector<bfloat16>(size_t(n))});
    };
    add("model.embed_tokens.weight", {10, 8});
    for (int l = 0; l < 2; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      add(p + "self_attn.q_proj.weight", {8, 8});
      add(p + "self_attn.k_proj.weight", {4, 8});
      add(p + "self_attn.v_proj.weight", {4, 8});
      add(p + "self_attn.o_proj.weight", {8, 8});
      add(p + "mlp.gate_proj.weight", {12, 8});
      add(p + "mlp.up_proj.weight", {12, 8});
      add(p + "mlp.down_proj.weight", {8, 12});
      add(p + "input_layernorm.weight", {8});
      add(p + "post_attention_layernorm.weight", {8});
    }
    add("model.norm.weight", {8});
    add("lm_head.weight", {10, 8});
    for (auto& e : t) e.first.data = e.second.data();
  }
  std::vector<TensorRef> refs(size_t begin, size_t end) const {
    std::vector<TensorRef> r;
    for (size_t i = begin; i < end; ++i) r.push_back(t[i].first);
    return r;
  }
};

void check_same(const Checkpoint& c, const TinyWeights& w) {
  REQUIRE(c.tensor_names().size() == w.t.size());
  for (const auto& e : w.t) {
    const TensorRef& t = c.tensor(e.first.name, e.first.shape, DType::bf16);
    CHECK(std::memcmp(t.data, e.second.data(), t.nbytes()) == 0);
  }
}

}  // namespace

TEST_CASE("Checkpoint opens a HF directory, single file or sharded", "[checkpoint]") {
  TempDir dir;
  const TinyWeights w;
  write_text(dir.file("config.json"), tiny_config(R"(, "bos_token_id": 1, "eos_token_id": 2)"));
  write_text(dir.file("tokenizer.json"), "{}");

  SECTION("single model.safetensors") {
    write_safetensors(dir.file("model.safetensors"), w.refs(0, w.t.size()), {{"format", "pt"}});
    Checkpoint c = Checkpoint::open(dir.path);
    CHECK(c.format() == Checkpoint::Format::safetensors);
    CHECK(c.config().n_layers == 2);
    CHECK(c.config().rope_layout == RopeLayout::rotate_half);
    CHECK(c.config_json_text() == tiny_config(R"(, "bos_token_id": 1, "eos_token_id": 2)"));
    check_same(c, w);
    CHECK(c.has("lm_head.weight"));
    CHECK(!c.has("nope"));
    CHECK(c.rope_inv_freq() == rope_inv_freq(4, 10000.f));
    CHECK(c.tokenizer_json() == dir.path / "tokenizer.json");
    CHECK(c.tokenizer_config_json().empty());
    CHECK(c.gguf_tokenizer() == nullptr);
    const std::string st = dir.file("model.safetensors");
    REQUIRE_THROWS_WITH(c.tensor("model.layers.9.mlp.up_proj.weight"), st + ": missing tensor model.layers.9.mlp.up_proj.weight");
    REQUIRE_THROWS_WITH(c.tensor("model.norm.weight", {9}), st + ": tensor model.norm.weight has shape [8], expected [9]");
    REQUIRE_THROWS_WITH(c.tensor("model.norm.weight", {8}, DType::f32),
                        st + ": tensor model.norm.weight has dtype bf16, expected f32");
    const View<const bfloat16, 2> v = c.tensor("lm_head.weight").view<bfloat16, 2>();
    CHECK(v.shape[0] == 10);
    CHECK(v.stride[0] == 8);
    REQUIRE_THROWS_WITH((c.tensor("lm_head.weight").view<float, 2>()), Catch::Contains("dtype is bf16, requested f32"));
    // Moving the checkpoint keeps the tensors valid.
    const Checkpoint moved = std::move(c);
    check_same(moved, w);
  }
  SECTION("sharded, through model.safetensors.index.json") {
    const size_t half_n = w.t.size() / 2;
    write_safetensors(dir.file("model-00001-of-00002.safetensors"), w.refs(0, half_n));
    write_safetensors(dir.file("model-00002-of-00002.safetensors"), w.refs(half_n, w.t.size()));
    nlohmann::json index;
    index["metadata"] = {{"total_size", 0}};
    for (size_t i = 0; i < w.t.size(); ++i)
      index["weight_map"][w.t[i].first.name] = i < half_n ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    write_text(dir.file("model.safetensors.index.json"), index.dump());
    const Checkpoint c = Checkpoint::open(dir.path);
    check_same(c, w);
    REQUIRE_THROWS_WITH(c.tensor("x"), dir.file("model.safetensors.index.json") + ": missing tensor x");

    index["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors";
    write_text(dir.file("model.safetensors.index.json"), index.dump());
    REQUIRE_THROWS_WITH(Checkpoint::open(dir.path),
                        dir.file("model-00001-of-00002.safetensors") + ": missing tensor extra.weight (listed in " +
                            dir.file("model.safetensors.index.json") + ")");
    index["weight_map"]["extra.weight"] = "model-00003-of-00002.safetensors";
    write_text(dir.file("model.safetensors.index.json"), index.dump());
    REQUIRE_THROWS_WITH(Checkpoint::open(dir.path),
                        Catch::StartsWith(dir.file("model-00003-of-00002.safetensors") + ": cannot open"));
    index["weight_map"]["extra.weight"] = "../model-00001-of-00002.safetensors";
    write_text(dir.file("model.safetensors.index.json"), index.dump());
    REQUIRE_THROWS_WITH(Checkpoint::open(dir.path), Catch::Contains("is not a file name in the model directory"));
    write_text(dir.file("model.safetensors.index.json"), R"({"weight_map": [1]})");
    REQUIRE_THROWS_WITH(Checkpoint::open(dir.path), Catch::Contains("weight_map must be an object"));
    write_text(dir.file("model.safetensors.index.json"), R"({"weight_map": )");
    REQUIRE_THROWS_WITH(Checkpoint::open(dir.path),
                        Catch::StartsWith(dir.file("model.safetensors.index.json") + ": malformed JSON in index"));
  }
}

TEST_CASE("a config whose sizes the tensors do not carry fails before allocating", "[checkpoint][bad][hostile]") {
  TempDir dir;
  const TinyWeights w;
  write_safetensors(dir.file("model.safetensors"), w.refs(0, w.t.size()), {{"format", "pt"}});
  auto open_error = [&](const std::string& cfg) -> std::string {
    write_text(dir.file("config.json"), cfg);
    try {
      Checkpoint::open(dir.path);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  auto with = [](std::string cfg, const std::string& from, const std::string& to) {
    cfg.replace(cfg.find(from), from.size(), to);
    return cfg;
  };
  REQUIRE(open_error(tiny_config()).empty());
  // 10^9 layers: used to allocate the head layout (24 GB) before any tensor was looked at
  CHECK(open_error(with(tiny_config(), "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000")) ==
        dir.file("config.json") + ": the config says 1000000000 layers but " + dir.file("model.safetensors") +
            " has no tensor model.layers.999999999.self_attn.q_proj.weight");
  CHECK_THAT(open_error(with(tiny_config(), "\"num_key_value_heads\": 1", "\"num_key_value_heads\": 2")),
             Catch::Contains("the config says num_key_value_heads * head_dim = 8 but"));
  CHECK_THAT(open_error(with(tiny_config(), "\"vocab_size\": 10", "\"vocab_size\": 2000000000")),
             Catch::Contains("the config says vocab_size = 2000000000 but"));
}

TEST_CASE("Checkpoint::open errors name the path", "[checkpoint][bad]") {
  TempDir dir;
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path / "none"), dir.file("none") + ": no such file or directory");
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path), dir.path.string() + ": no config.json (not a Hugging Face model directory)");
  write_text(dir.file("model.bin"), "x");
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path / "model.bin"), Catch::Contains("not a checkpoint"));
  write_text(dir.file("config.json"), tiny_config());
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path), dir.path.string() + ": no model.safetensors or model.safetensors.index.json");
  write_text(dir.file("config.json"), R"({"model_type": "falcon"})");
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path), Catch::StartsWith(dir.file("config.json") + ": unknown architecture"));
  write_text(dir.file("model.safetensors"), "12345678");
  write_text(dir.file("config.json"), tiny_config());
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path), Catch::StartsWith(dir.file("model.safetensors") + ": header length"));
}

namespace {

// A one-layer GGUF model in llama.cpp naming: d 32, 4 query heads, 2 KV heads of 8, ffn 64, vocab 16.
struct TinyGguf {
  std::vector<half> embd = rftest::random_vector<half>(16 * 32);
  std::vector<float> q_f32 = rftest::random_vector<float>(32 * 32);
  std::vector<uint8_t> q_q8 = std::vector<uint8_t>(32 * kQ8_0BlockBytes);
  std::vector<bfloat16> k = rftest::random_vector<bfloat16>(16 * 32);
  std::vector<float> qbias = rftest::random_vector<float>(32);
  std::vector<float> norm = rftest::random_vector<float>(32);
  std::vector<float> down = rftest::random_vector<float>(64 * 32);
  std::vector<float> freqs = rftest::random_vector<float>(4, 1.0, 8.0);
  GgufWriter w;
  // blocks_only: the Q8_0 attn_q alone (the one tensor a checkpoint needs), for alignment tests
  TinyGguf(const std::string& arch, bool with_output, bool blocks_only = false) {
    quantize_q8_0(q_f32.data(), 32 * 32, q_q8.data());
    w.set("general.architecture", GgufValue::str(arch));
    w.set("general.alignment", GgufValue::u32(64));
    const std::string p = arch + ".";
    w.set(p + "context_length", GgufValue::u32(4096));
    w.set(p + "embedding_length", GgufValue::u32(32));
    w.set(p + "block_count", GgufValue::u32(1));
    w.set(p + "feed_forward_length", GgufValue::u32(64));
    w.set(p + "attention.head_count", GgufValue::u32(4));
    w.set(p + "attention.head_count_kv", GgufValue::u32(2));
    w.set(p + "attention.layer_norm_rms_epsilon", GgufValue::f32(1e-5f));
    w.set(p + "rope.freq_base", GgufValue::f32(500000.f));
    w.set("tokenizer.ggml.model", GgufValue::str("gpt2"));
    std::vector<std::string> toks;
    for (int i = 0; i < 16; ++i) toks.push_back("t" + std::to_string(i));
    w.set("tokenizer.ggml.tokens", GgufValue::str_array(toks));
    w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(1));
    w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(2));
    w.add_tensor("blk.0.attn_q.weight", GgmlType::q8_0, {32, 32}, q_q8.data());
    if (blocks_only) return;
    w.add_tensor("token_embd.weight", GgmlType::f16, {32, 16}, embd.data());
    w.add_tensor("blk.0.attn_k.weight", GgmlType::bf16, {32, 16}, k.data());
    if (arch == "qwen2") w.add_tensor("blk.0.attn_q.bias", GgmlType::f32, {32}, qbias.data());
    w.add_tensor("blk.0.attn_norm.weight", GgmlType::f32, {32}, norm.data());
    w.add_tensor("blk.0.ffn_down.weight", GgmlType::f32, {64, 32}, down.data());
    w.add_tensor("output_norm.weight", GgmlType::f32, {32}, norm.data());
    if (with_output) w.add_tensor("output.weight", GgmlType::f16, {32, 16}, embd.data());
    w.add_tensor("rope_freqs.weight", GgmlType::f32, {4}, freqs.data());
  }
};

}  // namespace

TEST_CASE("Checkpoint opens GGUF with HF names, row-major shapes and Q8_0 dequantised", "[checkpoint][gguf]") {
  TempDir dir;
  const std::string path = dir.file("m.gguf");
  {
    TinyGguf g("llama", false);
    g.w.write(path);
    const Checkpoint c = Checkpoint::open(path);
    CHECK(c.format() == Checkpoint::Format::gguf);
    const ModelConfig& cfg = c.config();
    CHECK(cfg.architecture == "llama");
    CHECK(cfg.d_model == 32);
    CHECK(cfg.n_layers == 1);
    CHECK(cfg.n_q == 4);
    CHECK(cfg.n_kv == 2);
    CHECK(cfg.head_dim == 8);
    CHECK(cfg.ffn == 64);
    CHECK(cfg.vocab_size == 16);
    CHECK(cfg.rms_eps == 1e-5f);
    CHECK(cfg.rope_theta == 500000.f);
    CHECK(cfg.max_position_embeddings == 4096);
    CHECK(cfg.rope_layout == RopeLayout::interleaved);  // llama.cpp permuted the q/k rows
    CHECK(cfg.tie_word_embeddings);                      // no output.weight
    CHECK(!cfg.attention_bias);
    CHECK(cfg.bos_token_id == 1);
    CHECK(cfg.eos_token_ids == std::vector<int>{2});
    REQUIRE(c.gguf_tokenizer());
    CHECK(c.gguf_tokenizer()->tokens.size() == 16);
    CHECK(c.gguf_tokenizer()->bos == 1);
    REQUIRE(c.gguf());
    CHECK(c.gguf()->get_string("general.architecture") == "llama");

    const TensorRef& e = c.tensor("model.embed_tokens.weight", {16, 32}, DType::f16);
    CHECK(std::memcmp(e.data, g.embd.data(), e.nbytes()) == 0);
    const TensorRef& q = c.tensor("model.layers.0.self_attn.q_proj.weight", {32, 32}, DType::f32);
    std::vector<float> ref(32 * 32);
    dequantize_q8_0(g.q_q8.data(), 32 * 32, ref.data());
    CHECK(std::memcmp(q.data, ref.data(), ref.size() * 4) == 0);
    for (size_t i = 0; i < ref.size(); ++i) CHECK(std::fabs(ref[i] - g.q_f32[i]) <= 1.0f / 127 * 0.51f + 1e-3f);
    const TensorRef& k = c.tensor("model.layers.0.self_attn.k_proj.weight", {16, 32}, DType::bf16);
    CHECK(std::memcmp(k.data, g.k.data(), k.nbytes()) == 0);
    const TensorRef& d = c.tensor("model.layers.0.mlp.down_proj.weight", {32, 64}, DType::f32);
    CHECK(std::memcmp(d.data, g.down.data(), d.nbytes()) == 0);
    CHECK(c.has("model.layers.0.input_layernorm.weight"));
    CHECK(c.has("model.norm.weight"));
    CHECK(c.has("rope_freqs.weight"));  // llama3 scaling factors keep their GGUF name
    CHECK(!c.has("lm_head.weight"));
    REQUIRE_THROWS_WITH(c.tensor("lm_head.weight"), path + ": missing tensor lm_head.weight");
    // rope_freqs.weight divides the base frequencies (llama.cpp's form of Llama-3 scaling).
    const std::vector<float> inv = c.rope_inv_freq(), base = rope_inv_freq(8, 500000.f);
    REQUIRE(inv.size() == 4);
    for (size_t i = 0; i < 4; ++i) CHECK(inv[i] == base[i] / g.freqs[i]);
  }
  {
    TinyGguf g("qwen2", true);
    g.w.write(path);
    const Checkpoint c = Checkpoint::open(path);
    CHECK(c.config().architecture == "qwen2");
    CHECK(c.config().rope_layout == RopeLayout::rotate_half);  // llama.cpp does not permute qwen2
    CHECK(c.config().attention_bias);
    CHECK(!c.config().tie_word_embeddings);
    CHECK(c.tensor("lm_head.weight").shape == std::vector<int64_t>{16, 32});
    const TensorRef& b = c.tensor("model.layers.0.self_attn.q_proj.bias", {32});
    CHECK(std::memcmp(b.data, g.qbias.data(), 128) == 0);
  }
  {
    TinyGguf g("gpt2", true);
    g.w.write(path);
    REQUIRE_THROWS_WITH(Checkpoint::open(path), path + ": unknown architecture \"gpt2\" (supported: llama, qwen2)");
  }
  {
    TinyGguf g("llama", true);
    g.w.set("llama.attention.head_count_kv", GgufValue::u32(3));
    g.w.write(path);
    REQUIRE_THROWS_WITH(Checkpoint::open(path), Catch::Contains("num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"));
    g.w.set("llama.attention.head_count_kv", GgufValue::u32(2));
    g.w.set("llama.rope.dimension_count", GgufValue::u32(4));
    g.w.write(path);
    REQUIRE_THROWS_WITH(Checkpoint::open(path), Catch::Contains("llama.rope.dimension_count = 4: partial rotary"));
    g.w.set("llama.rope.dimension_count", GgufValue::u32(8));
    g.w.set("llama.attention.head_count_kv", GgufValue::str("2"));
    g.w.write(path);
    REQUIRE_THROWS_WITH(Checkpoint::open(path), path + ": metadata llama.attention.head_count_kv must be an integer");
  }
}

TEST_CASE("GGUF blocks are offered where 2-byte aligned; elsewhere the fp32 decoding serves", "[checkpoint][gguf]") {
  // general.alignment may be 1, so a block tensor can start at an odd address; its blocks (read
  // as structs with fp16 fields) are then not offered, and the tensor still opens, decoded.
  TempDir dir;
  const std::string path = dir.file("m.gguf");
  for (const bool odd : {false, true}) {
    INFO((odd ? "odd" : "even") << " address");
    TinyGguf g("llama", false, true);
    g.w.set("general.alignment", GgufValue::u32(1));
    bool placed = false;
    for (int pad = 0; pad < 2 && !placed; ++pad) {  // a metadata string one byte longer flips the parity
      g.w.set("test.padding", GgufValue::str(std::string(size_t(pad), 'x')));
      g.w.write(path);
      const GgufFile f = GgufFile::open(path);
      placed = (reinterpret_cast<uintptr_t>(f.find_tensor("blk.0.attn_q.weight")->data) % 2 == 1) == odd;
    }
    REQUIRE(placed);
    const Checkpoint c = Checkpoint::open(path);
    const TensorRef& q = c.tensor("model.layers.0.self_attn.q_proj.weight", {32, 32}, DType::f32);
    std::vector<float> ref(32 * 32);
    dequantize_q8_0(g.q_q8.data(), 32 * 32, ref.data());
    CHECK(std::memcmp(q.data, ref.data(), ref.size() * 4) == 0);
    if (odd) {
      CHECK(q.blocks == nullptr);
    } else {
      REQUIRE(q.blocks != nullptr);
      CHECK(q.quant == GgmlType::q8_0);
      CHECK(std::memcmp(q.blocks, g.q_q8.data(), g.q_q8.size()) == 0);
    }
  }
}

TEST_CASE("a GGUF whose block_count lies fails before allocating", "[checkpoint][gguf][bad][hostile]") {
  TempDir dir;
  TinyGguf g("llama", false);
  g.w.set("llama.block_count", GgufValue::u32(1000000000));
  g.w.write(dir.file("m.gguf"));
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.file("m.gguf")),
                      dir.file("m.gguf") + " (metadata): the config says 1000000000 layers but " + dir.file("m.gguf") +
                          " has no tensor model.layers.999999999.self_attn.q_proj.weight");
}

TEST_CASE("GGUF tensor names map to HF names", "[checkpoint][gguf]") {
  CHECK(detail::hf_name_from_gguf("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight");
  CHECK(detail::hf_name_from_gguf("blk.0.attn_v.bias") == "model.layers.0.self_attn.v_proj.bias");
  CHECK(detail::hf_name_from_gguf("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight");
  CHECK(detail::hf_name_from_gguf("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight");
  CHECK(detail::hf_name_from_gguf("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight");
  CHECK(detail::hf_name_from_gguf("output.weight") == "lm_head.weight");
  CHECK(detail::hf_name_from_gguf("blk.x.attn_q.weight") == "blk.x.attn_q.weight");
  CHECK(detail::hf_name_from_gguf("blk.1.unknown.weight") == "blk.1.unknown.weight");
  CHECK(detail::hf_name_from_gguf("blk.1") == "blk.1");
}
