// tests/support/chat_model.hpp: turns a random model directory (write_random_model) into a chat
// model: ChatML's <|im_start|> and <|im_end|> join its tokenizer as special added tokens (ids 281
// and 282, inside the model's 288-row vocabulary) and tokenizer_config.json gets a chat template.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "recurformer/model/config.hpp"
#include "recurformer/model/random_model.hpp"

namespace rftest {

constexpr int kImStartId = recurformer::detail::kRandomTokenizerSize;
constexpr int kImEndId = kImStartId + 1;

/// ChatML as SmolLM2 writes it, with a default system message.
inline const char* chatml_template() {
  return "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
}

/// Adds the ChatML tokens to dir's tokenizer and `chat_template` (unless empty) to its config.
inline void make_chat_model(const std::string& dir, const std::string& chat_template) {
  using nlohmann::json;
  namespace d = recurformer::detail;
  json tok = json::parse(d::read_text_file(dir + "/tokenizer.json"));
  int id = kImStartId;
  for (const char* s : {"<|im_start|>", "<|im_end|>"})
    tok["added_tokens"].push_back({{"id", id++}, {"content", s}, {"single_word", false}, {"lstrip", false},
                                   {"rstrip", false}, {"normalized", false}, {"special", true}});
  d::write_text(dir + "/tokenizer.json", tok.dump(1));
  json cfg = json::parse(d::read_text_file(dir + "/tokenizer_config.json"));
  if (!chat_template.empty()) cfg["chat_template"] = chat_template;
  d::write_text(dir + "/tokenizer_config.json", cfg.dump(2));
}

}  // namespace rftest
