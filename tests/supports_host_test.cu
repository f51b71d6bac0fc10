// supports(params, CudaExec) answered on the host, without a GPU (core/support.hpp): the CUDA ops'
// own limits beside their checks, where the CPU says yes to the same params. An engine asks this
// before it places a call; nothing here touches a device, so the test runs on every machine (a
// *_host_test.cu: compiled by nvcc, run with the plain test main, never skipped).
#include <cstdint>
#include <vector>

#include "recurformer/cpu/support.hpp"  // the CPU answers of the plain ops (their checks)
#include "recurformer/cuda/attention.cuh"
#include "recurformer/cuda/causal_conv1d.cuh"
#include "recurformer/cuda/hybrid_head_attention.cuh"
#include "recurformer/cuda/linear.cuh"
#include "recurformer/cuda/selective_scan.cuh"
#include "support/hybrid_layer_model.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

// Host buffers stand in for device memory: supports() reads shapes, strides and pointers only.
struct AttentionCase {
  int64_t tokens = 3, n_q, n_kv, hd = 64, cap = 16;
  std::vector<float> q, kv, out;
  std::vector<int32_t> kv_lens{3}, pos{0, 1, 2};
  AttentionCase(int64_t nq, int64_t nkv)
      : n_q(nq), n_kv(nkv), q(size_t(3 * nq * 64)), kv(size_t(nkv * 16 * 64) + 4), out(q.size()) {}
  AttentionParams<float> params(int64_t offset = 0) {
    AttentionParams<float> p;
    p.q = make_view(const_cast<const float*>(q.data()), {tokens, n_q, hd});
    p.k = make_view(const_cast<const float*>(kv.data()) + offset, {1, n_kv, cap, hd});
    p.v = p.k;
    p.out = make_view(out.data(), {tokens, n_q, hd});
    p.kv_lens = rftest::cview(kv_lens);
    p.q_positions = rftest::cview(pos);
    return p;
  }
};

}  // namespace

TEST_CASE("supports on CUDA: attention's kernel limits, named", "[supports]") {
  AttentionCase ok(8, 2);
  REQUIRE(supports(ok.params(), CudaExec{}));

  AttentionCase wide(32, 1);  // 32 query heads per KV head: the CPU runs it, the CUDA kernel does not
  REQUIRE(supports(wide.params(), CpuExec{}));
  Support s = supports(wide.params(), CudaExec{});
  REQUIRE_FALSE(s);
  REQUIRE_THAT(s.why(), Catch::Contains("at most 16 query heads per KV head, got 32"));

  // Paged K/V runs (a pool of one page of 16 keys); a pool one float off 16-byte alignment does
  // not, and 32 query heads per KV head add a second reason.
  AttentionParams<float> p = ok.params();
  std::vector<int32_t> table = {0};
  p.page_table = make_view(table.data(), {1, 1});
  REQUIRE(supports(p, CudaExec{}));
  p = ok.params(1);
  p.page_table = make_view(table.data(), {1, 1});
  s = supports(p, CudaExec{});
  REQUIRE(s.reasons.size() == 1);
  REQUIRE_THAT(s.reasons[0], Catch::Contains("16-byte aligned K and V rows"));
  AttentionCase wide_paged(32, 1);
  p = wide_paged.params(1);
  p.page_table = make_view(table.data(), {1, 1});
  s = supports(p, CudaExec{});
  REQUIRE(s.reasons.size() == 2);
  REQUIRE_THAT(s.reasons[0], Catch::Contains("at most 16 query heads per KV head"));
  REQUIRE_THAT(s.reasons[1], Catch::Contains("16-byte aligned K and V rows"));

  // Invalid params: the check's message alone (no limits are asked of them).
  AttentionParams<float> bad = ok.params();
  bad.out.shape[1] = 3;
  s = supports(bad, CudaExec{});
  REQUIRE(s.reasons.size() == 1);
  REQUIRE_THAT(s.why(), Catch::Contains("out"));
  REQUIRE(s.why() == supports(bad, CpuExec{}).why());
}

