// The CPU side of attention_test.cu: the CPU op (tested against a double reference in
// attention_test.cpp) as the oracle for the CUDA kernels.
#include <vector>

#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/thread_pool.hpp"

using namespace recurformer;

template <class T>
void cpu_attention(const AttentionParams<T>& p) {
  static ThreadPool pool(2);
  const CpuExec exec{&pool};
  std::vector<unsigned char> workspace(attention_workspace_bytes(p, exec));
  attention(p, exec, workspace.data(), workspace.size());
}

template void cpu_attention<float>(const AttentionParams<float>&);
template void cpu_attention<half>(const AttentionParams<half>&);
template void cpu_attention<bfloat16>(const AttentionParams<bfloat16>&);
