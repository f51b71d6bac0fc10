// examples/recurformer.cpp: the model runner (see `recurformer --help`).
//
// With no arguments it runs the main job on a built-in seeded random model written next to the
// executable (build/default-model), so the first command of the README needs no download.
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <iostream>

#include "runner_jobs.hpp"

namespace {
// build/bin/recurformer -> build/default-model
std::string default_home() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n > 0) {
    std::string exe(buf, size_t(n));
    std::string dir = exe.substr(0, exe.rfind('/'));
    const size_t up = dir.rfind('/');
    return (up == std::string::npos ? std::string(".") : dir.substr(0, up)) + "/default-model";
  }
  return "default-model";
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
        std::cerr << "recurformer: error: -m needs a command (generate, calibrate, convert, perplexity, bench); see --help\n";
        return 2;
      }
      return runner::run_main_job(a, default_home(), std::cout, std::cerr);
    }
    if (a.command == "generate") return runner::run_generate(a, std::cout, std::cerr);
    if (a.command == "calibrate") return runner::run_calibrate(a, std::cout, std::cerr);
    if (a.command == "convert") return runner::run_convert(a, std::cout, std::cerr);
    if (a.command == "perplexity") return runner::run_perplexity(a, std::cout, std::cerr);
    if (a.command == "bench") return runner::run_bench(a, std::cout, std::cerr);
  } catch (const std::exception& e) {
    std::cout.flush();
    std::cerr << "recurformer: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
