// backend_ops_test: every op's cases (cases.hpp), run on every backend this build and machine have
// and compared with the CPU's portable scalar body, then an op x dtype x backend matrix (llama.cpp's
// test-backend-ops). The backends: cpu-scalar (the reference), cpu-avx2 and cpu-avx512 where the
// CPU has them, and with CUDA cuda (default stream) and cuda-thread (a non-blocking stream from
// another host thread).
//
// RECURFORMER_BACKENDS=cuda (the gpu-labelled ctest) runs only the CUDA columns against the
// reference, and exits 77 (skipped) without a device, or 1 with RECURFORMER_REQUIRE_GPU set; a
// broken driver fails. Unset, every backend present runs; a CUDA build without a device says so
// in the matrix and runs the CPU columns.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>

#include "backend.hpp"

using namespace rfops;
using Keys = AttentionSpec::Keys;

namespace {

// ---- The cases: one list per op, each case in every dtype ---------------------------------------

constexpr DType kDtypes[] = {DType::f32, DType::f16, DType::bf16};

std::string shape_label(int64_t n_q, int64_t n_kv, int64_t hd) {
  return "q " + std::to_string(n_q) + " kv " + std::to_string(n_kv) + " hd " + std::to_string(hd);
}

std::vector<Case> attention_cases() {
  struct Shape {
    int64_t n_q, n_kv, hd;
  };
  const Shape shapes[] = {{2, 2, 64}, {8, 2, 128}, {16, 2, 64}, {8, 1, 128}};  // groups 1, 4, 8, 8
  std::vector<AttentionSpec> specs;
  std::vector<std::string> labels;
  auto add = [&](std::string label, AttentionSpec s) { labels.push_back(std::move(label)), specs.push_back(std::move(s)); };
  for (const Shape& sh : shapes) {
    const std::string l = shape_label(sh.n_q, sh.n_kv, sh.hd);
    // One token each after 2999, 1036, 0 and 1 keys: several key splits, a row that sees only
    // itself, slots permuted over a pool of 5; paged: pages of 16, shuffled, one shared.
    AttentionSpec d{sh.n_q, sh.n_kv, sh.hd, 5, 3072, {2999, 1036, 0, 1}, {1, 1, 1, 1}, {4, 0, 2, 1}};
    d.page_size = 16, d.share_page = true;
    add("decode, " + l + ", paged 16 shared", d);
    // Chunks of 37, 1, 70 and 0 queries after 300, 700, 0 and 5 keys (capacity 800: split path).
    AttentionSpec p{sh.n_q, sh.n_kv, sh.hd, 4, 800, {300, 700, 0, 5}, {37, 1, 70, 0}, {3, 1, 0, 2}};
    p.page_size = 32;
    add("chunked prefill, " + l + ", paged 32", p);
  }
  // Capacity 200: no split, rows written directly; one sequence without cu_seqlens or kv_slots.
  AttentionSpec direct{8, 2, 64, 1, 200, {60}, {133}, {0}};
  direct.packed = false;
  add("prefill into 200 slots, unpacked, " + shape_label(8, 2, 64), direct);
  for (const Shape& sh : {shapes[1], shapes[2]}) {
    const std::string l = shape_label(sh.n_q, sh.n_kv, sh.hd);
    // A ring of 4 sinks + 60 window entries at sequence lengths 500 and 30 (partly filled).
    AttentionSpec ring{sh.n_q, sh.n_kv, sh.hd, 2, 64, {499, 29}, {1, 1}, {1, 0}, Keys::ring, 4, 60};
    add("streaming ring, sink 4 + window 60, " + l, ring);
    AttentionSpec shuffled{sh.n_q, sh.n_kv, sh.hd, 1, 300, {295}, {5}, {0}, Keys::shuffled, 3, 50};
    add("streaming mask over shuffled positions, " + l, shuffled);
    AttentionSpec none{sh.n_q, sh.n_kv, sh.hd, 1, 64, {0}, {3}, {0}, Keys::future};
    add("rows that see no key, " + l, none);
  }
  // Limits of some backend (CUDA: group <= 16, K rows 16-byte aligned).
  add("group of 32, " + shape_label(32, 1, 64), AttentionSpec{32, 1, 64, 1, 64, {10}, {1}, {0}});
  AttentionSpec misaligned{4, 1, 64, 1, 64, {10}, {1}, {0}};
  misaligned.misalign_k = true;
  add("K rows not 16-byte aligned", misaligned);

  std::vector<Case> cases;
  for (DType dt : kDtypes)
    for (size_t i = 0; i < specs.size(); ++i) cases.push_back({"attention", labels[i], dt, dt, specs[i]});
  AttentionSpec lie{4, 1, 64, 1, 64, {10}, {1}, {0}};
  lie.lie_v = true;
  cases.push_back({"attention", "v one key short of k", DType::f32, DType::f32, lie, "v has shape"});
  return cases;
}

std::vector<Case> scan_cases() {
  std::vector<Case> cases;
  for (DType dt : kDtypes) {
    // Sequence 0 spans two CUDA chunks (512 tokens); 1 is padding; 2 is empty; 3 is one token.
    cases.push_back({"selective_scan", "5 sequences up to 700 tokens, groups 2, readers 3", dt, dt,
                     ScanSpec{{700, 9, 0, 1, 45}, {2, -1, 0, 4, 1}, 40, 64, 2, 3, 6}});
    cases.push_back({"selective_scan", "33 tokens, dch 17, N 5", dt, dt, ScanSpec{{33}, {0}, 17, 5, 1, 1, 1}});
    for (int64_t n : {64, 100})  // five one-token rows, a padding one; lanes own several states
      cases.push_back({"selective_state_update", "N " + std::to_string(n) + ", readers 4", dt, dt,
                       ScanSpec{{1, 1, 1, 1, 1}, {3, -1, 0, 4, 1}, 64, n, 1, 4, 6, true}});
    cases.push_back({"selective_scan", "9 readers", dt, dt, ScanSpec{{10}, {0}, 8, 4, 1, 9, 1}});  // CUDA: <= 8
    for (int64_t k : {2, 4, 8})
      cases.push_back({"causal_conv1d", "width " + std::to_string(k) + ", then an update", dt, dt,
                       ConvSpec{{300, 2, 0, 9}, {1, 3, -1, 0}, {0, -1, 3, 1}, 150, k, 4}});
  }
  return cases;
}

std::vector<Case> linear_cases() {
  const std::pair<DType, DType> pairs[] = {{DType::f32, DType::f32},
                                           {DType::f32, DType::f16},
                                           {DType::f32, DType::bf16},
                                           {DType::f16, DType::f16},
                                           {DType::bf16, DType::bf16}};
  std::vector<Case> cases;
  for (auto [x, w] : pairs) {
    // in and out: 1, not multiples of 8, and 300 (the most the fp32 budget covers) x 129.
    for (auto [in, out] : {std::pair<int64_t, int64_t>{1, 1}, {7, 13}, {33, 31}, {64, 40}, {300, 129}})
      for (int64_t tokens : {1, 3, 17, 64})
        for (bool padded : {false, true}) {
          const std::string l = std::to_string(tokens) + " x " + std::to_string(in) + " -> " + std::to_string(out);
          cases.push_back({"linear", l + (padded ? " + bias, strided" : ""), x, w, LinearSpec{tokens, in, out, padded, padded}});
        }
    cases.push_back({"linear", "no tokens", x, w, LinearSpec{0, 16, 8, true}});
  }
  LinearSpec lie{3, 20, 12, true};
  lie.lie_weight = true;
  cases.push_back({"linear", "weight one column short", DType::f32, DType::bf16, lie, "weight has shape"});
  return cases;
}

std::vector<Case> small_op_cases() {
  std::vector<Case> cases;
  for (DType dt : kDtypes) {
    for (int64_t hd : {2, 6, 64, 128})  // hd >= 64: Llama-3-scaled inv_freq
      for (int64_t tokens : {1, 37})
        for (RopeLayout layout : {RopeLayout::rotate_half, RopeLayout::interleaved})
          cases.push_back({"rope",
                           "hd " + std::to_string(hd) + ", " + std::to_string(tokens) + " tokens, " +
                               (layout == RopeLayout::rotate_half ? "rotate_half" : "interleaved"),
                           dt, dt, RopeSpec{hd, tokens, layout}});
    const std::pair<const char*, RecencySpec> recency[] = {
        {"shorter than the window", {10, 4, 1, 64, 16, 4}},
        {"group 1, window 1", {40, 4, 4, 64, 1, 0}},
        {"group 4, 300 tokens", {300, 8, 2, 128, 16, 4}},
        {"group 8, 1000 tokens", {1000, 8, 1, 64, 64, 4}}};
    for (const auto& [label, spec] : recency) cases.push_back({"recency_score", label, dt, dt, spec});
  }
  RopeSpec lie{64, 3, RopeLayout::rotate_half};
  lie.lie_inv_freq = true;
  cases.push_back({"rope", "inv_freq one short", DType::f32, DType::f32, lie, "inv_freq has shape"});
  return cases;
}

const std::vector<Case>& all_cases() {
  static const std::vector<Case> all = [] {
    std::vector<Case> v;
    for (auto list : {attention_cases(), scan_cases(), linear_cases(), small_op_cases()})
      v.insert(v.end(), list.begin(), list.end());
    for (size_t i = 0; i < v.size(); ++i) v[i].seed = (Catch::rngSeed() ? Catch::rngSeed() : 0x5eed) * 1000003 + i;
    return v;
  }();
  return all;
}

// ---- Judging a backend's result against the reference's ----------------------------------------

std::vector<Backend> g_backends;  // [0]: cpu-scalar, the reference

struct Cell {
  int pass = 0, fail = 0, unsupported = 0;
};
std::map<std::string, std::map<std::string, Cell>> g_matrix;  // "op dtype" -> backend -> cell

std::string compare_outputs(const Result& ref, const Result& got) {
  if (ref.outputs.size() != got.outputs.size()) return "a different number of outputs";
  for (size_t o = 0; o < ref.outputs.size(); ++o) {
    const Output &e = ref.outputs[o], &a = got.outputs[o];
    if (a.values.size() != e.values.size()) return a.name + ": a different size";
    size_t bad = 0, worst = 0;
    double worst_excess = -1;
    for (size_t i = 0; i < e.values.size(); ++i) {
      const double x = a.values[i], r = e.values[i];
      const double lim = a.abs + a.rel * (a.magnitude.empty() ? std::fabs(r) : a.magnitude[i]);
      const bool ok = x == r || (std::isfinite(x) && std::isfinite(r) && std::fabs(x - r) <= lim);
      if (!ok) {
        ++bad;
        const double excess = std::isfinite(x) ? std::fabs(x - r) / lim : 1e300;
        if (excess > worst_excess) worst_excess = excess, worst = i;
      }
    }
    if (bad) {
      std::ostringstream os;
      os << a.name << ": " << bad << " of " << e.values.size() << " elements out of tolerance (rel " << a.rel
         << ", abs " << a.abs << "); worst [" << worst << "]: " << a.values[worst] << " vs " << e.values[worst];
      return os.str();
    }
  }
  return {};
}

/// Empty when the backend did what the case asks; else what went wrong.
std::string judge(const Case& c, const Result& ref, const Result& got) {
  std::string why;
  for (const std::string& f : got.failures) why += (why.empty() ? "" : "; ") + f;
  if (!why.empty()) return why;
  if (!c.expect_error.empty())
    return got.error.find(c.expect_error) != std::string::npos
               ? ""
               : "expected an Error containing \"" + c.expect_error + "\", got " +
                     (got.error.empty() ? std::string("none") : "\"" + got.error + "\"");
  if (!ref.unsupported.empty() || !ref.error.empty())
    return "the reference did not run it: " + (ref.error.empty() ? ref.unsupported : ref.error);
  if (!got.unsupported.empty()) return {};
  if (!got.error.empty()) return "threw \"" + got.error + "\"";
  return compare_outputs(ref, got);
}

void run_op(const char* op) {
  int n = 0;
  for (const Case& c : all_cases()) {
    if (c.op != op) continue;
    ++n;
    std::string row = c.op + " " + dtype_name(c.dtype);
    if (c.op == "linear") row += std::string("/") + dtype_name(c.wdtype);
    const Result ref = g_backends[0].run(c);
    for (size_t b = 0; b < g_backends.size(); ++b) {
      const Result got = b == 0 ? ref : g_backends[b].run(c);
      const std::string why = judge(c, ref, got);
      Cell& cell = g_matrix[row][g_backends[b].name];
      if (!why.empty()) {
        ++cell.fail;
        FAIL_CHECK(c.op << " [" << row << "] " << c.label << " on " << g_backends[b].name << ": " << why);
      } else if (!got.unsupported.empty() && c.expect_error.empty()) {
        ++cell.unsupported;
      } else {
        ++cell.pass;
      }
    }
  }
  REQUIRE(n > 0);
}

void print_matrix(const std::string& absent) {
  std::printf("\nbackend ops (cases passed / run; \"n/a k\": k cases the backend's supports() refuses,\n"
              "each checked to throw that reason and write nothing)\n%-30s", "op dtype");
  for (const Backend& b : g_backends) std::printf(" %-16s", b.name.c_str());
  std::printf("\n");
  for (const auto& [row, cells] : g_matrix) {
    std::printf("%-30s", row.c_str());
    for (const Backend& b : g_backends) {
      auto it = cells.find(b.name);
      std::string s = "-";
      if (it != cells.end()) {
        const Cell& c = it->second;
        s = (c.fail ? "FAIL " : "OK ") + std::to_string(c.pass) + "/" + std::to_string(c.pass + c.fail);
        if (c.unsupported) s += " n/a " + std::to_string(c.unsupported);
      }
      std::printf(" %-16s", s.c_str());
    }
    std::printf("\n");
  }
  if (!absent.empty()) std::printf("not run: %s\n", absent.c_str());
}

}  // namespace

