// The linear layer at Llama-3.2-1B shapes (d_model 2048, q_proj 2048x2048, k/v_proj 512x2048,
// gate/up 8192x2048, down 2048x8192, lm_head 128256x2048), fp32 activations with fp32 or bf16
// weights.
//  - GEMV (decode, 1 token): memory-bound; "bytes/s" counts the weight bytes read, to be set
//    against BM_MemoryCopy's bytes/s in the same run.
//  - GEMM (prefill, 512 tokens): compute-bound; "flop/s" = 2 * tokens * in * out per second, to be
//    set against BM_FmaPeak, the fp32 FMA throughput of the same threads on register-only work.
//  - GGUF block weights: Q8_0 for the decode shapes and one prefill shape; Q4_0, Q4_1, Q5_0, Q2_K ..
//    Q6_K, IQ4_NL and IQ4_XS for gate_proj decode and q_proj prefill, and gate_proj decode with int8 x
//    (ActivationMath::int8); Q4_0, Q4_1 and Q8_0 gate_proj decode of 4 tokens with either x.
//  - A decode step's GEMVs at SmolLM2-135M shapes (30 layers of q/k/v/o/gate/up/down, then the
//    lm_head; 1 token, or 4 as in batched decode), each matrix its own copy as in a real model, so the step streams its weights from
//    memory when they exceed the last-level cache (110 MB as Q4_1 + Q8_0 lm_head, 540 MB as F32):
//    what a per-matrix benchmark, re-reading one cached matrix, cannot show.
//  - linear_backward (training) at SmolLM2-135M shapes (d 576, ffn 1536, vocab 49152): "flop/s" =
//    4 * tokens * in * out (dx and dweight; dbias is not counted), beside the forward's flop/s on
//    the same shapes in the same run.
#include <cstdint>
#include <vector>

#include "bench_util.hpp"
#include "recurformer/cpu/detail/isa.hpp"
#include "recurformer/cpu/detail/simd.hpp"
#include "recurformer/cpu/linear.hpp"

using namespace recurformer;

