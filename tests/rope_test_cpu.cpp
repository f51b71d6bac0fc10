// The CPU side of rope_test.cu: the CPU op (tested against a double reference in rope_test.cpp)
// as the oracle for the CUDA kernel.
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/thread_pool.hpp"

using namespace recurformer;

template <class T>
void cpu_rope(const RopeParams<T>& p) {
  static ThreadPool pool(2);
  rope(p, CpuExec{&pool});
}

template void cpu_rope<float>(const RopeParams<float>&);
template void cpu_rope<half>(const RopeParams<half>&);
template void cpu_rope<bfloat16>(const RopeParams<bfloat16>&);
