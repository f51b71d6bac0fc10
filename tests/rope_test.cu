// CUDA rope against the CPU op (itself tested against a double reference in rope_test.cpp) on the
// same random inputs: every storage dtype, both pair layouts, head dims 2, 6, 64 and 128, one and
// 37 tokens, positions up to 40000 (large angles), plain and llama3-scaled inv_freq, x a strided
// slice of a wider buffer (the padding must stay untouched); bad shapes throw before launching.
#include <cstdint>
#include <vector>

#include "recurformer/cuda/rope.cuh"
#include "support/cuda_util.cuh"
#include "support/test_util.hpp"

using namespace recurformer;

// The CPU side, in rope_test_cpu.cpp (compiled by the host compiler).
template <class T> void cpu_rope(const RopeParams<T>& p);

// Both sides compute the same fp32 angle and rotate in fp32; cos/sin differ by an ulp or two
// (glibc vs CUDA sincosf), far inside every budget: no extra factor.
TEMPLATE_LIST_TEST_CASE("CUDA rope equals the CPU rope", "[rope][cuda]", rftest::StorageTypes) {
  using T = TestType;
  RopeScaling llama3;
  llama3.type = RopeScaling::Type::llama3;
  for (int64_t hd : {2, 6, 64, 128})
    for (int64_t tokens : {1, 37})
      for (RopeLayout layout : {RopeLayout::rotate_half, RopeLayout::interleaved}) {
        const int64_t heads = 5, head_stride = hd + 4, tok_stride = heads * head_stride + 3;
        auto x = rftest::random_vector<T>(size_t(tokens * tok_stride));
        std::vector<int32_t> pos(static_cast<size_t>(tokens));
        for (auto& p : pos) p = int32_t(rftest::rng()() % 40001);
        const std::vector<float> inv =
            hd >= 64 ? rope_inv_freq(int(hd), 500000.f, llama3) : rope_inv_freq(int(hd), 10000.f);
        rftest::DeviceBuffer<T> dx(x);
        rftest::DeviceBuffer<int32_t> dpos(pos);
        rftest::DeviceBuffer<float> dinv(inv);
        RopeParams<T> hp;
        hp.x = make_strided_view(x.data(), {tokens, heads, hd}, {tok_stride, head_stride, 1});
        hp.positions = make_view<const int32_t>(pos.data(), {tokens});
        hp.inv_freq = make_view<const float>(inv.data(), {hd / 2});
        hp.layout = layout;
        RopeParams<T> dp = hp;
        dp.x.data = dx.data(), dp.positions.data = dpos.data(), dp.inv_freq.data = dinv.data();
        cpu_rope(hp);
        rope(dp, CudaExec{});
        CAPTURE(hd, tokens, int(layout));
        rftest::check_close<T>("x (CUDA vs CPU)", dx.download(), rftest::as_double(x));
      }
}

TEST_CASE("CUDA rope checks its arguments before launching", "[rope][cuda]") {
  const std::vector<float> x0 = rftest::random_vector<float>(2 * 3 * 8);
  rftest::DeviceBuffer<float> dx(x0);
  rftest::DeviceBuffer<int32_t> dpos(std::vector<int32_t>{0, 1});
  rftest::DeviceBuffer<float> dinv(rope_inv_freq(8, 10000.f));
  RopeParams<float> p;
  p.x = make_view(dx.data(), {2, 3, 8});
  p.positions = make_view<const int32_t>(dpos.data(), {2});
  p.inv_freq = make_view<const float>(dinv.data(), {3});  // hd / 2 is 4
  REQUIRE_THROWS_WITH(rope(p, CudaExec{}), Catch::Contains("inv_freq has shape"));
  p.inv_freq.shape[0] = 4;
  p.positions.shape[0] = 1;
  REQUIRE_THROWS_WITH(rope(p, CudaExec{}), Catch::Contains("positions has shape"));
  p.positions.shape[0] = 2;
  p.x.stride[2] = 2;
  REQUIRE_THROWS_WITH(rope(p, CudaExec{}), Catch::Contains("unit stride"));
  REQUIRE(dx.download() == x0);
}
