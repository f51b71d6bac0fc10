#!/usr/bin/env python3
"""Golden gradients of the Llama blocks from PyTorch autograd (tests/blocks_backward_test.cpp and
tests/cross_entropy_test.cpp).

Writes tests/data/golden_grads/<case>/*.npy (float32 '<f4' / int32 '<i4', C order) and meta.json in
the format of tools/make_golden.py. The files are committed; the tests and CI never run this script.
Rerun by hand (see tools/README.md):

    python3 tools/make_golden_grads_blocks.py [--out tests/data/golden_grads]

Everything is fp32 on the CPU, one thread, seeded, small shapes. Each case runs the forward the way
the reference implementations write it (F.rms_norm and Llama's RMSNorm formula, transformers'
rotate_half RoPE and Meta's complex-number RoPE for the interleaved layout, F.silu(g) * u,
F.embedding, F.cross_entropy + F.kl_div), then backward() of L = sum(dy * y) for a random dy
(for the cross-entropy: of the loss itself), and records inputs, dy and the gradients.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_case  # noqa: E402

SEED = 1234
TOLERANCE = {"rel": 1e-5, "abs_of_max": 2e-6,
             "why": "fp32 against fp32 autograd with another summation order; the floor (~16 ulps of the "
                    "array's largest value) covers elements that cancel to near zero"}

def Case(root, name, description):
    return golden_case.Case(root, name, description, "tools/make_golden_grads_blocks.py", SEED, TOLERANCE)

def leaf(*shape, lo=-1.0, hi=1.0):
    return (torch.rand(*shape, dtype=torch.float32) * (hi - lo) + lo).requires_grad_(True)


def llama_rms_norm(x, w, eps):
    """transformers' LlamaRMSNorm.forward (fp32 input, so its dtype casts are no-ops)."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def make_rmsnorm(root):
    tokens, d, eps = 7, 37, 1e-5
    c = Case(root, "rmsnorm_backward", f"LlamaRMSNorm formula (== F.rms_norm), x [{tokens},{d}], eps {eps}")
    x, w = leaf(tokens, d, lo=-3, hi=3), leaf(d, lo=0.5, hi=1.5)
    y = llama_rms_norm(x, w, eps)
    assert torch.allclose(y, F.rms_norm(x, (d,), w, eps), rtol=1e-6, atol=1e-6)
    dy = torch.rand(tokens, d) * 2 - 1
    (y * dy).sum().backward()
    for k, v in dict(x=x, weight=w, dy=dy, y=y, dx=x.grad, dweight=w.grad).items():
        c.save(k, v)
    c.finish(config={"tokens": tokens, "d": d, "eps": eps}, loss="L = sum(dy * y)")


