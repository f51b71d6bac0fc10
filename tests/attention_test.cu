// CUDA attention against the CPU op (itself tested against a double reference in
// attention_test.cpp) on the same random inputs, in every storage dtype and both head dims, GQA
// groups 1, 4 and 8: decode over 1-3000 keys (several key splits merged by log-sum-exp, slots
// permuted), chunked prefill after earlier keys (tiles cut at sequence boundaries, a one-token
// chunk), a short-capacity prefill (no split: the direct-write path), a streaming sink + window
// mask over ring-buffer key positions, rows that see no key, one unpacked sequence; LSE too. Paged
// K/V (shuffled pages, a shared prefix page) gives the contiguous layout's outputs bit for bit.
// Host checks: bad shapes, group size and K alignment throw before anything is launched.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "recurformer/cuda/attention.cuh"
#include "support/cuda_util.cuh"
#include "support/test_util.hpp"

using namespace recurformer;

// The CPU side, in attention_test_cpu.cpp (compiled by the host compiler).
template <class T> void cpu_attention(const AttentionParams<T>& p);

namespace {

// Both sides round the same fp32 math to T once; they differ in exp (CPU polynomial vs CUDA expf),
// in summation order over up to 3000 keys and in where the key splits fall, which fp32 sees at a
// few ulps of the output and of the lse (|lse| ~ 8): a factor 4 on the float budget, none on the
// 16-bit ones (their storage rounding dominates).
template <class T>
constexpr double kCrossTolerance = std::is_same<T, float>::value ? 4.0 : 1.0;

template <class T>
struct AttnCase {
  int64_t n_q, n_kv, hd, slots, cap, tokens = 0;
  bool packed = true;
  int sink = 0, window = 0;
  std::vector<int32_t> cu, kv_slots, kv_lens, q_pos, k_pos;
  std::vector<T> q, k, v, out;
  std::vector<float> lse;

  // Sequence s: `chunk[s]` new queries after `before[s]` stored keys, in slot slot_of[s].
  AttnCase(int64_t n_q_, int64_t n_kv_, int64_t hd_, int64_t slots_, int64_t cap_, const std::vector<int32_t>& before,
           const std::vector<int32_t>& chunk, std::vector<int32_t> slot_of)
      : n_q(n_q_), n_kv(n_kv_), hd(hd_), slots(slots_), cap(cap_), kv_slots(std::move(slot_of)) {
    cu.push_back(0);
    for (size_t s = 0; s < chunk.size(); ++s) {
      cu.push_back(cu.back() + chunk[s]);
      kv_lens.push_back(before[s] + chunk[s]);
      for (int32_t i = 0; i < chunk[s]; ++i) q_pos.push_back(before[s] + i);
    }
    tokens = cu.back();
    q = rftest::random_vector<T>(size_t(tokens * n_q * hd));
    k = rftest::random_vector<T>(size_t(slots * n_kv * cap * hd));
    v = rftest::random_vector<T>(size_t(slots * n_kv * cap * hd));
    out = rftest::random_vector<T>(size_t(tokens * n_q * hd));
    lse = rftest::random_vector<float>(size_t(tokens * n_q));
  }
  AttentionParams<T> params() {
    AttentionParams<T> p;
    p.q = make_view<const T>(q.data(), {tokens, n_q, hd});
    p.k = make_view<const T>(k.data(), {slots, n_kv, cap, hd});
    p.v = make_view<const T>(v.data(), {slots, n_kv, cap, hd});
    p.out = make_view(out.data(), {tokens, n_q, hd});
    if (packed) p.cu_seqlens = make_view<const int32_t>(cu.data(), {int64_t(cu.size())});
    if (!kv_slots.empty()) p.kv_slots = make_view<const int32_t>(kv_slots.data(), {int64_t(kv_slots.size())});
    p.kv_lens = make_view<const int32_t>(kv_lens.data(), {int64_t(kv_lens.size())});
    p.q_positions = make_view<const int32_t>(q_pos.data(), {tokens});
    if (!k_pos.empty()) p.k_positions = make_view<const int32_t>(k_pos.data(), {slots, cap});
    p.lse = make_view(lse.data(), {tokens, n_q});
    p.sink = sink, p.window = window;
    return p;
  }
};

// c's keys moved into a shuffled pool of pages of ps keys (ps divides c.cap, so a sequence can hold
// as many keys as a slot and the kernel splits the keys alike); with share, sequence 1 reads
// sequence 0's first page, whose keys are first made the same in both slots.
template <class T>
struct PagedCopy {
  std::vector<T> k, v;
  std::vector<int32_t> table;
  int64_t pages = 0, ps, max_pages;
  PagedCopy(AttnCase<T>& c, int64_t ps_, bool share) : ps(ps_), max_pages(c.cap / ps_) {
    const int64_t S = int64_t(c.kv_lens.size()), row = c.hd;
    auto at = [&](int64_t slot, int64_t kh, int64_t j) { return size_t(((slot * c.n_kv + kh) * c.cap + j) * row); };
    if (share)
      for (int64_t kh = 0; kh < c.n_kv; ++kh)
        for (auto* kv : {&c.k, &c.v})
          std::copy_n(kv->begin() + at(c.kv_slots[0], kh, 0), ps * row, kv->begin() + at(c.kv_slots[1], kh, 0));
    pages = S * max_pages + 3;
    std::vector<int32_t> free_pages(static_cast<size_t>(pages));
    std::iota(free_pages.begin(), free_pages.end(), 0);
    std::shuffle(free_pages.begin(), free_pages.end(), rftest::rng());
    table.assign(size_t(S * max_pages), -1);  // pages past a sequence's keys: never read
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i * ps < c.kv_lens[size_t(s)]; ++i) {
        table[size_t(s * max_pages + i)] = share && s == 1 && i == 0 ? table[0] : free_pages.back();
        if (!(share && s == 1 && i == 0)) free_pages.pop_back();
      }
    k = rftest::random_vector<T>(size_t(pages * c.n_kv * ps * row));  // unwritten rows: noise
    v = rftest::random_vector<T>(k.size());
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < c.kv_lens[size_t(s)]; ++j)
        for (int64_t kh = 0; kh < c.n_kv; ++kh) {
          const size_t dst = size_t(((table[size_t(s * max_pages + j / ps)] * c.n_kv + kh) * ps + j % ps) * row);
          std::copy_n(c.k.begin() + at(c.kv_slots[size_t(s)], kh, j), row, k.begin() + dst);
          std::copy_n(c.v.begin() + at(c.kv_slots[size_t(s)], kh, j), row, v.begin() + dst);
        }
  }
};

