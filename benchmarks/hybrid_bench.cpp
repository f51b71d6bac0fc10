// HybridHeadAttention decode on a Llama-3.2-1B attention layer (d_model 2048, 32 query heads, 8 KV
// heads, hd 64; bf16 weights), all-attention vs half of the KV groups recurrent (A R A R ...; d_state
// 64, dt_rank 8, conv 4), at contexts 4096 and 32768, for 1, 4 and 16 sequences decoding together,
// with a bf16 and an fp32 cache; and at 32768 with the attention groups' K/V in pages of 16 tokens
// (HybridCacheConfig::page_size), allocated round-robin across the sequences as a server's would be.
//
// The cache is brought to depth synthetically (K/V and states filled with a cheap pseudo-random
// pattern, lengths set with advance()), not by running a prefill; every iteration then decodes one
// token per sequence at that depth (the cache is not advanced, so the depth stays fixed).
// Counters: tokens/s; bytes/s of the memory the step must read (weights once per step, plus each
// sequence's K/V and states); cache_bytes_per_seq from the cache's own report, and spec_bytes_per_seq
// from the spec section 6 formula (they must be equal); compare bytes/s with BM_MemoryCopy in the
// same run.
#include <algorithm>
#include <cstring>
#include <memory>

#include "bench_util.hpp"
#include "recurformer/cpu/hybrid_head_attention.hpp"

using namespace recurformer;

namespace {

constexpr int kDModel = 2048, kNq = 32, kNkv = 8, kHd = 64, kRank = 8, kConv = 4;

// The layer's weights, bf16, generated once for all benchmarks.
struct Weights {
  std::vector<bfloat16> wq, wk, wv, wo;
  struct Rec {
    std::vector<bfloat16> dt_down, dt_up;
    std::vector<float> dt_bias, A, D, conv_w, conv_b;
  };
  std::vector<Rec> rec;
  std::vector<RecurrentGroupWeights<bfloat16>> rec_views;
  std::vector<float> inv_freq = rope_inv_freq(kHd, 500000.f);

