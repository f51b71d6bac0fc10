// supports(params, CpuExec) for every CPU op (core/support.hpp): on a valid call it says yes and
// the call runs; on a call the op refuses (bad shapes, a head dim no kernel is built for, an id
// outside the vocabulary, a missing state) it says no, and the call then throws exactly its first
// reason. The hybrid layer's and core's answers are tested with their calls in
// hybrid_head_attention_test.cpp (capacity, slots, pages).
#include <cstdint>
#include <vector>

#include "recurformer/cpu/attention.hpp"
#include "recurformer/cpu/attention_backward.hpp"
#include "recurformer/cpu/causal_conv1d.hpp"
#include "recurformer/cpu/cross_entropy.hpp"
#include "recurformer/cpu/embedding.hpp"
#include "recurformer/cpu/linear.hpp"
#include "recurformer/cpu/recency_score.hpp"
#include "recurformer/cpu/rmsnorm.hpp"
#include "recurformer/cpu/rope.hpp"
#include "recurformer/cpu/selective_scan.hpp"
#include "recurformer/cpu/swiglu.hpp"
#include "support/test_util.hpp"

using namespace recurformer;
using rftest::random_vector;
using rftest::require_agrees;

namespace {

// One sequence of `tokens` queries (positions 0..tokens-1) over a slot of `cap` keys, n_q / n_kv
// heads of head dim hd.
struct AttentionCase {
  int64_t tokens, n_q, n_kv, hd, cap;
  std::vector<float> q, k, v, out;
  std::vector<int32_t> kv_lens, pos;
  AttentionCase(int64_t t, int64_t nq, int64_t nkv, int64_t d, int64_t c)
      : tokens(t), n_q(nq), n_kv(nkv), hd(d), cap(c), q(random_vector<float>(size_t(t * nq * d))),
        k(random_vector<float>(size_t(nkv * c * d))), v(random_vector<float>(size_t(nkv * c * d))),
        out(size_t(t * nq * d)), kv_lens{int32_t(t)} {
    for (int32_t i = 0; i < int32_t(t); ++i) pos.push_back(i);
  }
  AttentionParams<float> params() {
    AttentionParams<float> p;
    p.q = make_view(q.data(), {tokens, n_q, hd});
    p.k = make_view(k.data(), {1, n_kv, cap, hd});
    p.v = make_view(v.data(), {1, n_kv, cap, hd});
    p.out = make_view(out.data(), {tokens, n_q, hd});
    p.kv_lens = rftest::cview(kv_lens);
    p.q_positions = rftest::cview(pos);
    return p;
  }
};

void run_attention(const AttentionParams<float>& p, CpuExec exec) {
  std::vector<unsigned char> ws(attention_workspace_bytes(p, exec));
  attention(p, exec, ws.data(), ws.size());
}

}  // namespace

TEST_CASE("supports: attention says what runs, and why not", "[supports]") {
  const CpuExec exec{};
  AttentionCase ok(5, 4, 2, 64, 8);
  const AttentionParams<float> p = ok.params();
  REQUIRE(supports(p, exec));
  require_agrees(supports(p, exec), [&] { run_attention(p, exec); });

  AttentionCase odd(5, 4, 2, 96, 8);  // no kernel is built for head_dim 96
  const Support s = supports(odd.params(), exec);
  REQUIRE_FALSE(s);
  REQUIRE(s.reasons.size() == 1);
  REQUIRE_THAT(s.why(), Catch::Contains("attention: head_dim: unsupported value 96 (supported: 64, 128)"));
  require_agrees(s, [&] { run_attention(odd.params(), exec); });

  AttentionParams<float> bad = ok.params();
  bad.out.shape[1] = 3;
  REQUIRE_THAT(supports(bad, exec).why(), Catch::Contains("out"));
  require_agrees(supports(bad, exec), [&] { run_attention(bad, exec); });

  // The backward refuses the same head dim, naming itself.
  AttentionBackwardParams<float> b;
  b.fwd = odd.params();
  std::vector<float> dout(odd.out.size(), 0.5f);
  std::vector<float> lse(size_t(odd.tokens * odd.n_q));
  b.fwd.lse = make_view(lse.data(), {odd.tokens, odd.n_q});
  b.dout = make_view(const_cast<const float*>(dout.data()), {odd.tokens, odd.n_q, odd.hd});
  REQUIRE_THAT(supports(b, exec).why(), Catch::Contains("attention_backward: head_dim: unsupported value 96"));
}

