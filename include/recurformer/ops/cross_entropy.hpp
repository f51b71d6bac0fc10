// recurformer/ops/cross_entropy.hpp: the lm_head, log-softmax, cross-entropy and (optionally) the
// KL divergence to a teacher, fused and chunked over tokens, forward and backward.
//
//   z[t, :]  = weight h[t, :]                      student logits [vocab] (fp32 accumulation)
//   zt[t, :] = teacher_weight teacher_h[t, :]      teacher logits (only with a teacher)
//   ce_t     = logsumexp(z[t]) - z[t, targets[t]]
//   kl_t     = sum_v pt[v] (log pt[v] - log ps[v]),  ps = softmax(z[t]), pt = softmax(zt[t])
//              (KL(teacher || student): F.kl_div(log ps, log pt, log_target=True))
//   counted  = tokens with targets[t] >= 0 (negative = ignored: no loss, zero gradient), N of them
//   ce = sum ce_t / N,  kl = sum kl_t / N,  loss = ce + kl_weight * kl      (all 0 when N = 0)
//
// Backward, for the loss scaled by grad_scale (s = grad_scale / N):
//   dz[t, v] = s * ((1 + kl_weight) ps[v] - kl_weight pt[v] - [v == targets[t]])
//   dh = dz weight (written),  dweight (+)= dz^T h (optional; the teacher gets no gradient)
//
// API:
//   CrossEntropyParams<TW>{h, weight, targets, teacher_h, teacher_weight, kl_weight, chunk_tokens, nll}
//   CrossEntropyBackwardParams<TW>{{forward params}, dh, dweight, accumulate, grad_scale}
//   cross_entropy_workspace_bytes(p, exec)                 // sized by chunk_tokens
//   CrossEntropyResult cross_entropy(p, exec, ws, bytes)            // loss only (perplexity)
//   CrossEntropyResult cross_entropy_backward(pb, exec, ws, bytes)  // loss, dh, dweight
//
// Memory: at most chunk_tokens x vocab fp32 logits exist at once (two such blocks with a teacher),
// in the caller's workspace; e.g. 32 x 49152 x 4 B = 6 MiB. The teacher comes as its final hidden
// states and its lm_head rather than as precomputed log-probabilities: those would be a
// tokens x vocab array (100 MiB for 512 tokens of a 49152 vocabulary), exactly what the chunking
// avoids, while hidden states are tokens x d_teacher and the extra cost is one forward GEMM per
// chunk. The teacher may have another width (dt) but must share the vocabulary.
// log-sum-exp subtracts the row maximum; exp sums and the KL sum are fp32 vector accumulations, the
// per-token losses are summed in double in token order. Results do not depend on the chunk size or
// the thread count except through the logits GEMM's blocking (cpu/linear.hpp).
// The CPU implementation is in cpu/cross_entropy.hpp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "recurformer/core/dtype.hpp"
#include "recurformer/core/view.hpp"