def rotate_half(x):
    """transformers.models.llama.modeling_llama.rotate_half."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def make_rope(root):
    tokens, heads, hd, theta = 6, 3, 16, 10000.0
    positions = torch.tensor([0, 1, 5, 17, 300, 4099], dtype=torch.int32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, hd/2] fp32, as transformers

    c = Case(root, "rope_rotate_half_backward",
             f"transformers' apply_rotary_pos_emb formula (rotate_half), x [{tokens},{heads},{hd}], theta {theta}")
    x = leaf(tokens, heads, hd)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    y = x * cos + rotate_half(x) * sin
    dy = torch.rand(tokens, heads, hd) * 2 - 1
    (y * dy).sum().backward()
    for k, v in dict(x=x, positions=positions, inv_freq=inv_freq, dy=dy, y=y, dx=x.grad).items():
        c.save(k, v)
    c.finish(config={"tokens": tokens, "heads": heads, "head_dim": hd, "theta": theta, "layout": "rotate_half"},
             loss="L = sum(dy * y)")

    c = Case(root, "rope_interleaved_backward",
             f"Meta Llama's apply_rotary_emb (view_as_complex, pairs (2i, 2i+1)), x [{tokens},{heads},{hd}]")
    x = leaf(tokens, heads, hd)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)[:, None, :]
    xc = torch.view_as_complex(x.reshape(tokens, heads, hd // 2, 2))
    y = torch.view_as_real(xc * freqs_cis).reshape(tokens, heads, hd)
    dy = torch.rand(tokens, heads, hd) * 2 - 1
    (y * dy).sum().backward()
    for k, v in dict(x=x, positions=positions, inv_freq=inv_freq, dy=dy, y=y, dx=x.grad).items():
        c.save(k, v)
    c.finish(config={"tokens": tokens, "heads": heads, "head_dim": hd, "theta": theta, "layout": "interleaved"},
             loss="L = sum(dy * y)")


def make_swiglu(root):
    tokens, d = 5, 29
    c = Case(root, "swiglu_backward", f"F.silu(gate) * up, [{tokens},{d}], gate in [-8, 8)")
    g, u = leaf(tokens, d, lo=-8, hi=8), leaf(tokens, d, lo=-2, hi=2)
    y = F.silu(g) * u
    dy = torch.rand(tokens, d) * 2 - 1
    (y * dy).sum().backward()
    for k, v in dict(gate=g, up=u, dout=dy, out=y, dgate=g.grad, dup=u.grad).items():
        c.save(k, v)
    c.finish(config={"tokens": tokens, "d": d}, loss="L = sum(dout * out)")


def make_embedding(root):
    vocab, d, tokens = 11, 19, 9
    c = Case(root, "embedding_backward", f"F.embedding, table [{vocab},{d}], {tokens} ids with repeats")
    table = leaf(vocab, d)
    ids = torch.tensor([3, 0, 10, 3, 7, 3, 0, 5, 10], dtype=torch.int64)
    y = F.embedding(ids, table)
    dy = torch.rand(tokens, d) * 2 - 1
    (y * dy).sum().backward()
    for k, v in dict(table=table, ids=ids, dout=dy, dtable=table.grad).items():
        c.save(k, v)
    c.finish(config={"vocab": vocab, "d": d, "tokens": tokens}, loss="L = sum(dout * out)")


def make_cross_entropy(root, name, tokens, d, vocab, dt, kl_weight, ignored):
    teacher = dt > 0
    c = Case(root, name,
             f"F.cross_entropy(h W^T, targets, ignore_index=-100)"
             + (f" + {kl_weight} * KL(teacher || student) via F.kl_div(log_target=True), mean over counted tokens"
                if teacher else "")
             + f"; h [{tokens},{d}], W [{vocab},{d}]" + (f", teacher_h [{tokens},{dt}], teacher_W [{vocab},{dt}]" if teacher else ""))
    h, w = leaf(tokens, d), leaf(vocab, d, lo=-2, hi=2)
    targets = torch.randint(0, vocab, (tokens,), dtype=torch.int64)
    for i in ignored:
        targets[i] = -100
    z = h @ w.t()
    ce = F.cross_entropy(z, targets, ignore_index=-100, reduction="mean")
    loss = ce
    arrays = dict(h=h, weight=w, targets=targets)
    kl = torch.zeros(())
    if teacher:
        th, tw = torch.rand(tokens, dt) * 2 - 1, torch.rand(vocab, dt) * 4 - 2
        zt = th @ tw.t()
        mask = targets != -100
        kl_tok = F.kl_div(F.log_softmax(z, -1), F.log_softmax(zt, -1), reduction="none", log_target=True).sum(-1)
        kl = kl_tok[mask].sum() / mask.sum()
        loss = ce + kl_weight * kl
        arrays.update(teacher_h=th, teacher_weight=tw)
    loss.backward()
    arrays.update(loss=loss.reshape(1), ce=ce.reshape(1), kl=kl.reshape(1), dh=h.grad, dweight=w.grad)
    for k, v in arrays.items():
        c.save(k, v)
    c.finish(config={"tokens": tokens, "d": d, "vocab": vocab, "teacher_d": dt, "kl_weight": kl_weight,
                     "ignore_index": -100},
             loss="loss = ce + kl_weight * kl (means over tokens with targets != -100)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden_grads"))
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    make_rmsnorm(args.out)
    make_rope(args.out)
    make_swiglu(args.out)
    make_embedding(args.out)
    make_cross_entropy(args.out, "cross_entropy_backward", tokens=9, d=24, vocab=100, dt=0, kl_weight=0.0,
                       ignored=[4])
    make_cross_entropy(args.out, "cross_entropy_kl_backward", tokens=7, d=20, vocab=83, dt=12, kl_weight=0.5,
                       ignored=[0, 5])


if __name__ == "__main__":
    main()
