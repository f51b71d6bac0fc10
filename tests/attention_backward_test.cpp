// attention_backward against central finite differences of a plain double-precision attention
// forward written here (causal by positions, GQA, streaming sink + window, packed sequences of
// different lengths over shuffled cache slots with prefixes already stored, a ring buffer, two
// sequences sharing a slot, a row that sees no key), and against the analytic gradients in double
// that those differences validate; every storage dtype and ISA, 1 and 2 threads (bit-identical);
// the forward's lse against the reference log-sum-exp; a PyTorch autograd fixture; bad input.
//
// Loss L = sum(dout * out) for a random dout. Inputs are multiples of 1/64 with at most 8
// significant bits, so float, half and bfloat16 hold them exactly and one double reference serves
// every dtype. head_dim is 64 or 128: the kernels are compiled for AttentionHeadDims only, and an
// unsupported head_dim is an error (tested below), so smaller "awkward" head dims do not exist here;
// the awkwardness is in the token and key counts (1, 7, 19, 23 tokens, 45-key tiles, 21-token blocks).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/attention_backward.hpp"
#include "support/npy.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

/// n values j / 64, j uniform in [-64 a, 64 a] without 0: never zero, exact in every storage dtype
/// (|j| <= 128 needs at most 8 significant bits, bfloat16's precision).
std::vector<double> grid_values(size_t n, int a) {
  std::uniform_int_distribution<int> d(-64 * a, 64 * a - 1);
  std::vector<double> r(n);
  for (double& x : r) {
    int j = d(rftest::rng());
    x = (j >= 0 ? j + 1 : j) / 64.0;
  }
  return r;
}

struct Case {
  int n_q = 6, n_kv = 2, hd = 64;
  std::vector<int> q_lens{7}, kv_lens{7};  // queries / keys (this chunk's included) per sequence
  std::vector<int> slot_of;                // slot of each sequence (empty: s + 1, slot 0 unread)
  int slots = 0;                           // 0: sequences + 1
  int capacity = 0;                        // 0: max kv_len + 3 (keys past kv_len are NaN)
  bool ring = false;                       // k_positions: slot j holds position pos_offset + (j + 5) % len
  int pos_offset = 0;
  bool blind_first_query = false;          // query 0 before every key: its row sees nothing
  int sink = 0, window = 0;
  float scale = 0;
};

/// A case's inputs in double and the reference attention on them.
struct Problem {
  Case c;
  int S = 0, tokens = 0, slots = 0, cap = 0, g = 0, hd = 0;
  double scale = 0;
  std::vector<int32_t> cu, kv_slots, kv_lens, qpos, kpos;  // kpos: [slots, cap]
  std::vector<int> seq_of;                                 // [tokens]
  std::vector<double> q, k, v, dout;                       // k, v: NaN where no sequence may read

  explicit Problem(const Case& c_) : c(c_) {
    S = int(c.q_lens.size());
    tokens = std::accumulate(c.q_lens.begin(), c.q_lens.end(), 0);
    cap = c.capacity ? c.capacity : *std::max_element(c.kv_lens.begin(), c.kv_lens.end()) + 3;
    slots = c.slots ? c.slots : S + 1;
    g = c.n_q / c.n_kv;
    hd = c.hd;
    scale = c.scale > 0 ? double(c.scale) : 1.0 / std::sqrt(double(hd));
    cu.assign(size_t(S) + 1, 0);
    kv_slots.resize(size_t(S));
    kv_lens.assign(c.kv_lens.begin(), c.kv_lens.end());
    for (int s = 0; s < S; ++s) {
      cu[size_t(s) + 1] = cu[size_t(s)] + c.q_lens[size_t(s)];
      kv_slots[size_t(s)] = c.slot_of.empty() ? s + 1 : c.slot_of[size_t(s)];
      for (int i = 0; i < c.q_lens[size_t(s)]; ++i) seq_of.push_back(s);
    }
    kpos.assign(size_t(slots) * cap, 0);
    for (int sl = 0; sl < slots; ++sl)
      for (int j = 0; j < cap; ++j) kpos[size_t(sl) * cap + j] = j;
    q = grid_values(size_t(tokens) * c.n_q * hd, 2);  // sharper softmax than [-1, 1]
    k = grid_values(size_t(slots) * c.n_kv * cap * hd, 1);
    v = grid_values(k.size(), 1);
    dout = grid_values(q.size(), 1);
    std::vector<int> readable(size_t(slots), 0);  // keys some reader may see, per slot
    for (int s = 0; s < S; ++s) {
      const int sl = kv_slots[size_t(s)], len = kv_lens[size_t(s)];
      readable[size_t(sl)] = std::max(readable[size_t(sl)], len);
      if (c.ring)
        for (int j = 0; j < len; ++j) kpos[size_t(sl) * cap + j] = c.pos_offset + (j + 5) % len;
      for (int i = 0; i < c.q_lens[size_t(s)]; ++i)  // the last q_len positions of the sequence's keys
        qpos.push_back((c.ring ? c.pos_offset : 0) + len - c.q_lens[size_t(s)] + i);
    }
    if (c.blind_first_query) qpos[0] = (c.ring ? c.pos_offset : 0) - 1;
    for (int sl = 0; sl < slots; ++sl)  // the kernels must never read these
      for (int kh = 0; kh < c.n_kv; ++kh)
        for (int j = readable[size_t(sl)]; j < cap; ++j)
          for (int d = 0; d < hd; ++d) k[ki(sl, kh, j, d)] = v[ki(sl, kh, j, d)] = NAN;
  }