// CUDA attention over c's inputs (contiguous), or over its paged copy; returns out and lse.
template <class T>
std::pair<std::vector<T>, std::vector<float>> cuda_attention(AttnCase<T>& c, const PagedCopy<T>* pg) {
  rftest::DeviceBuffer<T> q(c.q), k(pg ? pg->k : c.k), v(pg ? pg->v : c.v), out(c.out);
  rftest::DeviceBuffer<float> lse(c.lse);
  rftest::DeviceBuffer<int32_t> cu(c.cu), slots(c.kv_slots), lens(c.kv_lens), qp(c.q_pos), kp(c.k_pos),
      table(pg ? pg->table : std::vector<int32_t>{0});
  const AttentionParams<T> hp = c.params();
  AttentionParams<T> dp = hp;
  dp.q = rftest::rebase(hp.q, c.q, q.data());
  dp.out = rftest::rebase(hp.out, c.out, out.data());
  dp.lse = rftest::rebase(hp.lse, c.lse, lse.data());
  dp.cu_seqlens = rftest::rebase(hp.cu_seqlens, c.cu, cu.data());
  dp.kv_lens = rftest::rebase(hp.kv_lens, c.kv_lens, lens.data());
  dp.q_positions = rftest::rebase(hp.q_positions, c.q_pos, qp.data());
  dp.k_positions = rftest::rebase(hp.k_positions, c.k_pos, kp.data());  // contiguous only (a check)
  if (pg) {
    dp.k = make_view<const T>(k.data(), {pg->pages, c.n_kv, pg->ps, c.hd});
    dp.v = make_view<const T>(v.data(), {pg->pages, c.n_kv, pg->ps, c.hd});
    dp.kv_slots = {};
    dp.page_table = make_view<const int32_t>(table.data(), {int64_t(c.kv_lens.size()), pg->max_pages});
  } else {
    dp.k = rftest::rebase(hp.k, c.k, k.data());
    dp.v = rftest::rebase(hp.v, c.v, v.data());
    dp.kv_slots = rftest::rebase(hp.kv_slots, c.kv_slots, slots.data());
  }
  REQUIRE(supports(dp, CudaExec{}));
  const size_t bytes = attention_workspace_bytes(dp, CudaExec{});
  const std::vector<unsigned char> ws_init(bytes);
  rftest::DeviceBuffer<unsigned char> ws(ws_init);
  attention(dp, CudaExec{}, ws.data(), bytes);
  return {out.download(), lse.download()};
}

