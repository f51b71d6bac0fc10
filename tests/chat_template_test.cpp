// The chat formats (include/recurformer/model/chat_template.hpp): every family, with and without a
// system message, one and several turns, rendered byte for byte as transformers renders the real
// templates (tests/data/chat/renderings.json, written by tools/make_chat_fixtures.py; SmolLM2's
// template is the one in its GGUF); the default system message read from the template; special
// tokens in the rendering encode to their ids with no second BOS; multi-turn continuation; the
// template's sources in a model directory; and the errors.
#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "recurformer/model/chat_template.hpp"
#include "recurformer/model/random_model.hpp"
#include "support/chat_model.hpp"
#include "support/temp_dir.hpp"
#include "support/test_util.hpp"

using namespace recurformer;
using nlohmann::json;

namespace {
json fixtures() {
  std::ifstream f(std::string(RECURFORMER_TEST_DATA_DIR) + "/chat/renderings.json");
  REQUIRE(f);
  return json::parse(f);
}
std::vector<ChatMessage> messages_of(const json& conv) {
  std::vector<ChatMessage> m;
  for (const json& x : conv) m.push_back({x.at("role").get<std::string>(), x.at("content").get<std::string>()});
  return m;
}
ChatTemplate template_of(const json& t) {
  return ChatTemplate::recognise(t.at("template").get<std::string>(), t.at("bos_token").get<std::string>(),
                                 t.at("eos_token").get<std::string>(), t.at("name").get<std::string>());
}
const json& fixture_template(const json& fx, const std::string& name) {
  for (const json& t : fx.at("templates"))
    if (t.at("name") == name) return t;
  FAIL("no template " << name << " in the fixture");
  return fx;  // not reached: FAIL throws
}
}  // namespace

TEST_CASE("every family renders as transformers does, byte for byte", "[chat]") {
  const json fx = fixtures();
  REQUIRE(fx.at("cases").size() == 20);
  for (const json& c : fx.at("cases")) {
    const json& t = fixture_template(fx, c.at("template").get<std::string>());
    const std::string conv = c.at("conversation").get<std::string>();
    INFO(t.at("name").get<std::string>() << " / " << conv);
    const ChatTemplate tmpl = template_of(t);
    CHECK(std::string(tmpl.name()) == t.at("family").get<std::string>());
    CHECK(tmpl.render(messages_of(fx.at("conversations").at(conv))) == c.at("rendered").get<std::string>());
  }
}