  size_t qi(int t, int h, int d) const { return (size_t(t) * c.n_q + h) * hd + d; }
  size_t ki(int sl, int kh, int j, int d) const { return ((size_t(sl) * c.n_kv + kh) * cap + j) * hd + d; }
  int slot(int t) const { return kv_slots[size_t(seq_of[size_t(t)])]; }
  bool visible(int t, int j) const {
    const int s = seq_of[size_t(t)];
    if (j >= kv_lens[size_t(s)]) return false;
    const int64_t kp = kpos[size_t(slot(t)) * cap + j], qp = qpos[size_t(t)];
    return kp <= qp && (c.window == 0 || kp < c.sink || kp > qp - c.window);
  }

  /// Row (t, h) of the forward on the given q, k, v: out[hd] and lse; false (out 0, lse -inf) when
  /// the row sees no key.
  bool row(const std::vector<double>& qv, const std::vector<double>& kv, const std::vector<double>& vv, int t,
           int h, double* out, double& lse) const {
    const int sl = slot(t), kh = h / g;
    std::vector<double> logit;
    std::vector<int> keys;
    for (int j = 0; j < cap; ++j) {
      if (!visible(t, j)) continue;
      double dot = 0;
      for (int d = 0; d < hd; ++d) dot += qv[qi(t, h, d)] * kv[ki(sl, kh, j, d)];
      logit.push_back(scale * dot);
      keys.push_back(j);
    }
    for (int d = 0; d < hd; ++d) out[d] = 0;
    lse = -INFINITY;
    if (keys.empty()) return false;
    const double mx = *std::max_element(logit.begin(), logit.end());
    double sum = 0;
    for (double x : logit) sum += std::exp(x - mx);
    lse = mx + std::log(sum);
    for (size_t i = 0; i < keys.size(); ++i) {
      const double p = std::exp(logit[i] - lse);
      for (int d = 0; d < hd; ++d) out[d] += p * vv[ki(sl, kh, keys[i], d)];
    }
    return true;
  }

  /// Row (t, h)'s part of L = sum(dout * out).
  double row_loss(const std::vector<double>& qv, const std::vector<double>& kv, const std::vector<double>& vv,
                  int t, int h) const {
    std::vector<double> o(static_cast<size_t>(hd));
    double lse;
    row(qv, kv, vv, t, h, o.data(), lse);
    double L = 0;
    for (int d = 0; d < hd; ++d) L += dout[qi(t, h, d)] * o[size_t(d)];
    return L;
  }

  void forward(std::vector<double>& out, std::vector<double>& lse) const {
    out.assign(q.size(), 0);
    lse.assign(size_t(tokens) * c.n_q, 0);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < c.n_q; ++h) row(q, k, v, t, h, &out[qi(t, h, 0)], lse[size_t(t) * c.n_q + h]);
  }
};

struct Grads {
  std::vector<double> dq, dk, dv;
};