namespace {

// Block weights: bytes in [0x10, 0x3c), so every fp16 scale or min is a finite normal number
// (exponent field 4..14) and the codes vary (the kernels' speed does not depend on the values).
template <class TW>
std::vector<TW> bench_weights(size_t n) {
  if constexpr (is_quant_block_v<TW>) {
    std::vector<TW> w(n);
    auto* bytes = reinterpret_cast<unsigned char*>(w.data());
    for (size_t i = 0; i < n * sizeof(TW); ++i) bytes[i] = static_cast<unsigned char>(0x10 + (i * 31 + i / 7) % 44);
    return w;
  } else {
    return rfbench::random_vector<TW>(n, -0.05f, 0.05f);
  }
}

// y = x W^T as the model calls it: dense W through the typed linear, block W through BlockWeight,
// which carries x_math (its dense view only gives the shape and is never read).
template <class TW>
void run_linear(View<const float, 2> x, const TW* w, int64_t out, View<float, 2> y, ActivationMath x_math,
                CpuExec exec, void* ws, size_t ws_bytes) {
  const int64_t in = x.shape[1];
  if constexpr (is_quant_block_v<TW>) {
    const LinearParams<float, float> shape{x, make_view(reinterpret_cast<const float*>(w), {out, in}), {}, y};
    linear(shape, BlockWeight{w, TW::type, x_math}, exec, ws, ws_bytes);
  } else {
    linear(LinearParams<float, TW>{x, make_view(w, {out, in}), {}, y}, exec, ws, ws_bytes);
  }
}

template <class TW>
void bm_linear(benchmark::State& st, int64_t tokens, int64_t in, int64_t out,
               ActivationMath x_math = ActivationMath::fp32) {
  constexpr int64_t block = LinearWeight<TW>::block;
  const auto x = rfbench::random_vector<float>(size_t(tokens * in));
  const auto w = bench_weights<TW>(size_t(out * in / block));
  std::vector<float> y(size_t(tokens * out));
  LinearParams<float, TW> p;
  p.x = make_view(x.data(), {tokens, in});
  p.weight = make_view(w.data(), {out, in / block});
  p.y = make_view(y.data(), {tokens, out});
  const auto exec = rfbench::cpu_exec();
  std::vector<unsigned char> ws(linear_workspace_bytes(p, exec));
  for (auto _ : st) {
    run_linear(p.x, w.data(), out, p.y, x_math, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", double(out * in / block) * sizeof(TW));  // weights read
  rfbench::set_rate(st, "flop/s", 2.0 * double(tokens * in * out));
  st.counters["threads"] = exec.threads();
  if (x_math == ActivationMath::int8) st.counters["vnni"] = cpu::has_avx512_vnni();
}

void bm_linear_f32(benchmark::State& st, int64_t tokens, int64_t in, int64_t out) {
  bm_linear<float>(st, tokens, in, out);
}
void bm_linear_bf16(benchmark::State& st, int64_t tokens, int64_t in, int64_t out) {
  bm_linear<bfloat16>(st, tokens, in, out);
}
void bm_linear_f16(benchmark::State& st, int64_t tokens, int64_t in, int64_t out) {
  bm_linear<half>(st, tokens, in, out);
}

void bm_linear_q8_0(benchmark::State& st, int64_t tokens, int64_t in, int64_t out,
                    ActivationMath x_math = ActivationMath::fp32) {
  bm_linear<BlockQ8_0>(st, tokens, in, out, x_math);
}

#define RF_LINEAR_BENCH(name, tokens, in, out)                                                     \
  BENCHMARK_CAPTURE(bm_linear_f32, name, tokens, in, out)->Unit(benchmark::kMillisecond)->UseRealTime(); \
  BENCHMARK_CAPTURE(bm_linear_bf16, name, tokens, in, out)->Unit(benchmark::kMillisecond)->UseRealTime(); \
  BENCHMARK_CAPTURE(bm_linear_f16, name, tokens, in, out)->Unit(benchmark::kMillisecond)->UseRealTime()

RF_LINEAR_BENCH(gemv_q_proj, 1, 2048, 2048);
RF_LINEAR_BENCH(gemv_kv_proj, 1, 2048, 512);
RF_LINEAR_BENCH(gemv_gate_proj, 1, 2048, 8192);
RF_LINEAR_BENCH(gemv_down_proj, 1, 8192, 2048);
// fp32 lm_head would be 1 GiB of weights on a shared 24 GiB machine: bf16 only
BENCHMARK_CAPTURE(bm_linear_bf16, gemv_lm_head, 1, 2048, 128256)->Unit(benchmark::kMillisecond)->UseRealTime();
// Q8_0 (GGUF) weights: 34 bytes per 32 weights
BENCHMARK_CAPTURE(bm_linear_q8_0, gemv_q_proj, 1, 2048, 2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(bm_linear_q8_0, gemv_gate_proj, 1, 2048, 8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(bm_linear_q8_0, gemv_lm_head, 1, 2048, 128256)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(bm_linear_q8_0, gemm_q_proj, 512, 2048, 2048)->Unit(benchmark::kMillisecond)->UseRealTime();
// The other common GGUF types: Q4_0 / Q4_1 unpack nibbles in registers, the K-quants decode a
// block on the stack (20, 24, 144 and 210 bytes per 32, 32, 256 and 256 weights)
#define RF_BLOCK_BENCH(name, Block)                                                                       \
  void bm_linear_##name(benchmark::State& st, int64_t tokens, int64_t in, int64_t out,                     \
                        ActivationMath x_math = ActivationMath::fp32) {                                   \
    bm_linear<Block>(st, tokens, in, out, x_math);                                                        \
  }                                                                                                       \
  BENCHMARK_CAPTURE(bm_linear_##name, gemv_gate_proj, 1, 2048, 8192)->Unit(benchmark::kMillisecond)->UseRealTime(); \
  BENCHMARK_CAPTURE(bm_linear_##name, gemm_q_proj, 512, 2048, 2048)->Unit(benchmark::kMillisecond)->UseRealTime()
RF_BLOCK_BENCH(q4_0, BlockQ4_0);
RF_BLOCK_BENCH(q4_1, BlockQ4_1);
RF_BLOCK_BENCH(q5_0, BlockQ5_0);
RF_BLOCK_BENCH(q4_k, BlockQ4_K);
RF_BLOCK_BENCH(q6_k, BlockQ6_K);
RF_BLOCK_BENCH(q2_k, BlockQ2_K);
RF_BLOCK_BENCH(q3_k, BlockQ3_K);
RF_BLOCK_BENCH(q5_k, BlockQ5_K);
RF_BLOCK_BENCH(iq4_nl, BlockIQ4_NL);
RF_BLOCK_BENCH(iq4_xs, BlockIQ4_XS);

// The same GEMVs with x quantised to 8 bits and integer dot products (ActivationMath::int8, the
// path llama.cpp takes), beside the fp32-x runs: 1 token, and 4 tokens (one pass over W).
#define RF_INT8_X_BENCH(fn, name, tokens)                                                           \
  BENCHMARK_CAPTURE(fn, name, tokens, 2048, 8192, ActivationMath::int8)                             \
      ->Unit(benchmark::kMillisecond)                                                               \
      ->UseRealTime()
RF_INT8_X_BENCH(bm_linear_q4_0, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q4_0, int8_x_gemv4_gate_proj, 4);
RF_INT8_X_BENCH(bm_linear_q4_1, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q4_1, int8_x_gemv4_gate_proj, 4);
RF_INT8_X_BENCH(bm_linear_q5_0, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q4_k, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q6_k, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q2_k, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q3_k, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q5_k, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_iq4_nl, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_iq4_xs, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q8_0, int8_x_gemv_gate_proj, 1);
RF_INT8_X_BENCH(bm_linear_q8_0, int8_x_gemv4_gate_proj, 4);
BENCHMARK_CAPTURE(bm_linear_q4_0, gemv4_gate_proj, 4, 2048, 8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(bm_linear_q4_1, gemv4_gate_proj, 4, 2048, 8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(bm_linear_q8_0, gemv4_gate_proj, 4, 2048, 8192)->Unit(benchmark::kMillisecond)->UseRealTime();
RF_LINEAR_BENCH(gemv4_q_proj, 4, 2048, 2048);
RF_LINEAR_BENCH(gemm8_q_proj, 8, 2048, 2048);  // batched decode: the smallest GEMM
RF_LINEAR_BENCH(gemm_q_proj, 512, 2048, 2048);
RF_LINEAR_BENCH(gemm_kv_proj, 512, 2048, 512);
RF_LINEAR_BENCH(gemm_gate_proj, 512, 2048, 8192);
RF_LINEAR_BENCH(gemm_down_proj, 512, 8192, 2048);

// One step's linears over a model's worth of distinct matrices (SmolLM2-135M): TW for the layers, TL
// for the lm_head (Q4_1 GGUF files keep the tied embedding as Q8_0), which reads one token as
// generate's prefill and decode do. A decode step (1-4 tokens) is bound by reading the weights, so
// "bytes/s" counts every weight byte; a prefill step (512 tokens) by the FMAs (BM_FmaPeak).
template <class TW, class TL>
void bm_linear_model_step(benchmark::State& st, ActivationMath x_math, int64_t tokens) {
  constexpr int64_t d = 576, ffn = 1536, kv = 192, vocab = 49152, layers = 30;
  struct Matrix {
    int64_t in, out;
    std::vector<unsigned char> bytes;
  };
  std::vector<Matrix> ms;
  double total = 0, flops = 0;
  const auto exec = rfbench::cpu_exec();
  const auto x = rfbench::random_vector<float>(size_t(tokens * ffn));
  std::vector<float> y(static_cast<size_t>(std::max(tokens * ffn, vocab)));
  size_t ws_bytes = 0;
  auto add = [&](int64_t in, int64_t out, int64_t t, auto tag) {
    using B = typename decltype(tag)::type;
    const auto w = bench_weights<B>(size_t(out * in / LinearWeight<B>::block));
    const auto* p = reinterpret_cast<const unsigned char*>(w.data());
    ms.push_back({in, out, std::vector<unsigned char>(p, p + w.size() * sizeof(B))});
    total += double(ms.back().bytes.size());
    flops += 2.0 * double(t * in * out);
    const LinearParams<float, float> shape{make_view(x.data(), {t, in}),  // the shapes: only these count
                                           make_view(reinterpret_cast<const float*>(p), {out, in}), {},
                                           make_view(y.data(), {t, out})};
    ws_bytes = std::max(ws_bytes, linear_workspace_bytes(shape, exec));
  };
  for (int64_t l = 0; l < layers; ++l)
    for (auto [in, out] : {std::pair{d, d}, {d, kv}, {d, kv}, {d, d}, {d, ffn}, {d, ffn}, {ffn, d}})
      add(in, out, tokens, QuantTag<TW>{});
  add(d, vocab, 1, QuantTag<TL>{});
  std::vector<unsigned char> ws(ws_bytes);
  auto run = [&](const Matrix& m, int64_t t, auto tag) {
    using B = typename decltype(tag)::type;
    run_linear(make_view<const float>(x.data(), {t, m.in}), reinterpret_cast<const B*>(m.bytes.data()), m.out,
               make_view(y.data(), {t, m.out}), x_math, exec, ws.data(), ws.size());
  };
  for (auto _ : st) {
    for (size_t i = 0; i + 1 < ms.size(); ++i) run(ms[i], tokens, QuantTag<TW>{});
    run(ms.back(), 1, QuantTag<TL>{});
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "bytes/s", total);
  rfbench::set_rate(st, "flop/s", flops);
  rfbench::set_rate(st, "tokens/s", double(tokens));
  st.counters["MB"] = total / 1e6;
  st.counters["threads"] = exec.threads();
}
void bm_model_step_f32(benchmark::State& st, ActivationMath m, int64_t t) { bm_linear_model_step<float, float>(st, m, t); }
void bm_model_step_f16(benchmark::State& st, ActivationMath m, int64_t t) { bm_linear_model_step<half, half>(st, m, t); }
void bm_model_step_q4_1(benchmark::State& st, ActivationMath m, int64_t t) {
  bm_linear_model_step<BlockQ4_1, BlockQ8_0>(st, m, t);
}
void bm_model_step_q8_0(benchmark::State& st, ActivationMath m, int64_t t) {
  bm_linear_model_step<BlockQ8_0, BlockQ8_0>(st, m, t);
}
#define RF_MODEL_STEP_BENCH(fn, name, x_math, tokens) \
  BENCHMARK_CAPTURE(fn, name, x_math, tokens)->Unit(benchmark::kMillisecond)->UseRealTime()
RF_MODEL_STEP_BENCH(bm_model_step_f32, decode, ActivationMath::fp32, 1);
RF_MODEL_STEP_BENCH(bm_model_step_f16, decode, ActivationMath::fp32, 1);
RF_MODEL_STEP_BENCH(bm_model_step_q4_1, decode_fp32_x, ActivationMath::fp32, 1);
RF_MODEL_STEP_BENCH(bm_model_step_q4_1, decode_int8_x, ActivationMath::int8, 1);
RF_MODEL_STEP_BENCH(bm_model_step_q4_1, decode_int8_x_4_tokens, ActivationMath::int8, 4);
RF_MODEL_STEP_BENCH(bm_model_step_q8_0, decode_int8_x, ActivationMath::int8, 1);
// The same functions at 512 tokens: a prefill step's linears (fp32 x; block weights are unpacked
// into fp32 panels)
RF_MODEL_STEP_BENCH(bm_model_step_f32, prefill_512, ActivationMath::fp32, 512);
RF_MODEL_STEP_BENCH(bm_model_step_f16, prefill_512, ActivationMath::fp32, 512);
RF_MODEL_STEP_BENCH(bm_model_step_q8_0, prefill_512, ActivationMath::fp32, 512);
RF_MODEL_STEP_BENCH(bm_model_step_q4_1, prefill_512, ActivationMath::fp32, 512);

// Training shapes (SmolLM2-135M): the forward and the backward (dx, dweight, dbias) side by side.
template <class TW>
void bm_linear_backward(benchmark::State& st, int64_t tokens, int64_t in, int64_t out) {
  const auto x = rfbench::random_vector<float>(size_t(tokens * in));
  const auto w = bench_weights<TW>(size_t(out * in));
  const auto dy = rfbench::random_vector<float>(size_t(tokens * out), -1.f, 1.f, 2);
  std::vector<float> dx(size_t(tokens * in)), dw(size_t(out * in)), db(static_cast<size_t>(out));
  LinearBackwardParams<float, TW> p;
  p.x = make_view(x.data(), {tokens, in});
  p.weight = make_view(w.data(), {out, in});
  p.dy = make_view(dy.data(), {tokens, out});
  p.dx = make_view(dx.data(), {tokens, in});
  p.dweight = make_view(dw.data(), {out, in});
  p.dbias = make_view(db.data(), {out});
  const auto exec = rfbench::cpu_exec();
  std::vector<unsigned char> ws(linear_backward_workspace_bytes(p, exec));
  for (auto _ : st) {
    linear_backward(p, exec, ws.data(), ws.size());
    benchmark::DoNotOptimize(dw.data());
    benchmark::ClobberMemory();
  }
  rfbench::set_rate(st, "flop/s", 4.0 * double(tokens * in * out));
  st.counters["threads"] = exec.threads();
}
void bm_linear_backward_f32(benchmark::State& st, int64_t tokens, int64_t in, int64_t out) {
  bm_linear_backward<float>(st, tokens, in, out);
}
void bm_linear_backward_bf16(benchmark::State& st, int64_t tokens, int64_t in, int64_t out) {
  bm_linear_backward<bfloat16>(st, tokens, in, out);
}

#define RF_LINEAR_TRAIN_BENCH(name, tokens, in, out)                                                      \
  BENCHMARK_CAPTURE(bm_linear_f32, train_##name, tokens, in, out)->Unit(benchmark::kMillisecond)->UseRealTime(); \
  BENCHMARK_CAPTURE(bm_linear_backward_f32, name, tokens, in, out)->Unit(benchmark::kMillisecond)->UseRealTime(); \
  BENCHMARK_CAPTURE(bm_linear_backward_bf16, name, tokens, in, out)->Unit(benchmark::kMillisecond)->UseRealTime()

RF_LINEAR_TRAIN_BENCH(smol_t1536_576x320, 1536, 576, 320);
RF_LINEAR_TRAIN_BENCH(smol_q_proj, 512, 576, 576);
RF_LINEAR_TRAIN_BENCH(smol_gate_proj, 512, 576, 1536);
RF_LINEAR_TRAIN_BENCH(smol_down_proj, 512, 1536, 576);
RF_LINEAR_TRAIN_BENCH(smol_lm_head, 512, 576, 49152);

// The fp32 FMA ceiling: 16 independent accumulator chains per thread, no memory traffic.
template <class V>
float fma_loop(int64_t iters) {
  V acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = V::broadcast(float(i));
  const V a = V::broadcast(0.999f), b = V::broadcast(1e-3f);
  for (int64_t n = 0; n < iters; ++n)
    for (int i = 0; i < 16; ++i) acc[i] = fma(acc[i], a, b);
  V s = acc[0];
  for (int i = 1; i < 16; ++i) s = s + acc[i];
  return s.reduce_add();
}
#if RF_HAVE_X86_SIMD
RF_KERNEL_AVX512 float fma_loop_avx512(int64_t iters) { return fma_loop<cpu::simd::F32x16>(iters); }
#endif

void BM_FmaPeak(benchmark::State& st) {
#if RF_HAVE_X86_SIMD
  if (cpu::active_isa() != cpu::Isa::avx512) {
    st.SkipWithError("needs AVX-512");
    return;
  }
  const int64_t iters = 1 << 20;
  const auto exec = rfbench::cpu_exec();
  std::vector<float> sink(size_t(exec.threads()));
  for (auto _ : st) {
    exec.parallel_for(exec.threads(), [&](int64_t b, int64_t e, int t) {
      for (int64_t i = b; i < e; ++i) sink[size_t(t)] += fma_loop_avx512(iters);
    });
    benchmark::DoNotOptimize(sink.data());
  }
  rfbench::set_rate(st, "flop/s", 2.0 * 16 * 16 * double(iters) * exec.threads());
  st.counters["threads"] = exec.threads();
#else
  st.SkipWithError("needs x86 SIMD");
#endif
}
BENCHMARK(BM_FmaPeak)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
