// examples/runner_train.hpp: `recurformer finetune`, continual training of a converted checkpoint
// (model/finetune_train.hpp), wired like `distill` (included at the end of runner_jobs.hpp).
#pragma once

#include <ostream>

#include "recurformer/model/finetune_train.hpp"
#include "runner_jobs.hpp"

namespace runner {

/// Finetunes -m on -f into -o (see `finetune --help`); results to `out`, progress to `err`.
FinetuneResult finetune_model(const Args& a, std::ostream& out, std::ostream& err);

int run_finetune(const Args& a, std::ostream& out, std::ostream& err);

}  // namespace runner
