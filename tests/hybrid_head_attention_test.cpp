// HybridHeadAttention against a plain double-precision reference of one Llama attention layer
// (GQA, rotate_half RoPE, causal softmax), of spec section 3's recurrent group (causal conv, low-rank
// softplus Δ, selective scan with g readers, D) and of the streaming sink/window mask, computed
// over each whole sequence from position 0. Every schedule (one prefill, chunked prefill, prefill +
// token-by-token decode, sequences batched or alone) must reproduce the same reference; plus the
// capacity error (cache and out bit-identical), snapshot/restore and fork. Every storage type, every
// ISA, head_dim 64 (what the attention op is compiled for).
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "recurformer/layers/hybrid_head_attention.hpp"
#include "support/hybrid_layer_model.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

using namespace rftest::hybrid_layer;

// The CPU layer over a schedule (run_schedule): sequence s lives in slot slot_of[s] and takes its
// next tokens from xs[s]; step() runs one batch and advances the cache.
template <class T, class TW>
struct Runner {
  const Model<TW>& m;
  HybridCache<T> cache;
  std::vector<int> slot_of;
  std::vector<unsigned char> ws;
  ThreadPool pool{2};
  bool threaded = true;  // false: run on the calling thread (fast on a loaded 2-core CI machine)

  Runner(const Model<TW>& model, int slots, int64_t capacity)
      : m(model), cache(model.cache_config(slots, capacity)) {
    for (int s = 0; s < slots; ++s) slot_of.push_back(s);
  }
  HybridHeadAttentionParams<T, TW> params(const std::vector<float>& x, std::vector<float>& out,
                                          const std::vector<int32_t>& cu, const std::vector<int32_t>& slots) {
    HybridHeadAttentionParams<T, TW> p;
    const int64_t n = int64_t(x.size()) / kDModel;
    p.x = make_view(x.data(), {n, kDModel});
    p.out = make_view(out.data(), {n, kDModel});
    p.weights = m.weights();
    p.cache = &cache;
    p.layer = 0;
    p.n_q = kNq;
    p.cu_seqlens = make_view(cu.data(), {int64_t(cu.size())});
    p.slots = make_view(slots.data(), {int64_t(slots.size())});
    p.inv_freq = make_view(m.inv_freq.data(), {int64_t(m.inv_freq.size())});
    return p;
  }
  // One batch; returns the outputs packed like the input.
  std::vector<float> step(const std::vector<std::vector<float>>& xs, std::vector<int64_t>& done,
                          const std::vector<Step>& batch) {
    const PackedBatch pb(xs, done, batch, slot_of);
    std::vector<float> out(pb.x.size(), -7.f);
    auto p = params(pb.x, out, pb.cu, pb.slots);
    CpuExec exec{threaded ? &pool : nullptr};
    ws.resize(hybrid_head_attention_workspace_bytes(p, exec));
    hybrid_head_attention(p, exec, ws.data(), ws.size());
    pb.advance(cache, done, batch);
    return out;
  }
};

