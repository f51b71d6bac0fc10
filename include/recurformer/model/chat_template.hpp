// recurformer/model/chat_template.hpp: the chat formats of the instruct models this library loads,
// rendered byte for byte as Hugging Face's apply_chat_template(messages, add_generation_prompt=True).
//
// A model ships its format as a Jinja template (GGUF tokenizer.chat_template; tokenizer_config.json
// "chat_template", a string or a list of {name, template} whose "default" is used; or
// chat_template.jinja). Rather than interpret Jinja, ChatTemplate::recognise() tells the family
// from markers in the template text and renders it in C++:
//
//  * ChatML (SmolLM2, Qwen2): `<|im_start|>`. A default system message written in the template
//    (`'<|im_start|>system\n...<|im_end|>\n'` as one string literal, used when the conversation
//    does not start with a system message) is read from the template itself.
//  * Llama 2 chat: `[INST]` with `<<SYS>>`. The system message goes into the first user turn;
//    roles must alternate user / assistant; contents are stripped; no generation prompt.
//  * Llama 3 (3.0) instruct: `<|start_header_id|>` with `<|eot_id|>`. Contents are trimmed. The
//    Llama 3.1+ template (a dated system header, tool calls) is refused.
//
// Anything else is an Error that names the problem; ChatTemplate::named() picks a family by name
// instead. The rendered text holds the special tokens as text (`<|im_start|>`, and the BOS of the
// Llama templates): encode it with add_special = false, as apply_chat_template(tokenize=True) does,
// so that no second BOS is added; the tokenizer maps special-token text to its ids.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "recurformer/core/error.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/tokenizer.hpp"

namespace recurformer {

/// One turn of a conversation: role "system", "user" or "assistant", and its text.
struct ChatMessage {
  std::string role;
  std::string content;
};

enum class ChatFamily { chatml, llama2, llama3 };

class ChatTemplate {
 public:
  /// The family of a Jinja chat template, told by its markers. `bos` / `eos` are the template's
  /// bos_token / eos_token (the tokenizer's texts). Throws Error, naming `source`, when the
  /// template is none of the families above.
  static ChatTemplate recognise(std::string_view jinja, std::string bos, std::string eos,
                                const std::string& source = "chat template");
  /// A family by name: "chatml" (no default system message), "llama2", "llama3".
  static ChatTemplate named(const std::string& name, std::string bos, std::string eos);

  ChatFamily family() const { return family_; }
  const char* name() const;
  /// The system message ChatML adds when the conversation has none ("" when the template has none).
  const std::string& default_system() const { return default_system_; }
  /// The text that ends a model's turn (`<|im_end|>`, `<|eot_id|>`, the EOS for Llama 2).
  std::string end_of_turn() const;

  /// The conversation as the template renders it; add_generation_prompt: open the assistant's turn
  /// (Llama 2 has no such prompt). Throws Error on an empty conversation or, for Llama 2, roles
  /// that do not alternate.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true) const;

  /// Multi-turn without recomputing: `history` ends with the model's reply, whose tokens a cache
  /// already holds after render(history without the reply). Returns what follows the reply in
  /// render(history + {user}), i.e. the text to append to the cache for the next answer.
  std::string continuation(const std::vector<ChatMessage>& history, const ChatMessage& user) const;

 private:
  ChatTemplate(ChatFamily f, std::string bos, std::string eos, std::string default_system)
      : family_(f), bos_(std::move(bos)), eos_(std::move(eos)), default_system_(std::move(default_system)) {}
  ChatFamily family_;
  std::string bos_, eos_, default_system_;
};

/// The model's chat template text: the GGUF's tokenizer.chat_template, or for a HF directory
/// chat_template.jinja, else tokenizer_config.json's chat_template. "" when it has none.
std::string chat_template_text(const Checkpoint& ck);

/// The model's template (or the family `override_name` when not empty), with the tokenizer's BOS /
/// EOS texts. Throws Error when the model has no template or an unrecognised one.
ChatTemplate chat_template_for(const Checkpoint& ck, const Tokenizer& tok, const std::string& override_name = "");

namespace detail {

/// Python's str.strip() (Jinja's trim): strips whitespace as str.isspace() defines it.
std::string py_strip(std::string_view s);

}  // namespace detail

}  // namespace recurformer
