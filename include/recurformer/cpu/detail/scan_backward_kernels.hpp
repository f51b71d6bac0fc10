// recurformer/cpu/detail/scan_backward_kernels.hpp: the selective-scan backward kernel body (one
// task: a block of channels of one group over one sequence) and its ISA entry points.
//
// The forward is recomputed, never stored: a first pass runs the recurrence and keeps only the
// state at the start of each chunk of kScanBwdChunk tokens; then the chunks are visited last to
// first, each one's per-token states h_t and decays exp(dt A) recomputed from its boundary state
// into scratch, and the reverse recurrence dh_{t-1} = exp(dt_t A) dh_t run over it. Each state
// element costs two exps (boundary pass and recompute; the reverse pass reuses the stored decays),
// twice the forward's. The recompute runs the forward's arithmetic in the forward's order (exp2 of
// dt * (A log2 e), one fma), so the states are the forward's bit for bit.
//
// Vectorised over the state dimension N (the forward vectorises over channels): dB[t,g,:] and
// dC[t,g,r,:] are sums over the block's channels of vectors along N, which become plain vector
// fmas into one row per token instead of a horizontal sum per (token, n); only dt, du and the gate
// derivative need one horizontal sum per (token, channel). B and C rows are read once per token for
// the whole block. The readers enter twice per token, outside the per-channel loop and in groups
// of up to 4 (a compile-time count, so their rows or sums stay in registers): before it as
// cd[c,:] = sum_r dy[t,r,c] C[t,r,:], after it as dC[t,r,:] = sum_c dy0[t,r,c] h_t[c,:].
// The per-token element-wise work (softplus and its derivative, silu, dy * gate) is done per chunk
// vectorised over channels, like the forward's. Rows are padded with zeros to a multiple of 16
// floats (the widest vector), so the N loops have no tails: a padded state lane has A = 0,
// B = C = 0 and stays 0 in h and dh.
//
// Per state element and token the reverse pass is about 8 vector ops plus 2R for the readers, the
// two exp passes about 12 each: roughly 3x the forward's 12 + R, which is what it measures.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "recurformer/cpu/detail/scan_math.hpp"
#include "recurformer/ops/selective_scan.hpp"

namespace recurformer {
namespace cpu {
namespace detail {

constexpr int64_t kScanBwdChunk = 16;          // tokens per recomputed chunk (states stay in L2)
constexpr int64_t kScanBwdBlockChannels = 16;  // channels per task, at least ...
constexpr int64_t kScanBwdMaxBlocks = 8;       // ... and at most this many tasks per group, which
                                               // bounds the dB / dC partial sums in the workspace
constexpr int64_t kScanBwdPad = 16;            // rows padded to the widest vector (floats)

inline int64_t scan_bwd_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// One thread's scratch, in floats (every part starts on a 64-byte boundary when the base does).
struct ScanBwdScratch {
  // Per-(token, channel) buffers of a chunk, [kScanBwdChunk][ncs] each.
  enum Chan { kDt, kDtu, kSpd, kGate, kGprime, kU, kDdt, kDuh, kZdot, kChanCount };
  int64_t np = 0;   // N padded
  int64_t ncs = 0;  // channel buffers' row stride (block channels padded)
  int64_t bnd = 0, h = 0, e = 0, a2 = 0, ar = 0, carry = 0, dacc = 0, brow = 0, crow = 0, dbrow = 0,
          cd = 0, chan = 0, dyb = 0, dy0b = 0, dvacc = 0, bvacc = 0, total = 0;