/// The analytic gradients in double (the formulas of ops/attention_backward.hpp, row by row);
/// with_D = false is the classic bug of forgetting the softmax's D term, for the sensitivity check.
Grads analytic_grads(const Problem& P, bool with_D = true) {
  Grads G{std::vector<double>(P.q.size(), 0), std::vector<double>(P.k.size(), 0), std::vector<double>(P.k.size(), 0)};
  std::vector<double> o(static_cast<size_t>(P.hd));
  for (int t = 0; t < P.tokens; ++t)
    for (int h = 0; h < P.c.n_q; ++h) {
      double lse;
      if (!P.row(P.q, P.k, P.v, t, h, o.data(), lse)) continue;
      const int sl = P.slot(t), kh = h / P.g;
      double D = 0;
      for (int d = 0; d < P.hd; ++d) D += P.dout[P.qi(t, h, d)] * o[size_t(d)];
      if (!with_D) D = 0;
      for (int j = 0; j < P.cap; ++j) {
        if (!P.visible(t, j)) continue;
        double s = 0, dp = 0;
        for (int d = 0; d < P.hd; ++d) {
          s += P.q[P.qi(t, h, d)] * P.k[P.ki(sl, kh, j, d)];
          dp += P.dout[P.qi(t, h, d)] * P.v[P.ki(sl, kh, j, d)];
        }
        const double p = std::exp(P.scale * s - lse), ds = p * (dp - D);
        for (int d = 0; d < P.hd; ++d) {
          G.dq[P.qi(t, h, d)] += P.scale * ds * P.k[P.ki(sl, kh, j, d)];
          G.dk[P.ki(sl, kh, j, d)] += P.scale * ds * P.q[P.qi(t, h, d)];
          G.dv[P.ki(sl, kh, j, d)] += p * P.dout[P.qi(t, h, d)];
        }
      }
    }
  return G;
}

/// Central finite differences of L at a subset of elements: every element of q, and for every
/// stored key some reader may see, three random channels of k and of v.
struct FdPoints {
  std::vector<size_t> qi, ki, vi;
  std::vector<double> dq, dk, dv;
};

FdPoints finite_differences(const Problem& P) {
  const double eps = 1e-4;  // truncation ~eps^2 |L'''| ~ 1e-9, rounding ~1e-16 |L| / eps ~ 1e-12
  FdPoints F;
  std::vector<double> q = P.q, k = P.k, v = P.v;
  for (int t = 0; t < P.tokens; ++t)
    for (int h = 0; h < P.c.n_q; ++h)
      for (int d = 0; d < P.hd; ++d) {
        double& x = q[P.qi(t, h, d)];
        const double x0 = x;
        x = x0 + eps;
        const double Lp = P.row_loss(q, k, v, t, h);
        x = x0 - eps;
        const double Lm = P.row_loss(q, k, v, t, h);
        x = x0;
        F.qi.push_back(P.qi(t, h, d));
        F.dq.push_back((Lp - Lm) / (2 * eps));
      }
  std::uniform_int_distribution<int> chan(0, P.hd - 1);
  for (int sl = 0; sl < P.slots; ++sl)
    for (int kh = 0; kh < P.c.n_kv; ++kh)
      for (int j = 0; j < P.cap; ++j) {
        if (std::isnan(P.k[P.ki(sl, kh, j, 0)])) continue;
        for (int rep = 0; rep < 3; ++rep) {
          const int d = chan(rftest::rng());
          for (int which = 0; which < 2; ++which) {
            std::vector<double>& a = which ? v : k;
            double& x = a[P.ki(sl, kh, j, d)];
            const double x0 = x;
            double L[2] = {0, 0};
            for (int side = 0; side < 2; ++side) {
              x = x0 + (side ? -eps : eps);
              for (int t = 0; t < P.tokens; ++t)  // the rows that read this key
                if (P.slot(t) == sl)
                  for (int h = kh * P.g; h < (kh + 1) * P.g; ++h) L[side] += P.row_loss(q, k, v, t, h);
            }
            x = x0;
            (which ? F.vi : F.ki).push_back(P.ki(sl, kh, j, d));
            (which ? F.dv : F.dk).push_back((L[0] - L[1]) / (2 * eps));
          }
        }
      }
  return F;
}