// The CUDA op against the CPU op on the same inputs.
template <class T>
void compare_attention(AttnCase<T>& host) {
  AttnCase<T> dev_in = host;  // identical inputs, before the CPU run writes out and lse
  cpu_attention(host.params());
  const auto [out, lse] = cuda_attention<T>(dev_in, nullptr);
  CAPTURE(host.n_q, host.n_kv, host.hd, host.tokens, host.cap);
  rftest::check_close<T>("out (CUDA vs CPU)", out, rftest::as_double(host.out), kCrossTolerance<T>);
  rftest::check_close<float>("lse (CUDA vs CPU)", lse, rftest::as_double(host.lse), kCrossTolerance<float>);
}

struct Shape {
  int64_t n_q, n_kv, hd;
};
const Shape kShapes[] = {{2, 2, 64}, {8, 2, 128}, {16, 2, 64}, {8, 1, 128}};  // groups 1, 4, 8, 8

}  // namespace

TEMPLATE_LIST_TEST_CASE("CUDA attention decode equals the CPU op", "[attention][cuda]", rftest::StorageTypes) {
  using T = TestType;
  for (const Shape& sh : kShapes) {
    // One token each after 2999, 1036, 0 and 1 keys: several splits, a row that sees only itself,
    // an empty-before row, slots permuted over a pool of 5 with capacity 3072.
    AttnCase<T> c(sh.n_q, sh.n_kv, sh.hd, 5, 3072, {2999, 1036, 0, 1}, {1, 1, 1, 1}, {4, 0, 2, 1});
    compare_attention(c);
  }
}

TEMPLATE_LIST_TEST_CASE("CUDA attention chunked prefill equals the CPU op", "[attention][cuda]",
                        rftest::StorageTypes) {
  using T = TestType;
  for (const Shape& sh : kShapes) {
    // Chunks of 37, 1, 70 and 0 queries after 300, 700, 0 and 5 keys (capacity 800: split path).
    AttnCase<T> c(sh.n_q, sh.n_kv, sh.hd, 4, 800, {300, 700, 0, 5}, {37, 1, 70, 0}, {3, 1, 0, 2});
    compare_attention(c);
  }
  // Capacity 200: no split, rows written directly; one sequence without cu_seqlens or kv_slots.
  AttnCase<T> direct(8, 2, 64, 1, 200, {60}, {133}, {});
  direct.packed = false;
  compare_attention(direct);
}

TEMPLATE_LIST_TEST_CASE("CUDA attention streaming mask over ring-buffer positions equals the CPU op",
                        "[attention][cuda]", rftest::StorageTypes) {
  using T = TestType;
  for (const Shape& sh : {kShapes[1], kShapes[2]}) {
    // Ring of 4 sinks + 60 window entries: key index 4 + pos % 60 holds position pos (the newest
    // 60 of the sequence), sinks at 0..3. Two slots at sequence lengths 500 and 30 (partly
    // filled), one decode token each, then a chunk of 5 queries under random stored positions.
    const int sink = 4, window = 60, cap = sink + window;
    AttnCase<T> c(sh.n_q, sh.n_kv, sh.hd, 2, cap, {499, 29}, {1, 1}, {1, 0});
    c.sink = sink, c.window = window;
    c.k_pos.assign(size_t(2 * cap), INT32_MAX);  // unfilled ring entries: never visible
    const int32_t seq_len[2] = {30, 500};  // slot 0 holds the 30-token sequence, slot 1 the 500
    for (int slot = 0; slot < 2; ++slot)
      for (int32_t pos = 0; pos < seq_len[slot]; ++pos)
        if (pos < sink || pos >= seq_len[slot] - window)
          c.k_pos[size_t(slot * cap + (pos < sink ? pos : sink + pos % window))] = pos;
    c.kv_lens = {cap, cap};
    compare_attention(c);

    AttnCase<T> r(sh.n_q, sh.n_kv, sh.hd, 1, 300, {295}, {5}, {0});
    r.sink = 3, r.window = 50;
    r.k_pos.resize(300);
    std::iota(r.k_pos.begin(), r.k_pos.end(), 0);
    std::shuffle(r.k_pos.begin(), r.k_pos.end(), rftest::rng());
    compare_attention(r);

    // Every stored key after the queries' positions: rows that see no key (out 0, lse -inf).
    AttnCase<T> none(sh.n_q, sh.n_kv, sh.hd, 1, 64, {0}, {3}, {0});
    none.k_pos.resize(64);
    std::iota(none.k_pos.begin(), none.k_pos.end(), 10);
    compare_attention(none);
  }
}

