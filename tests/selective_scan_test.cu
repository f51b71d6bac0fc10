// CUDA selective_scan / selective_state_update / causal_conv1d(_update) against the CPU
// implementations (themselves tested against double references) on the same random inputs, in
// every storage dtype: packed sequences longer than one CUDA chunk (512 tokens, so the running
// state crosses chunks), shorter than the conv width, empty, padding slots, GQA readers, groups.
#include <cstdint>
#include <numeric>
#include <vector>

#include "recurformer/cuda/causal_conv1d.cuh"
#include "recurformer/cuda/selective_scan.cuh"
#include "support/cuda_util.cuh"
#include "support/test_util.hpp"

using namespace recurformer;

// The CPU side, in selective_scan_test_cpu.cpp (compiled by the host compiler).
template <class T> void cpu_selective_scan(const SelectiveScanParams<T>& p, bool update);
template <class T> void cpu_causal_conv1d(const CausalConv1dParams<T>& p, bool update);

namespace {

// The two sides use different exp and softplus approximations (CPU polynomial vs CUDA __expf), so
// fp32 results agree to a few ulps per step, compounded over the decaying state.
template <class T>
constexpr double kCrossTolerance = std::is_same<T, float>::value ? 10.0 : 1.0;

template <class T>
struct ScanCase {
  int64_t tokens, dch, n, g, r, slots;
  std::vector<int32_t> cu, state_slots;
  std::vector<T> u, delta, B, C, z, y;
  std::vector<float> A, D, delta_bias, state;