TEST_CASE("supports: the selective scan and its one-token update", "[supports]") {
  const CpuExec exec{};
  const int64_t T = 4, D = 8, N = 4;
  auto u = random_vector<float>(size_t(T * D)), delta = random_vector<float>(size_t(T * D), 0.1, 0.5);
  auto A = random_vector<float>(size_t(D * N), -1.0, -0.1), B = random_vector<float>(size_t(T * N)),
       C = random_vector<float>(size_t(T * N));
  std::vector<float> y(size_t(T * D)), state = random_vector<float>(size_t(T * D * N));
  SelectiveScanParams<float> p;
  p.u = make_view(u.data(), {T, D});
  p.delta = make_view(delta.data(), {T, D});
  p.A = make_view(A.data(), {D, N});
  p.B = make_view(B.data(), {T, 1, N});
  p.C = make_view(C.data(), {T, 1, 1, N});
  p.y = make_view(y.data(), {T, 1, D});
  p.state = make_view(state.data(), {T, D, N});  // T slots: the update's rows are one token each
  REQUIRE(supports(p, exec));
  require_agrees(supports(p, exec), [&] { selective_scan(p, exec); });
  REQUIRE(supports_update(p, exec));
  require_agrees(supports_update(p, exec), [&] { selective_state_update(p, exec); });

  // One packed sequence of 4 tokens: a prefill, which the one-token update refuses.
  const std::vector<int32_t> cu = {0, int32_t(T)};
  SelectiveScanParams<float> packed = p;
  packed.cu_seqlens = rftest::cview(cu);
  REQUIRE(supports(packed, exec));
  const Support s = supports_update(packed, exec);
  REQUIRE_THAT(s.why(), Catch::Contains("selective_state_update: cu_seqlens must be absent"));
  require_agrees(s, [&] { selective_state_update(packed, exec); });

  SelectiveScanParams<float> bad = p;
  bad.A.shape[1] = N + 1;
  require_agrees(supports(bad, exec), [&] { selective_scan(bad, exec); });
  REQUIRE_FALSE(supports(bad, exec));
}

TEST_CASE("supports: causal conv1d, its update and its width", "[supports]") {
  const CpuExec exec{};
  const int64_t T = 5, D = 8, K = 4;
  auto x = random_vector<float>(size_t(T * D)), w = random_vector<float>(size_t(D * 9));
  std::vector<float> y(size_t(T * D)), st = random_vector<float>(size_t(T * (K - 1) * D));
  CausalConv1dParams<float> p;
  p.x = make_view(x.data(), {T, D});
  p.weight = make_view(w.data(), {D, K});
  p.y = make_view(y.data(), {T, D});
  p.conv_state = make_view(st.data(), {T, K - 1, D});
  require_agrees(supports(p, exec), [&] { causal_conv1d(p, exec); });
  require_agrees(supports_update(p, exec), [&] { causal_conv1d_update(p, exec); });
  REQUIRE(supports(p, exec));
  REQUIRE(supports_update(p, exec));

  CausalConv1dParams<float> wide = p;
  wide.weight = make_view(w.data(), {D, 9});
  wide.conv_state = {};
  const Support s = supports(wide, exec);
  REQUIRE_THAT(s.why(), Catch::Contains("the width K = weight.shape[1] must be in 2..8, got 9"));
  require_agrees(s, [&] { causal_conv1d(wide, exec); });
}

TEST_CASE("supports: linear, plain and from GGUF blocks", "[supports]") {
  const CpuExec exec{};
  auto x = random_vector<float>(3 * 64), w = random_vector<float>(8 * 64);
  std::vector<float> y(3 * 8);
  LinearParams<float, float> p{make_view(x.data(), {3, 64}), make_view(w.data(), {8, 64}), {},
                               make_view(y.data(), {3, 8})};
  auto run = [&](const LinearParams<float, float>& q) {
    std::vector<unsigned char> ws(linear_workspace_bytes(q, exec));
    linear(q, exec, ws.data(), ws.size());
  };
  REQUIRE(supports(p, exec));
  require_agrees(supports(p, exec), [&] { run(p); });
  LinearParams<float, float> bad = p;
  bad.y.shape[1] = 7;
  REQUIRE_FALSE(supports(bad, exec));
  require_agrees(supports(bad, exec), [&] { run(bad); });

  // Q8_0 blocks (32 weights a block) whose row length is not a multiple of the block.
  std::vector<unsigned char> blocks(8 * 2 * 34);
  LinearParams<float, float> shape = p;
  shape.x = make_view(x.data(), {3, 48});
  shape.weight = make_view(w.data(), {8, 48});
  const BlockWeight q8{blocks.data(), GgmlType::q8_0};
  const Support s = supports(shape, q8, exec);
  REQUIRE_FALSE(s);
  require_agrees(s, [&] {
    std::vector<unsigned char> ws(1 << 16);
    linear(shape, q8, exec, ws.data(), ws.size());
  });
  REQUIRE(supports(p, q8, exec));
}