  Weights() {
    const float a = 0.03f;
    wq = rfbench::random_vector<bfloat16>(size_t(kNq) * kHd * kDModel, -a, a, 1);
    wk = rfbench::random_vector<bfloat16>(size_t(kNkv) * kHd * kDModel, -a, a, 2);
    wv = rfbench::random_vector<bfloat16>(size_t(kNkv) * kHd * kDModel, -a, a, 3);
    wo = rfbench::random_vector<bfloat16>(size_t(kDModel) * kNq * kHd, -a, a, 4);
    rec.resize(kNkv);  // enough for any layout
    for (int j = 0; j < kNkv; ++j) {
      Rec& r = rec[size_t(j)];
      r.dt_down = rfbench::random_vector<bfloat16>(size_t(kRank) * kDModel, -a, a, 10 + j);
      r.dt_up = rfbench::random_vector<bfloat16>(size_t(kHd) * kRank, -0.1f, 0.1f, 20 + j);
      r.dt_bias = rfbench::random_vector<float>(kHd, -4.f, -2.f, 30 + j);
      r.A = rfbench::random_vector<float>(size_t(kHd) * kHd, -2.f, -0.1f, 40 + j);
      r.D = rfbench::random_vector<float>(kHd, -1.f, 1.f, 50 + j);
      r.conv_w = rfbench::random_vector<float>(size_t(kHd) * kConv, -0.5f, 0.5f, 60 + j);
      r.conv_b = rfbench::random_vector<float>(kHd, -0.1f, 0.1f, 70 + j);
      RecurrentGroupWeights<bfloat16> v;
      v.dt_down = make_view(const_cast<const bfloat16*>(r.dt_down.data()), {kRank, kDModel});
      v.dt_up = make_view(const_cast<const bfloat16*>(r.dt_up.data()), {kHd, kRank});
      v.dt_bias = make_view(const_cast<const float*>(r.dt_bias.data()), {kHd});
      v.A = make_view(const_cast<const float*>(r.A.data()), {kHd, kHd});
      v.D = make_view(const_cast<const float*>(r.D.data()), {kHd});
      v.conv_weight = make_view(const_cast<const float*>(r.conv_w.data()), {kHd, kConv});
      v.conv_bias = make_view(const_cast<const float*>(r.conv_b.data()), {kHd});
      rec_views.push_back(v);
    }
  }
  static const Weights& get() {
    static const Weights w;
    return w;
  }
};

// Cheap deterministic fill in [-0.5, 0.5) (never zeros, no denormals): a pseudo-random block of
// 2^16 + 7 values (an odd length, so rows do not repeat in step), tiled.
template <class U>
void fill(U* p, int64_t n, uint32_t seed) {
  const int64_t block = std::min<int64_t>(n, (int64_t(1) << 16) + 7);
  uint32_t s = seed * 2654435761u + 1;
  for (int64_t i = 0; i < block; ++i) {
    s = s * 1664525u + 1013904223u;
    p[i] = U(float(s >> 8) * (1.f / 16777216.f) - 0.5f);
  }
  for (int64_t i = block; i < n; i += block) std::memcpy(p + i, p, size_t(std::min(block, n - i)) * sizeof(U));
}

// range(0): 0 = all attention, 1 = half recurrent; range(1): context; range(2): sequences;
// range(3): K/V page size (0: contiguous).
template <class T>
void BM_HybridDecode(benchmark::State& st) {
  const bool half_rec = st.range(0) == 1;
  const int64_t ctx = st.range(1), page = st.range(3);
  const int batch = int(st.range(2));
  const Weights& W = Weights::get();

  HybridCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv = kNkv;
  cfg.head_dim = kHd;
  LayerLayout ll = LayerLayout::uniform(kNkv, HeadKind::attention);
  if (half_rec)
    for (int j = 1; j < kNkv; j += 2) ll.groups[size_t(j)] = HeadKind::recurrent;
  cfg.layout.layers = {ll};
  cfg.recurrent.d_state = kHd;
  cfg.recurrent.dt_rank = kRank;
  cfg.recurrent.conv_kernel = kConv;
  cfg.slots = batch;
  cfg.capacity = ctx + 1;
  cfg.page_size = page;
  HybridCache<T> cache(cfg);
  const size_t nb = static_cast<size_t>(batch);
  std::vector<int32_t> slots(nb), counts(nb), cu(nb + 1);
  for (int s = 0; s < batch; ++s) slots[size_t(s)] = s, cu[size_t(s) + 1] = s + 1;
  auto slots_view = make_view(const_cast<const int32_t*>(slots.data()), {int64_t(batch)});
  auto counts_view = make_view(const_cast<const int32_t*>(counts.data()), {int64_t(batch)});
  // Synthetic depth: every slot holds ctx tokens of pattern K/V and states. Paged, the slots take
  // their pages in turn, a page at a time, so each sequence's pages are scattered over the pool.
  for (int64_t t = 0; t < ctx; t += page ? page : ctx) {
    std::fill(counts.begin(), counts.end(), int32_t(page ? std::min(page, ctx - t) : ctx));
    cache.reserve(slots_view, counts_view);
    cache.advance(slots_view, counts_view);
  }
  for (View<T, 4> kv : {cache.keys(0), cache.values(0)}) fill(kv.data, kv.numel(), uint32_t(kv.numel() & 0xffff));
  if (half_rec) {
    View<float, 4> s = cache.ssm_states(0);
    fill(s.data, s.numel(), 7);
    View<T, 4> c = cache.conv_states(0);
    fill(c.data, c.numel(), 8);
  }
  std::fill(counts.begin(), counts.end(), 1);
  cache.reserve(slots_view, counts_view);  // the decoded token's page (the loop never advances)

  std::vector<float> x = rfbench::random_vector<float>(size_t(batch) * kDModel, -1.f, 1.f, 99);
  std::vector<float> out(x.size());
  HybridHeadAttentionParams<T, bfloat16> p;
  p.x = make_view(const_cast<const float*>(x.data()), {int64_t(batch), kDModel});
  p.out = make_view(out.data(), {int64_t(batch), kDModel});
  p.weights.wq = make_view(W.wq.data(), {int64_t(kNq) * kHd, kDModel});
  p.weights.wk = make_view(W.wk.data(), {int64_t(kNkv) * kHd, kDModel});
  p.weights.wv = make_view(W.wv.data(), {int64_t(kNkv) * kHd, kDModel});
  p.weights.wo = make_view(W.wo.data(), {kDModel, int64_t(kNq) * kHd});
  p.weights.recurrent = W.rec_views.data();
  p.weights.n_recurrent = ll.count(HeadKind::recurrent);
  p.cache = &cache;
  p.n_q = kNq;
  p.cu_seqlens = make_view(const_cast<const int32_t*>(cu.data()), {int64_t(batch) + 1});
  p.slots = make_view(const_cast<const int32_t*>(slots.data()), {int64_t(batch)});
  p.inv_freq = make_view(W.inv_freq.data(), {kHd / 2});
  const CpuExec exec = rfbench::cpu_exec();
  std::vector<unsigned char> ws(hybrid_head_attention_workspace_bytes(p, exec));

  for (auto _ : st) {
    hybrid_head_attention(p, exec, ws.data(), ws.size());  // the cache is not advanced: fixed depth
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }

  const int64_t n_attn = ll.count(HeadKind::attention), n_rec = ll.count(HeadKind::recurrent);
  const double weight_bytes =
      2.0 * (double(kNq + 2 * kNkv) * kHd * kDModel + double(kDModel) * kNq * kHd +
             double(n_rec) * (kRank * kDModel + kHd * kRank));
  const double cache_read = double(batch) * (double(n_attn) * 2 * kHd * double(ctx) * sizeof(T) +
                                             double(n_rec) * (2.0 * kHd * kHd * 4 + (kConv - 1) * kHd * sizeof(T)));
  rfbench::set_rate(st, "tokens/s", double(batch));
  rfbench::set_rate(st, "bytes/s", weight_bytes + cache_read);
  const CacheReport rep = cache.bytes();
  st.counters["cache_bytes_per_seq"] = double(rep.held.total) / batch;
  st.counters["spec_bytes_per_seq"] = double(HybridCache<T>::spec_bytes(cfg, ctx).total);
  st.counters["threads"] = rfbench::bench_threads();
}

void decode_args(benchmark::internal::Benchmark* b, std::vector<int64_t> batches) {
  b->ArgNames({"half_recurrent", "ctx", "seqs", "page"})
      ->ArgsProduct({{0, 1}, {4096, 32768}, batches, {0}})
      ->ArgsProduct({{0, 1}, {32768}, {1, 4}, {16, 256}})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->MinTime(0.5);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_HybridDecode, bfloat16)->Apply([](benchmark::internal::Benchmark* b) {
  decode_args(b, {1, 4, 16});
});
BENCHMARK_TEMPLATE(BM_HybridDecode, float)->Apply([](benchmark::internal::Benchmark* b) {
  decode_args(b, {1, 4});
});