/// Per-dtype tolerance of a gradient element: |got - want| <= rel |want| + of_max max|want|. The
/// inputs are exact in every dtype, so the 16-bit budgets cover the one rounded input the backward
/// reads, out (through D = <dout, out>: relative 2^-11 for half, 2^-8 for bfloat16); float covers
/// fp32 sums over <= 64 rows or keys and the polynomial exp. Measured worst over these cases, in
/// units of max|want|: float 6e-7, half 3e-4, bfloat16 3.5e-3; the budgets are 4-8x that. A D term
/// off by 0.05% (a plausible bug) already fails in float.
template <class T>
struct GradTol;
template <>
struct GradTol<float> {
  static constexpr double rel = 2e-5, of_max = 5e-6;
};
template <>
struct GradTol<half> {
  static constexpr double rel = 2e-3, of_max = 1.5e-3;
};
template <>
struct GradTol<bfloat16> {
  static constexpr double rel = 1.5e-2, of_max = 1.5e-2;
};

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

/// got against want, where want = reference values at the given element indices (all when idx is empty).
template <class T>
void check_grad(const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
                const std::vector<size_t>& idx, double magnitude) {
  std::vector<float> g;
  if (idx.empty()) {
    g = got;
  } else {
    for (size_t i : idx) g.push_back(got[i]);
  }
  rftest::check_close(what, g, want, GradTol<T>::rel, GradTol<T>::of_max * magnitude);
}

/// Counts elements outside rel/abs (what check_close fails on).
size_t count_off(const std::vector<double>& got, const std::vector<double>& want, double rel, double abs) {
  size_t n = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(got[i] - want[i]) <= abs + rel * std::fabs(want[i]))) ++n;
  return n;
}

template <class T>
std::vector<T> to_storage(const std::vector<double>& a) {
  std::vector<T> r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = T(float(a[i]));
  return r;
}

/// The kernel on one dtype, every ISA, 1 and 2 threads, against the analytic gradients (all
/// elements) and the finite differences (their subset); the forward's out and lse against the reference.
template <class T>
void check_dtype(const Problem& P, const Grads& G, const FdPoints& F) {
  static ThreadPool pool2(2);
  const Case& c = P.c;
  std::vector<T> q = to_storage<T>(P.q), k = to_storage<T>(P.k), v = to_storage<T>(P.v), dout = to_storage<T>(P.dout);
  std::vector<T> out(q.size(), T(7.f));
  std::vector<float> lse(size_t(P.tokens) * c.n_q, 7.f);
  AttentionParams<T> f;
  f.q = make_view<const T>(q.data(), {P.tokens, c.n_q, P.hd});
  f.k = make_view<const T>(k.data(), {P.slots, c.n_kv, P.cap, P.hd});
  f.v = make_view<const T>(v.data(), {P.slots, c.n_kv, P.cap, P.hd});
  f.out = make_view<T>(out.data(), {P.tokens, c.n_q, P.hd});
  f.cu_seqlens = make_view<const int32_t>(P.cu.data(), {P.S + 1});
  f.kv_slots = make_view<const int32_t>(P.kv_slots.data(), {P.S});
  f.kv_lens = make_view<const int32_t>(P.kv_lens.data(), {P.S});
  f.q_positions = make_view<const int32_t>(P.qpos.data(), {P.tokens});
  if (c.ring) f.k_positions = make_view<const int32_t>(P.kpos.data(), {P.slots, P.cap});
  f.lse = make_view<float>(lse.data(), {P.tokens, c.n_q});
  f.scale = c.scale;
  f.sink = c.sink;
  f.window = c.window;
  {
    std::vector<char> ws(attention_workspace_bytes(f, CpuExec{&pool2}));
    attention(f, CpuExec{&pool2}, ws.data(), ws.size());
    std::vector<double> ref_out, ref_lse;
    P.forward(ref_out, ref_lse);
    rftest::check_close<T>("forward out", out, ref_out);
    std::vector<float> got = lse;
    for (size_t i = 0; i < got.size(); ++i)
      if (ref_lse[i] == -INFINITY) {
        INFO("lse row " << i);
        REQUIRE(got[i] == -INFINITY);
        got[i] = 0, ref_lse[i] = 0;
      }
    rftest::check_close<float>("forward lse", got, ref_lse);
  }

  AttentionBackwardParams<T> p;
  p.fwd = f;
  p.dout = make_view<const T>(dout.data(), {P.tokens, c.n_q, P.hd});
  std::vector<float> dq(q.size()), dk(k.size()), dv(k.size());
  p.dq = make_view<float>(dq.data(), {P.tokens, c.n_q, P.hd});
  p.dk = make_view<float>(dk.data(), {P.slots, c.n_kv, P.cap, P.hd});
  p.dv = make_view<float>(dv.data(), {P.slots, c.n_kv, P.cap, P.hd});
  const double mq = max_abs(G.dq), mk = max_abs(G.dk), mv = max_abs(G.dv);
  rftest::for_each_isa([&] {
    std::vector<float> dq1, dk1, dv1;
    for (CpuExec exec : {CpuExec{}, CpuExec{&pool2}}) {
      INFO("threads " << exec.threads());
      std::fill(dq.begin(), dq.end(), 7.f);
      std::fill(dk.begin(), dk.end(), 7.f);
      std::fill(dv.begin(), dv.end(), 7.f);
      std::vector<char> ws(attention_backward_workspace_bytes(p, exec));
      attention_backward(p, exec, ws.data(), ws.size());
      check_grad<T>("dq vs analytic", dq, G.dq, {}, mq);
      check_grad<T>("dk vs analytic", dk, G.dk, {}, mk);
      check_grad<T>("dv vs analytic", dv, G.dv, {}, mv);
      check_grad<T>("dq vs finite differences", dq, F.dq, F.qi, mq);
      check_grad<T>("dk vs finite differences", dk, F.dk, F.ki, mk);
      check_grad<T>("dv vs finite differences", dv, F.dv, F.vi, mv);
      for (size_t i = 0; i < dk.size(); ++i)  // keys nobody may read: exactly 0
        if (std::isnan(P.k[i])) {
          INFO("unread key element " << i);
          REQUIRE(dk[i] == 0.f);
          REQUIRE(dv[i] == 0.f);
        }
      if (exec.threads() == 1) {
        dq1 = dq, dk1 = dk, dv1 = dv;
      } else {  // one writer per output, fixed summation order: the same bits
        REQUIRE(std::memcmp(dq.data(), dq1.data(), dq.size() * sizeof(float)) == 0);
        REQUIRE(std::memcmp(dk.data(), dk1.data(), dk.size() * sizeof(float)) == 0);
        REQUIRE(std::memcmp(dv.data(), dv1.data(), dv.size() * sizeof(float)) == 0);
      }
    }
  });
}

