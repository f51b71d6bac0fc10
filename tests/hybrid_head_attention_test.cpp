// HybridHeadAttention against a plain double-precision reference of one Llama attention layer
// (GQA, rotate_half RoPE, causal softmax), of spec section 3's recurrent group (causal conv, low-rank
// softplus Δ, selective scan with g readers, D) and of the streaming sink/window mask, computed
// over each whole sequence from position 0. Every schedule (one prefill, chunked prefill, prefill +
// token-by-token decode, sequences batched or alone) must reproduce the same reference; plus the
// capacity error (cache and out bit-identical), snapshot/restore and fork. Every storage type, every
// ISA, head_dim 64 (what the attention op is compiled for). The planned engine runner also counts
// heap allocations around its core calls (this file replaces the global operator new).
#if defined(__GNUC__) && !defined(__clang__)
// GCC pairs operator new with operator delete by name and, once they are inlined, warns that our
// delete frees what our new took from malloc: a false positive for a replacement pair.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "recurformer/cpu/hybrid_head_attention.hpp"
#include "support/hybrid_layer_model.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

// Counts heap allocations while armed: a planned layer call must make none.
namespace {
std::atomic<bool> g_count_allocs{false};
std::atomic<long> g_allocs{0};
}  // namespace
// Every replaceable form but the aligned ones (left to the runtime on both sides), so whatever
// new allocated, any delete frees (Catch2 allocates with nothrow new; ASan checks the pairing).
namespace {
void* counted_malloc(std::size_t n) noexcept {
  if (g_count_allocs.load(std::memory_order_relaxed)) g_allocs.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void* counted_new(std::size_t n) {
  if (void* p = counted_malloc(n)) return p;
  throw std::bad_alloc();
}
}  // namespace
void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

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
  bool planned = false;  // true: each step planned once (plan_hybrid_step), the layer run from it
  std::vector<unsigned char> meta;