  static ScanBwdScratch make(int64_t n, int64_t nc_max, int64_t readers, int64_t chunks) {
    ScanBwdScratch s;
    s.np = scan_bwd_round_up(n, kScanBwdPad);
    s.ncs = scan_bwd_round_up(nc_max, kScanBwdPad);
    const int64_t L = kScanBwdChunk, state = nc_max * s.np;
    int64_t at = 0;
    auto take = [&](int64_t floats) {
      const int64_t o = at;
      at += scan_bwd_round_up(floats, kScanBwdPad);
      return o;
    };
    s.bnd = take(chunks * state);   // [chunks][nc][np] state at the start of each chunk
    s.h = take(L * state);          // [L][nc][np] h after each token of the chunk
    s.e = take(L * state);          // [L][nc][np] exp(dt A) of each token
    s.a2 = take(state);             // [nc][np] A log2(e)
    s.ar = take(state);             // [nc][np] A
    s.carry = take(state);          // [nc][np] dL/dh carried to the previous token
    s.dacc = take(state);           // [nc][np] dA
    s.brow = take(s.np);            // [np] B[t,g,:] as fp32
    s.crow = take(readers * s.np);  // [R][np] C[t,g,:,:] as fp32
    s.dbrow = take(s.np);           // [np] dB[t,g,:] over the block's channels
    s.cd = take(state);             // [nc][np] sum_r dy[t,r,c] C[t,r,:]
    s.chan = take(kChanCount * L * s.ncs);
    s.dyb = take(L * readers * s.ncs);   // [L][R][ncs] dy
    s.dy0b = take(L * readers * s.ncs);  // [L][R][ncs] dy * silu(z)
    s.dvacc = take(s.ncs);               // dD
    s.bvacc = take(s.ncs);               // ddelta_bias
    s.total = at;
    return s;
  }
};

/// One task: channels [0, nc) (pointers offset to the block's first channel, B and C to its group)
/// over tokens [t0, t1) of one sequence. Strides in elements; token rows are indexed by absolute t.
template <class T>
struct ScanBwdBlock {
  const T* u;               // [tokens, *] stride su
  const T* delta;           // [tokens, *] stride sdelta
  const T* B;               // [tokens, N] stride sB
  const T* C;               // [tokens, R, N] strides sC_t, sC_r
  const T* z;               // [tokens, *] stride sz, optional
  const float* dy;          // [tokens, R, *] strides sdy_t, sdy_r
  const float* A;           // [nc, N] row stride sA
  const float* D;           // [nc] optional
  const float* delta_bias;  // [nc] optional
  const float* h0;          // [nc, N] channel stride s_h0; null: h0 = 0
  float* du;                // [tokens, *] stride sdu, optional (and ddelta, dz likewise)
  float* ddelta;
  float* dz;
  float* dB;                // [tokens, N] stride sdB, optional (the output's group row or a partial)
  float* dC;                // [tokens, R, N] strides sdC_t, sdC_r, optional
  float* dA;                // [nc, N] row stride sdA, optional (the output's rows or a partial)
  float* dD;                // [nc] optional
  float* ddelta_bias;       // [nc] optional
  float* dh0;               // [nc, N] channel stride s_dh0, optional
  float* scratch;           // ScanBwdScratch::total floats, 64-byte aligned
  ScanBwdScratch layout;
  int64_t su, sdelta, sB, sC_t, sC_r, sz, sdy_t, sdy_r, sA, s_h0, sdu, sddelta, sdz, sdB, sdC_t, sdC_r,
      sdA, s_dh0;
  int64_t t0, t1, n_state, readers;
  int nc;
  bool softplus;
};

// Per-(token, channel) element-wise work of tokens [ts, ts + cl), vectorised over the channels.
// full = false: only dt and dt * u (what the boundary pass needs).
template <class V, class T>
void scan_bwd_prologue(const ScanBwdBlock<T>& a, float* ws, int64_t ts, int cl, bool full) {
  constexpr int W = V::width;
  const ScanBwdScratch& s = a.layout;
  const int64_t R = a.readers, ncs = s.ncs, L = kScanBwdChunk;
  float* chan = ws + s.chan;
  auto buf = [&](ScanBwdScratch::Chan k, int i) { return chan + (k * L + i) * ncs; };
  for (int ob = 0; ob < a.nc; ob += W) {
    const int m = std::min(W, a.nc - ob);
    const V bias = a.delta_bias ? simd::load_n<V>(a.delta_bias + ob, m) : V::zero();
    for (int i = 0; i < cl; ++i) {
      const int64_t t = ts + i;
      const V u = simd::load_n<V>(a.u + t * a.su + ob, m);
      const V x = simd::load_n<V>(a.delta + t * a.sdelta + ob, m) + bias;
      const V dt = a.softplus ? simd::softplus(x) : x;  // as the forward
      dt.store(buf(ScanBwdScratch::kDt, i) + ob);
      (dt * u).store(buf(ScanBwdScratch::kDtu, i) + ob);
      if (!full) continue;
      u.store(buf(ScanBwdScratch::kU, i) + ob);
      // softplus'(x) = sigmoid(x); for x > 20 the forward takes dt = x, and sigmoid(x) is 1.0f there
      // already (1 + e^-20 rounds to 1), so no cut-off is needed.
      const V one = V::broadcast(1.f);
      const V spd = a.softplus ? simd::div(one, one + exp(V::zero() - x)) : one;
      spd.store(buf(ScanBwdScratch::kSpd, i) + ob);
      V gate = one, gprime = V::zero();
      if (a.z) {
        const V zv = simd::load_n<V>(a.z + t * a.sz + ob, m);
        gate = simd::silu(zv);  // the forward's gate, bit for bit
        const V sg = simd::div(one, one + exp(V::zero() - zv));
        gprime = sg * fma(zv, one - sg, one);  // silu'(z) = s (1 + z (1 - s))
      }
      gate.store(buf(ScanBwdScratch::kGate, i) + ob);
      gprime.store(buf(ScanBwdScratch::kGprime, i) + ob);
      for (int64_t r = 0; r < R; ++r) {
        const V dy = simd::load_n<V>(a.dy + t * a.sdy_t + r * a.sdy_r + ob, m);
        dy.store(ws + s.dyb + (i * R + r) * ncs + ob);
        (dy * gate).store(ws + s.dy0b + (i * R + r) * ncs + ob);
      }
    }
  }
}

// B[t] (and C[t] when `with_c`) as fp32 rows padded with zeros to np; float rows whose N is a
// multiple of the vector width are read in place.
template <class V, class T>
void scan_bwd_rows(const ScanBwdBlock<T>& a, float* ws, int64_t t, bool with_c, const float*& b,
                   const float*& c, int64_t& c_r) {
  constexpr int W = V::width;
  const int64_t N = a.n_state, R = a.readers, np = a.layout.np;
  if constexpr (std::is_same<T, float>::value) {
    if (N % W == 0) {
      b = a.B + t * a.sB;
      c = a.C + t * a.sC_t;
      c_r = a.sC_r;
      return;
    }
  }
  auto stage = [&](const T* src, float* dst) {
    int64_t n = 0;
    for (; n + W <= N; n += W) V::load(src + n).store(dst + n);
    if (n < N) V::load_partial(src + n, int(N - n)).store(dst + n);  // zeros past N
  };
  float* br = ws + a.layout.brow;
  stage(a.B + t * a.sB, br);
  b = br;
  c = ws + a.layout.crow;
  c_r = np;
  if (with_c)
    for (int64_t r = 0; r < R; ++r) stage(a.C + t * a.sC_t + r * a.sC_r, ws + a.layout.crow + r * np);
}

// h <- exp(dt A) h + dt u B for the block's channels at token i of the chunk: the forward's
// arithmetic. `decay` (null: not kept) receives exp(dt A).
template <class V>
inline void scan_bwd_step(const float* chan_dt, const float* chan_dtu, const float* a2, const float* b,
                          const float* h_in, float* h_out, float* decay, int nc, int64_t np,
                          int64_t nw) {
  for (int c = 0; c < nc; ++c) {
    const V dt = V::broadcast(chan_dt[c]), dtu = V::broadcast(chan_dtu[c]);
    const float* A = a2 + c * np;
    const float* hi = h_in + c * np;
    float* ho = h_out + c * np;
    for (int64_t j = 0; j < nw; j += V::width) {
      const V e = simd::exp2(dt * V::load(A + j));
      fma(e, V::load(hi + j), dtu * V::load(b + j)).store(ho + j);
      if (decay) e.store(decay + c * np + j);
    }
  }
}

// cd[c, :] (+)= sum_{k < RB} dy[k, c] C[k, :] for the block's channels: RB readers' C rows stay in
// registers while the channels stream by. first: cd is overwritten.
template <class V, int RB>
void scan_bwd_cd(const float* C, int64_t c_r, const float* dy, int64_t dy_r, float* cd, int nc, int64_t np,
                 int64_t nw, bool first) {
  for (int64_t j = 0; j < nw; j += V::width) {
    V cv[RB];
    for (int k = 0; k < RB; ++k) cv[k] = V::load(C + k * c_r + j);
    for (int c = 0; c < nc; ++c) {
      V acc = first ? V::zero() : V::load(cd + c * np + j);
      for (int k = 0; k < RB; ++k) acc = fma(V::broadcast(dy[k * dy_r + c]), cv[k], acc);
      acc.store(cd + c * np + j);
    }
  }
}

// out[k, :N] = sum_c dy0[k, c] h[c, :] for RB readers: the sums stay in registers over the channels.
template <class V, int RB>
void scan_bwd_dc(const float* h, const float* dy0, int64_t dy_r, float* out, int64_t out_r, int nc,
                 int64_t np, int64_t N) {
  for (int64_t j = 0; j < N; j += V::width) {
    V acc[RB];
    for (int k = 0; k < RB; ++k) acc[k] = V::zero();
    for (int c = 0; c < nc; ++c) {
      const V hv = V::load(h + c * np + j);
      for (int k = 0; k < RB; ++k) acc[k] = fma(V::broadcast(dy0[k * dy_r + c]), hv, acc[k]);
    }
    const int m = int(std::min<int64_t>(V::width, N - j));
    for (int k = 0; k < RB; ++k) simd::store_n(acc[k], out + k * out_r + j, m);
  }
}

// One token of the reverse pass for the block's channels.
struct ScanBwdToken {
  const float* b;         // [np] B[t]
  const float* cd;        // [nc][np] sum_r dy C_r
  const float* h_before;  // [nc][np] h_{t-1}
  const float* h;         // [nc][np] h_t
  const float* e;         // [nc][np] exp(dt A)
  const float* ar;        // [nc][np] A
  float* carry;           // [nc][np] in: dL/dh_t from later tokens; out: dL/dh_{t-1}
  float* dacc;            // [nc][np] dA so far
  float* db;              // [np] dB[t] out, or null
  const float *gate, *dt, *dtu;   // [nc]
  float *ddt_a, *duh, *zdot;      // [nc] out: sum_n dh A e h_{t-1}, sum_n dh B, sum_n h cd
  int64_t np, nw;
  int nc;
};
template <class V, bool HasZ>
void scan_bwd_token(const ScanBwdToken& k) {
  constexpr int W = V::width;
  const int64_t np = k.np, nw = k.nw;
  for (int c = 0; c < k.nc; ++c) {
    const V gate = V::broadcast(k.gate[c]), dt = V::broadcast(k.dt[c]), dtu = V::broadcast(k.dtu[c]);
    const float* cd = k.cd + c * np;
    const float* hb = k.h_before + c * np;
    const float* ha = k.h + c * np;
    const float* e = k.e + c * np;
    const float* ar = k.ar + c * np;
    float* carry = k.carry + c * np;
    float* dacc = k.dacc + c * np;
    V ddt = V::zero(), duh = V::zero(), zdot = V::zero();
    for (int64_t j = 0; j < nw; j += W) {
      const V cdv = V::load(cd + j);
      const V dh = fma(gate, cdv, V::load(carry + j));  // dL/dh_t
      const V ev = V::load(e + j);
      const V q = dh * (ev * V::load(hb + j));  // dh exp(dt A) h_{t-1}
      fma(dt, q, V::load(dacc + j)).store(dacc + j);
      ddt = fma(V::load(ar + j), q, ddt);
      const V bj = V::load(k.b + j);
      duh = fma(dh, bj, duh);
      if (k.db) fma(dh, dtu, c == 0 ? V::zero() : V::load(k.db + j)).store(k.db + j);
      (ev * dh).store(carry + j);
      if (HasZ) zdot = fma(V::load(ha + j), cdv, zdot);
    }
    k.ddt_a[c] = ddt.reduce_add();
    k.duh[c] = duh.reduce_add();
    if (HasZ) k.zdot[c] = zdot.reduce_add();
  }
}

template <class V, class T>
void scan_bwd_block(const ScanBwdBlock<T>& a) {
  constexpr int W = V::width;
  const ScanBwdScratch& s = a.layout;
  float* ws = a.scratch;
  const int64_t N = a.n_state, R = a.readers, np = s.np, ncs = s.ncs, L = kScanBwdChunk;
  const int64_t nw = scan_bwd_round_up(N, W);  // state lanes the loops visit (np >= nw)
  const int nc = a.nc;
  const int64_t state = nc * np;
  const int64_t len = a.t1 - a.t0, chunks = (len + L - 1) / L;
  float* bnd = ws + s.bnd;
  float* H = ws + s.h;
  float* E = ws + s.e;
  float* a2 = ws + s.a2;
  float* ar = ws + s.ar;
  float* carry = ws + s.carry;
  float* dacc = ws + s.dacc;
  float* chan = ws + s.chan;
  auto buf = [&](ScanBwdScratch::Chan k, int i) { return chan + (k * L + i) * ncs; };

  for (int c = 0; c < nc; ++c)
    for (int64_t n = 0; n < np; ++n) {
      const bool live = n < N;
      const float A = live ? a.A[c * a.sA + n] : 0.f;
      a2[c * np + n] = A * simd::detail::kLog2e;
      ar[c * np + n] = A;
      carry[c * np + n] = 0.f;
      dacc[c * np + n] = 0.f;
      if (chunks > 0) bnd[c * np + n] = live && a.h0 ? a.h0[c * a.s_h0 + n] : 0.f;
    }
  for (int64_t k = 0; k < ncs; ++k) ws[s.dvacc + k] = ws[s.bvacc + k] = 0.f;

  // Pass 1: the state at the start of every chunk (the last chunk's end is never needed).
  for (int64_t k = 0; k + 1 < chunks; ++k) {
    const int64_t ts = a.t0 + k * L;
    scan_bwd_prologue<V>(a, ws, ts, int(L), false);
    float* h = bnd + (k + 1) * state;
    std::copy(bnd + k * state, bnd + (k + 1) * state, h);
    for (int i = 0; i < int(L); ++i) {
      const float *b, *c;
      int64_t c_r;
      scan_bwd_rows<V>(a, ws, ts + i, false, b, c, c_r);
      scan_bwd_step<V>(buf(ScanBwdScratch::kDt, i), buf(ScanBwdScratch::kDtu, i), a2, b, h, h, nullptr,
                       nc, np, nw);
    }
  }

  // Pass 2: chunks last to first.
  for (int64_t k = chunks - 1; k >= 0; --k) {
    const int64_t ts = a.t0 + k * L;
    const int cl = int(std::min(L, a.t1 - ts));
    scan_bwd_prologue<V>(a, ws, ts, cl, true);
    // h before token i of the chunk: the boundary state for i = 0, else H[i - 1]
    auto h_before = [&](int i) { return i == 0 ? bnd + k * state : H + (i - 1) * state; };
    for (int i = 0; i < cl; ++i) {
      const float *b, *c;
      int64_t c_r;
      scan_bwd_rows<V>(a, ws, ts + i, false, b, c, c_r);
      scan_bwd_step<V>(buf(ScanBwdScratch::kDt, i), buf(ScanBwdScratch::kDtu, i), a2, b, h_before(i),
                       H + i * state, E + i * state, nc, np, nw);
    }
    for (int i = cl - 1; i >= 0; --i) {
      const int64_t t = ts + i;
      const float *b, *cr;
      int64_t c_r;
      scan_bwd_rows<V>(a, ws, t, true, b, cr, c_r);
      const float* dyb = ws + s.dyb + i * R * ncs;
      const float* dy0b = ws + s.dy0b + i * R * ncs;
      float* cd = ws + s.cd;
      // cd[c,:] = sum_r dy[t,r,c] C[t,r,:] (dL/dh_t from y_t is silu(z) cd), readers in groups of 4
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const float* c0 = cr + r0 * c_r;
        const float* d0 = dyb + r0 * ncs;
        switch (std::min<int64_t>(4, R - r0)) {
          case 1: scan_bwd_cd<V, 1>(c0, c_r, d0, ncs, cd, nc, np, nw, r0 == 0); break;
          case 2: scan_bwd_cd<V, 2>(c0, c_r, d0, ncs, cd, nc, np, nw, r0 == 0); break;
          case 3: scan_bwd_cd<V, 3>(c0, c_r, d0, ncs, cd, nc, np, nw, r0 == 0); break;
          default: scan_bwd_cd<V, 4>(c0, c_r, d0, ncs, cd, nc, np, nw, r0 == 0); break;
        }
      }
      ScanBwdToken tk;
      tk.b = b;
      tk.cd = cd;
      tk.h_before = h_before(i);
      tk.h = H + i * state;
      tk.e = E + i * state;
      tk.ar = ar;
      tk.carry = carry;
      tk.dacc = dacc;
      tk.db = a.dB ? ws + s.dbrow : nullptr;
      tk.gate = buf(ScanBwdScratch::kGate, i);
      tk.dt = buf(ScanBwdScratch::kDt, i);
      tk.dtu = buf(ScanBwdScratch::kDtu, i);
      tk.ddt_a = buf(ScanBwdScratch::kDdt, i);
      tk.duh = buf(ScanBwdScratch::kDuh, i);
      tk.zdot = buf(ScanBwdScratch::kZdot, i);
      tk.np = np;
      tk.nw = nw;
      tk.nc = nc;
      if (a.z)
        scan_bwd_token<V, true>(tk);
      else
        scan_bwd_token<V, false>(tk);
      if (a.dB) std::copy(tk.db, tk.db + N, a.dB + t * a.sdB);
      // dC[t,r,:] = sum_c dy[t,r,c] silu(z[t,c]) h_t[c,:]
      for (int64_t r0 = 0; a.dC && r0 < R; r0 += 4) {
        const float* d0 = dy0b + r0 * ncs;
        float* out = a.dC + t * a.sdC_t + r0 * a.sdC_r;
        switch (std::min<int64_t>(4, R - r0)) {
          case 1: scan_bwd_dc<V, 1>(tk.h, d0, ncs, out, a.sdC_r, nc, np, N); break;
          case 2: scan_bwd_dc<V, 2>(tk.h, d0, ncs, out, a.sdC_r, nc, np, N); break;
          case 3: scan_bwd_dc<V, 3>(tk.h, d0, ncs, out, a.sdC_r, nc, np, N); break;
          default: scan_bwd_dc<V, 4>(tk.h, d0, ncs, out, a.sdC_r, nc, np, N); break;
        }
      }
    }
    // Epilogue, vectorised over channels.
    for (int ob = 0; ob < nc; ob += W) {
      const int m = std::min(W, nc - ob);
      const V Dv = a.D ? simd::load_n<V>(a.D + ob, m) : V::zero();
      V dD = V::load(ws + s.dvacc + ob), dbias = V::load(ws + s.bvacc + ob);
      for (int i = 0; i < cl; ++i) {
        const int64_t t = ts + i;
        V sdy = V::zero(), sdy0 = V::zero();
        for (int64_t r = 0; r < R; ++r) {
          sdy = sdy + V::load(ws + s.dyb + (i * R + r) * ncs + ob);
          sdy0 = sdy0 + V::load(ws + s.dy0b + (i * R + r) * ncs + ob);
        }
        const V u = V::load(buf(ScanBwdScratch::kU, i) + ob);
        const V dt = V::load(buf(ScanBwdScratch::kDt, i) + ob);
        // du = D sum_r dy0 + dt sum_n dh B;  dL/ddt = sum_n dh (A e h_{t-1} + B u)
        const V duh = V::load(buf(ScanBwdScratch::kDuh, i) + ob);
        const V du = fma(dt, duh, Dv * sdy0);
        const V ddt = fma(u, duh, V::load(buf(ScanBwdScratch::kDdt, i) + ob));
        const V dx = ddt * V::load(buf(ScanBwdScratch::kSpd, i) + ob);
        dbias = dbias + dx;
        dD = fma(u, sdy0, dD);
        if (a.du) simd::store_n(du, a.du + t * a.sdu + ob, m);
        if (a.ddelta) simd::store_n(dx, a.ddelta + t * a.sddelta + ob, m);
        if (a.dz) {  // (z is given: check())
          // dL/dz = sum_r dy y0_r silu'(z), y0_r = sum_n h C_r + D u
          const V dotv = fma(Dv * u, sdy, V::load(buf(ScanBwdScratch::kZdot, i) + ob));
          simd::store_n(dotv * V::load(buf(ScanBwdScratch::kGprime, i) + ob), a.dz + t * a.sdz + ob, m);
        }
      }
      dD.store(ws + s.dvacc + ob);
      dbias.store(ws + s.bvacc + ob);
    }
  }

  for (int c = 0; c < nc; ++c) {
    if (a.dA) std::copy(dacc + c * np, dacc + c * np + N, a.dA + c * a.sdA);
    if (a.dh0) std::copy(carry + c * np, carry + c * np + N, a.dh0 + c * a.s_dh0);
    if (a.dD) a.dD[c] = ws[s.dvacc + c];
    if (a.ddelta_bias) a.ddelta_bias[c] = ws[s.bvacc + c];
  }
}

template <class T>
void scan_bwd_block_scalar(const ScanBwdBlock<T>& a) {
  scan_bwd_block<simd::F32x1>(a);
}
#if RF_HAVE_X86_SIMD
template <class T>
RF_KERNEL_AVX2 void scan_bwd_block_avx2(const ScanBwdBlock<T>& a) {
  scan_bwd_block<simd::F32x8>(a);
}
template <class T>
RF_KERNEL_AVX512 void scan_bwd_block_avx512(const ScanBwdBlock<T>& a) {
  scan_bwd_block<simd::F32x16>(a);
}
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace recurformer