TEST_CASE("supports on CUDA: the scan's readers, the conv, linear", "[supports]") {
  const int64_t T = 2, D = 8, N = 64;
  for (int64_t R : {1, 8, 9, 16}) {  // the CPU takes R * N <= 4096; the CUDA kernels R <= 8
    std::vector<float> u(size_t(T * D)), A(size_t(D * N)), B(size_t(T * N)), C(size_t(T * R * N)),
        y(size_t(T * R * D)), st(size_t(T * D * N));
    SelectiveScanParams<float> p;
    p.u = make_view(const_cast<const float*>(u.data()), {T, D});
    p.delta = p.u;
    p.A = make_view(const_cast<const float*>(A.data()), {D, N});
    p.B = make_view(const_cast<const float*>(B.data()), {T, 1, N});
    p.C = make_view(const_cast<const float*>(C.data()), {T, 1, R, N});
    p.y = make_view(y.data(), {T, R, D});
    p.state = make_view(st.data(), {T, D, N});
    REQUIRE(supports(p, CpuExec{}));
    const Support s = supports(p, CudaExec{}), su = supports_update(p, CudaExec{});
    REQUIRE(bool(s) == (R <= 8));
    REQUIRE(bool(su) == (R <= 8));
    if (R > 8) {
      REQUIRE_THAT(s.why(), Catch::Contains("selective_scan: the CUDA kernels take at most 8 readers R, got " +
                                            std::to_string(R)));
      REQUIRE_THAT(su.why(), Catch::Contains("selective_state_update: the CUDA kernels take at most 8 readers"));
    }
  }

  std::vector<float> x(5 * 8), w(8 * 9), y(5 * 8);
  CausalConv1dParams<float> c;
  c.x = make_view(const_cast<const float*>(x.data()), {5, 8});
  c.weight = make_view(const_cast<const float*>(w.data()), {8, 4});
  c.y = make_view(y.data(), {5, 8});
  REQUIRE(supports(c, CudaExec{}));
  REQUIRE_THAT(supports_update(c, CudaExec{}).why(), Catch::Contains("conv_state is required"));

  std::vector<float> lx(3 * 64), lw(8 * 64), ly(3 * 8);
  LinearParams<float, float> l{make_view(const_cast<const float*>(lx.data()), {3, 64}),
                               make_view(const_cast<const float*>(lw.data()), {8, 64}), {}, make_view(ly.data(), {3, 8})};
  REQUIRE(supports(l, CudaExec{}));
  l.weight = make_strided_view(const_cast<const float*>(lw.data()), {8, 64}, {32, 1});  // rows overlap: not for cuBLAS
  Support s = supports(l, CudaExec{});
  REQUIRE(s.reasons.size() == 1);
  REQUIRE_THAT(s.why(), Catch::Contains("weight has row stride 32, expected at least its row length 64"));
  l.y = make_strided_view(ly.data(), {3, 8}, {4, 1});  // and y's rows overlap: both limits are listed
  s = supports(l, CudaExec{});
  REQUIRE(s.reasons.size() == 2);
  REQUIRE_THAT(s.reasons[1], Catch::Contains("y has row stride 4, expected at least its row length 8"));
}

TEST_CASE("supports on CUDA: the layer core over paged K/V", "[supports]") {
  using namespace rftest::hybrid_layer;
  Model<float> m({{K::attention, K::recurrent, K::streaming}}, true);
  const int64_t n = 3, page = 4, pages = 6, ring = kSink + kWindow;
  const std::vector<HeadKind> kinds = m.layout.groups;
  std::vector<float> qkv(size_t(n * (kNq + 6) * kHd)), dt(size_t(n * kRank)), out(size_t(n * kNq * kHd));
  std::vector<float> kpool(size_t(pages * page * kHd)), ssm(size_t(2 * kHd * kHd)), conv(size_t(2 * (kConv - 1) * kHd)),
      rk(size_t(2 * ring * kHd));
  std::vector<int32_t> cu = {0, 3}, slot = {0}, lengths = {2, 0}, table = {4, 1};
  const HybridAttentionWeights<float> w = m.weights();
  HybridAttentionCoreParams<float, float> cp;
  const float* base = qkv.data();
  cp.q = make_view(base, {n, int64_t(kNq * kHd)});
  cp.k = make_view(base + n * kNq * kHd, {n, int64_t(3 * kHd)});
  cp.v = make_view(base + n * (kNq + 3) * kHd, {n, int64_t(3 * kHd)});
  cp.dt_low = make_view(const_cast<const float*>(dt.data()), {n, int64_t(kRank)});
  cp.out = make_view(out.data(), {n, int64_t(kNq * kHd)});
  cp.recurrent = w.recurrent, cp.n_recurrent = w.n_recurrent;
  cp.cache.kinds = make_view(kinds.data(), {3});
  cp.cache.k = cp.cache.v = make_view(kpool.data(), {pages, 1, page, int64_t(kHd)});
  cp.cache.ssm_states = make_view(ssm.data(), {2, 1, int64_t(kHd), int64_t(kHd)});
  cp.cache.conv_states = make_view(conv.data(), {2, 1, int64_t(kConv - 1), int64_t(kHd)});
  cp.cache.ring_k = cp.cache.ring_v = make_view(rk.data(), {2, 1, ring, int64_t(kHd)});
  cp.cache.sink = kSink, cp.cache.window = kWindow;
  cp.step.cu_seqlens = rftest::cview(cu);
  cp.step.slots = rftest::cview(slot);
  cp.step.lengths = rftest::cview(lengths);
  cp.step.page_table = make_view(table.data(), {1, 2});
  cp.n_q = kNq, cp.head_dim = kHd;
  cp.inv_freq = rftest::cview(m.inv_freq);

  // CUDA runs it as the CPU does (hybrid_head_attention_test.cpp): the step's page rows travel
  // in the plan's metadata.
  REQUIRE(supports(cp, CudaExec{}));

  // Over-full pages: the step's own check comes first, in the words the CPU uses.
  lengths[0] = 6;
  REQUIRE_THAT(supports(cp, CudaExec{}).why(), Catch::Contains("holds 6 tokens and cannot take 3 more"));

  // Contiguous slots of capacity 8: CUDA runs it.
  cp.step.page_table = {};
  lengths[0] = 2;
  cp.cache.k = cp.cache.v = make_view(kpool.data(), {2, 1, 8, int64_t(kHd)});
  REQUIRE(supports(cp, CudaExec{}));
}
