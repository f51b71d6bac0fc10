// tests/backend_ops/cases.hpp: every op's backend test cases, written once (llama.cpp's
// test-backend-ops idea) and run by backend_ops_test on every backend the build has: the CPU at
// each vector ISA (cpu_backend.cpp) and CUDA (cuda_backend.cu, compiled by nvcc) where a device is
// present. The CPU's portable scalar body is the reference; it is itself tested against double
// references in tests/<op>_test.cpp.
//
// A case is a plain spec (shapes, lengths, masks); run_case() builds its inputs from the case's
// seed (the same bytes on every backend), puts them into the backend's memory, asks supports(),
// calls the op and brings the outputs back as doubles with the tolerance they are compared at.
// Properties a backend must hold on its own (paged K/V equals contiguous bit for bit, the padding
// of a strided output untouched, nothing written by a call that throws, supports() agreeing with
// the call) are checked inside the run and reported as failures.
//
// A Backend B provides: put(host vector) -> a copy in its memory (owned by B until it is
// destroyed), get(pointer, n) -> a host vector, exec() -> the CpuExec or CudaExec the ops take.
// The op entry points are found by argument-dependent lookup on that exec, so this header needs
// only the ops' params (ops/), and the TU that includes it brings the backend's implementations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "recurformer/core/dispatch.hpp"
#include "recurformer/core/support.hpp"
#include "recurformer/ops/attention.hpp"
#include "recurformer/ops/causal_conv1d.hpp"
#include "recurformer/ops/linear.hpp"
#include "recurformer/ops/recency_score.hpp"
#include "recurformer/ops/rope.hpp"
#include "recurformer/ops/selective_scan.hpp"
#include "support/test_util.hpp"

namespace rfops {

using namespace recurformer;
using recurformer::bfloat16;
using recurformer::half;  // not CUDA's ::half (cuda_fp16.h)
using Rng = std::mt19937_64;

/// One output of a case, as doubles, with the budget a backend's value may differ from the
/// reference's by: |a - r| <= abs + rel * (magnitude.empty() ? |r| : magnitude[i]).
struct Output {
  std::string name;
  std::vector<double> values;
  double rel = 0, abs = 0;
  std::vector<double> magnitude;  // linear: sum |x w| per element (a dot product's error scale)
};

/// What one backend made of one case.
struct Result {
  std::vector<Output> outputs;
  std::vector<std::string> failures;  // properties the backend broke on its own
  std::string error;                  // what the call threw (Error::what)
  std::string unsupported;            // supports() said no: its first reason
};

// ---- Specs: the cases, as data -----------------------------------------------------------------

/// Attention: sequence s has chunk[s] new queries after before[s] stored keys, in slot slot_of[s].
struct AttentionSpec {
  int64_t n_q, n_kv, hd, slots, cap;
  std::vector<int32_t> before, chunk, slot_of;
  enum class Keys { dense, ring, shuffled, future } keys = Keys::dense;  // stored key positions
  int sink = 0, window = 0;
  bool packed = true;
  int64_t page_size = 0;   // > 0: also run over a shuffled paged copy, which must be bit-identical
  bool share_page = false; // the paged copy's sequence 1 reads sequence 0's first page
  bool misalign_k = false; // K rows start 4 bytes into the buffer (not 16-byte aligned)
  bool lie_v = false;      // v's capacity one short of k's: every backend refuses
};

/// The scan over packed sequences (update: one token per row, selective_state_update).
struct ScanSpec {
  std::vector<int32_t> lengths, slot_of;
  int64_t dch, n, g, r, slots;
  bool update = false;
};

/// causal_conv1d over packed sequences, then causal_conv1d_update over update_slots.
struct ConvSpec {
  std::vector<int32_t> lengths, slot_of, update_slots;
  int64_t dch, k, slots;
};

/// y = x W^T (+ b) with rows strided past their length when strided (y's padding must stay).
struct LinearSpec {
  int64_t tokens, in, out;
  bool bias = false, strided = false;
  bool lie_weight = false;  // weight one column short: every backend refuses
};

struct RopeSpec {
  int64_t hd, tokens;
  RopeLayout layout;
  bool lie_inv_freq = false;  // inv_freq one short: every backend refuses
};

struct RecencySpec {
  int64_t seq, n_q, n_kv, hd;
  int window, sink;
};

using Spec = std::variant<AttentionSpec, ScanSpec, ConvSpec, LinearSpec, RopeSpec, RecencySpec>;

/// A case: its spec, the storage dtype (linear: x's; w is wdtype), a label and a seed.
struct Case {
  std::string op, label;
  DType dtype, wdtype;
  Spec spec;
  std::string expect_error;  // non-empty: every backend must throw an Error containing this
  uint64_t seed = 0;         // the driver numbers the cases