/// The whole check of one case: reference, finite differences, then every dtype.
void run_case(const Case& c) {
  const Problem P(c);
  const Grads G = analytic_grads(P);
  const FdPoints F = finite_differences(P);
  // The analytic reference against the differences, at their accuracy (~1e-9 of the gradients' size).
  auto pick = [](const std::vector<double>& a, const std::vector<size_t>& idx) {
    std::vector<double> r;
    for (size_t i : idx) r.push_back(a[i]);
    return r;
  };
  const double tight = 1e-7;
  rftest::check_close("analytic dq vs finite differences", pick(G.dq, F.qi), F.dq, tight, tight * max_abs(G.dq));
  rftest::check_close("analytic dk vs finite differences", pick(G.dk, F.ki), F.dk, tight, tight * max_abs(G.dk));
  rftest::check_close("analytic dv vs finite differences", pick(G.dv, F.vi), F.dv, tight, tight * max_abs(G.dv));
  // Sensitivity: a backward without the D term is far outside even the bfloat16 tolerance.
  const Grads bad = analytic_grads(P, false);
  REQUIRE(count_off(pick(bad.dq, F.qi), F.dq, GradTol<bfloat16>::rel, GradTol<bfloat16>::of_max * max_abs(G.dq)) > 0);
  REQUIRE(count_off(pick(bad.dk, F.ki), F.dk, GradTol<bfloat16>::rel, GradTol<bfloat16>::of_max * max_abs(G.dk)) > 0);
  SECTION("float") { check_dtype<float>(P, G, F); }
  SECTION("half") { check_dtype<half>(P, G, F); }
  SECTION("bfloat16") { check_dtype<bfloat16>(P, G, F); }
}

}  // namespace

TEST_CASE("attention_backward: GQA 6/2, three sequences (7, 1, 19 queries) over prefixes in shuffled slots",
          "[attention_backward]") {
  Case c;
  c.q_lens = {7, 1, 19};
  c.kv_lens = {7, 10, 45};  // no prefix; decode over 9 stored keys; a chunk over 26 (two key tiles)
  c.slot_of = {2, 3, 1};    // slot 0 unread: its gradients must be 0
  run_case(c);
}