TEST_CASE("supports: the small ops (rope, rmsnorm, swiglu, embedding, recency, cross-entropy)", "[supports]") {
  const CpuExec exec{};
  auto x = random_vector<float>(3 * 2 * 8);
  const std::vector<float> inv = rope_inv_freq(8, 10000.f);
  std::vector<int32_t> pos = {0, 1, -2};
  RopeParams<float> r{make_view(x.data(), {3, 2, 8}), rftest::cview(pos), rftest::cview(inv)};
  REQUIRE_THAT(supports(r, exec).why(), Catch::Contains("positions[2] = -2"));
  require_agrees(supports(r, exec), [&] { rope(r, exec); });
  pos[2] = 2;
  require_agrees(supports(r, exec), [&] { rope(r, exec); });
  REQUIRE(supports(r, exec));

  auto a = random_vector<float>(3 * 16), g = random_vector<float>(16);
  std::vector<float> o(3 * 16);
  RmsNormParams<float, float> n{make_view(a.data(), {3, 16}), make_view(g.data(), {15}), make_view(o.data(), {3, 16})};
  require_agrees(supports(n, exec), [&] { rmsnorm(n, exec); });
  REQUIRE_FALSE(supports(n, exec));
  n.weight = make_view(g.data(), {16});
  require_agrees(supports(n, exec), [&] { rmsnorm(n, exec); });

  SwigluParams<float> sw{make_view(a.data(), {3, 16}), make_view(g.data(), {1, 16}), make_view(o.data(), {3, 16})};
  require_agrees(supports(sw, exec), [&] { swiglu(sw, exec); });
  REQUIRE_FALSE(supports(sw, exec));

  auto table = random_vector<float>(10 * 16);
  std::vector<int32_t> ids = {1, 10, 0};
  EmbeddingParams<float, float> e{make_view(table.data(), {10, 16}), rftest::cview(ids), make_view(o.data(), {3, 16})};
  REQUIRE_THAT(supports(e, exec).why(), Catch::Contains("ids[1] = 10 is outside the vocabulary"));
  require_agrees(supports(e, exec), [&] { embedding(e, exec); });
  ids[1] = 9;
  require_agrees(supports(e, exec), [&] { embedding(e, exec); });

  auto q = random_vector<float>(20 * 2 * 96), k = random_vector<float>(20 * 1 * 96);
  std::vector<RecencyHeadStats> stats(2);
  RecencyScoreParams<float> rs;
  rs.q = make_view(q.data(), {20, 2, 96});
  rs.k = make_view(k.data(), {20, 1, 96});
  rs.stats = make_view(stats.data(), {2});
  REQUIRE_THAT(supports(rs, exec).why(), Catch::Contains("recency_score: head_dim: unsupported value 96"));
  require_agrees(supports(rs, exec), [&] { recency_score(rs, exec); });
  rs.q = make_view(q.data(), {30, 2, 64});
  rs.k = make_view(k.data(), {30, 1, 64});
  require_agrees(supports(rs, exec), [&] { recency_score(rs, exec); });

  auto h = random_vector<float>(3 * 16);
  std::vector<int32_t> targets = {1, 2, 3};
  CrossEntropyParams<float> ce;
  ce.h = make_view(h.data(), {3, 16});
  ce.weight = make_view(table.data(), {10, 16});
  ce.targets = rftest::cview(targets);
  auto run_ce = [&] {
    std::vector<unsigned char> ws(cross_entropy_workspace_bytes(ce, exec));
    cross_entropy(ce, exec, ws.data(), ws.size());
  };
  require_agrees(supports(ce, exec), run_ce);
  REQUIRE(supports(ce, exec));
  ce.chunk_tokens = 0;
  require_agrees(supports(ce, exec), run_ce);
  REQUIRE_FALSE(supports(ce, exec));
}
