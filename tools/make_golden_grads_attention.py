#!/usr/bin/env python3
"""Golden gradients of attention for tests/attention_backward_test.cpp, from PyTorch autograd.

Writes tests/data/golden_grads/<case>/*.npy (float32 '<f4' / int32 '<i4', C order) and meta.json in
the format of tools/make_golden.py. The files are committed; the tests and CI never run this script.
Rerun by hand:

    python3 tools/make_golden_grads_attention.py [--out tests/data/golden_grads]

Eager softmax attention as Llama's eager path computes it (repeat_kv of the KV heads, scores =
q k^T * scale + an additive mask of -inf where a key is not visible, softmax in fp32, @ v), per
sequence, with the mask of ops/attention.hpp: key position <= query position and, when window > 0,
(key < sink or key > query - window). Keys and values live in a cache [slots, n_kv, capacity, hd]
(the library's layout) and each sequence reads its slot's first kv_len keys, so a prefix already in
the cache is part of the case. L = sum(dout * out); autograd gives dq, dk, dv (dk, dv in the cache's
shape: zero where no query reads). lse = logsumexp of the masked scaled scores. Seeded, fp32, CPU.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

SEED = 4321
TOLERANCE = {"rel": 1e-5, "abs_of_max": 2e-6,
             "why": "fp32 against fp32 with another summation order; the floor (~16 ulps of the array's "
                    "largest value) covers elements that cancel to near zero"}


def versions():
    return {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}


def repeat_kv(x, n_rep):
    """transformers' repeat_kv: [b, n_kv, s, hd] -> [b, n_kv * n_rep, s, hd]."""
    b, n_kv, s, hd = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, s, hd).reshape(b, n_kv * n_rep, s, hd)


def save(case_dir, meta, name, a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(a).astype("<i4" if np.asarray(a).dtype.kind in "iu" else "<f4"))
    np.save(os.path.join(case_dir, name + ".npy"), a, allow_pickle=False)
    meta["arrays"][name] = {"dtype": a.dtype.str, "shape": list(a.shape)}


def make_case(root, name, description, n_q, n_kv, hd, q_lens, kv_lens, kv_slots, slots, capacity, sink, window,
              scale):
    g = torch.Generator().manual_seed(SEED + len(name))
    tokens = sum(q_lens)
    q = (torch.rand(tokens, n_q, hd, generator=g) * 4 - 2).requires_grad_()
    k = (torch.rand(slots, n_kv, capacity, hd, generator=g) * 2 - 1).requires_grad_()
    v = (torch.rand(slots, n_kv, capacity, hd, generator=g) * 2 - 1).requires_grad_()
    dout = torch.rand(tokens, n_q, hd, generator=g) * 2 - 1
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q_pos = np.concatenate([np.arange(kl - ql, kl) for ql, kl in zip(q_lens, kv_lens)]).astype(np.int32)

    outs, lses = [], []
    for s, (ql, kl, sl) in enumerate(zip(q_lens, kv_lens, kv_slots)):
        qs = q[cu[s]:cu[s + 1]].transpose(0, 1)[None]             # [1, n_q, ql, hd]
        ks = repeat_kv(k[sl, :, :kl][None], n_q // n_kv)           # [1, n_q, kl, hd]
        vs = repeat_kv(v[sl, :, :kl][None], n_q // n_kv)
        qp = torch.from_numpy(q_pos[cu[s]:cu[s + 1]]).long()[:, None]
        kp = torch.arange(kl)[None, :]
        visible = kp <= qp
        if window > 0:
            visible &= (kp < sink) | (kp > qp - window)
        mask = torch.zeros(ql, kl).masked_fill(~visible, float("-inf"))
        scores = torch.matmul(qs, ks.transpose(2, 3)) * scale + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        outs.append(torch.matmul(probs, vs)[0].transpose(0, 1))    # [ql, n_q, hd]
        lses.append(torch.logsumexp(scores, dim=-1)[0].transpose(0, 1))
    out = torch.cat(outs)
    lse = torch.cat(lses)
    (dout * out).sum().backward()

    case_dir = os.path.join(root, name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    meta = {"case": name, "description": description, "generator": "tools/make_golden_grads_attention.py",
            "seed": SEED, "versions": versions(), "arrays": {}, "scale": scale, "sink": sink, "window": window,
            "tolerance": TOLERANCE}
    for n, a in [("q", q), ("k", k), ("v", v), ("dout", dout), ("out", out), ("lse", lse), ("dq", q.grad),
                 ("dk", k.grad), ("dv", v.grad), ("cu_seqlens", cu), ("kv_lens", np.array(kv_lens)),
                 ("kv_slots", np.array(kv_slots)), ("q_positions", q_pos)]:
        save(case_dir, meta, n, a)
    with open(os.path.join(case_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden_grads"))
    args = ap.parse_args()
    torch.manual_seed(SEED)
    make_case(args.out, "attention_gqa_prefix",
              "GQA 6/2, head_dim 64, causal; two packed sequences (4 and 2 queries) in slots 2 and 0 of 3, "
              "the first over a 3-key prefix already in the cache", n_q=6, n_kv=2, hd=64, q_lens=[4, 2],
              kv_lens=[7, 2], kv_slots=[2, 0], slots=3, capacity=8, sink=0, window=0, scale=0.125)
    make_case(args.out, "attention_streaming",
              "n_q = n_kv = 2, head_dim 64, streaming mask sink 2 + window 5; 12 queries over 16 keys",
              n_q=2, n_kv=2, hd=64, q_lens=[12], kv_lens=[16], kv_slots=[0], slots=1, capacity=16, sink=2,
              window=5, scale=0.2)


if __name__ == "__main__":
    main()
