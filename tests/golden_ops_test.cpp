// Golden tests: the library's ops reproduce, in fp32, what transformers computes.
//
// The fixtures under tests/data/golden/<case>/ were written once by tools/make_golden.py from
// transformers' own modules (MambaMixer's torch path, Llama/Qwen2 attention + rotary embedding); see
// each meta.json for shapes and versions. The tests never run Python.
//
// Tolerance: |got - want| <= 1e-5 |want| + 2e-6 max|want| per array. Both sides are fp32 with
// different summation orders; the relative part covers ordinary elements, and the absolute floor
// (about 16 fp32 ulps of the array's largest value) covers elements that come out near zero by
// cancellation, whose rounding error is set by the size of the summed terms, not by their own value.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/selective_scan.hpp"
#include "support/npy.hpp"
#include "support/test_util.hpp"

namespace rf = recurformer;

namespace {

constexpr double kGoldenRel = 1e-5;
constexpr double kGoldenAbsOfMax = 2e-6;

std::string golden_path(const std::string& test_case, const std::string& name) {
  return std::string(RECURFORMER_TEST_DATA_DIR) + "/golden/" + test_case + "/" + name + ".npy";
}

/// A golden float array with its shape.
struct Golden {
  std::vector<float> v;
  std::vector<int64_t> shape;
  float* data() { return v.data(); }
  int64_t dim(size_t i) const { return shape.at(i); }
};
Golden golden(const std::string& test_case, const std::string& name) {
  const rftest::npy::Array a = rftest::npy::load(golden_path(test_case, name));
  return {a.as<float>(), a.shape};
}
std::vector<int32_t> golden_i32(const std::string& test_case, const std::string& name) {
  return rftest::npy::load(golden_path(test_case, name)).as<int32_t>();
}

/// Compares n values against the golden ones with the tolerance above.
void check_golden(const std::string& what, const float* got, const float* want, size_t n) {
  std::vector<double> e(want, want + n);
  double max_abs = 0;
  for (double x : e) max_abs = std::max(max_abs, std::fabs(x));
  rftest::check_close(what, got, e.data(), n, kGoldenRel, kGoldenAbsOfMax * max_abs);
}
void check_golden(const std::string& what, const std::vector<float>& got, const Golden& want) {
  REQUIRE(got.size() == want.v.size());
  check_golden(what, got.data(), want.v.data(), got.size());
}

/// Caller-owned, 64-byte aligned scratch for an op's workspace query.
struct Workspace {
  std::vector<unsigned char> bytes;
  void* data = nullptr;
  size_t size = 0;
  explicit Workspace(size_t n) : bytes(n + 64), size(n) {
    data = bytes.data() + (64 - reinterpret_cast<uintptr_t>(bytes.data()) % 64) % 64;
  }
};

template <class T, int N>
rf::View<T, N> view(T* data, const int64_t (&shape)[N]) {
  return rf::make_view(data, shape);
}

// ------------------------------------------------------------------------------------------------
// Mamba: transformers' MambaMixer (prompt of 2 packed sequences, then 3 single-token decode steps)
// ------------------------------------------------------------------------------------------------
const char* const kMamba = "mamba_scan";

struct MambaFixture {
  Golden conv_weight = golden(kMamba, "conv_weight");  // [Dch, K]
  Golden conv_bias = golden(kMamba, "conv_bias");      // [Dch]
  Golden A = golden(kMamba, "A");                      // [Dch, N]
  Golden D = golden(kMamba, "D");                      // [Dch]
  Golden delta_bias = golden(kMamba, "delta_bias");    // [Dch]
  std::vector<int32_t> cu = golden_i32(kMamba, "cu_seqlens");  // [S+1]
  int64_t dch = A.dim(0), n = A.dim(1), k = conv_weight.dim(1);
  int64_t seqs = int64_t(cu.size()) - 1, tokens = cu.back();

