// examples/runner_chat.cpp: `recurformer generate --chat` (runner_chat.hpp), a conversation with an
// instruct model.
#include "runner_chat.hpp"

#include <algorithm>

namespace runner {

Chat::Chat(const Loaded& m, ChatTemplate tmpl, std::string system, int64_t ctx, int chunk, const SamplingParams& sp,
           CpuExec exec, CacheOptions cache)
    : m_(&m), tmpl_(std::move(tmpl)), session_(*m.model, cache, ctx, exec, chunk), sampler_(sp), ctx_(ctx) {
  const std::string eot = tmpl_.end_of_turn();
  const int32_t eot_id = m.tok->token_id(eot);
  RF_CHECK(eot_id >= 0, "--chat: the tokenizer has no \"", eot, "\" token, which ends a turn in the ",
           tmpl_.name(), " chat format (wrong --chat-template?)");
  stop_ = {eot_id};
  if (m.tok->eos_id() >= 0) stop_.push_back(m.tok->eos_id());
  for (int e : m.model->config().eos_token_ids) stop_.push_back(e);
  if (!system.empty()) history_.push_back({"system", std::move(system)});
}

/// One user turn: prefills its rendered text after what the cache holds, then samples the
/// reply (at most n tokens), streaming it to `stream` without the end-of-turn token.
ChatReply Chat::say(const std::string& user, int n, std::ostream* stream) {
  const ChatMessage msg{"user", user};
  std::string text;
  if (history_.empty() || history_.back().role != "assistant") {
    std::vector<ChatMessage> first = history_;
    first.push_back(msg);
    text = tmpl_.render(first, true);
  } else {
    text = tmpl_.continuation(history_, msg);
  }
  // Special-token text (<|im_start|>, the Llama templates' BOS) maps to its ids; nothing is
  // added, as in apply_chat_template(tokenize=True).
  const std::vector<int32_t> ids = m_->tok->encode(text, false);
  RF_CHECK(!ids.empty(), "--chat: the chat template rendered nothing for this turn");
  RF_CHECK(cached_ + int64_t(ids.size()) < ctx_, "--chat: the conversation (", cached_ + int64_t(ids.size()),
           " tokens) has outgrown the context of ", ctx_, " tokens (raise -c)");
  ChatReply r;
  r.prompt_tokens = int64_t(ids.size());
  std::vector<float> logits = session_.prefill(ids.data(), int64_t(ids.size()));
  cached_ += int64_t(ids.size());
  StreamDecoder dec = m_->tok->stream_decoder(true);
  auto emit = [&](const std::string& piece) {
    r.text += piece;
    if (stream) *stream << piece << std::flush;
  };
  const int64_t V = m_->model->config().vocab_size;
  for (int64_t i = 0; i < n && cached_ < ctx_; ++i) {
    const int32_t next = sampler_.sample(logits.data(), V);
    if (std::find(stop_.begin(), stop_.end(), next) != stop_.end()) {
      r.ended = true;  // not fed: the next turn's text starts with the end-of-turn token
      break;
    }
    r.ids.push_back(next);
    if (next < m_->tok->vocab_size()) emit(dec.push(next));
    // Fed even at the budget's end, so the cache holds every token of the reply.
    logits = session_.decode(next);
    ++cached_;
  }
  emit(dec.flush());
  history_.push_back(msg);
  history_.push_back({"assistant", r.text});
  return r;
}

/// generate --chat: one reply to -p / -f, or a conversation read from `in` line by line until EOF.
int run_chat(const Args& a, std::istream& in, std::ostream& out, std::ostream& err) {
  std::string prompt = a.prompt;
  if (!a.file.empty()) prompt = read_file(a.file);
  Loaded m = load(a.model, model_options(a), kRunOnly);
  ThreadPool pool(threads_of(a));
  Chat chat(m, chat_template_for(m.model->checkpoint(), *m.tok, a.chat_template), a.system, a.ctx, a.batch,
            SamplingParams{a.temp, a.top_k, a.top_p, a.seed}, CpuExec{&pool}, cache_options(a));
  err << "chat: " << chat.chat_template().name() << " format";
  if (a.system.empty() && !chat.chat_template().default_system().empty())
    err << ", the template's system message \"" << chat.chat_template().default_system() << "\"";
  err << "\n";
  if (!prompt.empty()) {
    chat.say(prompt, a.n_predict, &out);
    out << "\n";
    return 0;
  }
  std::string line;
  while (err << "> " << std::flush, std::getline(in, line)) {
    if (line.empty()) continue;
    const ChatReply r = chat.say(line, a.n_predict, &out);
    out << "\n" << std::flush;
    if (!r.ended) err << "(reply cut at -n " << a.n_predict << " tokens)\n";
  }
  err << "\n";
  return 0;
}

}  // namespace runner
