// examples/embed_core.cpp: how an inference engine embeds recurformer's layer core.
//
// The engine here owns everything the core does not: the weights (read once from the checkpoint
// into fp32, the q, k, v and dt_down rows of each layer fused into one matrix, so the layer's input
// projections are one GEMM), the MLP and lm_head, and the memory: a pool of K/V pages per layer
// handed out from one free list as sequences grow (one page table for all layers, vLLM's way),
// SSM and conv states and streaming rings per slot, and the slots' lengths. Each step it plans once
// (plan_hybrid_step: positions, key counts, pages, checked once for all layers), then for each layer
// calls hybrid_attention_core with that plan on views of its memory; no HybridCache is involved.
//
// It runs a batch of sequences of different lengths (one packed prefill, then batched decode steps,
// greedy) and runs the same tokens through the library's own LlamaSession, printing the largest
// logit difference of every step. It exits with 1 when they differ by more than 1e-4 of the
// largest logit, so ctest runs it as a test.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "recurformer/cpu/embedding.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/rmsnorm.hpp"
#include "recurformer/cpu/swiglu.hpp"
#include "recurformer/cpu/hybrid_head_attention.hpp"
#include "recurformer/model/checkpoint.hpp"
#include "recurformer/model/llama.hpp"

using namespace recurformer;

namespace {

constexpr int64_t kPage = 16;  // tokens per K/V page

std::vector<float> to_f32(const TensorRef& t) {
  std::vector<float> out(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype) {
      case DType::f32: out[size_t(i)] = static_cast<const float*>(t.data)[i]; break;
      case DType::f16: out[size_t(i)] = to_float(static_cast<const half*>(t.data)[i]); break;
      case DType::bf16: out[size_t(i)] = to_float(static_cast<const bfloat16*>(t.data)[i]); break;
      default: fail("embed_core: tensor ", t.name, " has a dtype this example does not read");
    }
  }
  return out;
}

View<const float, 2> mat(const std::vector<float>& v, int64_t rows, int64_t cols) {
  return make_view(v.data(), {rows, cols});
}

// One layer as the engine keeps it.
struct Layer {
  std::vector<HeadKind> kinds;
  int64_t n_attn = 0, n_state = 0, n_ring = 0;
  std::vector<float> attn_norm, mlp_norm, w_in, b_in, wo, gate, up, down;  // w_in = [Wq; Wk; Wv; dt_down...]
  int64_t in_rows = 0;
  std::vector<std::vector<float>> rec_tensors;  // owned storage of the recurrent groups' tensors
  std::vector<RecurrentGroupWeights<float>> rec;
  std::vector<float> k_pages, v_pages, ssm, conv, ring_k, ring_v;  // the layer's memory
};

struct Engine {
  ModelConfig c;
  std::vector<float> embed, final_norm, lm_head, inv_freq;
  std::vector<Layer> layers;
  int slots = 0;
  int64_t pages = 0, ring = 0, N = 0, Kc = 0;  // pages in each layer's pool, ring entries, d_state, conv kernel
  std::vector<int32_t> lengths, free_pages;
  std::vector<std::vector<int32_t>> pages_of;
  std::vector<unsigned char> ws, meta;  // the layers' scratch and the step plan's metadata (grow-only)
  ThreadPool pool;