  Runner(const Model<TW>& model, int slots, int64_t capacity, int64_t page_size = 0)
      : m(model), cache(model.cache_config(slots, capacity, page_size)) {
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
    cache.reserve(rftest::cview(pb.slots), rftest::cview(pb.counts));
    if (planned) {
      const int64_t n = p.x.shape[0];
      const HybridStep st = hybrid_step(cache, p.cu_seqlens, p.slots);
      const HybridStepShape sh = hybrid_step_shape(cache, kNq, kRank);
      meta.resize(hybrid_step_metadata_bytes(sh, st, n));
      const HybridStepPlan<T, TW> plan =
          plan_hybrid_step<T, TW>(sh, st, n, exec, HybridPlanBuffers{meta.data(), nullptr, meta.size()});
      p.cu_seqlens = {}, p.slots = {};
      REQUIRE(supports(p, plan, exec));
      ws.resize(hybrid_head_attention_workspace_bytes(p, plan, exec));
      hybrid_head_attention(p, plan, exec, ws.data(), ws.size());
    } else {
      REQUIRE(supports(p, exec));
      ws.resize(hybrid_head_attention_workspace_bytes(p, exec));
      hybrid_head_attention(p, exec, ws.data(), ws.size());
    }
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
  auto agrees = [&](const HybridHeadAttentionParams<T, T>& q) {
    REQUIRE_FALSE(supports(q, exec));
    rftest::require_agrees(supports(q, exec), [&] { hybrid_head_attention(q, exec, ws.data(), ws.size()); });
  };
  agrees(p);
  REQUIRE(dump() == before);
  for (float o : out) REQUIRE(o == -7.f);
  // Other bad inputs: named, and nothing written.
  std::vector<int32_t> dup = {0, 0};
  auto pd = r.params(x, out, cu, dup);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pd, exec, ws.data(), ws.size()), Catch::Contains("twice"));
  agrees(pd);
  const std::vector<int32_t> bad_cu = {0, 2, 3}, cu2 = {0, 1, 2};
  auto pw = r.params(x, out, bad_cu, slots);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pw, exec, ws.data(), ws.size()), Catch::Contains("cu_seqlens"));
  agrees(pw);
  std::vector<float> x2(size_t(2 * kDModel), 0.5f), out2(x2.size(), -7.f);
  auto pr = r.params(x2, out2, cu2, slots);
  pr.weights.n_recurrent = 0;
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), ws.size()), Catch::Contains("recurrent"));
  agrees(pr);
  pr = r.params(x2, out2, cu2, slots);
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), 100), Catch::Contains("workspace"));
  REQUIRE(supports(pr, exec));  // the workspace is the caller's to size: not a question for supports()
  pr.n_q = 4;
  REQUIRE_THROWS_WITH(hybrid_head_attention(pr, exec, ws.data(), ws.size()), Catch::Contains("n_q"));
  agrees(pr);
  REQUIRE(dump() == before);
  for (float o : out2) REQUIRE(o == -7.f);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention over a step plan == the one-shot call, bit for bit; supports(p, plan) agrees with it",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::attention, K::recurrent, K::streaming}}, true);
  std::vector<std::vector<float>> xs;
  for (int64_t L : kLens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  for (const auto& schedule : {chunked(), prefill_then_decode()}) {
    Runner<T, T> once(m, int(kLens.size()), 40), planned(m, int(kLens.size()), 40);
    planned.planned = true;
    require_same_outputs(once, planned, xs, schedule);
  }

  // A plan for 3 tokens of slot 0, made on the calling thread.
  Runner<T, T> r(m, 2, 12), other(m, 2, 12);
  std::vector<float> x(size_t(3 * kDModel), 0.5f), out(x.size(), -7.f);
  const std::vector<int32_t> cu = {0, 3}, slots = {0};
  HybridHeadAttentionParams<T, T> p = r.params(x, out, cu, slots);
  r.cache.reserve(rftest::cview(slots), rftest::cview(std::vector<int32_t>{3}));
  const HybridStepShape sh = hybrid_step_shape(r.cache, kNq, kRank);
  const HybridStep st = hybrid_step(r.cache, p.cu_seqlens, p.slots);
  std::vector<unsigned char> meta(hybrid_step_metadata_bytes(sh, st, 3)), ws(1 << 22);
  const HybridStepPlan<T, T> plan =
      plan_hybrid_step<T, T>(sh, st, 3, CpuExec{}, HybridPlanBuffers{meta.data(), nullptr, meta.size()});
  auto agrees = [&](const HybridHeadAttentionParams<T, T>& q, const HybridStepPlan<T, T>& pl, CpuExec ex,
                    const char* what) {
    REQUIRE_THROWS_WITH(hybrid_head_attention(q, pl, ex, ws.data(), ws.size()), Catch::Contains(what));
    REQUIRE_FALSE(supports(q, pl, ex));
    rftest::require_agrees(supports(q, pl, ex), [&] { hybrid_head_attention(q, pl, ex, ws.data(), ws.size()); });
  };
  agrees(p, plan, CpuExec{}, "leave them empty");  // the step given twice
  p.cu_seqlens = {}, p.slots = {};
  agrees(p, HybridStepPlan<T, T>{}, CpuExec{}, "the plan is empty");
  agrees(p, plan, CpuExec{&r.pool}, "runs on 2 threads but the plan's scratch was sized for 1");
  HybridHeadAttentionParams<T, T> q = p;
  q.cache = &other.cache;
  agrees(q, plan, CpuExec{}, "another cache's lengths");
  q = p;
  q.n_q = 4;
  agrees(q, plan, CpuExec{}, "n_q");
  q = p;
  std::vector<float> x2(size_t(2 * kDModel), 0.5f), out2(x2.size(), -7.f);
  q.x = make_view(x2.data(), {2, int64_t(kDModel)}), q.out = make_view(out2.data(), {2, int64_t(kDModel)});
  agrees(q, plan, CpuExec{}, "the plan is for 3");
  for (float o : out) REQUIRE(o == -7.f);
  REQUIRE_THROWS_WITH(hybrid_head_attention(p, plan, CpuExec{}, ws.data(), 100), Catch::Contains("workspace"));
  REQUIRE(supports(p, plan, CpuExec{}));  // the workspace is the caller's to size
  hybrid_head_attention(p, plan, CpuExec{}, ws.data(), ws.size());
  REQUIRE(out[0] != -7.f);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention snapshot/restore and fork reproduce outputs",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::recurrent, K::attention, K::streaming}}, true);
  Runner<T, T> r(m, 3, 30);
  check_snapshot_and_fork(r);
}