  ScanCase(std::vector<int32_t> lengths, std::vector<int32_t> slot_of, int64_t dch_, int64_t n_,
           int64_t g_, int64_t r_, int64_t slots_)
      : dch(dch_), n(n_), g(g_), r(r_), slots(slots_), state_slots(std::move(slot_of)) {
    cu.push_back(0);
    for (int32_t l : lengths) cu.push_back(cu.back() + l);
    tokens = cu.back();
    u = rftest::random_vector<T>(size_t(tokens * dch));
    delta = rftest::random_vector<T>(size_t(tokens * dch), -1.0, 0.5);
    B = rftest::random_vector<T>(size_t(tokens * g * n));
    C = rftest::random_vector<T>(size_t(tokens * g * r * n));
    z = rftest::random_vector<T>(size_t(tokens * dch), -3, 3);
    y = rftest::random_vector<T>(size_t(tokens * r * dch));
    A = rftest::random_vector<float>(size_t(dch * n), -2.0, -0.05);
    D = rftest::random_vector<float>(size_t(dch));
    delta_bias = rftest::random_vector<float>(size_t(dch), -0.5, 0.5);
    state = rftest::random_vector<float>(size_t(slots * dch * n));
  }
  SelectiveScanParams<T> params(bool packed) {
    SelectiveScanParams<T> p;
    p.u = make_view<const T>(u.data(), {tokens, dch});
    p.delta = make_view<const T>(delta.data(), {tokens, dch});
    p.A = make_view<const float>(A.data(), {dch, n});
    p.B = make_view<const T>(B.data(), {tokens, g, n});
    p.C = make_view<const T>(C.data(), {tokens, g, r, n});
    p.D = make_view<const float>(D.data(), {dch});
    p.z = make_view<const T>(z.data(), {tokens, dch});
    p.delta_bias = make_view<const float>(delta_bias.data(), {dch});
    p.y = make_view(y.data(), {tokens, r, dch});
    p.state = make_view(state.data(), {slots, dch, n});
    if (packed) p.cu_seqlens = make_view<const int32_t>(cu.data(), {int64_t(cu.size())});
    p.state_slots = make_view<const int32_t>(state_slots.data(), {int64_t(state_slots.size())});
    return p;
  }
};

// Runs op on the host params and, on device copies of the same inputs, cuda_op; compares y and state.
template <class T, class CpuOp, class CudaOp>
void compare_scan(ScanCase<T>& host, bool packed, CpuOp cpu_op, CudaOp cuda_op) {
  ScanCase<T> dev_in = host;  // identical inputs, before the CPU run changes y and state
  rftest::DeviceBuffer<T> u(dev_in.u), delta(dev_in.delta), B(dev_in.B), C(dev_in.C), z(dev_in.z),
      y(dev_in.y);
  rftest::DeviceBuffer<float> A(dev_in.A), D(dev_in.D), bias(dev_in.delta_bias), state(dev_in.state);
  rftest::DeviceBuffer<int32_t> cu(dev_in.cu), slots(dev_in.state_slots);
  auto hp = dev_in.params(packed);
  SelectiveScanParams<T> dp = hp;
  dp.u = rftest::rebase(hp.u, dev_in.u, u.data());
  dp.delta = rftest::rebase(hp.delta, dev_in.delta, delta.data());
  dp.B = rftest::rebase(hp.B, dev_in.B, B.data());
  dp.C = rftest::rebase(hp.C, dev_in.C, C.data());
  dp.z = rftest::rebase(hp.z, dev_in.z, z.data());
  dp.y = rftest::rebase(hp.y, dev_in.y, y.data());
  dp.A = rftest::rebase(hp.A, dev_in.A, A.data());
  dp.D = rftest::rebase(hp.D, dev_in.D, D.data());
  dp.delta_bias = rftest::rebase(hp.delta_bias, dev_in.delta_bias, bias.data());
  dp.state = rftest::rebase(hp.state, dev_in.state, state.data());
  dp.cu_seqlens = rftest::rebase(hp.cu_seqlens, dev_in.cu, cu.data());
  dp.state_slots = rftest::rebase(hp.state_slots, dev_in.state_slots, slots.data());

  cpu_op(host.params(packed));
  cuda_op(dp, CudaExec{});
  const double scale = kCrossTolerance<T>;
  rftest::check_close<T>("y (CUDA vs CPU)", y.download(), rftest::as_double(host.y), scale);
  rftest::check_close<float>("state (CUDA vs CPU)", state.download(), rftest::as_double(host.state),
                             kCrossTolerance<float>);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("CUDA selective_scan equals the CPU scan", "[selective_scan][cuda]",
                        rftest::StorageTypes) {
  using T = TestType;
  // Sequence 0 spans two CUDA chunks; 1 is padding; 2 is empty; 3 is one token.
  ScanCase<T> c({700, 9, 0, 1, 45}, {2, -1, 0, 4, 1}, /*dch*/ 40, /*n*/ 64, /*g*/ 2, /*r*/ 3,
                /*slots*/ 6);
  compare_scan(c, true, [](auto p) { cpu_selective_scan(p, false); },
               [](auto p, CudaExec e) { selective_scan(p, e); });
  ScanCase<T> small({33}, {0}, 17, 5, 1, 1, 1);
  compare_scan(small, true, [](auto p) { cpu_selective_scan(p, false); },
               [](auto p, CudaExec e) { selective_scan(p, e); });
}

TEMPLATE_LIST_TEST_CASE("CUDA selective_state_update equals the CPU update", "[selective_scan][cuda]",
                        rftest::StorageTypes) {
  using T = TestType;
  // Five one-token rows on slots 3, padding, 0, 4, 1 of a pool of 6; N 64 and 100 (lanes own
  // several states), R 4.
  for (int64_t n : {64, 100}) {
    ScanCase<T> c({1, 1, 1, 1, 1}, {3, -1, 0, 4, 1}, 64, n, 1, 4, 6);
    compare_scan(c, false, [](auto p) { cpu_selective_scan(p, true); },
                 [](auto p, CudaExec e) { selective_state_update(p, e); });
  }
}

TEMPLATE_LIST_TEST_CASE("CUDA causal_conv1d and its update equal the CPU conv",
                        "[causal_conv1d][cuda]", rftest::StorageTypes) {
  using T = TestType;
  for (int64_t k : {2, 4, 8}) {
    const std::vector<int32_t> lengths{300, 2, 0, 9}, slot_of{1, 3, -1, 0};
    std::vector<int32_t> cu{0};
    for (int32_t l : lengths) cu.push_back(cu.back() + l);
    const int64_t tokens = cu.back(), dch = 150, slots = 4;
    auto x = rftest::random_vector<T>(size_t(tokens * dch));
    auto y = rftest::random_vector<T>(size_t(tokens * dch));
    auto w = rftest::random_vector<float>(size_t(dch * k));
    auto bias = rftest::random_vector<float>(size_t(dch));
    auto st = rftest::random_vector<T>(size_t(slots * (k - 1) * dch));
    auto make = [&](std::vector<T>& xv, std::vector<T>& yv, std::vector<float>& wv,
                    std::vector<float>& bv, std::vector<T>& sv, std::vector<int32_t>& cv,
                    std::vector<int32_t>& slv, int64_t rows, bool packed) {
      CausalConv1dParams<T> p;
      p.x = make_view<const T>(xv.data(), {rows, dch});
      p.y = make_view(yv.data(), {rows, dch});
      p.weight = make_view<const float>(wv.data(), {dch, k});
      p.bias = make_view<const float>(bv.data(), {dch});
      p.conv_state = make_view(sv.data(), {slots, k - 1, dch});
      if (packed) p.cu_seqlens = make_view<const int32_t>(cv.data(), {int64_t(cv.size())});
      p.state_slots = make_view<const int32_t>(slv.data(), {int64_t(slv.size())});
      p.activation = ConvActivation::silu;
      return p;
    };
    // Prefill over the packed sequences, then one decode row per slot (padding included).
    std::vector<int32_t> slot_list = slot_of, update_slots{0, -1, 3, 1};
    rftest::DeviceBuffer<T> dx(x), dy(y), dst(st);
    rftest::DeviceBuffer<float> dw(w), db(bias);
    rftest::DeviceBuffer<int32_t> dcu(cu), dsl(slot_list), dup(update_slots);
    auto hp = make(x, y, w, bias, st, cu, slot_list, tokens, true);
    CausalConv1dParams<T> dp = hp;
    dp.x.data = dx.data(), dp.y.data = dy.data(), dp.weight.data = dw.data(), dp.bias.data = db.data();
    dp.conv_state.data = dst.data(), dp.cu_seqlens.data = dcu.data(), dp.state_slots.data = dsl.data();
    cpu_causal_conv1d(hp, false);
    causal_conv1d(dp, CudaExec{});
    rftest::check_close<T>("conv y (CUDA vs CPU)", dy.download(), rftest::as_double(y));
    rftest::check_close<T>("conv state (CUDA vs CPU)", dst.download(), rftest::as_double(st));

    auto up = make(x, y, w, bias, st, cu, update_slots, 4, false);
    CausalConv1dParams<T> dup_p = up;
    dup_p.x.data = dx.data(), dup_p.y.data = dy.data(), dup_p.weight.data = dw.data();
    dup_p.bias.data = db.data(), dup_p.conv_state.data = dst.data(), dup_p.state_slots.data = dup.data();
    cpu_causal_conv1d(up, true);
    causal_conv1d_update(dup_p, CudaExec{});
    rftest::check_close<T>("conv update y (CUDA vs CPU)", dy.download(), rftest::as_double(y));
    rftest::check_close<T>("conv update state (CUDA vs CPU)", dst.download(), rftest::as_double(st));
  }
}

TEST_CASE("CUDA scan checks its arguments before launching", "[selective_scan][cuda]") {
  ScanCase<float> c({10}, {0}, 8, 4, 1, 9, 1);  // 9 readers: more than the CUDA kernels take
  auto p = c.params(true);
  REQUIRE_THROWS_WITH(selective_scan(p, CudaExec{}), Catch::Contains("at most 8 readers"));
}
