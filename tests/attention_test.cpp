// attention against a plain double-precision softmax over explicit positions: prefill, chunked
// prefill, packed sequences with slots, decode over ~1000 keys (split-KV with 2 threads), GQA,
// the streaming mask over a ring buffer, LSE, fully-masked rows; every dtype and ISA. Every
// case without a ring also runs over paged K/V (pages of 5, 32 and capacity keys, shuffled in a
// pool with unused pages of NaN) and must match the contiguous output bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "recurformer/cpu/attention.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

struct Case {
  int n_q = 4, n_kv = 2, hd = 64;
  std::vector<int> q_lens{17};   // queries per sequence
  std::vector<int> kv_lens{17};  // keys per sequence (chunk's own included)
  int capacity = 0;              // 0: max kv_len + 3
  int slots = 0;                 // 0: sequences + 1 (slot s+1 for sequence s, slot 0 unused)
  bool ring = false;             // k_positions: a rotated ring buffer
  int pos_offset = 0;            // ring: positions of stored keys start here
  int sink = 0, window = 0;
  bool lse = true;
  float scale = 0;
  int shared_prefix = 0;         // keys every sequence copies from sequence 0 (paged: the same pages)
};

// K or V [slots, n_kv, cap, hd] -> a pool of pages [pages, n_kv, P, hd] holding each sequence's
// slot in ceil(cap / P) pages at shuffled places, the unused pages NaN; page_table [S, ceil(cap / P)].
// Pages that lie within the shared prefix of a sequence s > 0 are sequence 0's pages.
template <class T>
void to_pages(const std::vector<T>& kv, int n_kv, int cap, int hd, const std::vector<int32_t>& kv_slots,
              int shared_prefix, int P, std::vector<T>& pool, std::vector<int32_t>& table, bool make_table) {
  const int S = int(kv_slots.size()), per = (cap + P - 1) / P, n_pages = S * per + 3;
  if (make_table) {
    std::vector<int32_t> order(static_cast<size_t>(n_pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rftest::rng());
    table.assign(size_t(S) * per, 0);
    for (int s = 0; s < S; ++s)
      for (int pg = 0; pg < per; ++pg)
        table[size_t(s) * per + pg] =
            s > 0 && (pg + 1) * P <= shared_prefix ? table[size_t(pg)] : order[size_t(s) * per + pg];
  }
  pool.assign(size_t(n_pages) * n_kv * P * hd, T(NAN));
  for (int s = 0; s < S; ++s)
    for (int pg = 0; pg < per; ++pg)
      for (int kh = 0; kh < n_kv; ++kh)
        for (int r = 0; r < P && pg * P + r < cap; ++r)
          for (int d = 0; d < hd; ++d)
            pool[((size_t(table[size_t(s) * per + pg]) * n_kv + kh) * P + r) * hd + d] =
                kv[((size_t(kv_slots[size_t(s)]) * n_kv + kh) * cap + pg * P + r) * hd + d];
}

// Builds the inputs and the reference once, then runs every ISA on one thread and on two.
template <class T>
void run_everywhere(const Case& c) {
  static ThreadPool pool2(2);
  const int S = int(c.q_lens.size());
  const int tokens = std::accumulate(c.q_lens.begin(), c.q_lens.end(), 0);
  const int cap = c.capacity ? c.capacity : *std::max_element(c.kv_lens.begin(), c.kv_lens.end()) + 3;
  const int slots = c.slots ? c.slots : S + 1;
  const int hd = c.hd, g = c.n_q / c.n_kv;
  auto q = rftest::random_vector<T>(size_t(tokens) * c.n_q * hd);
  auto k = rftest::random_vector<T>(size_t(slots) * c.n_kv * cap * hd);
  auto v = rftest::random_vector<T>(size_t(slots) * c.n_kv * cap * hd);
  std::vector<int32_t> cu(size_t(S) + 1, 0), kv_slots(static_cast<size_t>(S)), kv_lens(c.kv_lens.begin(), c.kv_lens.end());
  for (int s = 0; s < S; ++s) cu[size_t(s) + 1] = cu[size_t(s)] + c.q_lens[size_t(s)];
  for (int s = 0; s < S; ++s) kv_slots[size_t(s)] = (s + 1) % slots;
  for (int s = 1; s < S; ++s)
    for (int kh = 0; kh < c.n_kv; ++kh)
      for (int j = 0; j < c.shared_prefix * hd; ++j) {
        const size_t from = (size_t(kv_slots[0]) * c.n_kv + kh) * cap * hd + j;
        const size_t to = (size_t(kv_slots[size_t(s)]) * c.n_kv + kh) * cap * hd + j;
        k[to] = k[from], v[to] = v[from];
      }
  // Key positions: index, or a ring buffer whose slot j holds position pos_offset + ((j + 5) % len).
  std::vector<int32_t> kpos(size_t(slots) * cap, 0);
  for (int sl = 0; sl < slots; ++sl)
    for (int j = 0; j < cap; ++j) kpos[size_t(sl) * cap + j] = j;
  for (int s = 0; s < S; ++s) {
    const int sl = kv_slots[size_t(s)], len = kv_lens[size_t(s)];
    if (c.ring)
      for (int j = 0; j < len; ++j) kpos[size_t(sl) * cap + j] = c.pos_offset + (j + 5) % len;
    // Keys past kv_len must never be read: NaN there poisons any output that touches them.
    for (int kh = 0; kh < c.n_kv; ++kh)
      for (int j = len; j < cap; ++j)
        for (int d = 0; d < hd; ++d) {
          const size_t i = ((size_t(sl) * c.n_kv + kh) * cap + j) * hd + d;
          k[i] = T(NAN);
          v[i] = T(NAN);
        }
  }
  // Query positions: the last q_len positions of the sequence's keys (index or ring).
  std::vector<int32_t> qpos(static_cast<size_t>(tokens));
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < c.q_lens[size_t(s)]; ++i)
      qpos[size_t(cu[size_t(s)] + i)] = (c.ring ? c.pos_offset : 0) + kv_lens[size_t(s)] - c.q_lens[size_t(s)] + i;

  AttentionParams<T> p;
  p.q = make_view<const T>(q.data(), {tokens, c.n_q, hd});
  p.k = make_view<const T>(k.data(), {slots, c.n_kv, cap, hd});
  p.v = make_view<const T>(v.data(), {slots, c.n_kv, cap, hd});
  std::vector<T> out(size_t(tokens) * c.n_q * hd, T(7.f));
  std::vector<float> lse(size_t(tokens) * c.n_q, 7.f);
  p.out = make_view<T>(out.data(), {tokens, c.n_q, hd});
  p.cu_seqlens = make_view<const int32_t>(cu.data(), {S + 1});
  p.kv_slots = make_view<const int32_t>(kv_slots.data(), {S});
  p.kv_lens = make_view<const int32_t>(kv_lens.data(), {S});
  p.q_positions = make_view<const int32_t>(qpos.data(), {tokens});
  if (c.ring) p.k_positions = make_view<const int32_t>(kpos.data(), {slots, cap});
  if (c.lse) p.lse = make_view<float>(lse.data(), {tokens, c.n_q});
  p.scale = c.scale;
  p.sink = c.sink;
  p.window = c.window;

  // Reference in double.
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(double(hd));
  std::vector<double> ref(out.size()), ref_lse(lse.size());
  const auto qd = rftest::to_double(q), kd = rftest::to_double(k), vd = rftest::to_double(v);
  for (int s = 0; s < S; ++s) {
    const int sl = kv_slots[size_t(s)];
    for (int t = cu[size_t(s)]; t < cu[size_t(s) + 1]; ++t)
      for (int h = 0; h < c.n_q; ++h) {
        const int kh = h / g;
        std::vector<double> logit;
        std::vector<int> keys;
        for (int j = 0; j < kv_lens[size_t(s)]; ++j) {
          const int kp = kpos[size_t(sl) * cap + j], qp = qpos[size_t(t)];
          const bool vis = kp <= qp && (c.window == 0 || kp < c.sink || kp > qp - c.window);
          if (!vis) continue;
          double dot = 0;
          for (int d = 0; d < hd; ++d)
            dot += qd[(size_t(t) * c.n_q + h) * hd + d] * kd[((size_t(sl) * c.n_kv + kh) * cap + j) * hd + d];
          logit.push_back(scale * dot);
          keys.push_back(j);
        }
        double* o = &ref[(size_t(t) * c.n_q + h) * hd];
        if (keys.empty()) {
          ref_lse[size_t(t) * c.n_q + h] = -INFINITY;
          continue;  // fully masked row: 0
        }
        const double mx = *std::max_element(logit.begin(), logit.end());
        double sum = 0;
        for (double x : logit) sum += std::exp(x - mx);
        for (size_t i = 0; i < keys.size(); ++i) {
          const double pr = std::exp(logit[i] - mx) / sum;
          for (int d = 0; d < hd; ++d) o[d] += pr * vd[((size_t(sl) * c.n_kv + kh) * cap + keys[i]) * hd + d];
        }
        ref_lse[size_t(t) * c.n_q + h] = mx + std::log(sum);
      }
  }

  std::vector<double> ref_lse_finite = ref_lse;
  for (double& x : ref_lse_finite) x = x == -INFINITY ? 0 : x;
  rftest::for_each_isa([&] {
    for (CpuExec exec : {CpuExec{}, CpuExec{&pool2}}) {
      INFO("threads " << exec.threads());
      std::fill(out.begin(), out.end(), T(7.f));
      std::fill(lse.begin(), lse.end(), 7.f);
      std::vector<char> ws(attention_workspace_bytes(p, exec));
      attention(p, exec, ws.data(), ws.size());
      rftest::check_close<T>("out", out, ref);
      if (c.lse) {
        for (size_t i = 0; i < lse.size(); ++i)
          if (ref_lse[i] == -INFINITY) {
            INFO("lse row " << i);
            REQUIRE(lse[i] == -INFINITY);
            lse[i] = 0;
          }
        rftest::check_close<float>("lse", lse, ref_lse_finite);
      }
      if (c.ring) continue;  // paged K/V takes no k_positions
      const std::vector<T> want = out;
      const std::vector<float> want_lse = lse;
      for (int P : {5, 32, cap}) {
        INFO("paged K/V, pages of " << P << " keys");
        std::vector<T> kp, vp;
        std::vector<int32_t> table;
        to_pages(k, c.n_kv, cap, hd, kv_slots, c.shared_prefix, P, kp, table, true);
        to_pages(v, c.n_kv, cap, hd, kv_slots, c.shared_prefix, P, vp, table, false);
        const int n_pages = int(kp.size() / (size_t(c.n_kv) * P * hd)), per = int(table.size()) / S;
        AttentionParams<T> pp = p;
        pp.k = make_view<const T>(kp.data(), {n_pages, c.n_kv, P, hd});
        pp.v = make_view<const T>(vp.data(), {n_pages, c.n_kv, P, hd});
        pp.kv_slots = {};
        pp.page_table = make_view<const int32_t>(table.data(), {S, per});
        std::fill(out.begin(), out.end(), T(7.f));
        std::fill(lse.begin(), lse.end(), 7.f);
        std::vector<char> pws(attention_workspace_bytes(pp, exec));
        attention(pp, exec, pws.data(), pws.size());
        REQUIRE(std::memcmp(out.data(), want.data(), out.size() * sizeof(T)) == 0);
        REQUIRE(std::memcmp(lse.data(), want_lse.data(), lse.size() * sizeof(float)) == 0);
      }
    }
  });
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("attention: causal prefill of one sequence, GQA, awkward lengths", "[attention]",
                        rftest::StorageTypes) {
  for (int hd : {64, 128})
    for (auto [n_q, n_kv] : {std::pair{4, 2}, std::pair{3, 3}, std::pair{8, 1}})
      for (int T_ : {1, 15, 33, 70}) {
        INFO("hd " << hd << " n_q " << n_q << " n_kv " << n_kv << " tokens " << T_);
        Case c;
        c.hd = hd, c.n_q = n_q, c.n_kv = n_kv, c.q_lens = {T_}, c.kv_lens = {T_};
        run_everywhere<TestType>(c);
      }
}

TEMPLATE_LIST_TEST_CASE("attention: chunked prefill and packed sequences with slots", "[attention]",
                        rftest::StorageTypes) {
  Case c;
  c.q_lens = {13, 1, 31, 0, 5};
  c.kv_lens = {50, 1, 31, 9, 40};  // earlier keys already stored for sequences 0, 3 and 4
  c.scale = 0.3f;
  SECTION("n_q 4, n_kv 2") { run_everywhere<TestType>(c); }
  SECTION("n_q 16, n_kv 1 (token blocks of 4)") {
    c.n_q = 16, c.n_kv = 1;
    run_everywhere<TestType>(c);
  }
  SECTION("without lse") {
    c.lse = false;
    run_everywhere<TestType>(c);
  }
}

TEMPLATE_LIST_TEST_CASE("attention: decode over ~1000 keys (split-KV merge)", "[attention]",
                        rftest::StorageTypes) {
  Case c;
  SECTION("one sequence, 2 KV heads") {
    c.q_lens = {1}, c.kv_lens = {1000};
    run_everywhere<TestType>(c);
  }
  SECTION("batch of 3, MQA") {
    c.n_q = 4, c.n_kv = 1, c.q_lens = {1, 1, 1}, c.kv_lens = {1000, 1, 513};
    run_everywhere<TestType>(c);
  }
  SECTION("batch of 2, head_dim 128, 4 KV heads") {
    c.hd = 128, c.n_q = 8, c.n_kv = 4, c.q_lens = {1, 1}, c.kv_lens = {777, 1000};
    run_everywhere<TestType>(c);
  }
}

TEMPLATE_LIST_TEST_CASE("attention: sequences sharing prefix pages", "[attention]", rftest::StorageTypes) {
  Case c;
  c.q_lens = {1, 6, 1}, c.kv_lens = {70, 75, 300}, c.shared_prefix = 64;  // two pages of 32 shared
  run_everywhere<TestType>(c);
}

TEMPLATE_LIST_TEST_CASE("attention: streaming mask by positions", "[attention]", rftest::StorageTypes) {
  Case c;
  SECTION("index positions, prefill with sink 3 and window 5") {
    c.q_lens = {40}, c.kv_lens = {40}, c.sink = 3, c.window = 5;
    run_everywhere<TestType>(c);
  }
  SECTION("window only, chunk over a long prefix") {
    c.q_lens = {7, 2}, c.kv_lens = {300, 80}, c.sink = 0, c.window = 33;
    run_everywhere<TestType>(c);
  }
  SECTION("ring buffer (keys out of order), decode and a chunk") {
    c.ring = true, c.pos_offset = 1000, c.sink = 4 + 1000, c.window = 8;
    c.q_lens = {1, 3}, c.kv_lens = {12, 12}, c.capacity = 12;
    run_everywhere<TestType>(c);
  }
}

TEMPLATE_LIST_TEST_CASE("attention: rows that see no key give 0 and lse -inf", "[attention]",
                        rftest::StorageTypes) {
  using T = TestType;
  // Explicit: one query at position 5, keys at positions 10..14.
  std::vector<T> q = rftest::random_vector<T>(64), k = rftest::random_vector<T>(5 * 64),
                 v = rftest::random_vector<T>(5 * 64), out(64, T(7.f));
  std::vector<int32_t> qp{5}, kp{10, 11, 12, 13, 14}, lens{5};
  float lse = 7;
  AttentionParams<T> p;
  p.q = make_view<const T>(q.data(), {1, 1, 64});
  p.k = make_view<const T>(k.data(), {1, 1, 5, 64});
  p.v = make_view<const T>(v.data(), {1, 1, 5, 64});
  p.out = make_view<T>(out.data(), {1, 1, 64});
  p.kv_lens = make_view<const int32_t>(lens.data(), {1});
  p.q_positions = make_view<const int32_t>(qp.data(), {1});
  p.k_positions = make_view<const int32_t>(kp.data(), {1, 5});
  p.lse = make_view<float>(&lse, {1, 1});
  rftest::for_each_isa([&] {
    attention(p, CpuExec{}, nullptr, 0);
    for (auto x : out) REQUIRE(float(x) == 0.f);
    REQUIRE(lse == -INFINITY);
  });
}

TEST_CASE("attention: bad input throws and leaves the output untouched", "[attention]") {
  std::vector<float> q(2 * 4 * 64, 0.5f), k(2 * 2 * 8 * 64, 0.5f), v = k, out(q.size(), 7.f);
  std::vector<int32_t> qp{0, 1}, lens{2}, slots{0};
  AttentionParams<float> p;
  p.q = make_view<const float>(q.data(), {2, 4, 64});
  p.k = make_view<const float>(k.data(), {2, 2, 8, 64});
  p.v = make_view<const float>(v.data(), {2, 2, 8, 64});
  p.out = make_view<float>(out.data(), {2, 4, 64});
  p.kv_lens = make_view<const int32_t>(lens.data(), {1});
  p.q_positions = make_view<const int32_t>(qp.data(), {2});
  auto untouched = [&] {
    for (float x : out) REQUIRE(x == 7.f);
  };
  REQUIRE_NOTHROW(check(p));
  SECTION("out shape") {
    auto b = p;
    b.out = make_view<float>(out.data(), {2, 4, 32});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("attention: out has shape"));
  }
  SECTION("v shape") {
    auto b = p;
    b.v = make_view<const float>(v.data(), {2, 2, 4, 64});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("attention: v has shape"));
  }
  SECTION("n_q not a multiple of n_kv") {
    auto b = p;
    b.q = make_view<const float>(q.data(), {2, 3, 64});
    b.out = make_view<float>(out.data(), {2, 3, 64});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("multiple of n_kv"));
  }
  SECTION("no query heads (n_q = 0 divided by zero in the plan)") {
    auto b = p;
    b.q = make_view<const float>(q.data(), {2, 0, 64});
    b.out = make_view<float>(out.data(), {2, 0, 64});
    b.lse = {};
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("n_q (0) must be a positive multiple"));
  }
  SECTION("extents whose element count overflows int64") {
    auto b = p;
    b.k.shape[2] = int64_t(1) << 61;  // capacity 2^61 x 64 x 2 x 2 elements
    b.v.shape[2] = int64_t(1) << 61;
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0),
                        Catch::Contains("k of shape [2, 2, 2305843009213693952, 64] holds more elements than"));
  }
  SECTION("kv_len past capacity") {
    std::vector<int32_t> big{9};
    auto b = p;
    b.kv_lens = make_view<const int32_t>(big.data(), {1});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("kv_lens[0] = 9"));
  }
  SECTION("slot out of range") {
    std::vector<int32_t> bad{2};
    auto b = p;
    b.kv_slots = make_view<const int32_t>(bad.data(), {1});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("slot of sequence 0 is 2"));
  }
  SECTION("paged K/V: a page outside the pool, too few pages, kv_slots beside page_table") {
    std::vector<int32_t> table{1, 2};  // pool of 2 pages of 8 keys; page 2 does not exist
    auto b = p;
    b.kv_slots = {};
    b.page_table = make_view<const int32_t>(table.data(), {1, 2});
    b.kv_lens = make_view<const int32_t>(lens.data(), {1});
    REQUIRE_NOTHROW(check(b));  // 2 keys: only page 0 of the table is read
    std::vector<int32_t> many{9};
    b.kv_lens = make_view<const int32_t>(many.data(), {1});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("page_table[0, 1] = 2"));
    std::vector<int32_t> too_many{17};
    b.kv_lens = make_view<const int32_t>(too_many.data(), {1});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("kv_lens[0] = 17, expected in [0, 2 pages x 8"));
    b.kv_lens = make_view<const int32_t>(lens.data(), {1});
    b.kv_slots = make_view<const int32_t>(slots.data(), {1});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("takes neither kv_slots"));
  }
  SECTION("cu_seqlens not ending at tokens") {
    std::vector<int32_t> cu{0, 1};
    auto b = p;
    b.cu_seqlens = make_view<const int32_t>(cu.data(), {2});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("cu_seqlens must start at 0"));
  }
  SECTION("strided head dim") {
    auto b = p;
    b.q = make_strided_view<const float>(q.data(), {2, 4, 32}, {256, 64, 2});
    b.out = make_view<float>(out.data(), {2, 4, 32});
    b.k = make_view<const float>(k.data(), {2, 2, 8, 32});
    b.v = make_view<const float>(v.data(), {2, 2, 8, 32});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("q must have unit stride"));
  }
  SECTION("unsupported head_dim lists the supported ones") {
    auto b = p;
    b.q = make_view<const float>(q.data(), {2, 4, 32});
    b.out = make_view<float>(out.data(), {2, 4, 32});
    b.k = make_view<const float>(k.data(), {2, 2, 8, 32});
    b.v = make_view<const float>(v.data(), {2, 2, 8, 32});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("supported: 64, 128"));
  }
  SECTION("lse shape") {
    std::vector<float> l(8);
    auto b = p;
    b.lse = make_view<float>(l.data(), {2, 3});
    REQUIRE_THROWS_WITH(attention(b, CpuExec{}, nullptr, 0), Catch::Contains("attention: lse has shape"));
  }
  SECTION("workspace too small") {
    // 1 token, 1 KV head, 700 keys, 2 threads: the keys are split, so a workspace is needed.
    std::vector<float> k1(700 * 64, 0.5f);
    std::vector<int32_t> l1{700}, p1{699};
    auto b = p;
    b.q = make_view<const float>(q.data(), {1, 4, 64});
    b.out = make_view<float>(out.data(), {1, 4, 64});
    b.k = b.v = make_view<const float>(k1.data(), {1, 1, 700, 64});
    b.kv_lens = make_view<const int32_t>(l1.data(), {1});
    b.q_positions = make_view<const int32_t>(p1.data(), {1});
    ThreadPool pool(2);
    const size_t need = attention_workspace_bytes(b, CpuExec{&pool});
    REQUIRE(need > 0);
    std::vector<char> ws(need);
    REQUIRE_THROWS_WITH(attention(b, CpuExec{&pool}, ws.data(), need - 1), Catch::Contains("workspace has"));
  }
  untouched();
}