TEMPLATE_LIST_TEST_CASE("HybridHeadAttention over a paged HybridCache == over contiguous slots, bit for bit",
                        "[hybrid_head_attention]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::attention, K::windowed, K::attention}}, true);
  std::vector<std::vector<float>> xs;
  for (int64_t L : kLens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  for (const auto& schedule : {one_prefill(), chunked(), prefill_then_decode(), alone()}) {
    Runner<T, T> contiguous(m, 3, 40), paged(m, 3, 40, 3);  // interleaved steps interleave the pages
    contiguous.slot_of = paged.slot_of = {2, 0};
    require_same_outputs(contiguous, paged, xs, schedule);
    REQUIRE(paged.cache.pages_used() == (20 + 2) / 3 + (13 + 2) / 3);
  }
  // Speculative rollback, and a fork that shares its pages and copies the shared half-full one.
  Runner<T, T> forked(m, 3, 30, 5);  // the fork at 12 tokens shares a half-full page
  check_snapshot_and_fork(forked);
  REQUIRE(forked.cache.page_of(2, 0) == forked.cache.page_of(0, 0));  // the full pages stay shared
  REQUIRE(forked.cache.page_of(2, 12) != forked.cache.page_of(0, 12));
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

namespace {

// An inference engine's use of the layer core (no HybridCache): its own projections, written as
// column blocks of one fused [tokens, q | k | v | dt_low] buffer; its own K/V as a pool of pages of
// 4 tokens handed out from a shuffled free list as sequences grow; its own states, rings and lengths.
template <class T, class TW>
struct EngineRunner {
  static constexpr int64_t kPage = 4;
  const Model<TW>& m;
  int slots;
  int64_t capacity;
  std::vector<HeadKind> kinds;
  int64_t nA = 0, nState = 0, nRing = 0, ring = 0, pages = 0;
  std::vector<T> k_pool, v_pool, conv, ring_k, ring_v;
  std::vector<float> ssm;
  std::vector<int32_t> lengths, free_pages;
  std::vector<std::vector<int32_t>> pages_of;  // per slot
  std::vector<int> slot_of;
  ThreadPool pool{2};
  bool threaded = true;
  // Plan the step once (plan_hybrid_step) with a shape wider than this layer, as a model whose
  // largest layer has every kind, and run the core from the plan with no allocation.
  bool planned = false;

  EngineRunner(const Model<TW>& model, int n_slots, int64_t cap)
      : m(model), slots(n_slots), capacity(cap), kinds(model.layout.groups) {
    for (HeadKind k : kinds) nA += k == K::attention, nState += has_recurrent_state(k), nRing += has_stream_ring(k);
    ring = std::min<int64_t>(cap, kSink + kWindow);
    pages = slots * ((cap + kPage - 1) / kPage) + 5;
    k_pool.assign(size_t(pages * nA * kPage * kHd), T(NAN));  // never-written rows must never be read
    v_pool = k_pool;
    ssm.assign(size_t(slots * nState * kHd * kHd), 0.f);
    conv.assign(size_t(slots * nState * (kConv - 1) * kHd), T(0.f));
    ring_k.assign(size_t(slots * nRing * ring * kHd), T(0.f));
    ring_v = ring_k;
    lengths.assign(size_t(slots), 0);
    pages_of.resize(size_t(slots));
    for (int32_t p = 0; p < pages; ++p) free_pages.push_back(p);
    std::shuffle(free_pages.begin(), free_pages.end(), rftest::rng());
    for (int s = 0; s < slots; ++s) slot_of.push_back(s);
  }

  std::vector<float> step(const std::vector<std::vector<float>>& xs, std::vector<int64_t>& done,
                          const std::vector<Step>& batch) {
    const PackedBatch pb(xs, done, batch, slot_of);
    const int64_t n = int64_t(pb.x.size()) / kDModel, S = int64_t(batch.size());
    CpuExec exec{threaded ? &pool : nullptr};
    // Pages for the new tokens, then the step's page table.
    int64_t max_pages = 1;
    for (int64_t s = 0; s < S; ++s) {
      std::vector<int32_t>& pg = pages_of[size_t(pb.slots[size_t(s)])];
      while (int64_t(pg.size()) * kPage < lengths[size_t(pb.slots[size_t(s)])] + pb.counts[size_t(s)]) {
        pg.push_back(free_pages.back());
        free_pages.pop_back();
      }
      max_pages = std::max<int64_t>(max_pages, int64_t(pg.size()));
    }
    std::vector<int32_t> table(size_t(S * max_pages), -1);
    for (int64_t s = 0; s < S; ++s) {
      const std::vector<int32_t>& pg = pages_of[size_t(pb.slots[size_t(s)])];
      std::copy(pg.begin(), pg.end(), table.begin() + s * max_pages);
    }
    // Projections into one fused buffer.
    const int64_t dq = kNq * kHd, dkv = int64_t(kinds.size()) * kHd, dt = nState * kRank;
    const int64_t ld = dq + 2 * dkv + dt;
    std::vector<float> fused(size_t(n * ld)), heads(size_t(n * dq)), out(pb.x.size());
    const HybridAttentionWeights<TW> w = m.weights();
    std::vector<unsigned char> lin_ws;
    auto project = [&](View<const TW, 2> wt, View<const TW, 1> bias, int64_t col, CpuExec e) {
      LinearParams<float, TW> lp{make_view(pb.x.data(), {n, int64_t(kDModel)}), wt, bias,
                                 make_strided_view(fused.data() + col, {n, wt.shape[0]}, {ld, int64_t(1)})};
      lin_ws.resize(linear_workspace_bytes(lp, e));
      linear(lp, e, lin_ws.data(), lin_ws.size());
    };
    project(w.wq, w.bq, 0, exec);
    project(w.wk, w.bk, dq, exec);
    project(w.wv, w.bv, dq + dkv, exec);
    for (int64_t i = 0; i < nState; ++i)
      project(w.recurrent[i].dt_down, {}, dq + 2 * dkv + i * kRank, n == 1 ? CpuExec{} : exec);
    auto cols = [&](int64_t col, int64_t width) {
      return make_strided_view(const_cast<const float*>(fused.data()) + col, {n, width}, {ld, int64_t(1)});
    };
    HybridAttentionCoreParams<T, TW> cp;
    cp.q = cols(0, dq), cp.k = cols(dq, dkv), cp.v = cols(dq + dkv, dkv);
    if (nState) cp.dt_low = cols(dq + 2 * dkv, dt);
    cp.out = make_view(heads.data(), {n, dq});
    cp.recurrent = w.recurrent;
    cp.n_recurrent = w.n_recurrent;
    cp.cache.kinds = make_view(const_cast<const HeadKind*>(kinds.data()), {int64_t(kinds.size())});
    cp.cache.k = make_view(k_pool.data(), {pages, nA, kPage, int64_t(kHd)});
    cp.cache.v = make_view(v_pool.data(), {pages, nA, kPage, int64_t(kHd)});
    cp.cache.ssm_states = make_view(ssm.data(), {int64_t(slots), nState, int64_t(kHd), int64_t(kHd)});
    cp.cache.conv_states = make_view(conv.data(), {int64_t(slots), nState, int64_t(kConv - 1), int64_t(kHd)});
    cp.cache.ring_k = make_view(ring_k.data(), {int64_t(slots), nRing, ring, int64_t(kHd)});
    cp.cache.ring_v = make_view(ring_v.data(), {int64_t(slots), nRing, ring, int64_t(kHd)});
    cp.cache.sink = kSink, cp.cache.window = kWindow;
    cp.step.cu_seqlens = make_view(pb.cu.data(), {S + 1});
    cp.step.slots = make_view(pb.slots.data(), {S});
    cp.step.lengths = make_view(const_cast<const int32_t*>(lengths.data()), {int64_t(slots)});
    cp.step.page_table = make_view(const_cast<const int32_t*>(table.data()), {S, max_pages});
    cp.n_q = kNq, cp.head_dim = kHd;
    cp.inv_freq = make_view(m.inv_freq.data(), {int64_t(m.inv_freq.size())});
    if (planned) {
      HybridStepShape sh;
      sh.n_q = kNq, sh.n_kv = int64_t(kinds.size()), sh.head_dim = kHd;
      sh.max_attention_groups = sh.max_state_groups = sh.max_ring_groups = sh.n_kv;
      sh.max_dt_rank = kRank + 3;
      sh.kv_keys = kPage, sh.kv_pages = pages;
      sh.ring = ring, sh.sink = kSink, sh.window = kWindow;
      const HybridStep st = cp.step;
      std::vector<unsigned char> meta(hybrid_step_metadata_bytes(sh, st, n));
      const HybridStepPlan<T, TW> plan =
          plan_hybrid_step<T, TW>(sh, st, n, exec, HybridPlanBuffers{meta.data(), nullptr, meta.size()});
      cp.step = HybridStep{};
      REQUIRE(supports(cp, plan, exec));
      std::vector<unsigned char> ws(plan.workspace_bytes);
      g_allocs = 0;
      g_count_allocs = true;
      hybrid_attention_core(cp, plan, exec, ws.data(), ws.size());
      g_count_allocs = false;
      REQUIRE(g_allocs == 0);
    } else {
      REQUIRE(supports(cp, exec));
      std::vector<unsigned char> ws(hybrid_attention_core_workspace_bytes(cp, exec));
      hybrid_attention_core(cp, exec, ws.data(), ws.size());
    }
    LinearParams<float, TW> lo{make_view(const_cast<const float*>(heads.data()), {n, dq}), w.wo, {},
                               make_view(out.data(), {n, int64_t(kDModel)})};
    lin_ws.resize(linear_workspace_bytes(lo, exec));
    linear(lo, exec, lin_ws.data(), lin_ws.size());
    for (int64_t s = 0; s < S; ++s) lengths[size_t(pb.slots[size_t(s)])] += pb.counts[size_t(s)];
    for (const Step& b : batch) done[size_t(b.seq)] += b.count;
    return out;
  }
};

}  // namespace

TEMPLATE_LIST_TEST_CASE("hybrid_attention_core with an engine's own projections and paged K/V == the layer over a HybridCache, bit for bit",
                        "[hybrid_head_attention][core]", rftest::StorageTypes) {
  using T = TestType;
  Model<T> m({{K::windowed, K::recurrent, K::attention, K::streaming, K::attention, K::windowed}}, true);
  std::vector<std::vector<float>> xs;
  for (int64_t L : kLens) xs.push_back(rftest::random_vector<float>(size_t(L * kDModel)));
  for (const auto& schedule : {chunked(), prefill_then_decode(), one_prefill()}) {
    Runner<T, T> layer(m, 3, 40);
    EngineRunner<T, T> engine(m, 3, 40), planned(m, 3, 40);
    planned.planned = true;
    layer.slot_of = engine.slot_of = planned.slot_of = {2, 0};
    const auto want = run_schedule(layer, xs, schedule), got = run_schedule(engine, xs, schedule);
    const auto got_planned = run_schedule(planned, xs, schedule);
    for (size_t s = 0; s < xs.size(); ++s) {
      REQUIRE(std::memcmp(got[s].data(), want[s].data(), got[s].size() * 4) == 0);
      REQUIRE(std::memcmp(got_planned[s].data(), want[s].data(), got[s].size() * 4) == 0);
    }
  }
}

TEST_CASE("hybrid_attention_core: bad steps are named and write nothing", "[hybrid_head_attention][core]") {
  Model<float> m({{K::attention, K::recurrent, K::streaming}}, true);
  EngineRunner<float, float> e(m, 2, 12);
  std::vector<std::vector<float>> xs = {rftest::random_vector<float>(size_t(20 * kDModel)),
                                        rftest::random_vector<float>(size_t(20 * kDModel))};
  std::vector<int64_t> done = {0, 0};
  e.step(xs, done, {{0, 5}, {1, 3}});
  const auto k_before = e.k_pool, ring_before = e.ring_k;
  const auto ssm_before = e.ssm;
  // 9 more tokens need 4 pages for sequence 0, but its table row has only its 2 (an engine's bug).
  const std::vector<int32_t> two = e.pages_of[0];
  std::vector<int32_t> table = {two[0], two[1]}, cu = {0, 9}, slot = {0};
  std::vector<float> x(size_t(9 * kDModel), 0.5f), qkv(size_t(9 * (kNq + 6) * kHd), 0.25f), dt(size_t(9 * kRank), 0.1f),
      out(size_t(9 * kNq * kHd), -7.f);
  HybridAttentionCoreParams<float, float> cp;
  const HybridAttentionWeights<float> w = m.weights();
  cp.q = make_view(const_cast<const float*>(qkv.data()), {9, int64_t(kNq * kHd)});
  cp.k = make_view(const_cast<const float*>(qkv.data()) + 9 * kNq * kHd, {9, int64_t(3 * kHd)});
  cp.v = make_view(const_cast<const float*>(qkv.data()) + 9 * (kNq + 3) * kHd, {9, int64_t(3 * kHd)});
  cp.dt_low = make_view(const_cast<const float*>(dt.data()), {9, int64_t(kRank)});
  cp.out = make_view(out.data(), {9, int64_t(kNq * kHd)});
  cp.recurrent = w.recurrent, cp.n_recurrent = w.n_recurrent;
  cp.cache.kinds = make_view(const_cast<const HeadKind*>(e.kinds.data()), {3});
  cp.cache.k = make_view(e.k_pool.data(), {e.pages, 1, EngineRunner<float, float>::kPage, int64_t(kHd)});
  cp.cache.v = make_view(e.v_pool.data(), {e.pages, 1, EngineRunner<float, float>::kPage, int64_t(kHd)});
  cp.cache.ssm_states = make_view(e.ssm.data(), {2, 1, int64_t(kHd), int64_t(kHd)});
  cp.cache.conv_states = make_view(e.conv.data(), {2, 1, int64_t(kConv - 1), int64_t(kHd)});
  cp.cache.ring_k = make_view(e.ring_k.data(), {2, 1, e.ring, int64_t(kHd)});
  cp.cache.ring_v = make_view(e.ring_v.data(), {2, 1, e.ring, int64_t(kHd)});
  cp.cache.sink = kSink, cp.cache.window = kWindow;
  cp.step.cu_seqlens = make_view(const_cast<const int32_t*>(cu.data()), {2});
  cp.step.slots = make_view(const_cast<const int32_t*>(slot.data()), {1});
  cp.step.lengths = make_view(const_cast<const int32_t*>(e.lengths.data()), {2});
  cp.step.page_table = make_view(const_cast<const int32_t*>(table.data()), {1, 2});
  cp.n_q = kNq, cp.head_dim = kHd;
  cp.inv_freq = make_view(m.inv_freq.data(), {int64_t(m.inv_freq.size())});
  std::vector<unsigned char> ws(1 << 22);
  auto untouched = [&] {
    REQUIRE(e.k_pool.size() == k_before.size());
    REQUIRE(std::memcmp(e.k_pool.data(), k_before.data(), k_before.size() * 4) == 0);  // NaN-safe
    REQUIRE(e.ring_k == ring_before);
    REQUIRE(e.ssm == ssm_before);
    for (float o : out) REQUIRE(o == -7.f);
  };
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("holds 5 tokens and cannot take 9 more: its K/V hold 8 (page_table pages"));
  auto agrees = [&] {
    REQUIRE_FALSE(supports(cp, CpuExec{}));
    rftest::require_agrees(supports(cp, CpuExec{}), [&] { hybrid_attention_core(cp, CpuExec{}, ws.data(), ws.size()); });
  };
  agrees();
  untouched();
  table = {two[0], int32_t(e.pages)};  // a page outside the pool
  cu = {0, 3};
  cp.q.shape[0] = cp.k.shape[0] = cp.v.shape[0] = cp.dt_low.shape[0] = cp.out.shape[0] = 3;
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, CpuExec{}, ws.data(), ws.size()), Catch::Contains("page_table[0, 1]"));
  agrees();
  untouched();
  table = {two[0], two[1]};
  std::vector<int32_t> bad_slot = {2};
  cp.step.slots = make_view(const_cast<const int32_t*>(bad_slot.data()), {1});
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, CpuExec{}, ws.data(), ws.size()), Catch::Contains("has slot 2"));
  agrees();
  cp.step.slots = make_view(const_cast<const int32_t*>(slot.data()), {1});
  cp.dt_low = {};
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, CpuExec{}, ws.data(), ws.size()), Catch::Contains("dt_low"));
  agrees();
  cp.n_recurrent = 2;
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("1 recurrent and windowed groups but recurrent has 2 entries"));
  agrees();
  untouched();
  cp.n_recurrent = 1;
  cp.dt_low = make_view(const_cast<const float*>(dt.data()), {3, int64_t(kRank)});

  // The same through a step plan: the step's errors come from the plan, the layer's from the call.
  HybridStepShape sh;
  sh.n_q = kNq, sh.n_kv = 3, sh.head_dim = kHd;
  sh.max_attention_groups = sh.max_state_groups = sh.max_ring_groups = 1;
  sh.max_dt_rank = kRank;
  sh.kv_keys = EngineRunner<float, float>::kPage, sh.kv_pages = e.pages;
  sh.ring = e.ring, sh.sink = kSink, sh.window = kWindow;
  HybridStep st = cp.step;
  cp.step = HybridStep{};
  std::vector<unsigned char> meta(1 << 16);
  const HybridPlanBuffers buf{meta.data(), nullptr, meta.size()};
  std::vector<int32_t> cu9 = {0, 9};
  HybridStep st9 = st;
  st9.cu_seqlens = make_view(const_cast<const int32_t*>(cu9.data()), {2});
  REQUIRE_THROWS_WITH((plan_hybrid_step<float, float>(sh, st9, 9, CpuExec{}, buf)),
                      Catch::Contains("holds 5 tokens and cannot take 9 more"));
  table = {two[0], int32_t(e.pages)};
  REQUIRE_THROWS_WITH((plan_hybrid_step<float, float>(sh, st, 3, CpuExec{}, buf)),
                      Catch::Contains("page_table[0, 1] is " + std::to_string(e.pages) + ", outside the pool of " + std::to_string(e.pages) + " pages"));
  table = {two[0], two[1]};
  REQUIRE_THROWS_WITH((plan_hybrid_step<float, float>(sh, st, 3, CpuExec{}, HybridPlanBuffers{meta.data(), nullptr, 64})),
                      Catch::Contains("hybrid_step_metadata_bytes"));
  REQUIRE_THROWS_WITH((plan_hybrid_step<float, float>(sh, st, 3, CpuExec{}, HybridPlanBuffers{meta.data(), ws.data(), meta.size()})),
                      Catch::Contains("host_staging is given on the CPU"));
  HybridStepShape no_pages = sh;
  no_pages.kv_pages = 0;
  REQUIRE_THROWS_WITH((plan_hybrid_step<float, float>(no_pages, st, 3, CpuExec{}, buf)),
                      Catch::Contains("the step has a page table but the shape's kv_pages is 0"));
  const HybridStepPlan<float, float> plan = plan_hybrid_step<float, float>(sh, st, 3, CpuExec{}, buf);
  REQUIRE(plan.workspace_bytes > 0);
  // supports(p, plan, exec) answers every failure of the planned call but the workspace's size.
  auto plan_agrees = [&](const HybridStepPlan<float, float>& pl, CpuExec ex) {
    REQUIRE_FALSE(supports(cp, pl, ex));
    rftest::require_agrees(supports(cp, pl, ex), [&] { hybrid_attention_core(cp, pl, ex, ws.data(), ws.size()); });
  };
  cp.step = st;
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, plan, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("leave p.step empty"));
  plan_agrees(plan, CpuExec{});
  cp.step = HybridStep{};
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, plan, CpuExec{}, ws.data(), plan.workspace_bytes - 1),
                      Catch::Contains("plan.workspace_bytes"));
  cp.q.shape[0] = cp.k.shape[0] = cp.v.shape[0] = cp.dt_low.shape[0] = cp.out.shape[0] = 2;
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, plan, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("q has 2 tokens but the plan is for 3"));
  plan_agrees(plan, CpuExec{});
  cp.q.shape[0] = cp.k.shape[0] = cp.v.shape[0] = cp.dt_low.shape[0] = cp.out.shape[0] = 3;
  HybridStepShape small = sh;
  small.max_ring_groups = 0;
  const HybridStepPlan<float, float> small_plan = plan_hybrid_step<float, float>(small, st, 3, CpuExec{}, buf);
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, small_plan, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("1 ring (streaming or windowed) groups, more than the plan's shape allows (0)"));
  plan_agrees(small_plan, CpuExec{});
  HybridStepShape other_pool = sh;
  other_pool.kv_pages = e.pages + 1;
  const HybridStepPlan<float, float> pool_plan = plan_hybrid_step<float, float>(other_pool, st, 3, CpuExec{}, buf);
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, pool_plan, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("the plan's shape has kv_pages " + std::to_string(e.pages + 1)));
  plan_agrees(pool_plan, CpuExec{});
  HybridStepShape rank = sh;
  rank.max_dt_rank = kRank - 1;
  const HybridStepPlan<float, float> rank_plan = plan_hybrid_step<float, float>(rank, st, 3, CpuExec{}, buf);
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, rank_plan, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("more than the plan's max_dt_rank"));
  plan_agrees(rank_plan, CpuExec{});
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, HybridStepPlan<float, float>{}, CpuExec{}, ws.data(), ws.size()),
                      Catch::Contains("the plan is empty"));
  plan_agrees(HybridStepPlan<float, float>{}, CpuExec{});
  REQUIRE_THROWS_WITH(hybrid_attention_core(cp, plan, CpuExec{&e.pool}, ws.data(), ws.size()),
                      Catch::Contains("runs on 2 threads but the plan's scratch was sized for 1"));
  plan_agrees(plan, CpuExec{&e.pool});
  untouched();
  REQUIRE(supports(cp, plan, CpuExec{}));
  hybrid_attention_core(cp, plan, CpuExec{}, ws.data(), ws.size());  // and the good plan runs
  REQUIRE(out[0] != -7.f);
}
