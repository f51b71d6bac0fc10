// HybridCache: the byte report against the spec section 6 formula written out here for mixed
// layouts, the two-phase append and its capacity check (an over-full append leaves every byte as it
// was), reset, fork (copy), snapshot/restore, the streaming ring's entry/position mapping, and
// configuration errors. In every storage type.
#include <algorithm>
#include <cstring>
#include <vector>

#include "recurformer/cache/hybrid_cache.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

using K = HeadKind;

// memcpy / memcmp that accept the null pointers of empty arrays (a layer without a kind).
void copy_bytes(void* d, const void* src, size_t n) {
  if (n) std::memcpy(d, src, n);
}
bool same_bytes(const void* a, const void* b, size_t n) { return n == 0 || std::memcmp(a, b, n) == 0; }


// 3 layers of 4 KV groups: all attention / mixed / mostly non-attention.
HybridCacheConfig mixed_config(int slots = 3, int64_t capacity = 50) {
  HybridCacheConfig c;
  c.n_layers = 3;
  c.n_kv = 4;
  c.head_dim = 16;
  c.layout.layers = {{{K::attention, K::attention, K::attention, K::attention}},
                     {{K::attention, K::recurrent, K::streaming, K::recurrent}},
                     {{K::streaming, K::recurrent, K::windowed, K::attention}}};
  c.recurrent.d_state = 16;
  c.recurrent.conv_kernel = 4;
  c.streaming.sink = 2;
  c.streaming.window = 5;
  c.slots = slots;
  c.capacity = capacity;
  return c;
}

// Every byte the cache holds for K, V and states, plus the lengths.
template <class T>
std::vector<unsigned char> dump(HybridCache<T>& c) {
  std::vector<unsigned char> out;
  auto add = [&](const auto& v) {
    const auto* p = reinterpret_cast<const unsigned char*>(v.data);
    out.insert(out.end(), p, p + v.numel() * int64_t(sizeof(*v.data)));
  };
  for (int l = 0; l < c.n_layers(); ++l) {
    add(c.keys(l)), add(c.values(l)), add(c.ssm_states(l)), add(c.conv_states(l));
    add(c.stream_keys(l)), add(c.stream_values(l));
  }
  add(c.lengths());
  return out;
}

