// The CPU side of linear_test.cu: the CPU op (tested against a double reference in linear_test.cpp)
// as the second oracle for the cuBLAS path, with its own workspace.
#include <vector>

#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/thread_pool.hpp"

using namespace recurformer;

template <class TX, class TW>
void cpu_linear(const LinearParams<TX, TW>& p) {
  static ThreadPool pool(2);
  const CpuExec exec{&pool};
  std::vector<unsigned char> ws(linear_workspace_bytes(p, exec));
  linear(p, exec, ws.data(), ws.size());
}

template void cpu_linear<float, float>(const LinearParams<float, float>&);
template void cpu_linear<float, half>(const LinearParams<float, half>&);
template void cpu_linear<float, bfloat16>(const LinearParams<float, bfloat16>&);
template void cpu_linear<half, half>(const LinearParams<half, half>&);
template void cpu_linear<bfloat16, bfloat16>(const LinearParams<bfloat16, bfloat16>&);