TEST_CASE("attention_backward: n_q = n_kv, streaming sink 3 + window 6, a chunk over a prefix", "[attention_backward]") {
  Case c;
  c.n_q = 3, c.n_kv = 3;
  c.q_lens = {19, 7};
  c.kv_lens = {19, 40};
  c.sink = 3, c.window = 6;
  c.scale = 0.2f;
  run_case(c);
}

TEST_CASE("attention_backward: ring buffer (keys out of order), sink + window, a row that sees no key",
          "[attention_backward]") {
  Case c;
  c.ring = true, c.pos_offset = 1000, c.sink = 1000 + 2, c.window = 5;
  c.q_lens = {1, 7}, c.kv_lens = {12, 12}, c.capacity = 12;
  c.blind_first_query = true;
  run_case(c);
}

TEST_CASE("attention_backward: two sequences share a slot; 23 tokens make two token blocks", "[attention_backward]") {
  Case c;
  c.q_lens = {23, 5}, c.kv_lens = {23, 40};
  c.slot_of = {1, 1}, c.slots = 2;
  run_case(c);
}

TEST_CASE("attention_backward: head_dim 128, MQA", "[attention_backward]") {
  Case c;
  c.hd = 128, c.n_q = 2, c.n_kv = 1;
  c.q_lens = {5}, c.kv_lens = {9};
  run_case(c);
}

namespace {

/// A fixture array of tools/make_golden_grads_attention.py with its shape.
rftest::npy::Array golden(const std::string& test_case, const std::string& name) {
  return rftest::npy::load(std::string(RECURFORMER_TEST_DATA_DIR) + "/golden_grads/" + test_case + "/" + name + ".npy");
}

/// The fixtures' tolerance (their meta.json): fp32 against fp32 summed in another order.
void check_golden(const std::string& what, const std::vector<float>& got, const rftest::npy::Array& want) {
  const std::vector<float> w = want.as<float>();
  REQUIRE(got.size() == w.size());
  std::vector<double> e(w.begin(), w.end());
  rftest::check_close(what, got, e, 1e-5, 2e-6 * max_abs(e));
}

}  // namespace

TEST_CASE("attention_backward: PyTorch autograd fixtures (eager attention, repeat_kv, causal/streaming mask)",
          "[attention_backward][golden]") {
  ThreadPool pool2(2);
  for (const char* name : {"attention_gqa_prefix", "attention_streaming"}) {
    INFO(name);
    const auto q = golden(name, "q"), k = golden(name, "k"), v = golden(name, "v"), dout = golden(name, "dout");
    const std::vector<int32_t> cu = golden(name, "cu_seqlens").as<int32_t>(),
                               kv_lens = golden(name, "kv_lens").as<int32_t>(),
                               kv_slots = golden(name, "kv_slots").as<int32_t>(),
                               qpos = golden(name, "q_positions").as<int32_t>();
    const std::vector<float> qv = q.as<float>(), kv = k.as<float>(), vv = v.as<float>(), dv_in = dout.as<float>();
    const int64_t tokens = q.shape[0], n_q = q.shape[1], hd = q.shape[2];
    const int64_t slots = k.shape[0], n_kv = k.shape[1], cap = k.shape[2], S = int64_t(kv_lens.size());
    std::vector<float> out(qv.size()), lse(size_t(tokens * n_q));
    AttentionParams<float> f;
    f.q = make_view<const float>(qv.data(), {tokens, n_q, hd});
    f.k = make_view<const float>(kv.data(), {slots, n_kv, cap, hd});
    f.v = make_view<const float>(vv.data(), {slots, n_kv, cap, hd});
    f.out = make_view<float>(out.data(), {tokens, n_q, hd});
    f.cu_seqlens = make_view<const int32_t>(cu.data(), {S + 1});
    f.kv_slots = make_view<const int32_t>(kv_slots.data(), {S});
    f.kv_lens = make_view<const int32_t>(kv_lens.data(), {S});
    f.q_positions = make_view<const int32_t>(qpos.data(), {tokens});
    f.lse = make_view<float>(lse.data(), {tokens, n_q});
    f.scale = std::string(name) == "attention_streaming" ? 0.2f : 0.125f;  // meta.json "scale"
    if (std::string(name) == "attention_streaming") f.sink = 2, f.window = 5;
    std::vector<float> dq(qv.size(), 7.f), dk(kv.size(), 7.f), dv(kv.size(), 7.f);
    AttentionBackwardParams<float> p;
    p.dout = make_view<const float>(dv_in.data(), {tokens, n_q, hd});
    p.dq = make_view<float>(dq.data(), {tokens, n_q, hd});
    p.dk = make_view<float>(dk.data(), {slots, n_kv, cap, hd});
    p.dv = make_view<float>(dv.data(), {slots, n_kv, cap, hd});
    rftest::for_each_isa([&] {
      const CpuExec exec{&pool2};
      std::vector<char> ws(attention_workspace_bytes(f, exec));
      attention(f, exec, ws.data(), ws.size());
      check_golden("out", out, golden(name, "out"));
      check_golden("lse", lse, golden(name, "lse"));
      p.fwd = f;
      std::vector<char> wb(attention_backward_workspace_bytes(p, exec));
      attention_backward(p, exec, wb.data(), wb.size());
      check_golden("dq", dq, golden(name, "dq"));
      check_golden("dk", dk, golden(name, "dk"));
      check_golden("dv", dv, golden(name, "dv"));
    });
  }
}

