// recurformer/cpu/detail/scan_kernels.hpp: the selective-scan kernel body and its ISA entry points.
//
// One call runs a block of up to 4 x V::width channels of one group over the tokens of one sequence,
// vectorised over the channels: dt, u, z, D and y are contiguous over channels, and B[t,g,n] /
// C[t,g,r,n] are shared by the whole block, so they enter as broadcasts and no horizontal reduction
// is needed. The block's state h[n][lane] and decay rates A[n][lane] are transposed into stack
// buffers (at most 256 x 16 floats each, L1-resident) once per sequence; per token and state
// element the work is one exp, one multiply, one fma for h and one fma per reader for y.
// The exp dominates: it is computed as 2^(dt * A log2 e) with A log2 e staged once, in 9 vector
// instructions (simd::exp2 in scan_math.hpp), so the kernel is bound by the FMA ports, not memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "recurformer/cpu/detail/scan_math.hpp"
#include "recurformer/ops/selective_scan.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

/// One task: channels [c0, c0 + nc) of one group over tokens [t0, t1), nc <= kScanMaxSubBlocks
/// vector widths. Pointers are already offset
/// to channel c0 (and to the group in B and C); strides are in elements.
template <class T>
struct ScanBlock {
  const T* u;              // [tokens, *] token stride su
  const T* delta;          // [tokens, *] token stride sdelta
  const T* B;              // [tokens, N] token stride sB
  const T* C;              // [tokens, R, N] strides sC_t, sC_r
  const T* z;              // [tokens, *] token stride sz, optional
  T* y;                    // [tokens, R, *] strides sy_t, sy_r
  const float* A;          // [nc, N] row stride sA
  const float* D;          // [nc] optional
  const float* delta_bias; // [nc] optional
  float* state;            // [nc, N] channel stride s_state
  int64_t su, sdelta, sB, sC_t, sC_r, sz, sy_t, sy_r, sA, s_state;
  int64_t t0, t1, n_state, readers;
  int nc;
  bool softplus, use_initial_state;
};

/// Vector blocks of channels one prefill task interleaves (see scan_block).
constexpr int kScanMaxSubBlocks = 4;

