// rope and rope_inv_freq against double references: both pair layouts, with and without the
// Llama-3 frequency scaling, strided heads, awkward head dims; every dtype and ISA; bad input.
#include <cmath>

#include "recurformer/cpu/rope.hpp"
#include "support/test_util.hpp"

using namespace recurformer;

namespace {

// The table in double from the formulas (transformers' definitions).
std::vector<double> inv_freq_reference(int hd, double theta, const RopeScaling& sc) {
  std::vector<double> r;
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < hd / 2; ++i) {
    double f = 1.0 / std::pow(theta, double(2 * i) / hd);
    if (sc.type == RopeScaling::Type::llama3) {
      const double wavelen = 2 * pi / f;
      const double lo_wl = sc.original_max_position / double(sc.low_freq_factor);
      const double hi_wl = sc.original_max_position / double(sc.high_freq_factor);
      if (wavelen > lo_wl) {
        f = f / sc.factor;
      } else if (wavelen >= hi_wl) {
        const double smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) /
                              (sc.high_freq_factor - sc.low_freq_factor);
        f = (1 - smooth) * f / sc.factor + smooth * f;
      }
    }
    r.push_back(f);
  }
  return r;
}

template <class T>
void check_rope(int tokens, int heads, int hd, RopeLayout layout, const std::vector<float>& inv, CpuExec exec) {
  const int head_stride = hd + 3;  // heads not packed: the op must follow the view's strides
  auto x = rftest::random_vector<T>(size_t(tokens) * heads * head_stride);
  std::vector<int32_t> pos(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) pos[size_t(t)] = (t * 977) % 5003;  // up to ~5000, unordered
  const auto xd = rftest::to_double(x);
  std::vector<double> ref = xd;
  const int nf = hd / 2;
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < nf; ++i) {
        // The angle is rounded to fp32 (the op's contract, as transformers computes it).
        const double angle = double(float(pos[size_t(t)]) * inv[size_t(i)]);
        const double c = std::cos(angle), s = std::sin(angle);
        const size_t base = (size_t(t) * heads + h) * head_stride;
        const size_t ia = base + (layout == RopeLayout::rotate_half ? size_t(i) : size_t(2 * i));
        const size_t ib = ia + (layout == RopeLayout::rotate_half ? size_t(nf) : 1);
        ref[ia] = xd[ia] * c - xd[ib] * s;
        ref[ib] = xd[ib] * c + xd[ia] * s;
      }
  RopeParams<T> p;
  p.x = make_strided_view<T>(x.data(), {tokens, heads, hd}, {int64_t(heads) * head_stride, head_stride, 1});
  p.positions = make_view<const int32_t>(pos.data(), {tokens});
  p.inv_freq = make_view<const float>(inv.data(), {nf});
  p.layout = layout;
  rope(p, exec);
  // Padding between heads (the +3) is compared too: it must come back unchanged.
  rftest::check_close<T>(layout == RopeLayout::rotate_half ? "rotate_half" : "interleaved", x, ref);
}

}  // namespace

TEST_CASE("rope_inv_freq: default and llama3 tables", "[rope]") {
  RopeScaling llama3;
  llama3.type = RopeScaling::Type::llama3;
  for (int hd : {64, 128, 34}) {
    for (auto [theta, sc] : {std::pair{10000.f, RopeScaling{}}, std::pair{500000.f, llama3}}) {
      INFO("hd " << hd << " theta " << theta);
      const auto ours = rope_inv_freq(hd, theta, sc);
      const auto ref = inv_freq_reference(hd, theta, sc);
      // fp32 step by step against double: a few ulps; the llama3 smoothing band subtracts
      // low_freq_factor from old_len / wavelen (~1..4), which cancels a few more bits.
      const double rel = sc.type == RopeScaling::Type::llama3 ? 5e-6 : 1e-6;
      rftest::check_close("inv_freq", ours.data(), ref.data(), ref.size(), rel, 0.0);
    }
  }
  // Llama-3 scaling leaves the highest frequency alone and divides the lowest by the factor.
  const auto plain = rope_inv_freq(64, 500000.f), scaled = rope_inv_freq(64, 500000.f, llama3);
  REQUIRE(scaled[0] == plain[0]);
  REQUIRE(std::fabs(scaled[31] * 8 - plain[31]) <= 1e-6 * plain[31]);
  REQUIRE_THROWS_WITH(rope_inv_freq(63, 10000.f), Catch::Contains("even"));
  REQUIRE_THROWS_WITH(rope_inv_freq(64, 0.5f), Catch::Contains("theta"));
}

TEMPLATE_LIST_TEST_CASE("rope: both layouts, with and without llama3 scaling", "[rope]", rftest::StorageTypes) {
  ThreadPool pool(2);
  RopeScaling llama3;
  llama3.type = RopeScaling::Type::llama3;
  rftest::for_each_isa([&] {
    for (RopeLayout layout : {RopeLayout::rotate_half, RopeLayout::interleaved})
      for (int hd : {2, 34, 64, 66, 128})
        for (auto [tokens, heads] : {std::pair{1, 1}, std::pair{17, 3}, std::pair{5, 8}})
          for (const RopeScaling& sc : {RopeScaling{}, llama3}) {
            INFO("hd " << hd << " tokens " << tokens << " heads " << heads << " llama3 "
                       << (sc.type == RopeScaling::Type::llama3));
            const auto inv = rope_inv_freq(hd, sc.type == RopeScaling::Type::llama3 ? 500000.f : 10000.f, sc);
            check_rope<TestType>(tokens, heads, hd, layout, inv, CpuExec{&pool});
          }
  });
}

TEST_CASE("rope: bad input throws and leaves x untouched", "[rope]") {
  std::vector<float> x(2 * 2 * 8, 7.f), inv(4, 0.1f);
  std::vector<int32_t> pos{0, 1};
  RopeParams<float> p;
  p.x = make_view<float>(x.data(), {2, 2, 8});
  p.positions = make_view<const int32_t>(pos.data(), {2});
  p.inv_freq = make_view<const float>(inv.data(), {4});
  REQUIRE_NOTHROW(check(p));
  SECTION("odd head_dim") {
    auto b = p;
    b.x = make_view<float>(x.data(), {2, 2, 7});
    REQUIRE_THROWS_WITH(rope(b, CpuExec{}), Catch::Contains("rope: x head_dim must be positive and even"));
  }
  SECTION("inv_freq size") {
    auto b = p;
    b.inv_freq = make_view<const float>(inv.data(), {3});
    REQUIRE_THROWS_WITH(rope(b, CpuExec{}), Catch::Contains("rope: inv_freq has shape [3], expected [4]"));
  }
  SECTION("positions size") {
    auto b = p;
    b.positions = make_view<const int32_t>(pos.data(), {1});
    REQUIRE_THROWS_WITH(rope(b, CpuExec{}), Catch::Contains("rope: positions has shape"));
  }
  SECTION("negative position") {
    std::vector<int32_t> neg{0, -1};
    auto b = p;
    b.positions = make_view<const int32_t>(neg.data(), {2});
    REQUIRE_THROWS_WITH(rope(b, CpuExec{}), Catch::Contains("positions[1] = -1"));
  }
  SECTION("strided head dim") {
    auto b = p;
    b.x = make_strided_view<float>(x.data(), {2, 2, 4}, {16, 8, 2});
    b.inv_freq = make_view<const float>(inv.data(), {2});
    REQUIRE_THROWS_WITH(rope(b, CpuExec{}), Catch::Contains("unit stride"));
  }
  for (float v : x) REQUIRE(v == 7.f);
}
