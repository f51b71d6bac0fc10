// recurformer/ops/selective_scan.hpp: the Mamba-1 selective scan with groups and readers (spec
// section 4), for prefill / chunked prefill over packed variable-length batches, and its one-token
// state update for decode.
//
// For channel c of group g = c / (Dch / G), at token t of a sequence whose state slot is `slot`:
//   dt        = softplus(delta[t,c] + delta_bias[c])     (identity activation: no softplus;
//                                                          softplus(x) = x for x > 20)
//   h[c,n]    = exp(dt * A[c,n]) * h[c,n] + dt * B[t,g,n] * u[t,c]
//   y[t,r,c]  = sum_n h[c,n] * C[t,g,r,n] + D[c] * u[t,c],   then * silu(z[t,c]) when z is given
// h starts as state[slot] (or 0 when use_initial_state is false) and its final value is written
// back to state[slot]. State and accumulation are fp32 whatever the storage dtype T.
//
// A sequence whose slot is negative is padding: none of its tokens is read, its y rows and every
// state slot are left as they were.
// Chunked prefill (several calls, each starting from the state the previous one left) gives the same
// result as one long call, and selective_state_update applied token by token gives the same as
// selective_scan (the CPU kernels run the same per-token arithmetic in both).
//
// selective_scan_backward: the gradients of a loss L through one selective_scan call, given
// dL/dy, as the forward computes it (softplus(x) = x for x > 20, so its derivative is 1 there).
// The final state h_T is not an output of the loss: no gradient flows in through it. The forward
// is recomputed inside (chunk-boundary states first, then each chunk's states in reverse), so
// nothing from the forward call needs to be kept but its inputs.
#pragma once

#include <cstdint>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/index_memory.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

enum class DeltaActivation { identity, softplus };

template <class T>
struct SelectiveScanParams {
  View<const T, 2> u;               // [tokens, Dch] packed tokens of all sequences
  View<const T, 2> delta;           // [tokens, Dch]
  View<const float, 2> A;           // [Dch, N] (negative for a decaying state)
  View<const T, 3> B;               // [tokens, G, N]
  View<const T, 4> C;               // [tokens, G, R, N]
  View<const float, 1> D;           // [Dch] optional skip
  View<const T, 2> z;               // [tokens, Dch] optional gate: y *= silu(z)
  View<const float, 1> delta_bias;  // [Dch] optional
  View<T, 3> y;                     // [tokens, R, Dch]
  View<float, 3> state;             // [slots, Dch, N] fp32 state pool: read as h0, overwritten with h_T
  View<const int32_t, 1> cu_seqlens;   // [S+1] optional: sequence s = tokens [cu[s], cu[s+1]); absent = one sequence
  View<const int32_t, 1> state_slots;  // [S] optional: state slot of sequence s (absent = s); negative = padding, skipped
  DeltaActivation delta_activation = DeltaActivation::softplus;
  bool use_initial_state = true;  // false: every sequence starts from h = 0 (state is still written)
};

/// Limits of the CPU kernels (checked): d_state N and the readers' C rows of one token are staged in
/// fixed-size stack buffers.
constexpr int64_t kSelectiveScanMaxState = 256;
constexpr int64_t kSelectiveScanMaxReaderStates = 4096;  // R * N