TEST_CASE("attention_backward: bad input throws naming the argument and writes nothing", "[attention_backward]") {
  std::vector<float> q(2 * 4 * 64, 0.5f), k(2 * 2 * 8 * 64, 0.5f), v = k, out(q.size(), 0.25f), lse(8, 1.f);
  std::vector<float> dout = q, dq(q.size(), 7.f), dk(k.size(), 7.f), dv(k.size(), 7.f);
  std::vector<int32_t> qp{0, 1}, lens{2};
  AttentionBackwardParams<float> p;
  p.fwd.q = make_view<const float>(q.data(), {2, 4, 64});
  p.fwd.k = make_view<const float>(k.data(), {2, 2, 8, 64});
  p.fwd.v = make_view<const float>(v.data(), {2, 2, 8, 64});
  p.fwd.out = make_view<float>(out.data(), {2, 4, 64});
  p.fwd.lse = make_view<float>(lse.data(), {2, 4});
  p.fwd.kv_lens = make_view<const int32_t>(lens.data(), {1});
  p.fwd.q_positions = make_view<const int32_t>(qp.data(), {2});
  p.dout = make_view<const float>(dout.data(), {2, 4, 64});
  p.dq = make_view<float>(dq.data(), {2, 4, 64});
  p.dk = make_view<float>(dk.data(), {2, 2, 8, 64});
  p.dv = make_view<float>(dv.data(), {2, 2, 8, 64});
  REQUIRE_NOTHROW(check(p));
  std::vector<char> ws(attention_backward_workspace_bytes(p, CpuExec{}));
  REQUIRE(ws.size() == 2 * 4 * sizeof(float));
  auto run = [&](const AttentionBackwardParams<float>& b) { attention_backward(b, CpuExec{}, ws.data(), ws.size()); };
  SECTION("lse absent") {
    auto b = p;
    b.fwd.lse = {};
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: lse is required"));
  }
  SECTION("lse shape") {
    auto b = p;
    b.fwd.lse = make_view<float>(lse.data(), {2, 3});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: lse has shape"));
  }
  SECTION("dout absent or misshaped") {
    auto b = p;
    b.dout = {};
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: dout is required"));
    b.dout = make_view<const float>(dout.data(), {2, 4, 32});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: dout has shape"));
  }
  SECTION("dq shape") {
    auto b = p;
    b.dq = make_view<float>(dq.data(), {2, 2, 64});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: dq has shape [2, 2, 64], expected [2, 4, 64]"));
  }
  SECTION("dk, dv shape (the cache's)") {
    auto b = p;
    b.dk = make_view<float>(dk.data(), {2, 2, 4, 64});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: dk has shape"));
    b = p;
    b.dv = make_view<float>(dv.data(), {1, 2, 8, 64});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: dv has shape"));
  }
  SECTION("strided gradient rows") {
    auto b = p;
    b.dq = make_strided_view<float>(dq.data(), {2, 4, 64}, {256, 64, 2});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: dq must have unit stride"));
  }
  SECTION("the forward's params are checked, under this op's name") {
    std::vector<int32_t> big{9};
    auto b = p;
    b.fwd.kv_lens = make_view<const int32_t>(big.data(), {1});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: kv_lens[0] = 9"));
    b = p;
    b.fwd.out = make_view<float>(out.data(), {2, 4, 32});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: out has shape"));
  }
  SECTION("unsupported head_dim lists the supported ones") {
    auto b = p;
    b.fwd.q = make_view<const float>(q.data(), {2, 4, 32});
    b.fwd.out = make_view<float>(out.data(), {2, 4, 32});
    b.fwd.k = make_view<const float>(k.data(), {2, 2, 8, 32});
    b.fwd.v = make_view<const float>(v.data(), {2, 2, 8, 32});
    b.dout = make_view<const float>(dout.data(), {2, 4, 32});
    b.dq = make_view<float>(dq.data(), {2, 4, 32});
    b.dk = make_view<float>(dk.data(), {2, 2, 8, 32});
    b.dv = make_view<float>(dv.data(), {2, 2, 8, 32});
    REQUIRE_THROWS_WITH(run(b), Catch::Contains("attention_backward: head_dim") && Catch::Contains("supported: 64, 128"));
  }
  SECTION("workspace too small or null") {
    REQUIRE_THROWS_WITH(attention_backward(p, CpuExec{}, ws.data(), ws.size() - 1),
                        Catch::Contains("attention_backward: workspace has 31 bytes, expected at least 32"));
    REQUIRE_THROWS_WITH(attention_backward(p, CpuExec{}, nullptr, ws.size()),
                        Catch::Contains("attention_backward: workspace is null"));
  }
  for (float x : dq) REQUIRE(x == 7.f);
  for (float x : dk) REQUIRE(x == 7.f);
  for (float x : dv) REQUIRE(x == 7.f);
}

