// src/model/chat_template.cpp: ChatTemplate (the ChatML, Llama 2 and Llama 3 chat formats rendered in C++)
// and the lookup of a model's chat template.
#include "recurformer/model/chat_template.hpp"

#include <filesystem>
#include <initializer_list>

namespace recurformer {

namespace detail {

/// Python's str.strip() (Jinja's trim): strips whitespace as str.isspace() defines it.
std::string py_strip(std::string_view s) {
  // UTF-8 encodings of the non-ASCII whitespace: U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028,
  // U+2029, U+202F, U+205F, U+3000.
  static const char* const wide[] = {"\xC2\x85", "\xC2\xA0", "\xE1\x9A\x80", "\xE2\x80\x80", "\xE2\x80\x81",
                                     "\xE2\x80\x82", "\xE2\x80\x83", "\xE2\x80\x84", "\xE2\x80\x85",
                                     "\xE2\x80\x86", "\xE2\x80\x87", "\xE2\x80\x88", "\xE2\x80\x89",
                                     "\xE2\x80\x8A", "\xE2\x80\xA8", "\xE2\x80\xA9", "\xE2\x80\xAF",
                                     "\xE2\x81\x9F", "\xE3\x80\x80"};
  auto ascii_space = [](char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= '\x1c' && c <= '\x1f'); };
  auto space_at_front = [&](std::string_view t) -> size_t {
    if (!t.empty() && ascii_space(t.front())) return 1;
    for (const char* w : wide)
      if (t.substr(0, std::char_traits<char>::length(w)) == w) return std::char_traits<char>::length(w);
    return 0;
  };
  auto space_at_back = [&](std::string_view t) -> size_t {
    if (!t.empty() && ascii_space(t.back())) return 1;
    for (const char* w : wide) {
      const size_t n = std::char_traits<char>::length(w);
      if (t.size() >= n && t.substr(t.size() - n) == w) return n;
    }
    return 0;
  };
  for (size_t n; (n = space_at_front(s)) != 0;) s.remove_prefix(n);
  for (size_t n; (n = space_at_back(s)) != 0;) s.remove_suffix(n);
  return std::string(s);
}

namespace {

/// The default system message of a ChatML template: the body of a string literal
/// '<|im_start|>system\n BODY <|im_end|>' (either quote; the newline written or as \n), escapes
/// undone. "" when there is none.
std::string chatml_default_system(std::string_view t) {
  const std::string_view open = "<|im_start|>system", close = "<|im_end|>";
  for (size_t at = t.find(open); at != std::string_view::npos; at = t.find(open, at + 1)) {
    if (at == 0 || (t[at - 1] != '\'' && t[at - 1] != '"')) continue;  // not the start of a literal
    const char quote = t[at - 1];
    size_t i = at + open.size();
    if (t.compare(i, 1, "\n") == 0) i += 1;
    else if (t.compare(i, 2, "\\n") == 0) i += 2;
    else continue;
    std::string body;
    bool ok = false;
    while (i < t.size()) {
      if (t.compare(i, close.size(), close) == 0) {
        ok = true;
        break;
      }
      if (t[i] == quote) break;  // the literal ends first: the system text is not written in it
      if (t[i] == '\\' && i + 1 < t.size()) {
        const char e = t[i + 1];
        body += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        i += 2;
      } else {
        body += t[i++];
      }
    }
    if (ok && !body.empty()) return body;
  }
  return "";
}

}  // namespace

}  // namespace detail

ChatTemplate ChatTemplate::recognise(std::string_view t, std::string bos, std::string eos,
                                     const std::string& source) {
  auto has = [&](std::string_view marker) { return t.find(marker) != std::string_view::npos; };
  if (has("<|im_start|>"))
    return ChatTemplate(ChatFamily::chatml, std::move(bos), std::move(eos), detail::chatml_default_system(t));
  if (has("<|start_header_id|>") && has("<|eot_id|>")) {
    RF_CHECK(!has("Cutting Knowledge Date"), source,
             ": a Llama 3.1-style chat template (dated system header, tool calls) is not supported; "
             "name the family instead (chatml, llama2 or llama3, e.g. the runner's --chat-template llama3 for "
             "the Llama 3.0 format)");
    return ChatTemplate(ChatFamily::llama3, std::move(bos), std::move(eos), "");
  }
  if (has("[INST]") && has("<<SYS>>")) return ChatTemplate(ChatFamily::llama2, std::move(bos), std::move(eos), "");
  fail(source, ": unrecognised chat template (no ChatML <|im_start|>, Llama 3 <|start_header_id|> + <|eot_id|>",
       " or Llama 2 [INST] + <<SYS>> markers); name the family instead (chatml, llama2 or llama3, e.g. the ",
       "runner's --chat-template NAME)");
}