namespace detail {

// backward: the inputs of a prefill scan as selective_scan_backward reads them (y is not read,
// state only as h0 and only when use_initial_state; the pool size is checked by the caller).
enum class ScanMode { scan, state_update, backward };

// Checks cu_seqlens and state_slots against `tokens` and a pool of `slots` state slots; slots < 0
// means there is no pool (the slots then only mark padding).
inline void check_scan_sequences(const char* op, ScanMode mode, int64_t tokens, int64_t slots,
                                 const View<const int32_t, 1>& cu,
                                 const View<const int32_t, 1>& state_slots,
                                 IndexMemory where = IndexMemory::host) {
  int64_t n_seq = 1;
  if (mode == ScanMode::state_update) {
    RF_CHECK(!cu.present(), op, ": cu_seqlens must be absent (every token row is its own sequence)");
    n_seq = tokens;
  } else if (cu.present()) {
    RF_CHECK(cu.shape[0] >= 1, op, ": cu_seqlens must have at least one entry (S+1), got 0");
    n_seq = cu.shape[0] - 1;
    if (where == IndexMemory::device) {
      check_optional_shape(op, "state_slots", state_slots, {n_seq});
      return;
    }
    RF_CHECK(cu(0) == 0, op, ": cu_seqlens[0] must be 0, got ", cu(0));
    for (int64_t s = 0; s < n_seq; ++s)
      RF_CHECK(cu(s + 1) >= cu(s), op, ": cu_seqlens must be non-decreasing, but cu_seqlens[", s + 1,
               "] = ", cu(s + 1), " < cu_seqlens[", s, "] = ", cu(s));
    RF_CHECK(cu(n_seq) == tokens, op, ": cu_seqlens must end at the number of tokens ", tokens,
             ", got ", cu(n_seq));
  }
  if (state_slots.present()) {
    check_shape(op, "state_slots", state_slots, {n_seq});
    if (slots < 0 || where == IndexMemory::device) return;
    // Duplicates: a bitmap on the stack for pools up to kStackSlots (every decode step calls
    // this, so no allocation), pairwise comparison beyond.
    constexpr int64_t kStackSlots = 8192;
    uint64_t used[kStackSlots / 64] = {};
    for (int64_t s = 0; s < n_seq; ++s) {
      const int64_t slot = state_slots(s);
      if (slot < 0) continue;
      RF_CHECK(slot < slots, op, ": state_slots[", s, "] = ", slot, " is outside the pool of ", slots,
               " slots");
      bool seen = false;
      if (slots <= kStackSlots) {
        seen = used[slot / 64] >> (slot % 64) & 1u;
        used[slot / 64] |= uint64_t(1) << (slot % 64);
      } else {
        for (int64_t e = 0; e < s && !seen; ++e) seen = state_slots(e) == slot;
      }
      RF_CHECK(!seen, op, ": state slot ", slot, " is used by two sequences in one call (state_slots[",
               s, "])");
    }
  } else if (slots >= 0) {
    RF_CHECK(n_seq <= slots, op, ": without state_slots sequence s uses slot s, so the pool needs ",
             n_seq, " slots, but state has ", slots);
  }
}

template <class T>
void check_selective_scan(const char* op, ScanMode mode, const SelectiveScanParams<T>& p,
                          IndexMemory where = IndexMemory::host) {
  check_shape(op, "u", p.u, {-1, -1});
  const int64_t tokens = p.u.shape[0], dch = p.u.shape[1];
  RF_CHECK(dch >= 1, op, ": u must have at least one channel");
  check_shape(op, "A", p.A, {dch, -1});
  const int64_t n = p.A.shape[1];
  RF_CHECK(n >= 1 && n <= kSelectiveScanMaxState, op, ": d_state N = A.shape[1] must be in 1..",
           kSelectiveScanMaxState, ", got ", n);
  check_shape(op, "B", p.B, {tokens, -1, n});
  const int64_t g = p.B.shape[1];
  RF_CHECK(g >= 1 && dch % g == 0, op, ": the number of groups G = B.shape[1] = ", g,
           " must be >= 1 and divide Dch = ", dch);
  check_shape(op, "C", p.C, {tokens, g, -1, n});
  const int64_t r = p.C.shape[2];
  RF_CHECK(r >= 1, op, ": the number of readers R = C.shape[2] must be >= 1, got ", r);
  RF_CHECK(r <= kSelectiveScanMaxReaderStates / n, op, ": R * N = ", r, " * ", n, " exceeds ",
           kSelectiveScanMaxReaderStates);  // divided, not multiplied: R from a caller can be 2^58
  check_shape(op, "delta", p.delta, {tokens, dch});
  check_optional_shape(op, "D", p.D, {dch});
  check_optional_shape(op, "z", p.z, {tokens, dch});
  check_optional_shape(op, "delta_bias", p.delta_bias, {dch});
  if (mode != ScanMode::backward) {
    check_shape(op, "y", p.y, {tokens, r, dch});
    check_shape(op, "state", p.state, {-1, dch, n});
  } else if (p.use_initial_state) {
    check_shape(op, "state", p.state, {-1, dch, n});
  } else {
    check_optional_shape(op, "state", p.state, {-1, dch, n});
  }
  check_inner_contiguous(op, "u", p.u);
  check_inner_contiguous(op, "delta", p.delta);
  check_inner_contiguous(op, "A", p.A);
  check_inner_contiguous(op, "B", p.B);
  check_inner_contiguous(op, "C", p.C);
  check_inner_contiguous(op, "D", p.D);
  check_inner_contiguous(op, "z", p.z);
  check_inner_contiguous(op, "delta_bias", p.delta_bias);
  if (mode != ScanMode::backward) check_inner_contiguous(op, "y", p.y);
  check_inner_contiguous(op, "state", p.state);
  RF_CHECK(p.delta_activation == DeltaActivation::identity ||
               p.delta_activation == DeltaActivation::softplus,
           op, ": unknown delta_activation ", int(p.delta_activation));
  if (mode != ScanMode::backward)
    check_scan_sequences(op, mode, tokens, p.state.shape[0], p.cu_seqlens, p.state_slots, where);
}

}  // namespace detail