TEST_CASE("ChatML's default system message is read from the template", "[chat]") {
  const json fx = fixtures();
  CHECK(template_of(fixture_template(fx, "smollm2")).default_system() ==
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  CHECK(template_of(fixture_template(fx, "qwen2")).default_system() == "You are a helpful assistant.");
  CHECK(template_of(fixture_template(fx, "chatml")).default_system().empty());
  // an escaped quote inside the literal, and a system literal that closes before <|im_end|> (the
  // tools branch of Qwen2.5's template), which is no default
  CHECK(ChatTemplate::recognise("{{ '<|im_start|>system\\nIt\\'s me.<|im_end|>\\n' }}", "", "").default_system() ==
        "It's me.");
  CHECK(ChatTemplate::recognise("{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}", "", "")
            .default_system()
            .empty());
  CHECK(ChatTemplate::named("chatml", "", "").default_system().empty());
}

TEST_CASE("the end of a turn, and names", "[chat]") {
  CHECK(ChatTemplate::named("chatml", "<s>", "</s>").end_of_turn() == "<|im_end|>");
  CHECK(ChatTemplate::named("llama3", "<s>", "</s>").end_of_turn() == "<|eot_id|>");
  CHECK(ChatTemplate::named("llama2", "<s>", "</s>").end_of_turn() == "</s>");
  CHECK(ChatTemplate::named("llama2", "<s>", "</s>").family() == ChatFamily::llama2);
  CHECK_THROWS_WITH(ChatTemplate::named("vicuna", "", ""), Catch::Contains("\"vicuna\" is not one of chatml"));
}

TEST_CASE("unknown templates and bad conversations are clear errors", "[chat]") {
  // Zephyr / TinyLlama-chat
  const std::string zephyr = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
                             "eos_token }}{% endfor %}";
  CHECK_THROWS_WITH(ChatTemplate::recognise(zephyr, "<s>", "</s>", "model/tokenizer_config.json"),
                    Catch::Contains("model/tokenizer_config.json: unrecognised chat template") &&
                        Catch::Contains("--chat-template"));
  CHECK_THROWS_WITH(ChatTemplate::recognise("{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge "
                                            "Date: December 2023\\n' }}<|eot_id|>",
                                            "", ""),
                    Catch::Contains("Llama 3.1-style chat template") && Catch::Contains("not supported"));
  const ChatTemplate l2 = ChatTemplate::named("llama2", "<s>", "</s>");
  CHECK_THROWS_WITH(l2.render({{"user", "a"}, {"user", "b"}}), Catch::Contains("roles must alternate"));
  CHECK_THROWS_WITH(l2.render({{"assistant", "a"}}), Catch::Contains("roles must alternate"));
  CHECK_THROWS_WITH(l2.render({}), Catch::Contains("no messages"));
}

TEST_CASE("a continuation appends exactly what the next rendering adds after the reply", "[chat]") {
  for (const char* family : {"chatml", "llama2", "llama3"}) {
    INFO(family);
    const ChatTemplate t = ChatTemplate::named(family, "<s>", "</s>");
    const std::vector<ChatMessage> before = {{"system", "Be brief."}, {"user", "Capital of France?"}};
    // SentencePiece replies start with their space; the others are stripped of nothing
    const std::string reply = t.family() == ChatFamily::llama2 ? " Paris." : "Paris.";
    std::vector<ChatMessage> history = before;
    history.push_back({"assistant", reply});
    const ChatMessage next{"user", "And of Italy?"};
    std::vector<ChatMessage> all = history;
    all.push_back(next);
    const std::string cont = t.continuation(history, next);
    CHECK(t.render(before) + reply + cont == t.render(all));
    CHECK_THAT(cont, Catch::StartsWith(t.end_of_turn()) || Catch::StartsWith(" " + t.end_of_turn()));
  }
  CHECK_THROWS_WITH(ChatTemplate::named("chatml", "", "").continuation({{"user", "x"}}, {"user", "y"}),
                    Catch::Contains("ends with the assistant's reply"));
}

TEST_CASE("special tokens in the rendering encode to their ids, with no second BOS", "[chat]") {
  rftest::TempDir dir("rf_chat_tok_");
  write_random_model(dir / "m", RandomModelSpec{});
  rftest::make_chat_model(dir / "m", "");
  const Tokenizer tok = Tokenizer::from_hf(dir / "m");
  REQUIRE(tok.add_bos());  // the random tokenizer adds BOS to plain text
  const ChatTemplate chatml = ChatTemplate::named("chatml", tok.token(tok.bos_id()), tok.token(tok.eos_id()));
  const std::vector<int32_t> ids = tok.encode(chatml.render({{"user", "hi"}}), false);
  REQUIRE(ids.size() > 4);
  CHECK(ids.front() == rftest::kImStartId);  // no BOS: ChatML has none
  CHECK(std::count(ids.begin(), ids.end(), rftest::kImStartId) == 2);
  CHECK(std::count(ids.begin(), ids.end(), rftest::kImEndId) == 1);
  // Llama 3 writes BOS text itself: exactly one BOS id, first
  const ChatTemplate llama3 = ChatTemplate::named("llama3", tok.token(tok.bos_id()), tok.token(tok.eos_id()));
  const std::vector<int32_t> l3 = tok.encode(llama3.render({{"user", "hi"}}), false);
  CHECK(l3.front() == tok.bos_id());
  CHECK(std::count(l3.begin(), l3.end(), tok.bos_id()) == 1);
}

TEST_CASE("the template's sources in a model directory and a GGUF", "[chat]") {
  rftest::TempDir dir("rf_chat_src_");
  write_random_model(dir / "m", RandomModelSpec{});
  const std::string cfg_path = dir / "m/tokenizer_config.json";
  auto set_template = [&](const json& t) {
    json cfg = json::parse(detail::read_text_file(cfg_path));
    cfg["chat_template"] = t;
    detail::write_text(cfg_path, cfg.dump());
  };
  {
    const Checkpoint ck = Checkpoint::open(dir / "m");
    CHECK(chat_template_text(ck).empty());
    CHECK_THROWS_WITH(chat_template_for(ck, Tokenizer::from_hf(dir / "m")),
                      Catch::Contains("has no chat template") && Catch::Contains("--chat-template"));
    CHECK(chat_template_for(ck, Tokenizer::from_hf(dir / "m"), "llama3").family() == ChatFamily::llama3);
  }
  set_template("<|im_start|>plain string");
  CHECK(chat_template_text(Checkpoint::open(dir / "m")) == "<|im_start|>plain string");
  set_template(json::array({{{"name", "tool_use"}, {"template", "tools"}}, {{"name", "default"}, {"template", "[INST] <<SYS>>"}}}));
  {
    const Checkpoint ck = Checkpoint::open(dir / "m");
    CHECK(chat_template_text(ck) == "[INST] <<SYS>>");
    CHECK(chat_template_for(ck, Tokenizer::from_hf(dir / "m")).family() == ChatFamily::llama2);
  }
  set_template(json::array({{{"name", "tool_use"}, {"template", "tools"}}}));
  CHECK_THROWS_WITH(chat_template_text(Checkpoint::open(dir / "m")), Catch::Contains("no entry named \"default\""));
  // chat_template.jinja wins over tokenizer_config.json
  detail::write_text(dir / "m/chat_template.jinja", "<|start_header_id|><|eot_id|>");
  CHECK(chat_template_for(Checkpoint::open(dir / "m"), Tokenizer::from_hf(dir / "m")).family() == ChatFamily::llama3);
  // a GGUF without tokenizer.chat_template
  CHECK(chat_template_text(Checkpoint::open(std::string(RECURFORMER_TEST_DATA_DIR) + "/models/llama_gqa/model-f32.gguf"))
            .empty());
}

TEST_CASE("Python's strip: ASCII and Unicode whitespace, nothing else", "[chat]") {
  CHECK(detail::py_strip(" \t\n\r\v\f\x1c x y \x1f") == "x y");
  CHECK(detail::py_strip("\xC2\xA0\xE3\x80\x80x\xE2\x80\xA8") == "x");
  CHECK(detail::py_strip("\xC3\xA9") == "\xC3\xA9");  // é stays
  CHECK(detail::py_strip("   ").empty());
}
