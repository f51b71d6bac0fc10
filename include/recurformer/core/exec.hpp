// recurformer/core/exec.hpp: where an op runs. Every op has the call shape op(params, exec):
// CpuExec (this header) selects the CPU implementation and its thread pool; CudaExec
// (cuda/exec.cuh) selects the CUDA one and its stream.
#pragma once

#include "recurformer/core/index_memory.hpp"
#include "recurformer/cpu/thread_pool.hpp"

namespace recurformer {

/// Run on the host. A null pool runs on the calling thread.
struct CpuExec {
  ThreadPool* pool = nullptr;
  int threads() const { return pool ? pool->size() : 1; }
  /// fn(begin, end, thread) over [0, n) split into one contiguous block per thread.
  template <class F>
  void parallel_for(int64_t n, F&& fn) const {
    if (pool)
      pool->parallel_for(n, std::forward<F>(fn));
    else if (n > 0)
      fn(int64_t(0), n, 0);
  }
  /// fn(task, thread) for every task in [0, n), handed out dynamically (uneven work).
  template <class F>
  void for_each(int64_t n, F&& fn) const {
    if (pool)
      pool->for_each(n, std::forward<F>(fn));
    else
      for (int64_t i = 0; i < n; ++i) fn(i, 0);
  }
};

}  // namespace recurformer