  Engine(const Checkpoint& ck, int n_slots, int64_t capacity) : c(ck.config()), slots(n_slots), pool(0) {
    const int64_t d = c.d_model, hd = c.head_dim;
    N = c.recurformer ? c.recurformer->recurrent.d_state : hd;
    Kc = c.recurformer ? c.recurformer->recurrent.conv_kernel : 1;
    auto T = [&](const std::string& name) { return to_f32(ck.tensor(name)); };
    embed = T("model.embed_tokens.weight");
    lm_head = c.tie_word_embeddings || !ck.has("lm_head.weight") ? embed : T("lm_head.weight");
    final_norm = T("model.norm.weight");
    inv_freq = ck.rope_inv_freq();
    const HeadLayout layout = c.head_layout();
    const int sink = c.recurformer ? c.recurformer->streaming.sink : 0;
    const int window = c.recurformer ? c.recurformer->streaming.window : 1;
    ring = std::min<int64_t>(capacity, int64_t(sink) + window);
    pages = n_slots * ((capacity + kPage - 1) / kPage);
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Layer L;
      L.kinds = layout.layers[size_t(l)].groups;
      for (HeadKind k : L.kinds)
        L.n_attn += k == HeadKind::attention, L.n_state += has_recurrent_state(k), L.n_ring += has_stream_ring(k);
      L.attn_norm = T(p + "input_layernorm.weight");
      L.mlp_norm = T(p + "post_attention_layernorm.weight");
      // The fused input projection: q, k, v, then each state group's dt_down rows.
      std::vector<std::string> rows = {"q_proj", "k_proj", "v_proj"};
      for (const std::string& r : rows) {
        const std::vector<float> w = T(p + "self_attn." + r + ".weight");
        L.w_in.insert(L.w_in.end(), w.begin(), w.end());
        std::vector<float> b(w.size() / size_t(d), 0.f);
        if (c.attention_bias) b = T(p + "self_attn." + r + ".bias");
        L.b_in.insert(L.b_in.end(), b.begin(), b.end());
      }
      if (c.recurformer) {
        const RecurrentConfig& rc = c.recurformer->recurrent;
        for (int j : layout.layers[size_t(l)].state_groups()) {
          const std::string q = p + "self_attn.recurrent." + std::to_string(j) + ".";
          const std::vector<float> dd = T(q + "dt_down.weight");
          L.w_in.insert(L.w_in.end(), dd.begin(), dd.end());
          L.b_in.insert(L.b_in.end(), size_t(rc.dt_rank), 0.f);
          for (const char* name : {"dt_up.weight", "dt_bias", "A_log", "D", "conv1d.weight", "conv1d.bias", "alpha"})
            L.rec_tensors.push_back(ck.has(q + name) ? T(q + name) : std::vector<float>{});
          std::vector<float>* t = &L.rec_tensors[L.rec_tensors.size() - 7];
          for (float& a : t[2]) a = -std::exp(a);  // A = -exp(A_log)
          RecurrentGroupWeights<float> g;
          // dt_down stays absent: its rows are in the fused matrix, and the core takes dt_low.
          g.dt_up = mat(t[0], hd, rc.dt_rank);
          g.dt_bias = make_view(const_cast<const float*>(t[1].data()), {hd});
          g.A = mat(t[2], hd, rc.d_state);
          g.D = make_view(const_cast<const float*>(t[3].data()), {hd});
          g.conv_weight = mat(t[4], hd, rc.conv_kernel);
          g.conv_bias = make_view(const_cast<const float*>(t[5].data()), {hd});
          if (!t[6].empty()) g.alpha = make_view(const_cast<const float*>(t[6].data()), {int64_t(t[6].size())});
          L.rec.push_back(g);
        }
      }
      L.in_rows = int64_t(L.b_in.size());
      L.wo = T(p + "self_attn.o_proj.weight");
      L.gate = T(p + "mlp.gate_proj.weight");
      L.up = T(p + "mlp.up_proj.weight");
      L.down = T(p + "mlp.down_proj.weight");
      L.k_pages.assign(size_t(pages * L.n_attn * kPage * hd), 0.f);
      L.v_pages = L.k_pages;
      L.ssm.assign(size_t(n_slots * L.n_state * hd * N), 0.f);
      L.conv.assign(size_t(n_slots * L.n_state * (Kc - 1) * hd), 0.f);
      L.ring_k.assign(size_t(n_slots * L.n_ring * ring * hd), 0.f);
      L.ring_v = L.ring_k;
      layers.push_back(std::move(L));
    }
    lengths.assign(size_t(n_slots), 0);
    pages_of.resize(size_t(n_slots));
    for (int32_t pg = int32_t(pages) - 1; pg >= 0; --pg) free_pages.push_back(pg);
  }

  template <class F>
  void linear_f32(View<const float, 2> x, View<const float, 2> w, const float* bias, View<float, 2> y, F&& scratch) {
    LinearParams<float, float> lp{x, w, bias ? make_view(bias, {w.shape[0]}) : View<const float, 1>{}, y};
    std::vector<unsigned char>& s = scratch(linear_workspace_bytes(lp, CpuExec{&pool}));
    linear(lp, CpuExec{&pool}, s.data(), s.size());
  }

  // One step: tokens of S sequences (cu), each in its slot; returns the last token's logits per sequence.
  std::vector<float> step(const std::vector<int32_t>& tokens, const std::vector<int32_t>& cu,
                          const std::vector<int32_t>& seq_slots) {
    const CpuExec exec{&pool};
    const int64_t n = int64_t(tokens.size()), S = int64_t(seq_slots.size()), d = c.d_model, hd = c.head_dim;
    const int64_t nq = c.n_q, nkv = c.n_kv, V = c.vocab_size;
    // Pages for the new tokens (one table for every layer).
    int64_t max_pages = 1;
    for (int64_t s = 0; s < S; ++s) {
      std::vector<int32_t>& pg = pages_of[size_t(seq_slots[size_t(s)])];
      while (int64_t(pg.size()) * kPage < lengths[size_t(seq_slots[size_t(s)])] + cu[size_t(s) + 1] - cu[size_t(s)]) {
        RF_CHECK(!free_pages.empty(), "embed_core: out of K/V pages");
        pg.push_back(free_pages.back());
        free_pages.pop_back();
      }
      max_pages = std::max<int64_t>(max_pages, int64_t(pg.size()));
    }
    std::vector<int32_t> table(size_t(S * max_pages), 0);
    for (int64_t s = 0; s < S; ++s) {
      const std::vector<int32_t>& pg = pages_of[size_t(seq_slots[size_t(s)])];
      std::copy(pg.begin(), pg.end(), table.begin() + s * max_pages);
    }
    std::vector<float> x(size_t(n * d)), xn(x.size()), tmp(x.size()), heads(size_t(n * nq * hd));
    std::vector<float> gate(size_t(n * c.ffn)), up(gate.size());
    int64_t in_rows = 0;
    for (const Layer& L : layers) in_rows = std::max(in_rows, L.in_rows);
    std::vector<float> fused(size_t(n * in_rows));  // one buffer for every layer's fused projection
    std::vector<unsigned char> lin_ws;
    auto scratch = [&](size_t b) -> std::vector<unsigned char>& {
      if (lin_ws.size() < b) lin_ws.resize(b);
      return lin_ws;
    };
    // One plan for the step, shared by every layer: positions, key counts and pages are the same in
    // all of them. Its shape covers the largest layer of each kind.
    HybridStepShape shape;
    shape.n_q = nq, shape.n_kv = nkv, shape.head_dim = hd;
    for (const Layer& L : layers) {
      shape.max_attention_groups = std::max(shape.max_attention_groups, L.n_attn);
      shape.max_state_groups = std::max(shape.max_state_groups, L.n_state);
      shape.max_ring_groups = std::max(shape.max_ring_groups, L.n_ring);
    }
    shape.max_dt_rank = c.recurformer ? c.recurformer->recurrent.dt_rank : 0;
    shape.kv_keys = kPage, shape.kv_pages = pages;
    shape.ring = shape.max_ring_groups ? ring : 0;
    shape.sink = c.recurformer ? c.recurformer->streaming.sink : 0;
    shape.window = c.recurformer ? c.recurformer->streaming.window : 1;
    const HybridStep step_arrays{make_view(cu.data(), {S + 1}), make_view(seq_slots.data(), {S}),
                                 make_view(const_cast<const int32_t*>(lengths.data()), {int64_t(slots)}),
                                 make_view(const_cast<const int32_t*>(table.data()), {S, max_pages})};
    meta.resize(std::max(meta.size(), hybrid_step_metadata_bytes(shape, step_arrays, n)));  // grow-only
    const HybridStepPlan<float, float> plan =
        plan_hybrid_step<float, float>(shape, step_arrays, n, exec, HybridPlanBuffers{meta.data(), nullptr, meta.size()});
    if (ws.size() < plan.workspace_bytes) ws.resize(plan.workspace_bytes);
    auto X = [&](std::vector<float>& v, int64_t cols) { return make_view(v.data(), {n, cols}); };
    auto cX = [&](const std::vector<float>& v, int64_t cols) { return make_view(v.data(), {n, cols}); };
    embedding(EmbeddingParams<float, float>{mat(embed, V, d), make_view(tokens.data(), {n}), X(x, d)}, exec);
    for (Layer& L : layers) {
      rmsnorm(RmsNormParams<float, float>{cX(x, d), make_view(L.attn_norm.data(), {d}), X(xn, d), c.rms_eps}, exec);
      linear_f32(cX(xn, d), mat(L.w_in, L.in_rows, d), L.b_in.data(), X(fused, L.in_rows), scratch);
      auto cols = [&](int64_t col, int64_t width) {
        return make_strided_view(const_cast<const float*>(fused.data()) + col, {n, width}, {L.in_rows, int64_t(1)});
      };
      HybridAttentionCoreParams<float, float> cp;
      cp.q = cols(0, nq * hd);
      cp.k = cols(nq * hd, nkv * hd);
      cp.v = cols((nq + nkv) * hd, nkv * hd);
      if (L.n_state) cp.dt_low = cols((nq + 2 * nkv) * hd, L.in_rows - (nq + 2 * nkv) * hd);
      cp.out = X(heads, nq * hd);
      cp.recurrent = L.rec.data();
      cp.n_recurrent = int(L.rec.size());
      cp.cache.kinds = make_view(const_cast<const HeadKind*>(L.kinds.data()), {nkv});
      cp.cache.k = make_view(L.k_pages.data(), {pages, L.n_attn, kPage, hd});
      cp.cache.v = make_view(L.v_pages.data(), {pages, L.n_attn, kPage, hd});
      cp.cache.ssm_states = make_view(L.ssm.data(), {int64_t(slots), L.n_state, hd, N});
      cp.cache.conv_states = make_view(L.conv.data(), {int64_t(slots), L.n_state, Kc - 1, hd});
      cp.cache.ring_k = make_view(L.ring_k.data(), {int64_t(slots), L.n_ring, ring, hd});
      cp.cache.ring_v = make_view(L.ring_v.data(), {int64_t(slots), L.n_ring, ring, hd});
      cp.cache.sink = shape.sink, cp.cache.window = shape.window;
      cp.n_q = int(nq), cp.head_dim = int(hd);
      cp.inv_freq = make_view(inv_freq.data(), {int64_t(inv_freq.size())});
      cp.rope_layout = c.rope_layout;
      hybrid_attention_core(cp, plan, exec, ws.data(), ws.size());  // the step comes from the plan
      linear_f32(cX(heads, nq * hd), mat(L.wo, d, nq * hd), nullptr, X(tmp, d), scratch);
      for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
      rmsnorm(RmsNormParams<float, float>{cX(x, d), make_view(L.mlp_norm.data(), {d}), X(xn, d), c.rms_eps}, exec);
      linear_f32(cX(xn, d), mat(L.gate, c.ffn, d), nullptr, X(gate, c.ffn), scratch);
      linear_f32(cX(xn, d), mat(L.up, c.ffn, d), nullptr, X(up, c.ffn), scratch);
      swiglu(SwigluParams<float>{cX(gate, c.ffn), cX(up, c.ffn), X(gate, c.ffn)}, exec);
      linear_f32(cX(gate, c.ffn), mat(L.down, d, c.ffn), nullptr, X(tmp, d), scratch);
      for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
    }
    for (int64_t s = 0; s < S; ++s) lengths[size_t(seq_slots[size_t(s)])] += cu[size_t(s) + 1] - cu[size_t(s)];
    std::vector<float> last(size_t(S * d)), logits(size_t(S * V));
    for (int64_t s = 0; s < S; ++s)
      std::memcpy(&last[size_t(s * d)], &x[size_t((cu[size_t(s) + 1] - 1) * d)], size_t(d) * sizeof(float));
    const View<float, 2> lv = make_view(last.data(), {S, d});
    rmsnorm(RmsNormParams<float, float>{lv, make_view(final_norm.data(), {d}), lv, c.rms_eps}, exec);
    linear_f32(lv, mat(lm_head, V, d), nullptr, make_view(logits.data(), {S, V}), scratch);
    return logits;
  }
};

