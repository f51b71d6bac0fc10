// examples/runner_chat.hpp: `recurformer generate --chat`, a conversation with an instruct model
// (llama-cli -cnv): user turns go through the model's chat template, each reply ends at the
// end-of-turn token, and one cache holds the whole conversation, so a turn only prefills its own
// text.
#pragma once

#include <cstdint>
#include <istream>
#include <ostream>
#include <string>
#include <vector>

#include "recurformer/model/chat_template.hpp"
#include "runner_jobs.hpp"

namespace runner {

struct ChatReply {
  std::vector<int32_t> ids;  ///< the reply's tokens, without the end-of-turn token
  std::string text;
  bool ended = false;        ///< the model ended its turn (else the token budget ran out)
  int64_t prompt_tokens = 0;  ///< tokens prefilled for this turn
};

/// A conversation with a loaded model: its template, the ids that end a turn and one session.
class Chat {
 public:
  Chat(const Loaded& m, ChatTemplate tmpl, std::string system, int64_t ctx, int chunk, const SamplingParams& sp,
       CpuExec exec, CacheOptions cache = {});

  const ChatTemplate& chat_template() const { return tmpl_; }
  int64_t cached_tokens() const { return cached_; }

  /// One user turn: prefills its rendered text after what the cache holds, then samples the
  /// reply (at most n tokens), streaming it to `stream` without the end-of-turn token.
  ChatReply say(const std::string& user, int n, std::ostream* stream);

 private:
  const Loaded* m_;
  ChatTemplate tmpl_;
  Session session_;
  Sampler sampler_;
  int64_t ctx_, cached_ = 0;
  std::vector<int32_t> stop_;
  std::vector<ChatMessage> history_;
};

/// generate --chat: one reply to -p / -f, or a conversation read from `in` line by line until EOF.
int run_chat(const Args& a, std::istream& in, std::ostream& out, std::ostream& err);

}  // namespace runner