TEST_CASE("backend ops: attention", "[backend_ops][attention]") { run_op("attention"); }
TEST_CASE("backend ops: selective_scan", "[backend_ops][selective_scan]") { run_op("selective_scan"); }
TEST_CASE("backend ops: selective_state_update", "[backend_ops][selective_scan]") { run_op("selective_state_update"); }
TEST_CASE("backend ops: causal_conv1d", "[backend_ops][causal_conv1d]") { run_op("causal_conv1d"); }
TEST_CASE("backend ops: linear", "[backend_ops][linear]") { run_op("linear"); }
TEST_CASE("backend ops: rope", "[backend_ops][rope]") { run_op("rope"); }
TEST_CASE("backend ops: recency_score", "[backend_ops][recency_score]") { run_op("recency_score"); }

int main(int argc, char** argv) {
  const char* sel = std::getenv("RECURFORMER_BACKENDS");
  const std::string only = sel ? sel : "";
  std::vector<Backend> cpu = cpu_backends();
  g_backends.push_back(cpu[0]);  // the reference always runs
  for (size_t i = 1; i < cpu.size(); ++i)
    if (only.empty() || only.find("cpu") != std::string::npos) g_backends.push_back(cpu[i]);
  std::string absent;
#ifdef RF_BACKEND_OPS_CUDA
  if (only.empty() || only.find("cuda") != std::string::npos) {
    bool broken = false;
    std::vector<Backend> cuda = cuda_backends(absent, broken);
    if (broken) {
      std::printf("%s\n", absent.c_str());
      return 1;
    }
    if (cuda.empty() && !only.empty()) {  // the CUDA columns were asked for and cannot run
      if (rftest::gpu_required()) {
        std::printf("%s, and RECURFORMER_REQUIRE_GPU is set: failing\n", absent.c_str());
        return 1;
      }
      std::printf("%s: skipped\n", absent.c_str());
      return 77;
    }
    if (!absent.empty()) absent = "cuda (" + absent + ")";
    g_backends.insert(g_backends.end(), cuda.begin(), cuda.end());
  }
#else
  absent = "cuda (not in this build)";
#endif
  const int rc = Catch::Session().run(argc, argv);
  print_matrix(absent);
  return rc;
}
