// examples/runner_train.cpp: `recurformer finetune` (runner_train.hpp), continual training of a converted
// checkpoint.
#include "runner_train.hpp"

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

namespace runner {

/// Finetunes -m on -f into -o (see `finetune --help`); results to `out`, progress to `err`.
FinetuneResult finetune_model(const Args& a, std::ostream& out, std::ostream& err) {
  RF_CHECK(!a.model.empty(), "finetune: no model given (-m CONVERTED)");
  RF_CHECK(!a.file.empty(), "finetune: no training text (-f TEXT)");
  RF_CHECK(!a.out.empty(), "finetune: no output directory (-o DIR)");
  RF_CHECK(a.kl == 0 || !a.teacher.empty(), "finetune: --kl needs --teacher ORIGINAL (the model the student was converted from)");
  RF_CHECK(recurformer::detail::path_exists(a.model), a.model, ": no such file or directory");
  auto ck = std::make_shared<const Checkpoint>(Checkpoint::open(a.model));
  const ModelConfig& c = ck->config();
  std::shared_ptr<const Checkpoint> tck;
  if (!a.teacher.empty()) {
    RF_CHECK(recurformer::detail::path_exists(a.teacher), a.teacher, ": no such file or directory");
    tck = std::make_shared<const Checkpoint>(Checkpoint::open(a.teacher));
    const ModelConfig& tc = tck->config();
    RF_CHECK(tc.n_layers == c.n_layers && tc.d_model == c.d_model && tc.n_q == c.n_q && tc.n_kv == c.n_kv &&
                 tc.head_dim == c.head_dim && tc.vocab_size == c.vocab_size,
             "finetune: the teacher ", a.teacher, " (", tc.n_layers, " layers, d ", tc.d_model, ", ", tc.n_q, "/", tc.n_kv,
             " heads, vocabulary ", tc.vocab_size, ") is not the model ", a.model, " was converted from (", c.n_layers,
             " layers, d ", c.d_model, ", ", c.n_q, "/", c.n_kv, " heads, vocabulary ", c.vocab_size, ")");
    RF_CHECK(!tc.recurformer, "finetune: the teacher ", a.teacher, " is itself a RecurFormer; give the original model");
  }
  const Tokenizer tok = tokenizer_of(*ck);
  const std::vector<int32_t> tokens = tok.encode(read_file(a.file), true);
  FinetuneOptions o;
  o.ctx = a.ctx_set ? a.ctx : 512;
  o.steps = a.steps;
  o.batch_seqs = a.batch_seqs_set ? a.batch_seqs : 1;
  o.accum = a.accum;
  o.lr = a.lr_set ? a.lr : 1e-4f;
  o.train = a.train == "all" ? FinetuneTrain::all : FinetuneTrain::recurrent;
  o.kl_weight = a.kl;
  o.repeat = a.repeat_fraction;
  o.save_every = a.save_every;
  o.seed = a.seed;
  o.progress = [&err](int step, int steps, double loss, double tps, double eta) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "finetune: step %d/%d, loss %.4f, %.0f tokens/s, ETA %s\n", step, steps, loss, tps,
                  human_seconds(eta).c_str());
    err << buf << std::flush;
  };
  ThreadPool pool(threads_of(a));
  const FinetuneResult r = finetune(ck, tck, tokens, o, a.out, a.force, a.resume, CpuExec{&pool});
  char buf[300];
  std::snprintf(buf, sizeof buf,
                "finetune: %lld parameters (%s), steps %d..%d, %lld training / %lld held-out sequences of %lld tokens\n"
                "finetune: training loss %.4f -> %.4f, %.0f tokens/s, %s\n"
                "finetune: held-out loss %.4f -> %.4f (perplexity %.2f -> %.2f)\n",
                (long long)r.params, finetune_train_name(o.train), r.start_step, r.end_step, (long long)r.train_sequences,
                (long long)r.heldout_sequences, (long long)o.ctx, r.first_loss, r.last_loss, r.tokens_per_second,
                human_seconds(r.seconds).c_str(), r.heldout_before, r.heldout_after, std::exp(r.heldout_before),
                std::exp(r.heldout_after));
  out << buf << "finetuned -> " << a.out << "\n";
  return r;
}

int run_finetune(const Args& a, std::ostream& out, std::ostream& err) {
  finetune_model(a, out, err);
  return 0;
}

}  // namespace runner
