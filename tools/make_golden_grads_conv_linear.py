#!/usr/bin/env python3
"""Golden gradients of causal_conv1d and linear from PyTorch autograd (tests/conv_linear_backward_test.cpp).

Writes tests/data/golden_grads/<case>/*.npy (float32 '<f4' / int32 '<i4', C order) and meta.json in
the format of tools/make_golden.py. The files are committed; the tests and CI never run this script:

    python3 tools/make_golden_grads_conv_linear.py [--out tests/data/golden_grads]

fp32 on the CPU, one thread, seeded, small shapes. The loss is L = sum(dy * y) for a random dy, so
every gradient is what y.backward(dy) gives.

- conv_*: the depthwise causal conv as torch writes it (F.conv1d, groups = channels, over the
  channel-first sequence [1, D, L]). A sequence with history runs over cat(history, x) without
  padding, so autograd also gives d(history); one without runs with left padding K-1. Packed
  sequences are separate torch calls; a padding sequence (slot -1) has no output and zero dx.
- linear_*: F.linear(x, W, b) with W [out, in].
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_case  # noqa: E402

SEED = 4321
# What the test checks: |got - want| <= rel * |want| + abs_of_max * max|want| per array.

def Case(root, name, description):
    return golden_case.Case(root, name, description, "tools/make_golden_grads_conv_linear.py", SEED)

def make_conv(root, name, lengths, slots, n_slots, dch, k, silu, use_bias, use_history):
    torch.manual_seed(SEED)
    tokens = sum(lengths)
    x = torch.randn(tokens, dch, requires_grad=True)
    weight = torch.randn(dch, k, requires_grad=True)
    # without a bias the op's dbias is what a zero bias would get (C++ passes no bias)
    bias = (torch.randn(dch) if use_bias else torch.zeros(dch)).requires_grad_()
    conv_state = torch.randn(n_slots, k - 1, dch, requires_grad=True)  # the history, oldest first
    dy = torch.randn(tokens, dch)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ys = []
    for s, (b, e) in enumerate(zip(cu[:-1], cu[1:])):
        if slots[s] < 0 or e == b:  # padding (no output, no gradient) or empty
            ys.append(torch.zeros(e - b, dch))
            continue
        seq = x[b:e].t().unsqueeze(0)  # [1, D, L]
        w = weight.unsqueeze(1)        # [D, 1, K]
        bb = bias
        if use_history:
            inp = torch.cat([conv_state[slots[s]].t().unsqueeze(0), seq], dim=2)
            y = F.conv1d(inp, w, bb, groups=dch)
        else:
            y = F.conv1d(seq, w, bb, padding=k - 1, groups=dch)[..., : e - b]
        if silu:
            y = F.silu(y)
        ys.append(y[0].t())
    y = torch.cat(ys, dim=0)
    (y * dy).sum().backward()
    c = Case(root, name, f"causal depthwise conv1d, sequences {lengths} on slots {slots}, Dch {dch}, "
                         f"K {k}, silu {silu}, bias {use_bias}, history {use_history}")
    c.save("x", x)
    c.save("weight", weight)
    c.save("bias", bias)
    c.save("conv_state", conv_state)
    c.save("cu_seqlens", cu)
    c.save("state_slots", np.array(slots, dtype=np.int32))
    c.save("dy", dy)
    c.save("y", y)
    c.save("dx", x.grad)
    c.save("dweight", weight.grad)
    c.save("dbias", bias.grad)
    c.save("dconv_state", conv_state.grad if use_history else torch.zeros_like(conv_state))
    c.finish(silu=silu, bias=use_bias, use_initial_state=use_history, width=k)


def make_linear(root, name, tokens, d_in, d_out):
    torch.manual_seed(SEED)
    x = torch.randn(tokens, d_in, requires_grad=True)
    weight = (torch.randn(d_out, d_in) / d_in ** 0.5).requires_grad_()
    bias = torch.randn(d_out, requires_grad=True)
    dy = torch.randn(tokens, d_out)
    y = F.linear(x, weight, bias)
    (y * dy).sum().backward()
    c = Case(root, name, f"F.linear, tokens {tokens}, in {d_in}, out {d_out}")
    for n, a in (("x", x), ("weight", weight), ("bias", bias), ("dy", dy), ("y", y),
                 ("dx", x.grad), ("dweight", weight.grad), ("dbias", bias.grad)):
        c.save(n, a)
    c.finish()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                  "golden_grads"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    # lengths 5, 0, 2, 9 (the 0 and 2 shorter than the history) and a padding sequence of 3
    make_conv(args.out, "conv_packed_history_silu", [5, 0, 2, 9, 3], [2, 0, 3, 1, -1], 4,
              dch=13, k=4, silu=True, use_bias=True, use_history=True)
    make_conv(args.out, "conv_single_zero_history", [17], [0], 1, dch=37, k=3, silu=False,
              use_bias=False, use_history=False)
    make_linear(args.out, "linear_small", 17, 37, 13)
    make_linear(args.out, "linear_blocked", 40, 136, 24)  # in > NC = 128: two column blocks


if __name__ == "__main__":
    main()
