// recurformer/cpu/thread_pool.hpp: a small fork-join pool for the CPU kernels.
//
// The calling thread takes part, so a pool of n threads starts n-1 workers. A job is a function
// pointer plus a context pointer (no allocation per call). Workers spin briefly before sleeping,
// since decode issues many short jobs back to back. A job started from inside a job runs inline
// on the calling thread (no nested parallelism, no deadlock).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define RF_CPU_RELAX() __builtin_ia32_pause()
#else
#define RF_CPU_RELAX() ((void)0)
#endif

namespace recurformer {

class ThreadPool {
 public:
  /// n_threads <= 0 picks std::thread::hardware_concurrency().
  explicit ThreadPool(int n_threads = 0) {
    if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
    n_ = n_threads;
    for (int t = 1; t < n_; ++t) workers_.emplace_back([this, t] { worker(t); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int size() const { return n_; }

  /// fn(begin, end, thread) over [0, n), one contiguous block per thread.
  template <class F>
  void parallel_for(int64_t n, F&& fn) {
    if (n <= 0) return;
    const int parts = int(std::min<int64_t>(n_, n));
    auto body = [&](int t) {
      if (t >= parts) return;  // fewer items than threads
      const int64_t b = n * t / parts, e = n * (t + 1) / parts;
      fn(b, e, t);
    };
    run(body, parts);
  }

  /// fn(task, thread) for each task in [0, n), handed out one at a time.
  template <class F>
  void for_each(int64_t n, F&& fn) {
    if (n <= 0) return;
    std::atomic<int64_t> next{0};
    auto body = [&](int t) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next.fetch_add(1, std::memory_order_relaxed))
        fn(i, t);
    };
    run(body, int(std::min<int64_t>(n_, n)));
  }

 private:
  template <class Body>
  void run(Body& body, int parts) {
    if (parts <= 1 || n_ == 1 || in_job()) {
      for (int t = 0; t < parts; ++t) body(t);
      return;
    }
    std::lock_guard<std::mutex> job_lock(job_mu_);  // one job at a time from outside threads
    // Every worker joins every job (those past `parts` return at once), so no worker can lag behind
    // into the next job.
    ctx_ = &body;
    call_ = [](void* c, int t) { (*static_cast<Body*>(c))(t); };
    pending_.store(n_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    in_job() = true;
    body(0);
    in_job() = false;
    while (pending_.load(std::memory_order_acquire) != 0) RF_CPU_RELAX();
  }

  void worker(int t) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little: back-to-back decode jobs arrive within microseconds.
      uint64_t g = generation_.load(std::memory_order_acquire);
      for (int spin = 0; g == seen && spin < 20000; ++spin) {
        RF_CPU_RELAX();
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;
      if (stop_) return;
      in_job() = true;
      call_(ctx_, t);
      in_job() = false;
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  static bool& in_job() {
    thread_local bool flag = false;
    return flag;
  }

  int n_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mu_, job_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool stop_ = false;
  void* ctx_ = nullptr;
  void (*call_)(void*, int) = nullptr;
};

}  // namespace recurformer
