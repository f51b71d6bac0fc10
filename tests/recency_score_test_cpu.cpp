// The CPU side of recency_score_test.cu: the CPU op (tested against a materialised P in
// recency_score_test.cpp) as the oracle for the CUDA kernel.
#include "recurformer/cpu/recency_score.hpp"
#include "recurformer/cpu/thread_pool.hpp"

using namespace recurformer;

template <class T>
void cpu_recency_score(const RecencyScoreParams<T>& p) {
  static ThreadPool pool(2);
  recency_score(p, CpuExec{&pool});
}

template void cpu_recency_score<float>(const RecencyScoreParams<float>&);
template void cpu_recency_score<half>(const RecencyScoreParams<half>&);
template void cpu_recency_score<bfloat16>(const RecencyScoreParams<bfloat16>&);
