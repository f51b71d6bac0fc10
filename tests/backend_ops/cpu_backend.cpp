// The CPU backend of backend_ops_test: host memory, a two-thread pool, and the ISA limit set per
// backend so the scalar, AVX2 and AVX-512 bodies each run every case.
#include <memory>

#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/recency_score.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/selective_scan.hpp"
#include "recurformer/cpu/support.hpp"
#include "recurformer/cpu/thread_pool.hpp"

#include "backend.hpp"

namespace rfops {
namespace {

class CpuBackend {
 public:
  template <class T>
  T* put(const std::vector<T>& host) {
    auto copy = std::make_shared<std::vector<T>>(host);
    if (copy->empty()) copy->resize(1);  // a view needs a non-null pointer even when empty
    owned_.push_back(copy);
    return copy->data();
  }
  template <class T>
  std::vector<T> get(const T* p, size_t n) const {
    return std::vector<T>(p, p + n);
  }
  CpuExec exec() const {
    static ThreadPool pool(2);
    return CpuExec{&pool};
  }

 private:
  std::vector<std::shared_ptr<void>> owned_;
};

}  // namespace

std::vector<Backend> cpu_backends() {
  std::vector<Backend> all;
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512}) {
    if (int(isa) > int(cpu::detected_isa())) break;
    all.push_back({std::string("cpu-") + cpu::isa_name(isa), [isa](const Case& c) {
                     cpu::set_isa_limit(isa);
                     CpuBackend be;
                     Result r = run_case(c, be);
                     cpu::set_isa_limit(cpu::Isa::avx512);
                     return r;
                   }});
  }
  return all;
}

}  // namespace rfops