ChatTemplate ChatTemplate::named(const std::string& name, std::string bos, std::string eos) {
  for (ChatFamily f : {ChatFamily::chatml, ChatFamily::llama2, ChatFamily::llama3}) {
    ChatTemplate t(f, bos, eos, "");
    if (name == t.name()) return t;
  }
  fail("chat template \"", name, "\" is not one of chatml, llama2, llama3");
}

const char* ChatTemplate::name() const {
  return family_ == ChatFamily::chatml ? "chatml" : family_ == ChatFamily::llama2 ? "llama2" : "llama3";
}

std::string ChatTemplate::end_of_turn() const {
  return family_ == ChatFamily::chatml ? "<|im_end|>" : family_ == ChatFamily::llama3 ? "<|eot_id|>" : eos_;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  RF_CHECK(!messages.empty(), "chat template: no messages to render");
  std::string out;
  switch (family_) {
    case ChatFamily::chatml:
      if (messages[0].role != "system" && !default_system_.empty())
        out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
      for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    case ChatFamily::llama3:
      out += bos_;
      for (const ChatMessage& m : messages)
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + detail::py_strip(m.content) + "<|eot_id|>";
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatFamily::llama2: {
      // Meta's template: a leading system message is folded into the first user turn; then the
      // turns must go user, assistant, user, ... (its raise_exception); other roles at odd places
      // render nothing.
      const bool has_system = messages[0].role == "system";
      for (size_t i = has_system ? 1 : 0, k = 0; i < messages.size(); ++i, ++k) {
        const ChatMessage& m = messages[i];
        RF_CHECK((m.role == "user") == (k % 2 == 0),
                 "chat template llama2: conversation roles must alternate user/assistant/user/assistant/... (message ",
                 i, " is \"", m.role, "\")");
        std::string content = m.content;
        if (k == 0 && has_system) content = "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + content;
        if (m.role == "user") out += bos_ + "[INST] " + detail::py_strip(content) + " [/INST]";
        else if (m.role == "assistant") out += " " + detail::py_strip(content) + " " + eos_;
      }
      break;
    }
  }
  return out;
}

std::string ChatTemplate::continuation(const std::vector<ChatMessage>& history, const ChatMessage& user) const {
  RF_CHECK(!history.empty() && history.back().role == "assistant",
           "chat template: continuation needs a history that ends with the assistant's reply");
  // Render with a marker in place of the reply: what follows the marker follows the reply. The
  // marker has no whitespace at its ends, so stripping templates leave it whole.
  const std::string marker = "\x01recurformer-reply\x01";
  std::vector<ChatMessage> msgs = history;
  msgs.back().content = marker;
  msgs.push_back(user);
  const std::string text = render(msgs, true);
  const size_t at = text.rfind(marker);
  RF_CHECK(at != std::string::npos, "chat template ", name(), ": the reply does not appear in the rendering");
  return text.substr(at + marker.size());
}

std::string chat_template_text(const Checkpoint& ck) {
  if (const GgufFile* g = ck.gguf()) {
    const GgufValue* v = g->find("tokenizer.chat_template");
    return v && v->type == GgufValueType::string ? v->s : std::string();
  }
  const std::filesystem::path jinja = ck.path() / "chat_template.jinja";
  if (std::filesystem::is_regular_file(jinja)) return detail::read_text_file(jinja.string());
  if (ck.tokenizer_config_json().empty()) return "";
  const std::string source = ck.tokenizer_config_json().string();
  const std::string text = detail::read_text_file(source);
  const detail::json cfg = detail::parse_json(text.data(), text.data() + text.size(), source, "tokenizer config");
  if (!cfg.is_object() || !cfg.contains("chat_template") || cfg["chat_template"].is_null()) return "";
  const detail::json& t = cfg["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  RF_CHECK(t.is_array(), source, ": chat_template is neither a string nor a list of {name, template}");
  for (const detail::json& e : t)
    if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
      return e["template"].get<std::string>();
  fail(source, ": chat_template is a list with no entry named \"default\"");
}

ChatTemplate chat_template_for(const Checkpoint& ck, const Tokenizer& tok, const std::string& override_name) {
  std::string bos = tok.bos_id() >= 0 ? tok.token(tok.bos_id()) : "";
  std::string eos = tok.eos_id() >= 0 ? tok.token(tok.eos_id()) : "";
  if (!override_name.empty()) return ChatTemplate::named(override_name, std::move(bos), std::move(eos));
  const std::string text = chat_template_text(ck);
  RF_CHECK(!text.empty(), ck.path().string(),
           ": the model has no chat template (GGUF tokenizer.chat_template, tokenizer_config.json chat_template or "
           "chat_template.jinja); name the family instead (chatml, llama2 or llama3, e.g. the runner's "
           "--chat-template NAME)");
  return ChatTemplate::recognise(text, std::move(bos), std::move(eos), ck.path().string() + ": chat template");
}

}  // namespace recurformer