// Channels [0, nc) in sub-blocks of W lanes (nc <= kScanMaxSubBlocks * W, sub-blocks * N <= the
// state buffer). For each chunk of tokens every sub-block runs in turn, so each row of u, delta and
// y is visited once for up to 4 * W channels: with small N and wide rows, one-vector column strips
// would cost a TLB miss per row and stream.
template <class V, class T>
void scan_block(const ScanBlock<T>& a) {
  constexpr int W = V::width;
  const int64_t N = a.n_state, R = a.readers;
  const int nc = a.nc, nsub = (nc + W - 1) / W;
  alignas(64) float h[kSelectiveScanMaxState * W];   // [sub-block][N][W]
  alignas(64) float At[kSelectiveScanMaxState * W];  // A * log2(e), same layout
  alignas(64) float b_row[kSelectiveScanMaxState];
  alignas(64) float c_rows[kSelectiveScanMaxReaderStates];
  // Lanes past nc keep h = 0 and A = 0 (decay 1), so they stay finite and are never stored.
  for (int b = 0; b < nsub; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int j = 0; j < W; ++j) {
        const int c = b * W + j;
        const bool live = c < nc;
        h[(b * N + n) * W + j] = live && a.use_initial_state ? a.state[c * a.s_state + n] : 0.f;
        At[(b * N + n) * W + j] = live ? a.A[c * a.sA + n] * simd::detail::kLog2e : 0.f;  // exp(x) = 2^(x log2 e)
      }
  // The per-token element-wise work (softplus, silu: long dependency chains) is done for a chunk of
  // tokens first, so its latency overlaps across tokens instead of stalling every token's state loop.
  constexpr int kChunk = 16;
  alignas(64) float dt_buf[kChunk * W], du_buf[kChunk * W], skip_buf[kChunk * W], gate_buf[kChunk * W];
  for (int64_t tc = a.t0; tc < a.t1; tc += kChunk) {
    const int chunk = int(std::min<int64_t>(kChunk, a.t1 - tc));
    for (int b = 0; b < nsub; ++b) {
      const int ob = b * W, ncb = std::min(W, nc - ob);
      float* hb = h + b * N * W;
      const float* Ab = At + b * N * W;
      const V bias = a.delta_bias ? simd::load_n<V>(a.delta_bias + ob, ncb) : V::zero();
      const V Dv = a.D ? simd::load_n<V>(a.D + ob, ncb) : V::zero();
      for (int i = 0; i < chunk; ++i) {
        const int64_t t = tc + i;
        const V u = simd::load_n<V>(a.u + t * a.su + ob, ncb);
        V dt = simd::load_n<V>(a.delta + t * a.sdelta + ob, ncb) + bias;
        if (a.softplus) dt = simd::softplus(dt);
        dt.store(dt_buf + i * W);
        (dt * u).store(du_buf + i * W);
        (Dv * u).store(skip_buf + i * W);
        const V gate = a.z ? simd::silu(simd::load_n<V>(a.z + t * a.sz + ob, ncb)) : V::broadcast(1.f);
        gate.store(gate_buf + i * W);
      }
      for (int i = 0; i < chunk; ++i) {
        const int64_t t = tc + i;
        // B and C rows of this token as fp32 (for float storage: read in place).
        const float* bt;
        const float* ct;
        int64_t ct_r;
        if constexpr (std::is_same<T, float>::value) {
          bt = a.B + t * a.sB;
          ct = a.C + t * a.sC_t;
          ct_r = a.sC_r;
        } else {
          const T* bs = a.B + t * a.sB;
          int64_t n = 0;
          for (; n + W <= N; n += W) V::load(bs + n).store(b_row + n);
          if (n < N) V::load_partial(bs + n, int(N - n)).store_partial(b_row + n, int(N - n));
          for (int64_t r = 0; r < R; ++r) {
            const T* cs = a.C + t * a.sC_t + r * a.sC_r;
            float* cd = c_rows + r * N;
            n = 0;
            for (; n + W <= N; n += W) V::load(cs + n).store(cd + n);
            if (n < N) V::load_partial(cs + n, int(N - n)).store_partial(cd + n, int(N - n));
          }
          bt = b_row;
          ct = c_rows;
          ct_r = N;
        }
        const V dt = V::load(dt_buf + i * W), du = V::load(du_buf + i * W);
        for (int64_t n = 0; n < N; ++n) {
          const V decay = simd::exp2(dt * V::load(Ab + n * W));
          fma(decay, V::load(hb + n * W), du * V::broadcast(bt[n])).store(hb + n * W);
        }
        const V skip = V::load(skip_buf + i * W), gate = V::load(gate_buf + i * W);
        for (int64_t r = 0; r < R; ++r) {
          const float* cr = ct + r * ct_r;
          // four partial sums: the fma latency chain over n would otherwise bound the loop
          V s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
          int64_t n = 0;
          for (; n + 4 <= N; n += 4) {
            s0 = fma(V::load(hb + n * W), V::broadcast(cr[n]), s0);
            s1 = fma(V::load(hb + (n + 1) * W), V::broadcast(cr[n + 1]), s1);
            s2 = fma(V::load(hb + (n + 2) * W), V::broadcast(cr[n + 2]), s2);
            s3 = fma(V::load(hb + (n + 3) * W), V::broadcast(cr[n + 3]), s3);
          }
          for (; n < N; ++n) s0 = fma(V::load(hb + n * W), V::broadcast(cr[n]), s0);
          const V yv = ((s0 + s1) + (s2 + s3) + skip) * gate;
          simd::store_n(yv, a.y + t * a.sy_t + r * a.sy_r + ob, ncb);
        }
      }
    }
  }
  for (int c = 0; c < nc; ++c)
    for (int64_t n = 0; n < N; ++n) a.state[c * a.s_state + n] = h[((c / W) * N + n) * W + c % W];
}

/// One decode task: token row t (a one-token sequence), channels [c0, c0 + nc) with nc <= 64, any
/// groups. Pointers are offset to the row and to channel c0 (B and C to the row only).
template <class T>
struct UpdateBlock {
  const T* u;               // [nc]
  const T* delta;           // [nc]
  const T* B;               // [G, N] group stride sB_g
  const T* C;               // [G, R, N] strides sC_g, sC_r
  const T* z;               // [nc] optional
  T* y;                     // [R, nc] reader stride sy_r
  const float* A;           // [nc, N] row stride sA
  const float* D;           // [nc] optional
  const float* delta_bias;  // [nc] optional
  float* state;             // [nc, N] channel stride s_state
  int64_t sB_g, sC_g, sC_r, sy_r, sA, s_state;
  int64_t c0, per_group, n_state, readers;
  int nc;
  bool softplus, use_initial_state;
};
constexpr int kUpdateChannels = 64;

