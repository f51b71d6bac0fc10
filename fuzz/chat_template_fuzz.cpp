// fuzz/chat_template_fuzz.cpp: libFuzzer target for the chat templates (model/chat_template.hpp).
//
// The bytes are NUL-separated fields: a chat template text (as a model file would carry it), then
// messages, each field's first byte choosing the role (system, user, assistant, or the rest of the
// field as a role of its own) and the rest its content. Recognising and rendering must succeed or
// throw recurformer::Error, and a conversation that ends with the assistant's reply must satisfy
// continuation()'s contract: what it returns is exactly the tail of rendering the conversation plus
// the next user turn, or the fuzzer aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "recurformer/model/chat_template.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace recurformer;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> fields;
  for (size_t at = 0;;) {
    const size_t end = in.find('\0', at);
    fields.push_back(in.substr(at, end == std::string_view::npos ? std::string_view::npos : end - at));
    if (end == std::string_view::npos) break;
    at = end + 1;
  }
  std::vector<ChatMessage> messages;
  for (size_t i = 1; i < fields.size() && messages.size() < 64; ++i) {
    const std::string_view f = fields[i];
    static const char* const kRoles[] = {"system", "user", "assistant"};
    const unsigned pick = f.empty() ? 1u : static_cast<unsigned char>(f[0]) % 4u;
    const std::string_view rest = f.empty() ? f : f.substr(1);
    if (pick < 3) messages.push_back({kRoles[pick], std::string(rest)});
    else messages.push_back({std::string(rest.substr(0, rest.size() / 2)), std::string(rest.substr(rest.size() / 2))});
  }
  try {
    (void)ChatTemplate::recognise(fields[0], "<s>", "</s>", "fuzz template");
    (void)ChatTemplate::named(std::string(fields[0]), "<s>", "</s>");
  } catch (const Error&) {
  }
  for (const char* family : {"chatml", "llama2", "llama3"}) {
    const ChatTemplate t = ChatTemplate::named(family, "<s>", "</s>");
    try {
      (void)t.render(messages, true);
      (void)t.render(messages, false);
    } catch (const Error&) {
    }
    if (messages.size() < 2 || messages.back().role != "assistant") continue;
    const ChatMessage user{"user", messages.front().content};
    std::string tail, full;
    try {
      tail = t.continuation(messages, user);
      std::vector<ChatMessage> next = messages;
      next.push_back(user);
      full = t.render(next, true);
    } catch (const Error&) {
      continue;
    }
    if (full.size() < tail.size() || full.compare(full.size() - tail.size(), tail.size(), tail) != 0) std::abort();
  }
  return 0;
}