  /// The scan's parameters for rows of golden arrays named prefix + "u" etc.
  struct ScanInputs {
    Golden u, delta, B, C, z;
  };
  ScanInputs scan_inputs(const std::string& prefix) const {
    return {golden(kMamba, prefix + "u"), golden(kMamba, prefix + "delta"), golden(kMamba, prefix + "B"),
            golden(kMamba, prefix + "C"), golden(kMamba, prefix + "z")};
  }
  /// Scan params over rows [t0, t0 + rows) of the inputs, writing y (rows [t0, ..) too).
  rf::SelectiveScanParams<float> scan_params(ScanInputs& in, int64_t t0, int64_t rows, float* y,
                                             float* state, int64_t slots) {
    rf::SelectiveScanParams<float> p;
    p.u = view<const float>(in.u.data() + t0 * dch, {rows, dch});
    p.delta = view<const float>(in.delta.data() + t0 * dch, {rows, dch});
    p.A = view<const float>(A.data(), {dch, n});
    p.B = view<const float>(in.B.data() + t0 * n, {rows, 1, n});
    p.C = view<const float>(in.C.data() + t0 * n, {rows, 1, 1, n});
    p.D = view<const float>(D.data(), {dch});
    p.z = view<const float>(in.z.data() + t0 * dch, {rows, dch});
    p.delta_bias = view<const float>(delta_bias.data(), {dch});
    p.y = view<float>(y + t0 * dch, {rows, 1, dch});
    p.state = view<float>(state, {slots, dch, n});
    p.delta_activation = rf::DeltaActivation::softplus;
    return p;
  }
  rf::CausalConv1dParams<float> conv_params(const float* x, int64_t rows, float* y, float* conv_state,
                                            int64_t slots) {
    rf::CausalConv1dParams<float> p;
    p.x = view<const float>(x, {rows, dch});
    p.weight = view<const float>(conv_weight.data(), {dch, k});
    p.bias = view<const float>(conv_bias.data(), {dch});
    p.y = view<float>(y, {rows, dch});
    p.conv_state = view<float>(conv_state, {slots, k - 1, dch});
    p.activation = rf::ConvActivation::silu;
    return p;
  }
};

TEST_CASE("golden mamba: causal_conv1d + SiLU over the packed prompt matches transformers", "[golden]") {
  MambaFixture f;
  Golden x = golden(kMamba, "conv_x"), want_y = golden(kMamba, "conv_y"),
         want_state = golden(kMamba, "conv_state");
  REQUIRE(x.shape == std::vector<int64_t>{f.tokens, f.dch});
  rf::ThreadPool pool(2);
  rftest::for_each_isa([&] {
    std::vector<float> y(size_t(f.tokens * f.dch), -7.f);
    // Garbage history: use_initial_state = false must ignore it (transformers starts from zeros).
    std::vector<float> conv_state(size_t(f.seqs * (f.k - 1) * f.dch), 3.f);
    auto p = f.conv_params(x.data(), f.tokens, y.data(), conv_state.data(), f.seqs);
    p.cu_seqlens = view<const int32_t>(f.cu.data(), {f.seqs + 1});
    p.use_initial_state = false;
    rf::causal_conv1d(p, rf::CpuExec{&pool});
    check_golden("conv y", y, want_y);
    check_golden("conv_state", conv_state, want_state);
  });
}

TEST_CASE("golden mamba: selective_scan over the packed prompt matches transformers", "[golden]") {
  MambaFixture f;
  auto in = f.scan_inputs("");
  Golden want_y = golden(kMamba, "y"), want_state = golden(kMamba, "ssm_state");
  REQUIRE(want_y.shape == std::vector<int64_t>{f.tokens, 1, f.dch});
  rf::ThreadPool pool(2);
  // (for_each_isa inside each SECTION: Catch runs one leaf section per pass of the test case.)
  SECTION("one call from a zero state") {
    rftest::for_each_isa([&] {
      std::vector<float> y(size_t(f.tokens * f.dch), -7.f), state(size_t(f.seqs * f.dch * f.n), 0.f);
      auto p = f.scan_params(in, 0, f.tokens, y.data(), state.data(), f.seqs);
      p.cu_seqlens = view<const int32_t>(f.cu.data(), {f.seqs + 1});
      rf::selective_scan(p, rf::CpuExec{&pool});
      check_golden("y", y, want_y);
      check_golden("ssm_state", state, want_state);
    });
  }
  SECTION("use_initial_state = false ignores what the state pool holds") {
    rftest::for_each_isa([&] {
      std::vector<float> y(size_t(f.tokens * f.dch), -7.f), state(size_t(f.seqs * f.dch * f.n), 5.f);
      auto p = f.scan_params(in, 0, f.tokens, y.data(), state.data(), f.seqs);
      p.cu_seqlens = view<const int32_t>(f.cu.data(), {f.seqs + 1});
      p.use_initial_state = false;
      rf::selective_scan(p, rf::CpuExec{&pool});
      check_golden("y", y, want_y);
      check_golden("ssm_state", state, want_state);
    });
  }
  SECTION("chunked prefill: two calls per sequence give the same as one") {
    rftest::for_each_isa([&] {
      std::vector<float> y(size_t(f.tokens * f.dch), -7.f), state(size_t(f.seqs * f.dch * f.n), 0.f);
      for (int64_t s = 0; s < f.seqs; ++s) {
        const int64_t b = f.cu[size_t(s)], e = f.cu[size_t(s) + 1], mid = b + (e - b) / 2;
        const int32_t slot = int32_t(s);
        for (auto range : {std::pair<int64_t, int64_t>{b, mid}, {mid, e}}) {
          auto p = f.scan_params(in, range.first, range.second - range.first, y.data(), state.data(), f.seqs);
          p.state_slots = view<const int32_t>(&slot, {1});
          rf::selective_scan(p, rf::CpuExec{&pool});
        }
      }
      check_golden("y", y, want_y);
      check_golden("ssm_state", state, want_state);
    });
  }
}

TEST_CASE("golden mamba: decode steps through causal_conv1d_update and selective_state_update", "[golden]") {
  MambaFixture f;
  Golden conv_state0 = golden(kMamba, "conv_state"), ssm_state0 = golden(kMamba, "ssm_state");
  const int64_t steps = 3, slots = 3;
  // Sequence s lives in slot slot_of[s] of a pool of 3; slot 1 belongs to nobody and must stay as it is.
  const std::vector<int32_t> slot_of = {2, 0};
  REQUIRE(f.seqs == int64_t(slot_of.size()));
  const int64_t conv_slot = (f.k - 1) * f.dch, ssm_slot = f.dch * f.n;
  rf::ThreadPool pool(2);
  rftest::for_each_isa([&] {
    std::vector<float> conv_state(size_t(slots * conv_slot), 9.f), state(size_t(slots * ssm_slot), 9.f);
    for (int64_t s = 0; s < f.seqs; ++s) {
      std::copy_n(conv_state0.v.begin() + s * conv_slot, conv_slot, conv_state.begin() + slot_of[size_t(s)] * conv_slot);
      std::copy_n(ssm_state0.v.begin() + s * ssm_slot, ssm_slot, state.begin() + slot_of[size_t(s)] * ssm_slot);
    }
    auto slot_rows = [&](const std::vector<float>& pool_values, int64_t per_slot) {
      std::vector<float> r;
      for (int32_t slot : slot_of)
        r.insert(r.end(), pool_values.begin() + slot * per_slot, pool_values.begin() + (slot + 1) * per_slot);
      return r;
    };
    for (int64_t i = 0; i < steps; ++i) {
      const std::string pre = "decode" + std::to_string(i) + "_";
      INFO("decode step " << i);
      Golden x = golden(kMamba, pre + "conv_x");
      std::vector<float> u(size_t(f.seqs * f.dch), -7.f);
      auto cp = f.conv_params(x.data(), f.seqs, u.data(), conv_state.data(), slots);
      cp.state_slots = view<const int32_t>(slot_of.data(), {f.seqs});
      rf::causal_conv1d_update(cp, rf::CpuExec{&pool});
      check_golden("conv y", u, golden(kMamba, pre + "conv_y"));
      check_golden("conv_state", slot_rows(conv_state, conv_slot), golden(kMamba, pre + "conv_state"));

      auto in = f.scan_inputs(pre);
      std::vector<float> y(size_t(f.seqs * f.dch), -7.f);
      auto sp = f.scan_params(in, 0, f.seqs, y.data(), state.data(), slots);
      sp.state_slots = view<const int32_t>(slot_of.data(), {f.seqs});
      rf::selective_state_update(sp, rf::CpuExec{&pool});
      check_golden("y", y, golden(kMamba, pre + "y"));
      check_golden("ssm_state", slot_rows(state, ssm_slot), golden(kMamba, pre + "ssm_state"));
    }
    REQUIRE(std::all_of(conv_state.begin() + conv_slot, conv_state.begin() + 2 * conv_slot,
                        [](float v) { return v == 9.f; }));
    REQUIRE(std::all_of(state.begin() + ssm_slot, state.begin() + 2 * ssm_slot, [](float v) { return v == 9.f; }));
  });
}

// ------------------------------------------------------------------------------------------------
// Llama attention: LlamaRotaryEmbedding + LlamaAttention (GQA 4/2, head_dim 64, eager, causal)
// ------------------------------------------------------------------------------------------------
struct LlamaCase {
  const char* name;
  float theta;
  rf::RopeScaling scaling;
};
std::vector<LlamaCase> llama_cases() {
  rf::RopeScaling llama3;
  llama3.type = rf::RopeScaling::Type::llama3;
  llama3.factor = 8;
  llama3.low_freq_factor = 1;
  llama3.high_freq_factor = 4;
  llama3.original_max_position = 8192;
  return {{"llama_attention_default", 10000.f, {}}, {"llama_attention_llama3", 500000.f, llama3}};
}

TEST_CASE("golden llama: rope_inv_freq and rope (rotate_half) match transformers", "[golden]") {
  rf::ThreadPool pool(2);
  for (const LlamaCase& c : llama_cases()) {
    INFO(c.name);
    Golden inv = golden(c.name, "inv_freq"), q = golden(c.name, "q"), k = golden(c.name, "k");
    Golden want_q = golden(c.name, "q_rope"), want_k = golden(c.name, "k_rope");
    std::vector<int32_t> pos = golden_i32(c.name, "positions");
    const int64_t tokens = q.dim(0), hd = q.dim(2);

    // The table is computed operation by operation in fp32 as transformers does: it must agree to
    // the last bit or two (1e-6 relative = ~8 ulps, no absolute floor).
    const std::vector<float> ours = rf::rope_inv_freq(int(hd), c.theta, c.scaling);
    REQUIRE(int64_t(ours.size()) == hd / 2);
    std::vector<double> want_inv(inv.v.begin(), inv.v.end());
    rftest::check_close("inv_freq", ours.data(), want_inv.data(), ours.size(), 1e-6, 0.0);

    rftest::for_each_isa([&] {
      const std::vector<float>* tables[] = {&inv.v, &ours};  // the golden table and ours
      for (const std::vector<float>* table : tables) {
        for (auto qk : {std::make_pair(&q, &want_q), std::make_pair(&k, &want_k)}) {
          std::vector<float> x = qk.first->v;
          rf::RopeParams<float> p;
          p.x = view<float>(x.data(), {tokens, qk.first->dim(1), hd});
          p.positions = view<const int32_t>(pos.data(), {tokens});
          p.inv_freq = view<const float>(table->data(), {hd / 2});
          p.layout = rf::RopeLayout::rotate_half;
          rf::rope(p, rf::CpuExec{&pool});
          check_golden(qk.first == &q ? "q after rope" : "k after rope", x, *qk.second);
        }
      }
    });
  }
}

TEST_CASE("golden llama: causal GQA attention matches transformers' eager attention", "[golden]") {
  rf::ThreadPool pool(2);
  for (const LlamaCase& c : llama_cases()) {
    INFO(c.name);
    Golden q = golden(c.name, "q_rope"), k = golden(c.name, "k_rope"), v = golden(c.name, "v"),
           want = golden(c.name, "attn");
    std::vector<int32_t> pos = golden_i32(c.name, "positions");
    const int64_t tokens = q.dim(0), n_q = q.dim(1), n_kv = k.dim(1), hd = q.dim(2);
    // Keys and values in a cache slot [slots = 1, n_kv, capacity, hd] with room to spare, their
    // true positions in k_positions (the llama3 case starts at 9000).
    const int64_t capacity = tokens + 5;
    std::vector<float> kc(size_t(n_kv * capacity * hd), 1e4f), vc(kc.size(), 1e4f);
    std::vector<int32_t> kpos(size_t(capacity), 0);
    for (int64_t t = 0; t < tokens; ++t) {
      kpos[size_t(t)] = pos[size_t(t)];
      for (int64_t h = 0; h < n_kv; ++h)
        for (int64_t d = 0; d < hd; ++d) {
          kc[size_t((h * capacity + t) * hd + d)] = k.v[size_t((t * n_kv + h) * hd + d)];
          vc[size_t((h * capacity + t) * hd + d)] = v.v[size_t((t * n_kv + h) * hd + d)];
        }
    }
    const int32_t kv_len = int32_t(tokens);

    // All queries in one prefill call, then the last few as a second chunk (decode-like).
    for (int64_t first : {int64_t(0), tokens - 3, tokens - 1}) {
      INFO("queries " << first << ".." << tokens - 1);
      rftest::for_each_isa([&] {
        const int64_t rows = tokens - first;
        std::vector<float> out(size_t(rows * n_q * hd), -7.f);
        rf::AttentionParams<float> p;
        p.q = view<const float>(q.data() + first * n_q * hd, {rows, n_q, hd});
        p.k = view<const float>(kc.data(), {1, n_kv, capacity, hd});
        p.v = view<const float>(vc.data(), {1, n_kv, capacity, hd});
        p.out = view<float>(out.data(), {rows, n_q, hd});
        p.kv_lens = view<const int32_t>(&kv_len, {1});
        p.q_positions = view<const int32_t>(pos.data() + first, {rows});
        p.k_positions = view<const int32_t>(kpos.data(), {1, capacity});
        p.scale = float(1.0 / std::sqrt(double(hd)));
        const rf::CpuExec exec{&pool};
        Workspace ws(rf::attention_workspace_bytes(p, exec));
        rf::attention(p, exec, ws.data, ws.size);
        check_golden("attention out", out.data(), want.v.data() + first * n_q * hd, out.size());
      });
    }
  }
}

TEST_CASE("golden llama: both cases packed in one attention call (varlen, slots, positions)", "[golden]") {
  // Sequence 0 = the llama3 case (positions 9000..) in cache slot 1, sequence 1 = the default case
  // (positions 0..) in slot 0: one call must give each its own golden output.
  const std::vector<LlamaCase> cases = llama_cases();
  const LlamaCase* seq_case[2] = {&cases[1], &cases[0]};
  const int32_t kv_slots[2] = {1, 0};
  std::vector<Golden> q, k, v, want;
  std::vector<std::vector<int32_t>> pos;
  for (const LlamaCase* c : seq_case) {
    q.push_back(golden(c->name, "q_rope"));
    k.push_back(golden(c->name, "k_rope"));
    v.push_back(golden(c->name, "v"));
    want.push_back(golden(c->name, "attn"));
    pos.push_back(golden_i32(c->name, "positions"));
  }
  const int64_t n_q = q[0].dim(1), n_kv = k[0].dim(1), hd = q[0].dim(2), capacity = 16;
  REQUIRE(q[1].dim(1) == n_q);
  REQUIRE(k[1].dim(1) == n_kv);
  std::vector<float> kc(size_t(2 * n_kv * capacity * hd), 1e4f), vc(kc.size(), 1e4f), qs, want_all;
  std::vector<int32_t> kpos(size_t(2 * capacity), 0), cu = {0}, lens, qpos;
  for (int s = 0; s < 2; ++s) {
    const int64_t tokens = q[size_t(s)].dim(0), slot = kv_slots[s];
    REQUIRE(tokens <= capacity);
    qs.insert(qs.end(), q[size_t(s)].v.begin(), q[size_t(s)].v.end());
    want_all.insert(want_all.end(), want[size_t(s)].v.begin(), want[size_t(s)].v.end());
    qpos.insert(qpos.end(), pos[size_t(s)].begin(), pos[size_t(s)].end());
    cu.push_back(cu.back() + int32_t(tokens));
    lens.push_back(int32_t(tokens));
    for (int64_t t = 0; t < tokens; ++t) {
      kpos[size_t(slot * capacity + t)] = pos[size_t(s)][size_t(t)];
      for (int64_t h = 0; h < n_kv; ++h)
        for (int64_t d = 0; d < hd; ++d) {
          const size_t dst = size_t(((slot * n_kv + h) * capacity + t) * hd + d), src = size_t((t * n_kv + h) * hd + d);
          kc[dst] = k[size_t(s)].v[src];
          vc[dst] = v[size_t(s)].v[src];
        }
    }
  }
  const int64_t tokens = cu.back();
  rf::ThreadPool pool(2);
  rftest::for_each_isa([&] {
    std::vector<float> out(size_t(tokens * n_q * hd), -7.f);
    rf::AttentionParams<float> p;
    p.q = view<const float>(qs.data(), {tokens, n_q, hd});
    p.k = view<const float>(kc.data(), {2, n_kv, capacity, hd});
    p.v = view<const float>(vc.data(), {2, n_kv, capacity, hd});
    p.out = view<float>(out.data(), {tokens, n_q, hd});
    p.cu_seqlens = view<const int32_t>(cu.data(), {3});
    p.kv_slots = view<const int32_t>(kv_slots, {2});
    p.kv_lens = view<const int32_t>(lens.data(), {2});
    p.q_positions = view<const int32_t>(qpos.data(), {tokens});
    p.k_positions = view<const int32_t>(kpos.data(), {2, capacity});
    const rf::CpuExec exec{&pool};
    Workspace ws(rf::attention_workspace_bytes(p, exec));
    rf::attention(p, exec, ws.data, ws.size);
    check_golden("packed attention out", out.data(), want_all.data(), out.size());
  });
}

/// y[T, out] = x[T, in] W^T (+ b) with the library's linear op (fp32 weights).
std::vector<float> golden_linear(const float* x, int64_t tokens, Golden& w, Golden* b, rf::CpuExec exec) {
  const int64_t out = w.dim(0), in = w.dim(1);
  std::vector<float> y(size_t(tokens * out), -7.f);
  rf::LinearParams<float, float> p;
  p.x = view<const float>(x, {tokens, in});
  p.weight = view<const float>(w.data(), {out, in});
  if (b) p.bias = view<const float>(b->data(), {out});
  p.y = view<float>(y.data(), {tokens, out});
  Workspace ws(rf::linear_workspace_bytes(p, exec));
  rf::linear(p, exec, ws.data, ws.size);
  return y;
}

TEST_CASE("golden qwen2: the whole attention layer from the library's ops matches Qwen2Attention", "[golden]") {
  // linear (q/k/v with biases) -> rope -> attention -> linear (o_proj), each step fed by the library's
  // own previous output, against transformers' intermediates.
  const char* c = "qwen2_attention";
  Golden x = golden(c, "x"), wq = golden(c, "q_weight"), bq = golden(c, "q_bias"), wk = golden(c, "k_weight"),
         bk = golden(c, "k_bias"), wv = golden(c, "v_weight"), bv = golden(c, "v_bias"), wo = golden(c, "o_weight");
  Golden want_q = golden(c, "q"), want_k = golden(c, "k"), want_v = golden(c, "v"), want_attn = golden(c, "attn"),
         want_out = golden(c, "out"), inv = golden(c, "inv_freq");
  std::vector<int32_t> pos = golden_i32(c, "positions");
  const int64_t tokens = x.dim(0), n_q = want_q.dim(1), n_kv = want_k.dim(1), hd = want_q.dim(2);
  rf::ThreadPool pool(2);
  const rf::CpuExec exec{&pool};
  rftest::for_each_isa([&] {
    std::vector<float> q = golden_linear(x.data(), tokens, wq, &bq, exec);
    std::vector<float> k = golden_linear(x.data(), tokens, wk, &bk, exec);
    std::vector<float> v = golden_linear(x.data(), tokens, wv, &bv, exec);
    check_golden("q = linear(x) + bias", q, want_q);
    check_golden("k = linear(x) + bias", k, want_k);
    check_golden("v = linear(x) + bias", v, want_v);

    const std::vector<float> ours = rf::rope_inv_freq(int(hd), 1e6f);
    std::vector<double> want_inv(inv.v.begin(), inv.v.end());
    rftest::check_close("inv_freq", ours.data(), want_inv.data(), ours.size(), 1e-6, 0.0);
    for (auto qk : {std::make_pair(&q, n_q), std::make_pair(&k, n_kv)}) {
      rf::RopeParams<float> p;
      p.x = view<float>(qk.first->data(), {tokens, qk.second, hd});
      p.positions = view<const int32_t>(pos.data(), {tokens});
      p.inv_freq = view<const float>(ours.data(), {hd / 2});
      rf::rope(p, exec);
    }
    check_golden("q after rope", q, golden(c, "q_rope"));
    check_golden("k after rope", k, golden(c, "k_rope"));

    // The chunk's keys as a cache slot with exactly `tokens` capacity: [1, n_kv, T, hd] strided over
    // the packed [T, n_kv, hd] projections (no copy).
    std::vector<int32_t> kpos = pos;
    const int32_t kv_len = int32_t(tokens);
    std::vector<float> attn(size_t(tokens * n_q * hd), -7.f);
    rf::AttentionParams<float> p;
    p.q = view<const float>(q.data(), {tokens, n_q, hd});
    p.k = rf::make_strided_view<const float>(k.data(), {1, n_kv, tokens, hd}, {0, hd, n_kv * hd, 1});
    p.v = rf::make_strided_view<const float>(v.data(), {1, n_kv, tokens, hd}, {0, hd, n_kv * hd, 1});
    p.out = view<float>(attn.data(), {tokens, n_q, hd});
    p.kv_lens = view<const int32_t>(&kv_len, {1});
    p.q_positions = view<const int32_t>(pos.data(), {tokens});
    p.k_positions = view<const int32_t>(kpos.data(), {1, tokens});
    Workspace ws(rf::attention_workspace_bytes(p, exec));
    rf::attention(p, exec, ws.data, ws.size);
    check_golden("attention out", attn, want_attn);

    check_golden("o_proj(attention out)", golden_linear(attn.data(), tokens, wo, nullptr, exec), want_out);
  });
}

// ------------------------------------------------------------------------------------------------
// The .npy reader itself
// ------------------------------------------------------------------------------------------------
TEST_CASE("npy reader: shapes, dtypes and clear errors", "[golden][npy]") {
  const rftest::npy::Array a = rftest::npy::load(golden_path(kMamba, "y"));
  CHECK(a.descr == "<f4");
  REQUIRE(a.shape.size() == 3);
  CHECK(a.numel() == int64_t(a.as<float>().size()));
  const std::vector<int32_t> cu = rftest::npy::load_as<int32_t>(golden_path(kMamba, "cu_seqlens"), {-1});
  CHECK(cu.front() == 0);
  CHECK_THROWS_WITH(a.as<int32_t>(), Catch::Contains("has dtype '<f4', expected '<i4'"));
  CHECK_THROWS_WITH(rftest::npy::load_as<float>(golden_path(kMamba, "y"), {1, 2}),
                    Catch::Contains("expected [1, 2]"));
  CHECK_THROWS_WITH(rftest::npy::load(golden_path(kMamba, "no_such_array")), Catch::Contains("cannot open"));
  CHECK_THROWS_WITH(rftest::npy::load(std::string(RECURFORMER_TEST_DATA_DIR) + "/golden/mamba_scan/meta.json"),
                    Catch::Contains("bad magic"));
}

}  // namespace