TEST_CASE("attention_backward: optional outputs, each alone, give the same values", "[attention_backward]") {
  Case c;
  c.q_lens = {9, 4}, c.kv_lens = {20, 4};
  const Problem P(c);
  std::vector<float> q = to_storage<float>(P.q), k = to_storage<float>(P.k), v = to_storage<float>(P.v),
                     dout = to_storage<float>(P.dout), out(q.size()), lse(size_t(P.tokens) * c.n_q);
  AttentionBackwardParams<float> p;
  p.fwd.q = make_view<const float>(q.data(), {P.tokens, c.n_q, P.hd});
  p.fwd.k = make_view<const float>(k.data(), {P.slots, c.n_kv, P.cap, P.hd});
  p.fwd.v = make_view<const float>(v.data(), {P.slots, c.n_kv, P.cap, P.hd});
  p.fwd.out = make_view<float>(out.data(), {P.tokens, c.n_q, P.hd});
  p.fwd.cu_seqlens = make_view<const int32_t>(P.cu.data(), {P.S + 1});
  p.fwd.kv_slots = make_view<const int32_t>(P.kv_slots.data(), {P.S});
  p.fwd.kv_lens = make_view<const int32_t>(P.kv_lens.data(), {P.S});
  p.fwd.q_positions = make_view<const int32_t>(P.qpos.data(), {P.tokens});
  p.fwd.lse = make_view<float>(lse.data(), {P.tokens, c.n_q});
  attention(p.fwd, CpuExec{}, nullptr, 0);
  p.dout = make_view<const float>(dout.data(), {P.tokens, c.n_q, P.hd});
  auto grads = [&](bool want_q, bool want_k, bool want_v) {
    std::vector<std::vector<float>> g{std::vector<float>(q.size(), 7.f), std::vector<float>(k.size(), 7.f),
                                      std::vector<float>(k.size(), 7.f)};
    auto b = p;
    if (want_q) b.dq = make_view<float>(g[0].data(), {P.tokens, c.n_q, P.hd});
    if (want_k) b.dk = make_view<float>(g[1].data(), {P.slots, c.n_kv, P.cap, P.hd});
    if (want_v) b.dv = make_view<float>(g[2].data(), {P.slots, c.n_kv, P.cap, P.hd});
    std::vector<char> ws(attention_backward_workspace_bytes(b, CpuExec{}));
    attention_backward(b, CpuExec{}, ws.data(), ws.size());
    return g;
  };
  const auto all = grads(true, true, true);
  REQUIRE(grads(true, false, false)[0] == all[0]);
  REQUIRE(grads(false, true, false)[1] == all[1]);
  REQUIRE(grads(false, false, true)[2] == all[2]);
  const auto none = grads(false, false, false);
  for (const auto& g : none)
    for (float x : g) REQUIRE(x == 7.f);
}