// Tolerance: the plain per-dtype budget. q, k, v, the head outputs and Δ are each rounded once to
// T, but Wo averages the rounding errors of 384 head outputs, so no extra factor is needed.
template <class T, class TW>
void check_schedule(const Model<TW>& m, const std::vector<int64_t>& lens,
                    const std::vector<std::vector<Step>>& schedule, const char* what) {
  std::vector<std::vector<float>> xs;
  for (int64_t L : lens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  std::vector<std::vector<double>> refs;
  for (size_t s = 0; s < xs.size(); ++s) refs.push_back(reference(m, xs[s], lens[s]));
  rftest::for_each_isa([&] {
    Runner<T, TW> r(m, int(lens.size()) + 1, 40);
    // Two threads under the best ISA; the other ISAs' bodies are the same code on one thread.
    r.threaded = cpu::active_isa() == cpu::detected_isa();
    r.slot_of = {};
    for (size_t s = 0; s < lens.size(); ++s) r.slot_of.push_back(int(lens.size() - s));  // not the identity
    const auto outs = run_schedule(r, xs, schedule);
    for (size_t s = 0; s < xs.size(); ++s) {
      REQUIRE(int64_t(outs[s].size()) == lens[s] * kDModel);
      rftest::check_close<T>(std::string(what) + ", sequence " + std::to_string(s), outs[s], refs[s]);
    }
  });
}

template <class T>
void all_schedules(const LayerLayout& layout, bool biases) {
  Model<T> m(layout, biases);
  check_schedule<T>(m, kLens, one_prefill(), "one prefill");
  check_schedule<T>(m, kLens, chunked(), "chunked prefill");
  check_schedule<T>(m, kLens, prefill_then_decode(), "prefill + decode");
  check_schedule<T>(m, kLens, alone(), "sequences alone");
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention all-attention layout == Llama attention reference",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  all_schedules<TestType>({{K::attention, K::attention, K::attention}}, false);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention all-recurrent layout == spec section 3 reference",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  all_schedules<TestType>({{K::recurrent, K::recurrent, K::recurrent}}, true);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention streaming groups == sink/window reference",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  all_schedules<TestType>({{K::streaming, K::attention, K::streaming}}, true);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention mixed layouts == reference", "[hybrid_head_attention]",
                        rftest::StorageTypes) {
  all_schedules<TestType>({{K::recurrent, K::streaming, K::attention}}, true);
  all_schedules<TestType>({{K::recurrent, K::attention}}, true);  // n_kv 2, g 3
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention windowed groups == streaming + alpha x recurrent reference",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  all_schedules<TestType>({{K::windowed, K::streaming, K::windowed}}, true);
  // every kind in one layer: n_kv 6, g 1 (MHA)
  all_schedules<TestType>({{K::windowed, K::recurrent, K::attention, K::streaming, K::attention, K::windowed}}, false);
}

TEST_CASE("HybridHeadAttention: a windowed group with alpha = 0 is exactly its streaming group",
          "[hybrid_head_attention]") {
  // What `convert --kind windowed` relies on: the converted model starts as the streaming one, bit for bit.
  Model<float> w({{K::windowed, K::attention, K::windowed}}, true);
  for (auto& r : w.rec) std::fill(r.alpha.begin(), r.alpha.end(), 0.f);
  Model<float> s({{K::streaming, K::attention, K::streaming}}, true);
  s.wq = w.wq, s.wk = w.wk, s.wv = w.wv, s.wo = w.wo, s.bq = w.bq, s.bk = w.bk, s.bv = w.bv;
  std::vector<std::vector<float>> xs;
  for (int64_t L : kLens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  for (const auto& schedule : {chunked(), prefill_then_decode()}) {
    Runner<float, float> rw(w, int(kLens.size()), 40), rs(s, int(kLens.size()), 40);
    const auto ow = run_schedule(rw, xs, schedule), os = run_schedule(rs, xs, schedule);
    for (size_t i = 0; i < xs.size(); ++i) CHECK(ow[i] == os[i]);
  }
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention capacity error leaves cache and out bit-identical",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::attention, K::recurrent, K::streaming}}, true);
  Runner<T, T> r(m, 2, 12);
  std::vector<std::vector<float>> xs = {rftest::random_vector<float>(size_t(20 * kDModel)),
                                        rftest::random_vector<float>(size_t(20 * kDModel))};
  std::vector<int64_t> done = {0, 0};
  r.step(xs, done, {{0, 9}, {1, 4}});
  auto dump = [&] {
    std::vector<unsigned char> b;
    auto add = [&](const auto& v) {
      const auto* p = reinterpret_cast<const unsigned char*>(v.data);
      b.insert(b.end(), p, p + v.numel() * int64_t(sizeof(*v.data)));
    };
    add(r.cache.keys(0)), add(r.cache.values(0)), add(r.cache.ssm_states(0)), add(r.cache.conv_states(0));
    add(r.cache.stream_keys(0)), add(r.cache.stream_values(0)), add(r.cache.lengths());
    return b;
  };
  const auto before = dump();
  // Slot 1 could take 8 more, slot 0 only 3: a batch of (1: 2 tokens, 0: 4 tokens) must not touch
  // slot 1 either.
  std::vector<float> x(size_t(6 * kDModel), 0.5f), out(x.size(), -7.f);
  std::vector<int32_t> cu = {0, 2, 6}, slots = {1, 0};
  auto p = r.params(x, out, cu, slots);
  CpuExec exec{&r.pool};
  std::vector<unsigned char> ws(1 << 22);
  REQUIRE_THROWS_WITH(hybrid_head_attention(p, exec, ws.data(), ws.size()),
                      Catch::Contains("slot 0") && Catch::Contains("capacity 12"));
  REQUIRE(dump() == before);
  for (float o : out) REQUIRE(o == -7.f);
  // Other bad inputs: named, and nothing written.
  std::vector<int32_t> dup = {0, 0};
  auto pd = r.params(x, out, cu, dup);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pd, exec, ws.data(), ws.size()), Catch::Contains("twice"));
  const std::vector<int32_t> bad_cu = {0, 2, 3}, cu2 = {0, 1, 2};
  auto pw = r.params(x, out, bad_cu, slots);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pw, exec, ws.data(), ws.size()), Catch::Contains("cu_seqlens"));
  std::vector<float> x2(size_t(2 * kDModel), 0.5f), out2(x2.size(), -7.f);
  auto pr = r.params(x2, out2, cu2, slots);
  pr.weights.n_recurrent = 0;
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), ws.size()), Catch::Contains("recurrent"));
  pr = r.params(x2, out2, cu2, slots);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), 100), Catch::Contains("workspace"));
  pr.n_q = 4;
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), ws.size()), Catch::Contains("n_q"));
  REQUIRE(dump() == before);
  for (float o : out2) REQUIRE(o == -7.f);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention snapshot/restore and fork reproduce outputs",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::recurrent, K::attention, K::streaming}}, true);
  Runner<T, T> r(m, 3, 30);
  check_snapshot_and_fork(r);
}

TEST_CASE("HybridHeadAttention without cu_seqlens and slots: one sequence in slot 0",
          "[hybrid_head_attention]") {
  Model<float> m({{K::attention, K::recurrent, K::streaming}}, true);
  const int64_t L = 10;
  const std::vector<float> xs = rftest::random_vector<float>(size_t(L * kDModel));
  const std::vector<double> ref = reference(m, xs, L);
  Runner<float, float> r(m, 1, 16);
  std::vector<float> outs;
  CpuExec exec{&r.pool};
  for (int64_t begin : {int64_t(0), int64_t(9)}) {  // a prefill of 9, then one decode step
    const int64_t n = begin == 0 ? 9 : 1;
    const std::vector<float> x(xs.begin() + begin * kDModel, xs.begin() + (begin + n) * kDModel);
    std::vector<float> out(x.size(), -7.f);
    HybridHeadAttentionParams<float, float> p = r.params(x, out, {}, {});
    p.cu_seqlens = {};
    p.slots = {};
    std::vector<unsigned char> ws(hybrid_head_attention_workspace_bytes(p, exec));
    hybrid_head_attention(p, exec, ws.data(), ws.size());
    const std::vector<int32_t> slot = {0}, count = {int32_t(n)};
    r.cache.advance(make_view(slot.data(), {1}), make_view(count.data(), {1}));
    outs.insert(outs.end(), out.begin(), out.end());
  }
  rftest::check_close<float>("cu_seqlens and slots absent", outs, ref);
}