/// Throws Error unless p is a valid selective_scan call (shapes, strides, sequences, slots).
template <class T>
void check(const SelectiveScanParams<T>& p) {
  detail::check_selective_scan("selective_scan", detail::ScanMode::scan, p);
}
/// The same for selective_state_update: cu_seqlens absent, state_slots (if given) of shape [tokens].
template <class T>
void check_state_update(const SelectiveScanParams<T>& p) {
  detail::check_selective_scan("selective_state_update", detail::ScanMode::state_update, p);
}

/// The gradients of selective_scan. Every gradient is fp32, optional (absent = not computed), and
/// overwritten, never accumulated into. Sums run over all tokens of the call: dA, dD and
/// ddelta_bias over every sequence, dB and dC over the channels of each group (c / (Dch / G)) and
/// dC also per reader. Rows of padding sequences (negative slot) get zeros in du, ddelta, dz, dB and
/// dC, so every output row is defined; they add nothing to dA, dD, ddelta_bias or dstate.
/// Deterministic: the same inputs and thread count give the same bits (partial sums are combined
/// in a fixed order, never by atomics).
template <class T>
struct SelectiveScanBackwardParams {
  SelectiveScanParams<T> fwd;    // the forward call's inputs as given to selective_scan; fwd.y is not
                                 // read (may be absent), fwd.state only read (h0 = state[slot]) and
                                 // only when use_initial_state (then required; absent otherwise is fine)
  View<const float, 3> dy;       // [tokens, R, Dch] dL/dy
  View<float, 2> du;             // [tokens, Dch] optional
  View<float, 2> ddelta;         // [tokens, Dch] optional: dL/d(delta), through softplus and delta_bias
  View<float, 2> dA;             // [Dch, N] optional
  View<float, 3> dB;             // [tokens, G, N] optional
  View<float, 4> dC;             // [tokens, G, R, N] optional
  View<float, 1> dD;             // [Dch] optional (fwd.D absent: the gradient at D = 0)
  View<float, 2> dz;             // [tokens, Dch] optional; requires fwd.z
  View<float, 1> ddelta_bias;    // [Dch] optional: the sum of ddelta over tokens (also when
                                 // fwd.delta_bias is absent: the gradient at 0)
  View<float, 3> dstate;         // [slots, Dch, N] optional: dL/dh0, written only for the slots read
                                 // (use_initial_state, slot >= 0); other slots untouched
};

namespace detail {
template <class T>
void check_selective_scan_backward(const SelectiveScanBackwardParams<T>& p) {
  constexpr const char* op = "selective_scan_backward";
  const SelectiveScanParams<T>& f = p.fwd;
  check_selective_scan(op, ScanMode::backward, f);
  const int64_t tokens = f.u.shape[0], dch = f.u.shape[1], n = f.A.shape[1], g = f.B.shape[1],
                r = f.C.shape[2];
  check_shape(op, "dy", p.dy, {tokens, r, dch});
  check_optional_shape(op, "du", p.du, {tokens, dch});
  check_optional_shape(op, "ddelta", p.ddelta, {tokens, dch});
  check_optional_shape(op, "dA", p.dA, {dch, n});
  check_optional_shape(op, "dB", p.dB, {tokens, g, n});
  check_optional_shape(op, "dC", p.dC, {tokens, g, r, n});
  check_optional_shape(op, "dD", p.dD, {dch});
  check_optional_shape(op, "dz", p.dz, {tokens, dch});
  RF_CHECK(!p.dz.present() || f.z.present(), op, ": dz is given but z is absent (no gate, nothing to differentiate)");
  check_optional_shape(op, "ddelta_bias", p.ddelta_bias, {dch});
  // the pool: state's slots, else dstate's (state may be absent when it is not read)
  const int64_t slots = f.state.present() ? f.state.shape[0] : p.dstate.present() ? p.dstate.shape[0] : -1;
  check_optional_shape(op, "dstate", p.dstate, {slots, dch, n});
  check_inner_contiguous(op, "dy", p.dy);
  check_inner_contiguous(op, "du", p.du);
  check_inner_contiguous(op, "ddelta", p.ddelta);
  check_inner_contiguous(op, "dA", p.dA);
  check_inner_contiguous(op, "dB", p.dB);
  check_inner_contiguous(op, "dC", p.dC);
  check_inner_contiguous(op, "dD", p.dD);
  check_inner_contiguous(op, "dz", p.dz);
  check_inner_contiguous(op, "ddelta_bias", p.ddelta_bias);
  check_inner_contiguous(op, "dstate", p.dstate);
  check_scan_sequences(op, ScanMode::scan, tokens, slots, f.cu_seqlens, f.state_slots);
}
}  // namespace detail

/// Throws Error unless p is a valid selective_scan_backward call (the workspace is checked by
/// selective_scan_backward()).
template <class T>
void check(const SelectiveScanBackwardParams<T>& p) {
  detail::check_selective_scan_backward(p);
}

}  // namespace recurformer
