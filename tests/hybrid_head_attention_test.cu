// The hybrid head attention layer on CUDA over a HybridCache<T, DeviceMemory>, against the same
// double-precision reference as the CPU layer (support/hybrid_layer_model.hpp): every layout kind
// (attention, recurrent, streaming, mixed, n_kv 2 with g 3), every schedule (one prefill, chunked
// prefill, prefill + decode, sequences alone), every storage type; paged K/V equals contiguous
// slots bit for bit; then the device cache's snapshot/restore and fork reproduce outputs bit for bit, and bad input throws before anything on
// the device changes (cache bytes and out compared after the throw).
#include <cstring>
#include <deque>
#include <type_traits>
#include <vector>

#include "recurformer/cuda/hybrid_head_attention.cuh"
#include "support/cuda_util.cuh"
#include "support/hybrid_layer_model.hpp"
#include "support/test_util.hpp"

using namespace recurformer;
using namespace rftest::hybrid_layer;

namespace {

/// Model<TW>'s weights copied to the device; w and inv_freq are the layer's device views (w.recurrent
/// is a host array of device views, as the layer reads it on the host).
template <class TW>
struct DeviceModel {
  std::deque<rftest::DeviceBuffer<TW>> tw;
  std::deque<rftest::DeviceBuffer<float>> f32;
  std::vector<RecurrentGroupWeights<TW>> rec;
  HybridAttentionWeights<TW> w;
  View<const float, 1> inv_freq;

  template <class U>
  const U* up(const std::vector<U>& v) {
    if constexpr (std::is_same_v<U, TW>)
      return tw.emplace_back(v).data();
    else
      return f32.emplace_back(v).data();
  }
  explicit DeviceModel(const Model<TW>& m) {
    w = m.weights();
    w.wq.data = up(m.wq), w.wk.data = up(m.wk), w.wv.data = up(m.wv), w.wo.data = up(m.wo);
    if (m.biases) w.bq.data = up(m.bq), w.bk.data = up(m.bk), w.bv.data = up(m.bv);
    for (size_t i = 0; i < m.rec.size(); ++i) {
      RecurrentGroupWeights<TW> v = m.rec_views[i];
      const auto& r = m.rec[i];
      v.dt_down.data = up(r.dt_down), v.dt_up.data = up(r.dt_up), v.dt_bias.data = up(r.dt_bias);
      v.A.data = up(r.A), v.D.data = up(r.D), v.conv_weight.data = up(r.conv_w), v.conv_bias.data = up(r.conv_b);
      rec.push_back(v);
    }
    w.recurrent = rec.data();
    inv_freq = make_view(up(m.inv_freq), {int64_t(m.inv_freq.size())});
  }
};

/// Every byte the device cache holds for layer 0, downloaded.
template <class T>
std::vector<unsigned char> dump(HybridCache<T, DeviceMemory>& c) {
  RF_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<unsigned char> b;
  auto add = [&](const auto& v) {
    const size_t n = size_t(v.numel()) * sizeof(*v.data);
    const size_t at = b.size();
    b.resize(at + n);
    if (n) RF_CUDA_CHECK(cudaMemcpy(b.data() + at, v.data, n, cudaMemcpyDeviceToHost));
  };
  add(c.keys(0)), add(c.values(0)), add(c.ssm_states(0)), add(c.conv_states(0));
  add(c.stream_keys(0)), add(c.stream_values(0));
  for (int s = 0; s < c.slots(); ++s) {
    const int64_t len = c.length(s);
    const auto* p = reinterpret_cast<const unsigned char*>(&len);
    b.insert(b.end(), p, p + sizeof len);
  }
  return b;
}

template <class T, class TW>
struct DeviceRunner {
  const Model<TW>& m;
  DeviceModel<TW> dm;
  HybridCache<T, DeviceMemory> cache;
  std::vector<int> slot_of;
  void* ws = nullptr;
  size_t ws_bytes = 0;

  DeviceRunner(const Model<TW>& model, int slots, int64_t capacity, int64_t page_size = 0)
      : m(model), dm(model), cache(model.cache_config(slots, capacity, page_size)) {
    for (int s = 0; s < slots; ++s) slot_of.push_back(s);
  }
  DeviceRunner(const DeviceRunner&) = delete;
  DeviceRunner& operator=(const DeviceRunner&) = delete;
  ~DeviceRunner() { cudaFree(ws); }