void usage() {
  std::printf(
      "usage: recurformer-embed-core -m MODEL [-n STEPS]\n\n"
      "Runs a Llama or RecurFormer checkpoint (Hugging Face directory or .gguf) the way an inference\n"
      "engine embedding recurformer's layer core would: its own fused projections, MLP and lm_head, its\n"
      "own paged K/V pool (pages of %lld tokens) and states, hybrid_attention_core per layer. Three\n"
      "sequences of different lengths are prefilled in one packed batch, then decoded STEPS times\n"
      "together (greedy; default 8). Every step's logits are compared with the library's LlamaSession\n"
      "on the same tokens; the exit status is 1 when they differ by more than 1e-4 of the largest logit.\n\n"
      "  -m, --model PATH   the checkpoint\n  -n, --steps N      decode steps (default 8)\n  -h, --help         this text\n",
      static_cast<long long>(kPage));
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  int steps = 8;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") return usage(), 0;
    if ((a == "-m" || a == "--model") && i + 1 < argc) path = argv[++i];
    else if ((a == "-n" || a == "--steps") && i + 1 < argc) steps = std::atoi(argv[++i]);
    else return std::fprintf(stderr, "recurformer-embed-core: unknown argument %s (try --help)\n", a.c_str()), 2;
  }
  if (path.empty() || steps < 0) return usage(), 2;
  try {
    const auto ck = std::make_shared<const Checkpoint>(Checkpoint::open(path));
    const int64_t V = ck->config().vocab_size;
    const std::vector<int64_t> prompt_lens = {37, 5, 21};
    const int S = int(prompt_lens.size());
    const int64_t capacity = 64 + steps;
    Engine engine(*ck, S, capacity);
    LlamaModelOptions exact;
    exact.serve_blocks = false;  // the same fp32 weights the engine multiplies by
    exact.activations = ActivationMath::fp32;
    const LlamaModel model(ck, exact);
    LlamaSession session(model, S, capacity, CpuExec{&engine.pool});

    std::vector<int32_t> tokens, cu = {0}, seq_slots;
    uint32_t r = 12345;
    for (int s = 0; s < S; ++s) {
      for (int64_t i = 0; i < prompt_lens[size_t(s)]; ++i) tokens.push_back(int32_t((r = r * 1103515245u + 12345u) >> 8) % int32_t(V));
      cu.push_back(int32_t(tokens.size()));
      seq_slots.push_back(S - 1 - s);  // slots need not follow the batch order
    }
    std::printf("embed_core: %s, %d layers, %d sequences of %lld, %lld and %lld tokens, %d decode steps, "
                "K/V in pages of %lld tokens\n",
                path.c_str(), ck->config().n_layers, S, (long long)prompt_lens[0], (long long)prompt_lens[1],
                (long long)prompt_lens[2], steps, (long long)kPage);
    double worst = 0;
    for (int st = 0; st <= steps; ++st) {
      const std::vector<float> got = engine.step(tokens, cu, seq_slots);
      std::vector<float> want(size_t(S * V));
      if (st == 0) {
        for (int s = 0; s < S; ++s) {
          const std::vector<float>& l = session.prefill(seq_slots[size_t(s)], tokens.data() + cu[size_t(s)], prompt_lens[size_t(s)]);
          std::copy(l.begin(), l.end(), want.begin() + s * V);
        }
      } else {
        want = session.decode(seq_slots.data(), tokens.data(), S);
      }
      double diff = 0, scale = 0;
      for (size_t i = 0; i < got.size(); ++i) diff = std::max(diff, double(std::fabs(got[i] - want[i]))), scale = std::max(scale, double(std::fabs(want[i])));
      worst = std::max(worst, diff / scale);
      // Greedy next tokens from the engine's logits, fed to both.
      std::vector<int32_t> next(static_cast<size_t>(S));
      for (int s = 0; s < S; ++s)
        next[size_t(s)] = int32_t(std::max_element(got.begin() + s * V, got.begin() + (s + 1) * V) - (got.begin() + s * V));
      std::printf("  %s %2d: max |logit difference| %.3g (of max |logit| %.3g), next tokens %d %d %d\n",
                  st == 0 ? "prefill" : "decode ", st, diff, scale, next[0], next[1], next[2]);
      tokens = next;
      cu = {0, 1, 2, 3};
    }
    const bool ok = worst <= 1e-4;
    std::printf("embed_core: %s: largest difference %.3g of the largest logit (limit 1e-4)\n",
                ok ? "the engine matches the library" : "MISMATCH", worst);
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "recurformer-embed-core: %s\n", e.what());
    return 1;
  }
}