namespace recurformer {

template <class TW>  // lm_head storage: float, half or bfloat16
struct CrossEntropyParams {
  View<const float, 2> h;              // [tokens, d] final hidden states (after the final norm)
  View<const TW, 2> weight;            // [vocab, d] lm_head, HF row-major
  View<const int32_t, 1> targets;      // [tokens] target ids in [0, vocab); < 0: ignored
  View<const float, 2> teacher_h;      // [tokens, dt] optional: the teacher's final hidden states
  View<const TW, 2> teacher_weight;    // [vocab, dt] the teacher's lm_head (with teacher_h only)
  float kl_weight = 0.f;               // >= 0; > 0 needs a teacher
  int64_t chunk_tokens = 32;           // tokens whose logits exist at once (>= 1)
  View<float, 1> nll;                  // [tokens] optional out: ce_t per token (0 where ignored)
};

template <class TW>
struct CrossEntropyBackwardParams : CrossEntropyParams<TW> {
  View<float, 2> dh;        // [tokens, d] dL/dh, written (must not overlap h)
  View<float, 2> dweight;   // [vocab, d] dL/dweight; optional (absent: not computed)
  bool accumulate = false;  // dweight += (true) or dweight = (false)
  float grad_scale = 1.f;   // gradients of grad_scale * loss (e.g. micro-batch weighting)
};

/// Means over the counted tokens (0 when there are none).
struct CrossEntropyResult {
  double loss = 0;     // ce + kl_weight * kl
  double ce = 0;       // mean negative log-likelihood (perplexity = exp(ce))
  double kl = 0;       // mean KL(teacher || student); 0 without a teacher
  int64_t count = 0;   // tokens with targets[t] >= 0
};

namespace detail {
template <class TW>
void check_cross_entropy(const char* op, const CrossEntropyParams<TW>& p) {
  static_assert(std::is_same<TW, float>::value || std::is_same<TW, half>::value ||
                    std::is_same<TW, bfloat16>::value,
                "cross_entropy: the lm_head is float, half or bfloat16");
  check_shape(op, "h", p.h, {-1, -1});
  const int64_t tokens = p.h.shape[0], d = p.h.shape[1];
  RF_CHECK(d >= 1, op, ": h must have at least one column");
  check_shape(op, "weight", p.weight, {-1, d});
  const int64_t vocab = p.weight.shape[0];
  RF_CHECK(vocab >= 1, op, ": weight must have at least one row (the vocabulary)");
  check_shape(op, "targets", p.targets, {tokens});
  check_inner_contiguous(op, "h", p.h);
  check_inner_contiguous(op, "weight", p.weight);
  RF_CHECK(p.teacher_h.present() == p.teacher_weight.present(), op,
           ": teacher_h and teacher_weight come together (one of them is absent)");
  if (p.teacher_h.present()) {
    check_shape(op, "teacher_h", p.teacher_h, {tokens, -1});
    RF_CHECK(p.teacher_h.shape[1] >= 1, op, ": teacher_h must have at least one column");
    check_shape(op, "teacher_weight", p.teacher_weight, {vocab, p.teacher_h.shape[1]});
    check_inner_contiguous(op, "teacher_h", p.teacher_h);
    check_inner_contiguous(op, "teacher_weight", p.teacher_weight);
  }
  RF_CHECK(std::isfinite(p.kl_weight) && p.kl_weight >= 0.f, op,
           ": kl_weight must be finite and >= 0, got ", p.kl_weight);
  RF_CHECK(p.kl_weight == 0.f || p.teacher_h.present(), op, ": kl_weight = ", p.kl_weight,
           " needs a teacher (teacher_h and teacher_weight)");
  RF_CHECK(p.chunk_tokens >= 1, op, ": chunk_tokens must be >= 1, got ", p.chunk_tokens);
  check_optional_shape(op, "nll", p.nll, {tokens});
  for (int64_t t = 0; t < tokens; ++t)
    RF_CHECK(p.targets(t) < vocab, op, ": targets[", t, "] = ", p.targets(t),
             " is outside the vocabulary [0, ", vocab, ") (negative ids are ignored)");
}
}  // namespace detail

/// Throws Error naming the argument unless p is a valid cross_entropy call.
template <class TW>
void check(const CrossEntropyParams<TW>& p) {
  detail::check_cross_entropy("cross_entropy", p);
}

/// Throws Error naming the argument unless p is a valid cross_entropy_backward call.
template <class TW>
void check(const CrossEntropyBackwardParams<TW>& p) {
  constexpr const char* op = "cross_entropy_backward";
  detail::check_cross_entropy(op, p);
  const int64_t tokens = p.h.shape[0], d = p.h.shape[1], vocab = p.weight.shape[0];
  detail::check_shape(op, "dh", p.dh, {tokens, d});
  detail::check_optional_shape(op, "dweight", p.dweight, {vocab, d});
  detail::check_inner_contiguous(op, "dh", p.dh);
  detail::check_inner_contiguous(op, "dweight", p.dweight);
  RF_CHECK(static_cast<const void*>(p.dh.data) != static_cast<const void*>(p.h.data), op,
           ": dh must not overlap h");
  RF_CHECK(std::isfinite(p.grad_scale), op, ": grad_scale must be finite, got ", p.grad_scale);
}

}  // namespace recurformer