// Decode: one token, so nothing is reused across tokens; vectorised over the state dimension N
// instead, h is read and written in place in the slot (no transposition), y is a dot product per
// (reader, channel). Per state element the arithmetic is the prefill kernel's, in the same order,
// so the state is bit-identical to a scan over the same tokens; y sums in another order.
template <class V, class T>
void update_block(const UpdateBlock<T>& a) {
  constexpr int W = V::width;
  const int64_t N = a.n_state, R = a.readers;
  alignas(64) float dt[kUpdateChannels], du[kUpdateChannels], skip[kUpdateChannels],
      gate[kUpdateChannels];
  alignas(64) float b_row[kSelectiveScanMaxState];
  alignas(64) float c_rows[kSelectiveScanMaxReaderStates];
  for (int j = 0; j < a.nc; j += W) {
    const int m = std::min(W, a.nc - j);
    const V u = simd::load_n<V>(a.u + j, m);
    V d = simd::load_n<V>(a.delta + j, m);
    if (a.delta_bias) d = d + simd::load_n<V>(a.delta_bias + j, m);
    if (a.softplus) d = simd::softplus(d);
    simd::store_n(d, dt + j, m);
    simd::store_n(d * u, du + j, m);
    simd::store_n(a.D ? simd::load_n<V>(a.D + j, m) * u : V::zero(), skip + j, m);
    simd::store_n(a.z ? simd::silu(simd::load_n<V>(a.z + j, m)) : V::broadcast(1.f), gate + j, m);
  }
  const int64_t n_full = N / W * W;
  const int tail = int(N - n_full);
  int64_t group = -1;
  const float* bt = nullptr;
  const float* ct = nullptr;
  int64_t ct_r = 0;
  for (int j = 0; j < a.nc; ++j) {
    const int64_t g = (a.c0 + j) / a.per_group;
    if (g != group) {  // B and C rows of this channel's group as fp32
      group = g;
      if constexpr (std::is_same<T, float>::value) {
        bt = a.B + g * a.sB_g;
        ct = a.C + g * a.sC_g;
        ct_r = a.sC_r;
      } else {
        const T* bs = a.B + g * a.sB_g;
        for (int64_t n = 0; n < n_full; n += W) V::load(bs + n).store(b_row + n);
        if (tail) V::load_partial(bs + n_full, tail).store_partial(b_row + n_full, tail);
        for (int64_t r = 0; r < R; ++r) {
          const T* cs = a.C + g * a.sC_g + r * a.sC_r;
          for (int64_t n = 0; n < n_full; n += W) V::load(cs + n).store(c_rows + r * N + n);
          if (tail) V::load_partial(cs + n_full, tail).store_partial(c_rows + r * N + n_full, tail);
        }
        bt = b_row;
        ct = c_rows;
        ct_r = N;
      }
    }
    float* h = a.state + j * a.s_state;
    const float* A = a.A + j * a.sA;
    const V dtv = V::broadcast(dt[j]), duv = V::broadcast(du[j]), log2e = V::broadcast(simd::detail::kLog2e);
    for (int64_t n = 0; n < n_full; n += W) {
      const V decay = simd::exp2(dtv * (V::load(A + n) * log2e));
      const V h0 = a.use_initial_state ? V::load(h + n) : V::zero();
      fma(decay, h0, duv * V::load(bt + n)).store(h + n);
    }
    if (tail) {
      const V decay = simd::exp2(dtv * (V::load_partial(A + n_full, tail) * log2e));
      const V h0 = a.use_initial_state ? V::load_partial(h + n_full, tail) : V::zero();
      fma(decay, h0, duv * V::load_partial(bt + n_full, tail)).store_partial(h + n_full, tail);
    }
    for (int64_t r = 0; r < R; ++r) {
      const float* cr = ct + r * ct_r;
      V s0 = V::zero(), s1 = V::zero();
      int64_t n = 0;
      for (; n + 2 * W <= n_full; n += 2 * W) {
        s0 = fma(V::load(h + n), V::load(cr + n), s0);
        s1 = fma(V::load(h + n + W), V::load(cr + n + W), s1);
      }
      if (n < n_full) s0 = fma(V::load(h + n), V::load(cr + n), s0);
      if (tail) s1 = fma(V::load_partial(h + n_full, tail), V::load_partial(cr + n_full, tail), s1);
      a.y[r * a.sy_r + j] = from_float<T>(((s0 + s1).reduce_add() + skip[j]) * gate[j]);
    }
  }
}

template <class T>
void update_block_scalar(const UpdateBlock<T>& a) {
  update_block<simd::F32x1>(a);
}
#if RF_HAVE_X86_SIMD
template <class T>
RF_KERNEL_AVX2 void update_block_avx2(const UpdateBlock<T>& a) {
  update_block<simd::F32x8>(a);
}
template <class T>
RF_KERNEL_AVX512 void update_block_avx512(const UpdateBlock<T>& a) {
  update_block<simd::F32x16>(a);
}
#endif

template <class T>
void scan_block_scalar(const ScanBlock<T>& a) {
  scan_block<simd::F32x1>(a);
}
#if RF_HAVE_X86_SIMD
template <class T>
RF_KERNEL_AVX2 void scan_block_avx2(const ScanBlock<T>& a) {
  scan_block<simd::F32x8>(a);
}
template <class T>
RF_KERNEL_AVX512 void scan_block_avx512(const ScanBlock<T>& a) {
  scan_block<simd::F32x16>(a);
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
