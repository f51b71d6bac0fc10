// HybridHeadAttention decode on the device (cuda/hybrid_head_attention.cuh), the CUDA twin of
// hybrid_bench.cpp: one Llama-3.2-1B attention layer (d_model 2048, 32 query heads, 8 KV heads,
// hd 64, bf16 weights, bf16 cache), all attention vs half of the KV groups recurrent (A R A R ...;
// d_state 64, dt_rank 8, conv 4), contexts 4096 and 32768, 1, 16 and 64 sequences decoding together.
//
// The cache is brought to depth synthetically (K/V and states filled on the device with a hash
// pattern in [-0.5, 0.5), lengths set with advance()); every iteration decodes one token per
// sequence at that depth (not advanced). Timed with CUDA events around the whole call (host
// planning and the metadata upload included, as a serving loop sees it), after an L2 flush.
// Counters: tokens/s and bytes/s of what the step must read (weights once, each sequence's K/V or
// states); compare with BM_DeviceCopy of the same run, and the half-recurrent rows with the
// all-attention rows at the same context and batch for the layer's speed-up.
#include <cstdint>
#include <vector>

#include "cuda_bench_util.cuh"
#include "recurformer/cuda/hybrid_head_attention.cuh"

using namespace recurformer;
using rfbench::DeviceArena;

namespace {

constexpr int64_t kDModel = 2048, kNq = 32, kNkv = 8, kHd = 64, kRank = 8, kConv = 4;

template <class T>
__global__ void fill_pattern_kernel(T* p, int64_t n, uint32_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    recurformer::cuda::detail::store_float(p + i, float(h >> 8) * (1.f / 16777216.f) - 0.5f);
  }
}
template <class T>
void fill_pattern(View<T, 4> v, uint32_t seed) {
  if (v.numel() == 0) return;
  fill_pattern_kernel<T><<<1024, 256>>>(v.data, v.numel(), seed);
  RF_CUDA_CHECK_LAUNCH("fill_pattern_kernel");
}

// range(0): 0 = all attention, 1 = half recurrent; range(1): context; range(2): sequences.
void BM_HybridDecodeCuda(benchmark::State& st) {
  using T = bfloat16;
  using TW = bfloat16;
  const bool half_rec = st.range(0) == 1;
  const int64_t ctx = st.range(1);
  const int batch = int(st.range(2));
  DeviceArena dev;

  HybridCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv = int(kNkv);
  cfg.head_dim = int(kHd);
  LayerLayout ll = LayerLayout::uniform(int(kNkv), HeadKind::attention);
  if (half_rec)
    for (int j = 1; j < kNkv; j += 2) ll.groups[size_t(j)] = HeadKind::recurrent;
  cfg.layout.layers = {ll};
  cfg.recurrent.d_state = int(kHd);
  cfg.recurrent.dt_rank = int(kRank);
  cfg.recurrent.conv_kernel = int(kConv);
  cfg.slots = batch;
  cfg.capacity = ctx + 1;
  HybridCache<T, DeviceMemory> cache(cfg);
  fill_pattern(cache.keys(0), 1), fill_pattern(cache.values(0), 2);
  fill_pattern(cache.ssm_states(0), 3), fill_pattern(cache.conv_states(0), 4);
  const size_t nb = size_t(batch);
  std::vector<int32_t> slots(nb), counts(nb, int32_t(ctx)), cu(nb + 1, 0);
  for (int s = 0; s < batch; ++s) slots[size_t(s)] = s, cu[size_t(s) + 1] = s + 1;
  cache.advance(make_view(const_cast<const int32_t*>(slots.data()), {int64_t(batch)}),
                make_view(const_cast<const int32_t*>(counts.data()), {int64_t(batch)}));

  const float a = 0.03f;
  const int n_rec = ll.count(HeadKind::recurrent);
  std::vector<RecurrentGroupWeights<TW>> rec(static_cast<size_t>(n_rec));
  for (RecurrentGroupWeights<TW>& r : rec) {
    r.dt_down = make_view<const TW>(dev.random<TW>(size_t(kRank * kDModel), -a, a), {kRank, kDModel});
    r.dt_up = make_view<const TW>(dev.random<TW>(size_t(kHd * kRank), -0.1f, 0.1f), {kHd, kRank});
    r.dt_bias = make_view<const float>(dev.random<float>(size_t(kHd), -4.f, -2.f), {kHd});
    r.A = make_view<const float>(dev.random<float>(size_t(kHd * kHd), -2.f, -0.1f), {kHd, kHd});
    r.D = make_view<const float>(dev.random<float>(size_t(kHd)), {kHd});
    r.conv_weight = make_view<const float>(dev.random<float>(size_t(kHd * kConv), -0.5f, 0.5f), {kHd, kConv});
    r.conv_bias = make_view<const float>(dev.random<float>(size_t(kHd), -0.1f, 0.1f), {kHd});
  }
  HybridHeadAttentionParams<T, TW, DeviceMemory> p;
  p.x = make_view<const float>(dev.random<float>(nb * kDModel), {int64_t(batch), kDModel});
  p.out = make_view(dev.random<float>(nb * kDModel), {int64_t(batch), kDModel});
  p.weights.wq = make_view<const TW>(dev.random<TW>(size_t(kNq * kHd * kDModel), -a, a), {kNq * kHd, kDModel});
  p.weights.wk = make_view<const TW>(dev.random<TW>(size_t(kNkv * kHd * kDModel), -a, a), {kNkv * kHd, kDModel});
  p.weights.wv = make_view<const TW>(dev.random<TW>(size_t(kNkv * kHd * kDModel), -a, a), {kNkv * kHd, kDModel});
  p.weights.wo = make_view<const TW>(dev.random<TW>(size_t(kDModel * kNq * kHd), -a, a), {kDModel, kNq * kHd});
  p.weights.recurrent = rec.data();
  p.weights.n_recurrent = n_rec;
  p.cache = &cache;
  p.n_q = int(kNq);
  p.cu_seqlens = make_view(const_cast<const int32_t*>(cu.data()), {int64_t(batch) + 1});
  p.slots = make_view(const_cast<const int32_t*>(slots.data()), {int64_t(batch)});
  p.inv_freq = make_view<const float>(dev.upload(rope_inv_freq(int(kHd), 500000.f)), {kHd / 2});
  const size_t ws_bytes = hybrid_head_attention_workspace_bytes(p, CudaExec{});
  void* ws = dev.scratch(ws_bytes);

  const int64_t n_attn = ll.count(HeadKind::attention);
  const double weight_bytes = 2.0 * (double(kNq + 2 * kNkv) * kHd * kDModel + double(kDModel) * kNq * kHd +
                                     double(n_rec) * (kRank * kDModel + kHd * kRank));
  const double cache_read = double(batch) * (double(n_attn) * 2 * kHd * double(ctx) * sizeof(T) +
                                             double(n_rec) * (2.0 * kHd * kHd * 4 + (kConv - 1) * kHd * sizeof(T)));
  rfbench::time_cuda(st, weight_bytes + cache_read,
                     [&] { hybrid_head_attention(p, CudaExec{}, ws, ws_bytes); });
  st.counters["tokens/s"] = benchmark::Counter(double(batch) * double(st.iterations()), benchmark::Counter::kIsRate);
  st.counters["cache_bytes_per_seq"] = double(cache.bytes().held.total) / batch;
}

}  // namespace

BENCHMARK(BM_HybridDecodeCuda)
    ->ArgNames({"half_recurrent", "ctx", "seqs"})
    ->ArgsProduct({{0, 1}, {4096, 32768}, {1, 16, 64}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
