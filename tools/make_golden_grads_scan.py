#!/usr/bin/env python3
"""Golden gradients of the selective scan from PyTorch autograd (tests/selective_scan_backward_test.cpp).

Writes tests/data/golden_grads/<case>/*.npy (float32 '<f4' / int32 '<i4', C order) and meta.json in
the format of tools/make_golden.py. The files are committed; the tests and CI never run this script:

    python3 tools/make_golden_grads_scan.py [--out tests/data/golden_grads]

fp32 on the CPU, one thread, seeded, small shapes. The loss is L = sum(dy * y) for a random dy, so
every gradient is what y.backward(dy) gives.

The forward is a plain PyTorch selective scan written like mamba_ssm's selective_scan_ref (decays
exp(delta A) and inputs delta B u for all tokens at once, then a sequential loop over tokens), with
groups (channel c reads B and C of group c / (Dch / G)) and readers (R rows of C read the same state):
spec section 4. Packed sequences are separate loops; a sequence starts from state[slot] when
use_initial_state; a padding sequence (slot -1) has no output, so its rows get zero gradients.
F.softplus has threshold 20 (x above it is returned as is), exactly the op's cut-off.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_case  # noqa: E402

SEED = 2718
# What the test checks: |got - want| <= rel * |want| + abs_of_max * max|want| per array.

def Case(root, name, description):
    return golden_case.Case(root, name, description, "tools/make_golden_grads_scan.py", SEED)

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, h0=None):
    """One sequence. u, delta, z: [L, Dch]; A: [Dch, N]; B: [L, G, N]; C: [L, G, R, N]; D, delta_bias:
    [Dch]; h0: [Dch, N] or None. Returns y [L, R, Dch] and the last state [Dch, N]."""
    length, dch = u.shape
    groups = B.shape[1]
    per_group = dch // groups
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = F.softplus(delta)
    Bc = B.repeat_interleave(per_group, dim=1)  # [L, Dch, N]: each channel's group row
    Cc = C.repeat_interleave(per_group, dim=1)  # [L, Dch, R, N]
    deltaA = torch.exp(torch.einsum("ld,dn->ldn", delta, A))
    deltaB_u = torch.einsum("ld,ldn,ld->ldn", delta, Bc, u)
    x = h0 if h0 is not None else A.new_zeros(A.shape)
    ys = []
    for i in range(length):
        x = deltaA[i] * x + deltaB_u[i]
        ys.append(torch.einsum("dn,drn->rd", x, Cc[i]))
    y = torch.stack(ys) if ys else u.new_zeros(0, C.shape[2], dch)  # [L, R, Dch]
    if D is not None:
        y = y + (u * D)[:, None, :]
    if z is not None:
        y = y * F.silu(z)[:, None, :]
    return y, x


def make_case(root, name, description, lengths, slots, n_slots, dch, n, g, r, use_D, use_z, use_bias,
              use_initial_state):
    torch.manual_seed(SEED)
    tokens = sum(lengths)
    leaves = {
        "u": torch.randn(tokens, dch),
        "delta": torch.randn(tokens, dch) * 0.5 - 1.0,
        # the model's initialisation shape: A = -exp(A_log), A_log = log(n + 1), perturbed
        "A": -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(dch, 1)
                        + 0.1 * torch.randn(dch, n)) * 0.3,
        "B": torch.randn(tokens, g, n),
        "C": torch.randn(tokens, g, r, n),
    }
    if use_D:
        leaves["D"] = torch.randn(dch)
    if use_z:
        leaves["z"] = torch.randn(tokens, dch) * 2
    if use_bias:
        leaves["delta_bias"] = torch.rand(dch) - 0.5
    if use_initial_state:
        leaves["state"] = torch.randn(n_slots, dch, n)
    for t in leaves.values():
        t.requires_grad_()
    dy = torch.randn(tokens, r, dch)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    y_rows = []
    for s, (b, e) in enumerate(zip(cu[:-1], cu[1:])):
        if slots[s] < 0:  # padding: no output, nothing read
            y_rows.append(torch.zeros(e - b, r, dch))
            continue
        sl = slice(int(b), int(e))
        y, _ = selective_scan_ref(
            leaves["u"][sl], leaves["delta"][sl], leaves["A"], leaves["B"][sl], leaves["C"][sl],
            D=leaves.get("D"), z=leaves["z"][sl] if use_z else None, delta_bias=leaves.get("delta_bias"),
            delta_softplus=True, h0=leaves["state"][slots[s]] if use_initial_state else None)
        y_rows.append(y)
    y = torch.cat(y_rows)
    y.backward(dy)

    case = Case(root, name, description)
    for k, v in leaves.items():
        case.save(k, v)
        case.save("d" + k, v.grad if v.grad is not None else torch.zeros_like(v))
    case.save("dy", dy)
    case.save("y", y)
    case.save("cu_seqlens", cu)
    case.save("state_slots", np.array(slots, dtype=np.int32))
    case.finish(shapes={"tokens": tokens, "Dch": dch, "N": n, "G": g, "R": r, "slots": n_slots},
                flags={"delta_softplus": True, "use_initial_state": use_initial_state, "D": use_D,
                       "z": use_z, "delta_bias": use_bias},
                loss="sum(dy * y); d<name> = dL/d<name>; absent operands have no array")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                  "golden_grads"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    make_case(args.out, "scan_packed",
              "4 packed sequences (lengths 5, 0, 3, 11; slots 2, 0, -1 = padding, 3; slot 1 unread), "
              "G 2, R 3, with D, z, delta_bias, softplus, use_initial_state",
              lengths=[5, 0, 3, 11], slots=[2, 0, -1, 3], n_slots=4, dch=8, n=6, g=2, r=3,
              use_D=True, use_z=True, use_bias=True, use_initial_state=True)
    make_case(args.out, "scan_training",
              "a RecurFormer head as trained: one sequence of 40 tokens (3 backward chunks), Dch 16, "
              "N 16, G 1, R 3, D and delta_bias, no gate, softplus, no initial state",
              lengths=[40], slots=[0], n_slots=1, dch=16, n=16, g=1, r=3,
              use_D=True, use_z=False, use_bias=True, use_initial_state=False)


if __name__ == "__main__":
    main()
