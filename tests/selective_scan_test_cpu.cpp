// The CPU side of selective_scan_test.cu: the CPU ops (tested against double references in
// selective_scan_test.cpp / causal_conv1d_test.cpp) as the oracle for the CUDA kernels.
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/selective_scan.hpp"

using namespace recurformer;

template <class T>
void cpu_selective_scan(const SelectiveScanParams<T>& p, bool update) {
  static ThreadPool pool(2);
  if (update)
    selective_state_update(p, CpuExec{&pool});
  else
    selective_scan(p, CpuExec{&pool});
}
template <class T>
void cpu_causal_conv1d(const CausalConv1dParams<T>& p, bool update) {
  static ThreadPool pool(2);
  if (update)
    causal_conv1d_update(p, CpuExec{&pool});
  else
    causal_conv1d(p, CpuExec{&pool});
}

#define RF_INSTANTIATE(T)                                                          \
  template void cpu_selective_scan<T>(const SelectiveScanParams<T>&, bool);       \
  template void cpu_causal_conv1d<T>(const CausalConv1dParams<T>&, bool);
RF_INSTANTIATE(float)
RF_INSTANTIATE(half)
RF_INSTANTIATE(bfloat16)