  Case(std::string op_, std::string label_, DType dt, DType wdt, Spec spec_, std::string expect = {})
      : op(std::move(op_)), label(std::move(label_)), dtype(dt), wdtype(wdt), spec(std::move(spec_)),
        expect_error(std::move(expect)) {}
};

// ---- Helpers shared by the runs ----------------------------------------------------------------

using rftest::random_vector;
using rftest::to_double;

/// An output compared at `scale` times T's test tolerance.
template <class T>
Output output(std::string name, const std::vector<T>& v, double scale) {
  return {std::move(name), to_double(v), rftest::Tolerance<T>::rel * scale, rftest::Tolerance<T>::abs * scale, {}};
}

/// Makes the call after the backend's supports() answer `s`: a backend that says no must throw
/// exactly its first reason. Returns whether the call ran.
template <class Call>
bool launch(Result& r, const Support& s, Call&& call) {
  if (!s) r.unsupported = s.reasons.front();
  try {
    call();
  } catch (const Error& e) {
    r.error = e.what();
  }
  if (!s && r.error != r.unsupported)
    r.failures.push_back("supports() said \"" + r.unsupported + "\" but the call " +
                         (r.error.empty() ? std::string("ran") : "threw \"" + r.error + "\""));
  return r.error.empty();
}

/// After a call that threw: the output it would have written must be as it was.
template <class T>
void require_untouched(Result& r, const char* name, const std::vector<T>& now, const std::vector<T>& before) {
  if (now.size() != before.size() || std::memcmp(now.data(), before.data(), now.size() * sizeof(T)) != 0)
    r.failures.push_back(std::string(name) + " was written by a call that threw");
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// ---- Attention -----------------------------------------------------------------------------------

// The backends round the same fp32 math to T once; they differ in exp (CPU polynomial vs expf),
// in summation order over up to 3000 keys and in where key splits fall, which fp32 sees at a few
// ulps of the output and of the lse (|lse| ~ 8): a factor 4 on the float budget, none on the
// 16-bit ones (their storage rounding dominates).
template <class T>
constexpr double kAttentionScale = std::is_same<T, float>::value ? 4.0 : 1.0;

template <class T, class B>
Result run_attention(const AttentionSpec& s, B& be, Rng& g) {
  std::vector<int32_t> cu{0}, kv_lens, q_pos, k_pos;
  for (size_t i = 0; i < s.chunk.size(); ++i) {
    cu.push_back(cu.back() + s.chunk[i]);
    kv_lens.push_back(s.before[i] + s.chunk[i]);
    for (int32_t j = 0; j < s.chunk[i]; ++j) q_pos.push_back(s.before[i] + j);
  }
  const int64_t tokens = cu.back(), S = int64_t(kv_lens.size()), cap = s.cap, row = s.hd;
  if (s.keys == AttentionSpec::Keys::ring) {
    // Ring of `sink` sinks + `window` entries: index sink + pos % window holds position pos (the
    // newest `window` of the sequence); unfilled entries hold INT32_MAX (never visible).
    k_pos.assign(size_t(s.slots * cap), INT32_MAX);
    for (int64_t i = 0; i < S; ++i) {
      const int32_t len = kv_lens[size_t(i)], slot = s.slot_of[size_t(i)];
      for (int32_t pos = 0; pos < len; ++pos)
        if (pos < s.sink || pos >= len - s.window)
          k_pos[size_t(slot * cap + (pos < s.sink ? pos : s.sink + pos % s.window))] = pos;
      kv_lens[size_t(i)] = int32_t(cap);
    }
  } else if (s.keys == AttentionSpec::Keys::shuffled) {
    k_pos.resize(size_t(s.slots * cap));
    std::iota(k_pos.begin(), k_pos.end(), 0);
    std::shuffle(k_pos.begin(), k_pos.end(), g);
  } else if (s.keys == AttentionSpec::Keys::future) {  // every key after every query: rows see none
    k_pos.resize(size_t(s.slots * cap));
    std::iota(k_pos.begin(), k_pos.end(), 10);
  }
  auto q = random_vector<T>(g, size_t(tokens * s.n_q * s.hd));
  auto k = random_vector<T>(g, size_t(s.slots * s.n_kv * cap * row) + 1);  // + 1: room to misalign
  auto v = random_vector<T>(g, size_t(s.slots * s.n_kv * cap * row));
  const auto out0 = random_vector<T>(g, size_t(tokens * s.n_q * s.hd));
  const auto lse0 = random_vector<float>(g, size_t(tokens * s.n_q));
  auto at = [&](int64_t slot, int64_t kh, int64_t j) { return size_t(((slot * s.n_kv + kh) * cap + j) * row); };
  if (s.share_page)  // sequence 1's first page holds sequence 0's keys, so the two may share it
    for (int64_t kh = 0; kh < s.n_kv; ++kh)
      for (auto* kv : {&k, &v})
        std::copy_n(kv->begin() + at(s.slot_of[0], kh, 0), s.page_size * row, kv->begin() + at(s.slot_of[1], kh, 0));

  AttentionParams<T> p;
  p.q = make_view<const T>(be.put(q), {tokens, s.n_q, s.hd});
  p.k = make_view<const T>(be.put(k) + (s.misalign_k ? 1 : 0), {s.slots, s.n_kv, cap, s.hd});
  p.v = make_view<const T>(be.put(v), {s.slots, s.n_kv, s.lie_v ? cap - 1 : cap, s.hd});
  if (s.packed) p.cu_seqlens = make_view<const int32_t>(be.put(cu), {S + 1});
  if (s.packed) p.kv_slots = make_view<const int32_t>(be.put(s.slot_of), {S});
  p.kv_lens = make_view<const int32_t>(be.put(kv_lens), {S});
  p.q_positions = make_view<const int32_t>(be.put(q_pos), {tokens});
  if (!k_pos.empty()) p.k_positions = make_view<const int32_t>(be.put(k_pos), {s.slots, cap});
  p.sink = s.sink, p.window = s.window;

  // One call into fresh out / lse buffers; returns them.
  auto call = [&](AttentionParams<T> pc, Result& r) {
    pc.out = make_view(be.put(out0), {tokens, s.n_q, s.hd});
    pc.lse = make_view(be.put(lse0), {tokens, s.n_q});
    launch(r, supports(pc, be.exec()), [&] {
      const size_t bytes = attention_workspace_bytes(pc, be.exec());
      attention(pc, be.exec(), be.put(std::vector<unsigned char>(bytes + 1)), bytes);
    });
    return std::make_pair(be.get(pc.out.data, out0.size()), be.get(pc.lse.data, lse0.size()));
  };
  Result r;
  const auto [out, lse] = call(p, r);
  if (!r.error.empty()) {
    require_untouched(r, "out", out, out0);
    require_untouched(r, "lse", lse, lse0);
    return r;
  }
  r.outputs.push_back(output<T>("out", out, kAttentionScale<T>));
  r.outputs.push_back(output<float>("lse", lse, kAttentionScale<float>));
  if (s.page_size == 0) return r;

  // The same keys in a shuffled pool of pages of page_size (pages past a sequence's keys: -1,
  // never read; unwritten rows: noise); with share_page, sequence 1's first page is sequence 0's.
  const int64_t ps = s.page_size, max_pages = cap / ps, pages = S * max_pages + 3;
  std::vector<int32_t> free_pages(static_cast<size_t>(pages)), table(size_t(S * max_pages), -1);
  std::iota(free_pages.begin(), free_pages.end(), 0);
  std::shuffle(free_pages.begin(), free_pages.end(), g);
  for (int64_t i = 0; i < S; ++i)
    for (int64_t j = 0; j * ps < kv_lens[size_t(i)]; ++j) {
      const bool shared = s.share_page && i == 1 && j == 0;
      table[size_t(i * max_pages + j)] = shared ? table[0] : free_pages.back();
      if (!shared) free_pages.pop_back();
    }
  auto pk = random_vector<T>(g, size_t(pages * s.n_kv * ps * row));
  auto pv = random_vector<T>(g, pk.size());
  for (int64_t i = 0; i < S; ++i)
    for (int64_t j = 0; j < kv_lens[size_t(i)]; ++j)
      for (int64_t kh = 0; kh < s.n_kv; ++kh) {
        const size_t dst = size_t(((table[size_t(i * max_pages + j / ps)] * s.n_kv + kh) * ps + j % ps) * row);
        std::copy_n(k.begin() + at(s.slot_of[size_t(i)], kh, j), row, pk.begin() + dst);
        std::copy_n(v.begin() + at(s.slot_of[size_t(i)], kh, j), row, pv.begin() + dst);
      }
  AttentionParams<T> pp = p;
  pp.k = make_view<const T>(be.put(pk), {pages, s.n_kv, ps, s.hd});
  pp.v = make_view<const T>(be.put(pv), {pages, s.n_kv, ps, s.hd});
  pp.kv_slots = {};
  pp.page_table = make_view<const int32_t>(be.put(table), {S, max_pages});
  Result rp;
  const auto [pout, plse] = call(pp, rp);
  for (auto& f : rp.failures) r.failures.push_back("paged: " + f);
  if (!rp.error.empty())
    r.failures.push_back("paged: " + rp.error);
  else if (!same_bits(pout, out) || !same_bits(plse, lse))
    r.failures.push_back("paged K/V (pages of " + std::to_string(ps) + ") differs from contiguous");
  return r;
}

// ---- Selective scan and causal conv1d ---------------------------------------------------------

// The backends use different exp and softplus approximations (CPU polynomial vs __expf), so fp32
// results agree to a few ulps per step, compounded over the decaying state.
template <class T>
constexpr double kScanScale = std::is_same<T, float>::value ? 10.0 : 1.0;

template <class T, class B>
Result run_scan(const ScanSpec& s, B& be, Rng& g) {
  std::vector<int32_t> cu{0};
  for (int32_t l : s.lengths) cu.push_back(cu.back() + l);
  const int64_t T_ = cu.back(), S = int64_t(s.lengths.size());
  const auto u = random_vector<T>(g, size_t(T_ * s.dch)), delta = random_vector<T>(g, size_t(T_ * s.dch), -1.0, 0.5);
  const auto B_ = random_vector<T>(g, size_t(T_ * s.g * s.n)), C = random_vector<T>(g, size_t(T_ * s.g * s.r * s.n));
  const auto z = random_vector<T>(g, size_t(T_ * s.dch), -3, 3), y0 = random_vector<T>(g, size_t(T_ * s.r * s.dch));
  const auto A = random_vector<float>(g, size_t(s.dch * s.n), -2.0, -0.05), D = random_vector<float>(g, size_t(s.dch));
  const auto bias = random_vector<float>(g, size_t(s.dch), -0.5, 0.5);
  const auto state0 = random_vector<float>(g, size_t(s.slots * s.dch * s.n));
  SelectiveScanParams<T> p;
  p.u = make_view<const T>(be.put(u), {T_, s.dch});
  p.delta = make_view<const T>(be.put(delta), {T_, s.dch});
  p.A = make_view<const float>(be.put(A), {s.dch, s.n});
  p.B = make_view<const T>(be.put(B_), {T_, s.g, s.n});
  p.C = make_view<const T>(be.put(C), {T_, s.g, s.r, s.n});
  p.D = make_view<const float>(be.put(D), {s.dch});
  p.z = make_view<const T>(be.put(z), {T_, s.dch});
  p.delta_bias = make_view<const float>(be.put(bias), {s.dch});
  p.y = make_view(be.put(y0), {T_, s.r, s.dch});
  p.state = make_view(be.put(state0), {s.slots, s.dch, s.n});
  if (!s.update) p.cu_seqlens = make_view<const int32_t>(be.put(cu), {S + 1});
  p.state_slots = make_view<const int32_t>(be.put(s.slot_of), {S});
  Result r;
  launch(r, s.update ? supports_update(p, be.exec()) : supports(p, be.exec()), [&] { s.update ? selective_state_update(p, be.exec()) : selective_scan(p, be.exec()); });
  const auto y = be.get(p.y.data, y0.size());
  const auto state = be.get(p.state.data, state0.size());
  if (!r.error.empty()) {
    require_untouched(r, "y", y, y0);
    require_untouched(r, "state", state, state0);
    return r;
  }
  r.outputs.push_back(output<T>("y", y, kScanScale<T>));
  r.outputs.push_back(output<float>("state", state, kScanScale<float>));
  return r;
}

template <class T, class B>
Result run_conv(const ConvSpec& s, B& be, Rng& g) {
  std::vector<int32_t> cu{0};
  for (int32_t l : s.lengths) cu.push_back(cu.back() + l);
  const int64_t T_ = cu.back(), S = int64_t(s.lengths.size()), U = int64_t(s.update_slots.size());
  const auto x = random_vector<T>(g, size_t(T_ * s.dch)), y0 = random_vector<T>(g, size_t(T_ * s.dch));
  const auto w = random_vector<float>(g, size_t(s.dch * s.k)), bias = random_vector<float>(g, size_t(s.dch));
  const auto st0 = random_vector<T>(g, size_t(s.slots * (s.k - 1) * s.dch));
  CausalConv1dParams<T> p;
  T* dx = be.put(x);
  T* dy = be.put(y0);
  p.x = make_view<const T>(dx, {T_, s.dch});
  p.y = make_view(dy, {T_, s.dch});
  p.weight = make_view<const float>(be.put(w), {s.dch, s.k});
  p.bias = make_view<const float>(be.put(bias), {s.dch});
  p.conv_state = make_view(be.put(st0), {s.slots, s.k - 1, s.dch});
  p.cu_seqlens = make_view<const int32_t>(be.put(cu), {S + 1});
  p.state_slots = make_view<const int32_t>(be.put(s.slot_of), {S});
  p.activation = ConvActivation::silu;
  Result r;
  // Prefill over the packed sequences, then one decode row per update slot (padding included).
  const bool ran = launch(r, supports(p, be.exec()), [&] { causal_conv1d(p, be.exec()); });
  const auto y = be.get(dy, y0.size()), st = be.get(p.conv_state.data, st0.size());
  if (!ran) {
    require_untouched(r, "y", y, y0);
    require_untouched(r, "conv_state", st, st0);
    return r;
  }
  r.outputs.push_back(output<T>("y", y, 1.0));
  r.outputs.push_back(output<T>("conv_state", st, 1.0));
  CausalConv1dParams<T> up = p;
  up.x = make_view<const T>(dx, {U, s.dch});
  up.y = make_view(dy, {U, s.dch});
  up.cu_seqlens = {};
  up.state_slots = make_view<const int32_t>(be.put(s.update_slots), {U});
  Result ru;
  if (!launch(ru, supports_update(up, be.exec()), [&] { causal_conv1d_update(up, be.exec()); })) {
    r.failures.push_back("update: " + (ru.failures.empty() ? ru.error : ru.failures.front()));
    return r;
  }
  r.outputs.push_back(output<T>("update y", be.get(dy, y0.size()), 1.0));
  r.outputs.push_back(output<T>("update conv_state", be.get(up.conv_state.data, st0.size()), 1.0));
  return r;
}

// ---- Linear --------------------------------------------------------------------------------------

template <class T>
constexpr double unit_roundoff() {
  return std::is_same<T, half>::value ? 1.0 / 2048 : std::is_same<T, bfloat16>::value ? 1.0 / 256 : 0x1p-24;
}

// Budget per element relative to m = |b| + sum_i |x_i w_i| (a dot product's rounding error scales
// with m, not with |y|; linear_test.cpp): each side is within Tolerance<TX>::rel * m of the exact
// value (fp32 accumulation of <= 300 terms, and for 16-bit y its one rounding); fp32 x with 16-bit
// weights adds the rounding of x to TW on the tensor-core path (each product moves by at most
// u_TW |x_i w_i|; factor 2 for the MMA's truncating accumulation). Two sides: the sum of both.
template <class TX, class TW>
double linear_rel() {
  return 2 * rftest::Tolerance<TX>::rel + (std::is_same<TX, TW>::value ? 0.0 : 2.0 * unit_roundoff<TW>());
}

template <class TX, class TW, class B>
Result run_linear(const LinearSpec& s, B& be, Rng& g) {
  using TB = typename LinearWeight<TW>::bias_type;
  const int64_t ldx = s.in + (s.strided ? 5 : 0), ldw = s.in + (s.strided ? 3 : 0), ldy = s.out + (s.strided ? 2 : 0);
  // + 1 element: with tokens = 0 the views still need a non-null pointer (an absent x or y throws).
  const auto x = random_vector<TX>(g, size_t(s.tokens * ldx + 1));
  const auto w = random_vector<TW>(g, size_t(s.out * ldw));
  const auto b = random_vector<TB>(g, size_t(s.out));
  const std::vector<TX> y0(size_t(s.tokens * ldy + 1), TX(7.f));  // 7: the padding's sentinel
  LinearParams<TX, TW> p;
  p.x = make_strided_view<const TX>(be.put(x), {s.tokens, s.in}, {ldx, 1});
  p.weight = make_strided_view<const TW>(be.put(w), {s.out, s.lie_weight ? s.in - 1 : s.in}, {ldw, 1});
  if (s.bias) p.bias = make_view<const TB>(be.put(b), {s.out});
  p.y = make_strided_view(be.put(y0), {s.tokens, s.out}, {ldy, 1});
  Result r;
  launch(r, supports(p, be.exec()), [&] {
    const size_t bytes = linear_workspace_bytes(p, be.exec());
    // The workspace starts 6 bytes into its buffer, so the op's own alignment is exercised.
    linear(p, be.exec(), be.put(std::vector<unsigned char>(bytes + 6)) + 6, bytes);
  });
  const auto y = be.get(p.y.data, y0.size());
  if (!r.error.empty()) {
    require_untouched(r, "y", y, y0);
    return r;
  }
  Output o{"y", {}, linear_rel<TX, TW>(), 2 * rftest::Tolerance<TX>::abs, {}};
  for (int64_t t = 0; t < s.tokens; ++t) {
    for (int64_t n = 0; n < s.out; ++n) {
      double m = s.bias ? std::fabs(double(float(b[size_t(n)]))) : 0.0;
      for (int64_t i = 0; i < s.in; ++i)
        m += std::fabs(double(float(x[size_t(t * ldx + i)])) * double(float(w[size_t(n * ldw + i)])));
      o.values.push_back(double(float(y[size_t(t * ldy + n)])));
      o.magnitude.push_back(m);
    }
    for (int64_t n = s.out; n < ldy; ++n)
      if (float(y[size_t(t * ldy + n)]) != 7.f) r.failures.push_back("y's padding was written");
  }
  r.outputs.push_back(std::move(o));
  return r;
}

// ---- RoPE and recency ----------------------------------------------------------------------------

template <class T, class B>
Result run_rope(const RopeSpec& s, B& be, Rng& g) {
  RopeScaling llama3;
  llama3.type = RopeScaling::Type::llama3;
  const int64_t heads = 5, head_stride = s.hd + 4, tok_stride = heads * head_stride + 3;  // padded
  const auto x0 = random_vector<T>(g, size_t(s.tokens * tok_stride));
  std::vector<int32_t> pos(static_cast<size_t>(s.tokens));
  for (auto& q : pos) q = int32_t(g() % 40001);  // large angles
  const std::vector<float> inv =
      s.hd >= 64 ? rope_inv_freq(int(s.hd), 500000.f, llama3) : rope_inv_freq(int(s.hd), 10000.f);
  RopeParams<T> p;
  p.x = make_strided_view(be.put(x0), {s.tokens, heads, s.hd}, {tok_stride, head_stride, 1});
  p.positions = make_view<const int32_t>(be.put(pos), {s.tokens});
  p.inv_freq = make_view<const float>(be.put(inv), {s.hd / 2 - (s.lie_inv_freq ? 1 : 0)});
  p.layout = s.layout;
  Result r;
  launch(r, supports(p, be.exec()), [&] { rope(p, be.exec()); });
  const auto x = be.get(p.x.data, x0.size());  // the padding is compared too: it must stay
  if (!r.error.empty())
    require_untouched(r, "x", x, x0);
  else  // both sides rotate in fp32; cos/sin differ by an ulp or two (glibc vs sincosf)
    r.outputs.push_back(output<T>("x", x, 1.0));
  return r;
}

template <class T, class B>
Result run_recency(const RecencySpec& s, B& be, Rng& g) {
  const auto q = random_vector<T>(g, size_t(s.seq * s.n_q * s.hd), -2, 2);
  const auto k = random_vector<T>(g, size_t(s.seq * s.n_kv * s.hd), -2, 2);
  std::vector<RecencyHeadStats> stats0(static_cast<size_t>(s.n_q));
  for (size_t h = 0; h < stats0.size(); ++h)  // earlier sequences' sums: the op adds to them
    stats0[h] = {0.25 * double(h), 0.5, 3.0 * double(h), int64_t(h) * 7};
  RecencyScoreParams<T> p;
  p.q = make_view<const T>(be.put(q), {s.seq, s.n_q, s.hd});
  p.k = make_view<const T>(be.put(k), {s.seq, s.n_kv, s.hd});
  p.stats = make_view(be.put(stats0), {s.n_q});
  p.window = s.window;
  p.sink_tokens = s.sink;
  Result r;
  launch(r, supports(p, be.exec()), [&] { recency_score(p, be.exec()); });
  const auto st = be.get(p.stats.data, stats0.size());
  if (!r.error.empty()) {
    require_untouched(r, "stats", st, stats0);
    return r;
  }
  // Both sides sum in double over fp32 logits: their order and exp differ, which moves each row's
  // terms by a few fp32 ulps; a head's sums at 1e-5 relative plus 1e-6 per query it scored
  // (rel 1e-5 of magnitude |sum| + 0.1 (queries + 1)). The counts are exact.
  Output counts{"queries", {}, 0, 0, {}}, sums{"sums", {}, 1e-5, 0, {}};
  for (const RecencyHeadStats& h : st) {
    counts.values.push_back(double(h.queries));
    for (double v : {h.recency_sum, h.sink_sum, h.distance_sum}) {
      sums.values.push_back(v);
      sums.magnitude.push_back(std::fabs(v) + 0.1 * double(h.queries + 1));
    }
  }
  r.outputs.push_back(std::move(counts));
  r.outputs.push_back(std::move(sums));
  return r;
}

// ---- Dispatch: a case's runtime dtypes to the templates, in one place ----------------------------

template <class B>
Result run_case(const Case& c, B& be) {
  Rng g(c.seed);
  return std::visit(
      [&](const auto& spec) -> Result {
        using S = std::decay_t<decltype(spec)>;
        return dispatch_dtype("backend_ops", c.dtype, [&](auto tag) -> Result {
          using T = typename decltype(tag)::type;
          if constexpr (std::is_same_v<S, LinearSpec>) {
            if (!std::is_same_v<T, float> && c.wdtype != c.dtype) fail("backend_ops: 16-bit x takes its own weight type");
            return dispatch_dtype("backend_ops", c.wdtype, [&](auto wtag) -> Result {
              using TW = typename decltype(wtag)::type;
              if constexpr (std::is_same_v<T, float> || std::is_same_v<T, TW>) return run_linear<T, TW>(spec, be, g);
              return {};  // refused above
            });
          } else if constexpr (std::is_same_v<S, AttentionSpec>) {
            return run_attention<T>(spec, be, g);
          } else if constexpr (std::is_same_v<S, ScanSpec>) {
            return run_scan<T>(spec, be, g);
          } else if constexpr (std::is_same_v<S, ConvSpec>) {
            return run_conv<T>(spec, be, g);
          } else if constexpr (std::is_same_v<S, RopeSpec>) {
            return run_rope<T>(spec, be, g);
          } else {
            return run_recency<T>(spec, be, g);
          }
        });
      },
      c.spec);
}

}  // namespace rfops