TEMPLATE_LIST_TEST_CASE("CUDA attention over paged K/V equals it over contiguous slots, bit for bit",
                        "[attention][cuda]", rftest::StorageTypes) {
  using T = TestType;
  for (const Shape& sh : kShapes) {
    // Decode over up to 3000 keys (key splits), pages of 16 in shuffled order, two sequences
    // sharing their first page; then a chunked prefill over pages of 32.
    AttnCase<T> d(sh.n_q, sh.n_kv, sh.hd, 5, 3072, {2999, 1036, 0, 1}, {1, 1, 1, 1}, {4, 0, 2, 1});
    const PagedCopy<T> dpg(d, 16, true);
    const auto a = cuda_attention<T>(d, nullptr), b = cuda_attention(d, &dpg);
    CAPTURE(sh.n_q, sh.n_kv, sh.hd);
    REQUIRE(std::memcmp(a.first.data(), b.first.data(), a.first.size() * sizeof(T)) == 0);
    REQUIRE(std::memcmp(a.second.data(), b.second.data(), a.second.size() * sizeof(float)) == 0);
    AttnCase<T> pf(sh.n_q, sh.n_kv, sh.hd, 4, 800, {300, 700, 0, 5}, {37, 1, 70, 0}, {3, 1, 0, 2});
    const PagedCopy<T> pp(pf, 32, false);
    const auto c = cuda_attention<T>(pf, nullptr), e = cuda_attention(pf, &pp);
    REQUIRE(std::memcmp(c.first.data(), e.first.data(), c.first.size() * sizeof(T)) == 0);
    REQUIRE(std::memcmp(c.second.data(), e.second.data(), c.second.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("CUDA attention checks its arguments before launching", "[attention][cuda]") {
  AttnCase<float> c(32, 1, 64, 1, 64, {10}, {1}, {0});  // 32 query heads per KV head: more than 16
  const std::vector<float> before = c.out;
  rftest::DeviceBuffer<float> out(c.out);
  auto p = c.params();
  p.out.data = out.data();
  // Host index arrays are never read by the CUDA check, so these views may stay on the host.
  REQUIRE_THROWS_WITH(attention(p, CudaExec{}, nullptr, 0), Catch::Contains("at most 16 query heads"));
  AttnCase<float> m(4, 1, 64, 1, 64, {10}, {1}, {0});
  auto pm = m.params();
  pm.out.data = out.data();
  pm.k.data += 1;  // K rows no longer 16-byte aligned
  REQUIRE_THROWS_WITH(attention(pm, CudaExec{}, nullptr, 0), Catch::Contains("16-byte aligned"));
  AttnCase<float> h(4, 1, 96, 1, 64, {10}, {1}, {0});
  auto ph = h.params();
  ph.out.data = out.data();
  REQUIRE_THROWS_WITH(attention(ph, CudaExec{}, nullptr, 1 << 20), Catch::Contains("head_dim"));
  pm = m.params();
  pm.out.data = out.data();
  pm.v.shape[2] = 63;
  REQUIRE_THROWS_WITH(attention(pm, CudaExec{}, nullptr, 0), Catch::Contains("v has shape"));
  // The decode split needs a workspace: too small throws.
  AttnCase<float> d(4, 1, 64, 1, 4096, {3000}, {1}, {0});
  auto pd = d.params();
  REQUIRE(attention_workspace_bytes(pd, CudaExec{}) > 0);
  REQUIRE_THROWS_WITH(attention(pd, CudaExec{}, nullptr, 16), Catch::Contains("workspace has 16 bytes"));
  REQUIRE(out.download() == before);
}