  HybridHeadAttentionParams<T, TW, DeviceMemory> params(const float* x, float* out, int64_t n,
                                                       const std::vector<int32_t>& cu,
                                                       const std::vector<int32_t>& slots) {
    HybridHeadAttentionParams<T, TW, DeviceMemory> p;
    p.x = make_view(x, {n, kDModel});
    p.out = make_view(out, {n, kDModel});
    p.weights = dm.w;
    p.cache = &cache;
    p.layer = 0;
    p.n_q = kNq;
    p.cu_seqlens = make_view(cu.data(), {int64_t(cu.size())});
    p.slots = make_view(slots.data(), {int64_t(slots.size())});
    p.inv_freq = dm.inv_freq;
    return p;
  }
  void reserve(size_t bytes) {
    if (bytes <= ws_bytes) return;
    RF_CUDA_CHECK(cudaFree(ws));
    ws = nullptr;
    RF_CUDA_CHECK(cudaMalloc(&ws, bytes));
    ws_bytes = bytes;
  }
  std::vector<float> step(const std::vector<std::vector<float>>& xs, std::vector<int64_t>& done,
                          const std::vector<Step>& batch) {
    const PackedBatch pb(xs, done, batch, slot_of);
    rftest::DeviceBuffer<float> dx(pb.x), dout(std::vector<float>(pb.x.size(), -7.f));
    auto p = params(dx.data(), dout.data(), int64_t(pb.x.size()) / kDModel, pb.cu, pb.slots);
    cache.reserve(rftest::cview(pb.slots), rftest::cview(pb.counts));  // paged: the step's pages
    reserve(hybrid_head_attention_workspace_bytes(p, CudaExec{}));
    hybrid_head_attention(p, CudaExec{}, ws, ws_bytes);
    pb.advance(cache, done, batch);
    return dout.download();
  }
};

// Tolerance: the CPU layer's per-dtype budget, times 2 for 16-bit weights: cuBLAS multiplies x
// rounded to the weight type (cuda/linear.cuh), one more rounding of the same size as q, k, v's own
// rounding to T, so at most doubling the error of the projections.
template <class T, class TW>
void check_schedule(const Model<TW>& m, const std::vector<std::vector<Step>>& schedule, const char* what) {
  std::vector<std::vector<float>> xs;
  for (int64_t L : kLens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  DeviceRunner<T, TW> r(m, int(kLens.size()) + 1, 40);
  r.slot_of = {};
  for (size_t s = 0; s < kLens.size(); ++s) r.slot_of.push_back(int(kLens.size() - s));  // not the identity
  const auto outs = run_schedule(r, xs, schedule);
  const double scale = std::is_same_v<TW, float> ? 1.0 : 2.0;
  for (size_t s = 0; s < xs.size(); ++s)
    rftest::check_close<T>(std::string(what) + ", sequence " + std::to_string(s), outs[s],
                           reference(m, xs[s], kLens[s]), scale);
}

template <class T>
void all_schedules(const LayerLayout& layout, bool biases) {
  Model<T> m(layout, biases);
  check_schedule<T>(m, one_prefill(), "one prefill");
  check_schedule<T>(m, chunked(), "chunked prefill");
  check_schedule<T>(m, prefill_then_decode(), "prefill + decode");
  check_schedule<T>(m, alone(), "sequences alone");
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("CUDA HybridHeadAttention matches the reference for every layout", "[hybrid][cuda]",
                        rftest::StorageTypes) {
  using K = HeadKind;
  SECTION("all attention") { all_schedules<TestType>({{K::attention, K::attention, K::attention}}, false); }
  SECTION("all recurrent") { all_schedules<TestType>({{K::recurrent, K::recurrent, K::recurrent}}, true); }
  SECTION("streaming") { all_schedules<TestType>({{K::streaming, K::attention, K::streaming}}, true); }
  SECTION("mixed") { all_schedules<TestType>({{K::recurrent, K::streaming, K::attention}}, true); }
  SECTION("n_kv 2, g 3") { all_schedules<TestType>({{K::recurrent, K::attention}}, true); }
  SECTION("windowed") { all_schedules<TestType>({{K::windowed, K::streaming, K::windowed}}, true); }
  SECTION("every kind") { all_schedules<TestType>({{K::windowed, K::recurrent, K::attention, K::streaming, K::attention, K::windowed}}, true); }
}

TEST_CASE("CUDA HybridHeadAttention over fp32 weights and a bf16 cache", "[hybrid][cuda]") {
  using K = HeadKind;
  Model<float> m({{K::recurrent, K::streaming, K::attention}}, true);
  check_schedule<bfloat16>(m, prefill_then_decode(), "bf16 cache, fp32 weights");
}

// Paged K/V on the device (pages of 3 keys, interleaved by the schedules' steps): the appends write
// through the plan's copy of the page rows and attention reads through it, with the same arithmetic
// as over contiguous slots, so the outputs are bit for bit the same.
TEMPLATE_LIST_TEST_CASE("CUDA HybridHeadAttention over a paged device cache == over contiguous slots, bit for bit",
                        "[hybrid][cuda]", rftest::StorageTypes) {
  using T = TestType;
  using K = HeadKind;
  Model<T> m({{K::attention, K::windowed, K::attention}}, true);
  std::vector<std::vector<float>> xs;
  for (int64_t L : kLens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  for (const auto& schedule : {one_prefill(), chunked(), prefill_then_decode(), alone()}) {
    DeviceRunner<T, T> contiguous(m, 3, 40), paged(m, 3, 40, 3);
    contiguous.slot_of = paged.slot_of = {2, 0};
    require_same_outputs(contiguous, paged, xs, schedule);
  }
  DeviceRunner<T, T> forked(m, 3, 30, 5);  // a fork at 12 tokens shares a half-full page
  check_snapshot_and_fork(forked);
}

TEMPLATE_LIST_TEST_CASE("CUDA HybridHeadAttention: device snapshot/restore and fork reproduce outputs",
                        "[hybrid][cuda]", rftest::StorageTypes) {
  using T = TestType;
  using K = HeadKind;
  Model<T> m({{K::recurrent, K::attention, K::streaming}}, true);
  DeviceRunner<T, T> r(m, 3, 30);
  check_snapshot_and_fork(r);
  // reset clears the slot on the device.
  r.cache.reset(2);
  auto cleared = r.cache.snapshot(2);
  std::vector<float> ssm(cleared.ssm.size());
  RF_CUDA_CHECK(cudaMemcpy(ssm.data(), cleared.ssm.data(), ssm.size() * 4, cudaMemcpyDeviceToHost));
  for (float s : ssm) REQUIRE(s == 0.f);
}

TEST_CASE("CUDA HybridHeadAttention: bad input throws before the device changes", "[hybrid][cuda]") {
  using K = HeadKind;
  Model<float> m({{K::attention, K::recurrent, K::streaming}}, true);
  DeviceRunner<float, float> r(m, 2, 12);
  std::vector<std::vector<float>> xs = {rftest::random_vector<float>(size_t(20 * kDModel)),
                                        rftest::random_vector<float>(size_t(20 * kDModel))};
  std::vector<int64_t> done = {0, 0};
  r.step(xs, done, {{0, 9}, {1, 4}});
  const auto before = dump(r.cache);
  rftest::DeviceBuffer<float> dx(std::vector<float>(size_t(6 * kDModel), 0.5f));
  rftest::DeviceBuffer<float> dout(std::vector<float>(size_t(6 * kDModel), -7.f));
  const std::vector<int32_t> cu = {0, 2, 6}, slots = {1, 0}, dup = {0, 0};
  r.reserve(size_t(1) << 24);
  auto p = r.params(dx.data(), dout.data(), 6, cu, slots);
  REQUIRE_THROWS_WITH(hybrid_head_attention(p, CudaExec{}, r.ws, r.ws_bytes),
                      Catch::Contains("slot 0") && Catch::Contains("capacity 12"));
  auto pd = r.params(dx.data(), dout.data(), 6, cu, dup);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pd, CudaExec{}, r.ws, r.ws_bytes), Catch::Contains("twice"));
  auto pw = r.params(dx.data(), dout.data(), 6, cu, slots);
  pw.weights.n_recurrent = 0;
  REQUIRE_THROWS_WITH(hybrid_head_attention(pw, CudaExec{}, r.ws, r.ws_bytes), Catch::Contains("recurrent"));
  REQUIRE_THROWS_WITH(hybrid_head_attention(p, CudaExec{}, r.ws, 100), Catch::Contains("workspace"));
  REQUIRE(dump(r.cache) == before);
  for (float o : dout.download()) REQUIRE(o == -7.f);
}

// Plan once per step on the device: the layer over a step plan, captured in a CUDA graph at the
// first decode step and replayed for the next ones (the plan re-uploads each step's metadata into
// the same device buffer), gives the bytes of the same layer run directly from the same plans.
TEST_CASE("CUDA HybridHeadAttention: a planned decode step captured in a graph and replayed == run directly",
          "[hybrid][cuda][graph]") {
  using K = HeadKind;
  Model<float> m({{K::windowed, K::recurrent, K::attention, K::streaming, K::attention, K::windowed}}, true);
  const int64_t S = 2, steps = 8;
  std::vector<std::vector<float>> xs = {rftest::random_vector<float>(size_t((7 + steps) * kDModel)),
                                        rftest::random_vector<float>(size_t((4 + steps) * kDModel))};
  DeviceRunner<float, float> direct(m, 3, 40), graphed(m, 3, 40);
  direct.slot_of = graphed.slot_of = {2, 0};
  std::vector<int64_t> done_d = {0, 0}, done_g = {0, 0};
  direct.step(xs, done_d, {{0, 7}, {1, 4}});  // one-shot prefill (also creates the cuBLAS handle)
  graphed.step(xs, done_g, {{0, 7}, {1, 4}});

  cudaStream_t stream = nullptr;
  RF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const CudaExec exec{stream};
  const std::vector<int32_t> cu = {0, 1, 2}, slots = {2, 0};
  const HybridStepShape shape = hybrid_step_shape(direct.cache, kNq, kRank);
  const size_t meta_bytes =
      hybrid_step_metadata_bytes(shape, hybrid_step(direct.cache, make_view(cu.data(), {S + 1}), make_view(slots.data(), {S})), S);
  struct PlanMemory {
    void *device = nullptr, *staging = nullptr;
    explicit PlanMemory(size_t b) {
      RF_CUDA_CHECK(cudaMalloc(&device, b));
      RF_CUDA_CHECK(cudaMallocHost(&staging, b));
    }
    ~PlanMemory() { cudaFree(device), cudaFreeHost(staging); }
  } pm_d(meta_bytes), pm_g(meta_bytes);
  rftest::DeviceBuffer<float> dx(std::vector<float>(size_t(S * kDModel), 0.f));
  rftest::DeviceBuffer<float> out_d(std::vector<float>(size_t(S * kDModel), -7.f)), out_g(out_d.download());
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  for (int64_t step = 0; step < steps; ++step) {
    std::vector<float> x;
    for (int64_t s = 0; s < S; ++s) {
      const float* src = xs[size_t(s)].data() + done_d[size_t(s)] * kDModel;
      x.insert(x.end(), src, src + kDModel);
    }
    RF_CUDA_CHECK(cudaMemcpyAsync(dx.data(), x.data(), x.size() * 4, cudaMemcpyHostToDevice, stream));
    auto run = [&](DeviceRunner<float, float>& r, PlanMemory& pm, float* out, bool capture) {
      const auto plan = plan_hybrid_step<float, float>(
          shape, hybrid_step(r.cache, make_view(cu.data(), {S + 1}), make_view(slots.data(), {S})), S, exec,
          HybridPlanBuffers{pm.device, pm.staging, meta_bytes});
      auto p = r.params(dx.data(), out, S, cu, slots);
      p.cu_seqlens = {}, p.slots = {};  // the plan holds the step
      REQUIRE(supports(p, plan, exec));
      if (step == 0) r.reserve(hybrid_head_attention_workspace_bytes(p, plan, exec));
      if (!capture) {
        hybrid_head_attention(p, plan, exec, r.ws, r.ws_bytes);
        return;
      }
      if (!graph_exec) {
        RF_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        hybrid_head_attention(p, plan, exec, r.ws, r.ws_bytes);
        RF_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
        RF_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));
      }
      RF_CUDA_CHECK(cudaGraphLaunch(graph_exec, stream));
    };
    run(direct, pm_d, out_d.data(), false);
    run(graphed, pm_g, out_g.data(), true);
    RF_CUDA_CHECK(cudaStreamSynchronize(stream));  // the staging is rewritten by the next plan
    const std::vector<float> a = out_d.download(), b = out_g.download();
    REQUIRE(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
    for (float o : a) REQUIRE(o != -7.f);
    const std::vector<Step> batch = {{0, 1}, {1, 1}};
    PackedBatch(xs, done_d, batch, direct.slot_of).advance(direct.cache, done_d, batch);
    PackedBatch(xs, done_g, batch, graphed.slot_of).advance(graphed.cache, done_g, batch);
  }
  REQUIRE(dump(direct.cache) == dump(graphed.cache));
  cudaGraphExecDestroy(graph_exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