// Fills a slot's K/V up to `upto` tokens and all its states and rings with random values.
template <class T>
void scribble(HybridCache<T>& c, int slot, int64_t upto) {
  for (int l = 0; l < c.n_layers(); ++l) {
    for (View<T, 4> kv : {c.keys(l), c.values(l), c.stream_keys(l), c.stream_values(l)}) {
      const int64_t t = kv.data == c.keys(l).data || kv.data == c.values(l).data ? upto : kv.shape[2];
      for (int64_t g = 0; g < kv.shape[1]; ++g) {
        auto r = rftest::random_vector<T>(size_t(t * kv.shape[3]));
        copy_bytes(kv.ptr(slot, g, 0, 0), r.data(), r.size() * sizeof(T));
      }
    }
    View<float, 4> s = c.ssm_states(l);
    auto rs = rftest::random_vector<float>(size_t(s.numel() / s.shape[0]));
    copy_bytes(s.ptr(slot, 0, 0, 0), rs.data(), rs.size() * 4);
    View<T, 4> cv = c.conv_states(l);
    auto rc = rftest::random_vector<T>(size_t(cv.numel() / cv.shape[0]));
    copy_bytes(cv.ptr(slot, 0, 0, 0), rc.data(), rc.size() * sizeof(T));
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("HybridCache byte report equals the spec section 6 formula", "[hybrid_cache]",
                        rftest::StorageTypes) {
  using T = TestType;
  const HybridCacheConfig cfg = mixed_config(3, 50);
  const int64_t b = sizeof(T), hd = 16, N = 16, Kc = 4;
  // The formula, written out for this layout (per layer: attention, recurrent, streaming, windowed counts).
  auto formula = [&](int64_t Tctx) {
    const int64_t counts[3][4] = {{4, 0, 0, 0}, {1, 2, 1, 0}, {1, 1, 1, 1}};
    CacheBytes r;
    for (auto& c : counts) {
      r.attention += c[0] * 2 * hd * Tctx * b;
      r.recurrent += c[1] * (hd * N * 4 + (Kc - 1) * hd * b);
      r.streaming += c[2] * 2 * hd * std::min<int64_t>(Tctx, 2 + 5) * b;
      r.windowed += c[3] * (hd * N * 4 + (Kc - 1) * hd * b + 2 * hd * std::min<int64_t>(Tctx, 2 + 5) * b);
    }
    r.total = r.attention + r.recurrent + r.streaming + r.windowed;
    return r;
  };
  for (int64_t t : {0, 1, 6, 7, 8, 50, 32768}) {
    INFO("context " << t);
    REQUIRE(HybridCache<T>::spec_bytes(cfg, t) == formula(t));
  }
  // The all-attention model is the spec's "full cache": L n_kv 2 hd T bytes.
  HybridCacheConfig full = cfg;
  full.layout = HeadLayout::uniform(3, 4, K::attention);
  REQUIRE(HybridCache<T>::spec_bytes(full, 1000).total == 3 * 4 * 2 * hd * 1000 * b);

  HybridCache<T> cache(cfg);
  CacheReport r = cache.bytes();
  CacheBytes cap3 = formula(50);
  cap3.attention *= 3, cap3.recurrent *= 3, cap3.streaming *= 3, cap3.windowed *= 3, cap3.total *= 3;
  REQUIRE(r.capacity == cap3);
  REQUIRE(cache.allocated_bytes() == cap3.total);
  REQUIRE(r.held == CacheBytes{});

  const std::vector<int32_t> slots = {2, 0}, counts = {9, 3};
  cache.advance(rftest::cview(slots), rftest::cview(counts));
  CacheBytes held = formula(9);
  held += formula(3);
  REQUIRE(cache.bytes().held == held);
  REQUIRE(cache.length(0) == 3);
  REQUIRE(cache.length(1) == 0);
  REQUIRE(cache.length(2) == 9);
}

TEMPLATE_LIST_TEST_CASE("HybridCache capacity error leaves every slot bit-identical", "[hybrid_cache]",
                        rftest::StorageTypes) {
  using T = TestType;
  HybridCache<T> cache(mixed_config(3, 20));
  cache.advance(rftest::cview({0, 1, 2}), rftest::cview({5, 19, 0}));
  for (int s = 0; s < 3; ++s) scribble(cache, s, cache.length(s));
  const auto before = dump(cache);
  // Slot 1 would hold 21 > 20 tokens: nothing changes, not even slot 0's length.
  REQUIRE_THROWS_WITH(cache.advance(rftest::cview({0, 1}), rftest::cview({2, 2})),
                      Catch::Contains("slot 1") && Catch::Contains("capacity 20"));
  REQUIRE_THROWS_AS(cache.check_append(rftest::cview({2, 1}), rftest::cview({1, 2})), Error);
  REQUIRE_THROWS_WITH(cache.advance(rftest::cview({0, 0}), rftest::cview({1, 1})), Catch::Contains("appears twice"));
  REQUIRE_THROWS_WITH(cache.advance(rftest::cview({3}), rftest::cview({1})), Catch::Contains("slot 3"));
  REQUIRE_THROWS_WITH(cache.advance(rftest::cview({0}), rftest::cview({-1})), Catch::Contains(">= 0"));
  REQUIRE_THROWS_AS(cache.advance(rftest::cview({0, 1}), rftest::cview({1})), Error);
  REQUIRE(dump(cache) == before);
  // Exactly full is fine.
  cache.advance(rftest::cview({1, 2}), rftest::cview({1, 20}));
  REQUIRE(cache.length(1) == 20);
  REQUIRE(cache.length(2) == 20);
}

TEMPLATE_LIST_TEST_CASE("HybridCache reset, copy (fork) and snapshot/restore", "[hybrid_cache]",
                        rftest::StorageTypes) {
  using T = TestType;
  HybridCache<T> cache(mixed_config(3, 30));
  cache.advance(rftest::cview({0, 1, 2}), rftest::cview({12, 4, 7}));
  for (int s = 0; s < 3; ++s) scribble(cache, s, cache.length(s));

  // Fork slot 0 onto slot 2: every live byte of slot 2 equals slot 0's.
  cache.copy(0, 2);
  REQUIRE(cache.length(2) == 12);
  for (int l = 0; l < cache.n_layers(); ++l) {
    auto same = [](const auto& v, int64_t tokens_dim2) {  // slot 0 vs slot 2 over dims 1.. (dim 2 cut)
      for (int64_t g = 0; g < v.shape[1]; ++g)
        for (int64_t t = 0; t < tokens_dim2; ++t)
          for (int64_t i = 0; i < v.shape[3]; ++i)
            if (std::memcmp(v.ptr(0, g, t, i), v.ptr(2, g, t, i), sizeof(*v.data))) return false;
      return true;
    };
    REQUIRE(same(cache.keys(l), 12));
    REQUIRE(same(cache.values(l), 12));
    REQUIRE(same(cache.ssm_states(l), cache.ssm_states(l).shape[2]));
    REQUIRE(same(cache.conv_states(l), cache.conv_states(l).shape[2]));
    REQUIRE(same(cache.stream_keys(l), cache.ring_size()));
    REQUIRE(same(cache.stream_values(l), cache.ring_size()));
  }

  // Snapshots are only valid across appends to the same slot.
  typename HybridCache<T>::Snapshot snap = cache.snapshot(1);
  cache.advance(rftest::cview({1}), rftest::cview({6}));
  // Only appends may happen between snapshot and restore.
  REQUIRE_THROWS_WITH(cache.restore(0, snap), Catch::Contains("slot 1"));
  cache.reset(1);
  REQUIRE_THROWS_WITH(cache.restore(1, snap), Catch::Contains("reset"));

  // reset: length 0, states, conv states and rings zero; other slots untouched.
  auto other = cache.snapshot(2);
  cache.reset(0);
  REQUIRE(cache.length(0) == 0);
  REQUIRE(cache.length(2) == 12);
  auto zero = cache.snapshot(0);
  for (float x : zero.ssm) REQUIRE(x == 0.f);
  for (T x : zero.small) REQUIRE(float(x) == 0.f);
  auto other_after = cache.snapshot(2);
  REQUIRE(other_after.ssm == other.ssm);
  REQUIRE(same_bytes(other_after.small.data(), other.small.data(), other.small.size() * sizeof(T)));
}

TEMPLATE_LIST_TEST_CASE("HybridCache snapshot restores the states byte for byte", "[hybrid_cache]",
                        rftest::StorageTypes) {
  using T = TestType;
  HybridCache<T> cache(mixed_config(2, 30));
  cache.advance(rftest::cview({0, 1}), rftest::cview({9, 3}));
  for (int s = 0; s < 2; ++s) scribble(cache, s, cache.length(s));
  const auto saved = dump(cache);
  auto snap = cache.snapshot(0);
  cache.advance(rftest::cview({0}), rftest::cview({5}));
  // A speculative step rewrites slot 0's states and rings and keys 9..13 (past the snapshot).
  for (int l = 0; l < cache.n_layers(); ++l) {
    View<float, 4> s = cache.ssm_states(l);
    for (int64_t i = 0; i < s.numel() / s.shape[0]; ++i) s.data[i] += 1.f;
    View<T, 4> cv = cache.conv_states(l);
    for (int64_t i = 0; i < cv.numel() / cv.shape[0]; ++i) cv.data[i] = T(7.f);
    for (View<T, 4> rk : {cache.stream_keys(l), cache.stream_values(l)})
      for (int64_t i = 0; i < rk.numel() / rk.shape[0]; ++i) rk.data[i] = T(-3.f);
    for (View<T, 4> kv : {cache.keys(l), cache.values(l)})
      for (int64_t g = 0; g < kv.shape[1]; ++g)
        for (int64_t t = 9; t < 14; ++t)
          for (int64_t i = 0; i < kv.shape[3]; ++i) kv(0, g, t, i) = T(5.f);
  }
  cache.restore(0, snap);
  REQUIRE(cache.length(0) == 9);
  // Everything is as before except the dead keys past the length (which no reader sees).
  for (int l = 0; l < cache.n_layers(); ++l)
    for (View<T, 4> kv : {cache.keys(l), cache.values(l)})
      for (int64_t g = 0; g < kv.shape[1]; ++g)
        for (int64_t t = 9; t < 14; ++t)
          for (int64_t i = 0; i < kv.shape[3]; ++i) kv(0, g, t, i) = T(0.f);
  REQUIRE(dump(cache) == saved);
  // Speculative decoding retries: append, roll back, append again, roll back to the same snapshot.
  cache.advance(rftest::cview({0}), rftest::cview({2}));
  cache.restore(0, snap);
  REQUIRE(cache.length(0) == 9);
  cache.copy(1, 0);
  REQUIRE_THROWS_WITH(cache.restore(0, snap), Catch::Contains("copied onto"));
}

TEST_CASE("HybridCache streaming ring: entries and positions", "[hybrid_cache]") {
  HybridCache<float> cache(mixed_config(1, 40));  // sink 2, window 5: ring of 7
  REQUIRE(cache.ring_size() == 7);
  for (int64_t len = 0; len <= 40; ++len) {
    // Entry of each live position, and each entry's position, agree; the ring holds exactly the
    // sinks and the last `window` positions.
    std::vector<int64_t> want;
    for (int64_t p = 0; p < len; ++p)
      if (p < 2 || p >= len - 5) want.push_back(p);
    std::vector<int64_t> got;
    for (int64_t e = 0; e < 7; ++e) {
      const int64_t p = cache.ring_position(e, len);
      if (p >= 0) {
        REQUIRE(cache.ring_entry(p) == e);
        got.push_back(p);
      }
    }
    std::sort(got.begin(), got.end());
    INFO("length " << len);
    REQUIRE(got == want);
  }
  HybridCache<float> small(mixed_config(1, 4));  // capacity below sink + window: ring of 4, no wrap
  REQUIRE(small.ring_size() == 4);
  for (int64_t p = 0; p < 4; ++p) REQUIRE(small.ring_entry(p) == p);
}

TEST_CASE("HybridCache configuration and argument errors", "[hybrid_cache]") {
  auto bad = [](auto edit, const char* what) {
    HybridCacheConfig c = mixed_config();
    edit(c);
    REQUIRE_THROWS_WITH(HybridCache<float>(c), Catch::Contains(what));
  };
  bad([](HybridCacheConfig& c) { c.n_layers = 2; }, "layers");
  bad([](HybridCacheConfig& c) { c.n_kv = 3; }, "KV groups");
  bad([](HybridCacheConfig& c) { c.capacity = 0; }, "capacity");
  bad([](HybridCacheConfig& c) { c.slots = 0; }, "slots");
  bad([](HybridCacheConfig& c) { c.head_dim = 0; }, "head_dim");
  bad([](HybridCacheConfig& c) { c.streaming.window = 0; }, "window");
  bad([](HybridCacheConfig& c) { c.recurrent.d_state = 0; }, "d_state");
  HybridCache<float> cache(mixed_config());
  REQUIRE_THROWS_WITH(cache.keys(3), Catch::Contains("layer 3"));
  REQUIRE_THROWS_WITH(cache.ssm_state(1, 2), Catch::Contains("recurrent group 2"));
  REQUIRE_THROWS_WITH(cache.reset(3), Catch::Contains("slot 3"));
  REQUIRE_THROWS_WITH(cache.copy(0, -1), Catch::Contains("slot -1"));
  // Per-group views are the scan's / conv's shapes, aliasing the layer's arrays.
  View<float, 3> s = cache.ssm_state(2, 1);
  REQUIRE(s.shape[0] == 3);
  REQUIRE(s.shape[1] == 16);
  REQUIRE(s.shape[2] == 16);
  REQUIRE(s.data == cache.ssm_states(2).ptr(0, 1, 0, 0));
  View<float, 3> cs = cache.conv_state(1, 1);
  REQUIRE(cs.shape[1] == 3);
  REQUIRE(cs.stride[0] == 2 * 3 * 16);
  REQUIRE(cache.keys(1).shape[1] == 1);
  REQUIRE(cache.keys(0).shape[1] == 4);
  REQUIRE(cache.stream_keys(0).shape[1] == 0);
}

TEST_CASE("streaming_window_matching_recurrent: the largest ring within one recurrent state's bytes", "[cache]") {
  for (int64_t hd : {16, 64, 80})
    for (int N : {8, 16, 64})
      for (int Kc : {1, 4})
        for (int64_t e : {2, 4})
          for (int sink : {0, 4}) {
            const RecurrentConfig rc{N, 8, Kc};
            const int64_t state = hd * N * 4 + (Kc - 1) * hd * e, token = 2 * hd * e;
            if (state / token <= sink) {
              CHECK_THROWS_WITH(streaming_window_matching_recurrent(hd, rc, sink, e), Catch::Contains("not more than the sink"));
              continue;
            }
            const int w = streaming_window_matching_recurrent(hd, rc, sink, e);
            CHECK(w >= 1);
            CHECK((sink + w) * token <= state);
            CHECK((sink + w + 1) * token > state);
          }
  CHECK(streaming_window_matching_recurrent(64, RecurrentConfig{64, 8, 4}, 4, 4) == 29);  // SmolLM2, f32
  CHECK(streaming_window_matching_recurrent(64, RecurrentConfig{64, 8, 4}, 4, 2) == 61);  // SmolLM2, f16
}

namespace {

// The K and V rows (every layer, every attention group) of position pos of a paged cache's slot.
template <class T>
std::vector<T> kv_rows_at(HybridCache<T>& c, int slot, int64_t pos) {
  std::vector<T> out;
  const int32_t page = c.page_of(slot, pos);
  REQUIRE(page >= 0);
  for (int l = 0; l < c.n_layers(); ++l)
    for (View<T, 4> kv : {c.keys(l), c.values(l)})
      for (int64_t g = 0; g < kv.shape[1]; ++g) {
        const T* row = kv.ptr(page, g, pos % c.config().page_size, 0);
        out.insert(out.end(), row, row + kv.shape[3]);
      }
  return out;
}

// Random K and V at positions [from, to) of a paged slot (what the layers would write).
template <class T>
void write_kv(HybridCache<T>& c, int slot, int64_t from, int64_t to) {
  for (int64_t pos = from; pos < to; ++pos)
    for (int l = 0; l < c.n_layers(); ++l)
      for (View<T, 4> kv : {c.keys(l), c.values(l)})
        for (int64_t g = 0; g < kv.shape[1]; ++g) {
          auto r = rftest::random_vector<T>(size_t(kv.shape[3]));
          copy_bytes(kv.ptr(c.page_of(slot, pos), g, pos % c.config().page_size, 0), r.data(), r.size() * sizeof(T));
        }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("HybridCache paged: reserve takes pages, copy shares them, a write copies a shared page, reset frees them",
                        "[hybrid_cache]", rftest::StorageTypes) {
  using T = TestType;
  HybridCacheConfig cfg = mixed_config(3, 20);
  cfg.page_size = 4;
  HybridCache<T> cache(cfg);
  REQUIRE(cache.paged());
  REQUIRE(cache.pages_per_slot() == 5);
  REQUIRE(cache.free_pages() == 15);  // kv_pages 0: every slot's capacity
  REQUIRE(cache.keys(1).shape[0] == 15);
  REQUIRE(cache.keys(1).shape[2] == 4);
  REQUIRE(cache.allocated_bytes() == cache.bytes().capacity.total);

  // Not reserved: the layers' check refuses, naming reserve().
  REQUIRE_THROWS_WITH(cache.check_append(rftest::cview({0}), rftest::cview({6})), Catch::Contains("reserve"));
  cache.reserve(rftest::cview({0}), rftest::cview({6}));
  REQUIRE(cache.pages_used() == 2);
  REQUIRE_NOTHROW(cache.check_append(rftest::cview({0}), rftest::cview({6})));
  write_kv(cache, 0, 0, 6);
  cache.advance(rftest::cview({0}), rftest::cview({6}));

  // A fork shares slot 0's two pages.
  cache.copy(0, 2);
  REQUIRE(cache.length(2) == 6);
  REQUIRE(cache.pages_used() == 2);
  for (int64_t pos : {0, 5}) {
    REQUIRE(cache.page_of(2, pos) == cache.page_of(0, pos));
    REQUIRE(cache.page_refs(cache.page_of(0, pos)) == 2);
  }
  REQUIRE_THROWS_WITH(cache.check_append(rftest::cview({2}), rftest::cview({1})), Catch::Contains("shared page"));

  // Slot 2 appends 3 tokens: its half-full shared page is copied (rows 4, 5), and a new page follows.
  std::vector<std::vector<T>> before;
  for (int64_t pos = 0; pos < 6; ++pos) before.push_back(kv_rows_at(cache, 0, pos));
  const int32_t shared = cache.page_of(0, 4);
  cache.reserve(rftest::cview({2}), rftest::cview({3}));
  REQUIRE(cache.pages_used() == 4);
  REQUIRE(cache.page_of(2, 0) == cache.page_of(0, 0));  // full page: still shared
  REQUIRE(cache.page_of(2, 4) != shared);
  REQUIRE(cache.page_refs(shared) == 1);
  REQUIRE(cache.page_of(2, 8) >= 0);
  for (int64_t pos = 0; pos < 6; ++pos) REQUIRE(kv_rows_at(cache, 2, pos) == before[size_t(pos)]);
  write_kv(cache, 2, 6, 9);
  cache.advance(rftest::cview({2}), rftest::cview({3}));
  for (int64_t pos = 0; pos < 6; ++pos) REQUIRE(kv_rows_at(cache, 0, pos) == before[size_t(pos)]);  // untouched

  // The step's page table: the rows of its slots, -1 beyond what they hold.
  const View<const int32_t, 2> pt = cache.page_table(rftest::cview({2, 0}), 2);
  REQUIRE(pt.shape[1] == 5);
  REQUIRE(pt(0, 1) == cache.page_of(2, 4));
  REQUIRE(pt(1, 1) == shared);
  REQUIRE(pt(0, 3) == -1);

  // reset returns a slot's pages, except those another slot still holds.
  cache.reset(0);
  REQUIRE(cache.pages_used() == 3);
  REQUIRE(cache.page_refs(cache.page_of(2, 0)) == 1);
  cache.reset(2);
  REQUIRE(cache.pages_used() == 0);
  REQUIRE(cache.free_pages() == 15);
}

TEST_CASE("HybridCache paged: a step the pool cannot hold changes nothing", "[hybrid_cache]") {
  HybridCacheConfig cfg = mixed_config(3, 20);
  cfg.page_size = 4;
  cfg.kv_pages = 3;
  HybridCache<float> cache(cfg);
  cache.reserve(rftest::cview({1}), rftest::cview({2}));
  const std::vector<int32_t> pages_before = {cache.page_of(0, 0), cache.page_of(1, 0), cache.page_of(2, 0)};
  REQUIRE_THROWS_WITH(cache.reserve(rftest::cview({0, 2}), rftest::cview({5, 1})),
                      Catch::Contains("needs 3 new pages of 4 tokens; 2 of the pool's 3 are free"));
  REQUIRE(cache.free_pages() == 2);
  REQUIRE(std::vector<int32_t>{cache.page_of(0, 0), cache.page_of(1, 0), cache.page_of(2, 0)} == pages_before);
  REQUIRE_THROWS_WITH(cache.reserve(rftest::cview({0}), rftest::cview({21})), Catch::Contains("capacity"));
  REQUIRE(cache.free_pages() == 2);
  cache.reserve(rftest::cview({0, 2}), rftest::cview({4, 1}));  // exactly the two free pages
  REQUIRE(cache.free_pages() == 0);

  HybridCacheConfig bad = mixed_config(3, 20);
  bad.page_size = 21;
  REQUIRE_THROWS_WITH(HybridCache<float>(bad), Catch::Contains("page_size is 21"));
  bad.page_size = 0;
  bad.kv_pages = 4;
  REQUIRE_THROWS_WITH(HybridCache<float>(bad), Catch::Contains("kv_pages is 4"));
}
