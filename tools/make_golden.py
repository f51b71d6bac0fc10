#!/usr/bin/env python3
"""Golden reference data for the op tests (tests/golden_ops_test.cpp), from transformers itself.

Writes tests/data/golden/<case>/*.npy (float32 '<f4' / int32 '<i4', C order) and meta.json (shapes,
flags, tolerances, how it was generated, library versions). The files are committed; the tests and CI
never run this script. Rerun by hand (see tools/README.md):

    python3 tools/make_golden.py [--out tests/data/golden]

Everything runs in fp32 on the CPU, seeded, with small shapes. The intermediates are not recomputed
here: the script wraps the functions transformers' modules call (the Mamba mixer's causal conv and
selective scan fallbacks, Llama's apply_rotary_pos_emb and eager attention) and records exactly what
goes in and comes out of them, so the fixture is what transformers computes.
"""
import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("USE_HUB_KERNELS", "0")  # the plain torch fallbacks, never hub kernels

import numpy as np
import torch
import transformers
from transformers.models.llama import modeling_llama
from transformers.models.mamba import modeling_mamba
from transformers.models.qwen2 import modeling_qwen2

SEED = 1234
# What tests/golden_ops_test.cpp checks: |got - want| <= rel * |want| + abs_of_max * max|want| per array.
TOLERANCE = {"rel": 1e-5, "abs_of_max": 2e-6,
             "why": "fp32 against fp32 with another summation order; the floor (~16 ulps of the array's "
                    "largest value) covers elements that cancel to near zero"}


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


class Case:
    """One fixture directory: .npy files plus meta.json."""

    def __init__(self, root, name, description):
        self.dir = os.path.join(root, name)
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.meta = {"case": name, "description": description, "generator": "tools/make_golden.py",
                     "seed": SEED, "versions": versions(), "arrays": {}}

    def save(self, name, a):
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.dtype.kind in "iu":
            a = a.astype("<i4")
        else:
            a = a.astype("<f4")
        a = np.ascontiguousarray(a)
        np.save(os.path.join(self.dir, name + ".npy"), a, allow_pickle=False)
        self.meta["arrays"][name] = {"dtype": a.dtype.str, "shape": list(a.shape)}

    def finish(self, **fields):
        self.meta.update(fields)
        with open(os.path.join(self.dir, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1, sort_keys=True)
            f.write("\n")


class Recorder:
    """Replaces module-level functions of a transformers module with wrappers that record each call's
    arguments and result (cloned), then restores them."""

    def __init__(self, module, names):
        self.module, self.names, self.calls = module, names, {n: [] for n in names}

    def __enter__(self):
        self.saved = {n: getattr(self.module, n) for n in self.names}
        for n in self.names:
            fn = self.saved[n]

            def wrapper(*args, __fn=fn, __n=n, **kwargs):
                snap = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
                a = [snap(v) for v in args]
                k = {key: snap(v) for key, v in kwargs.items()}
                out = __fn(*args, **kwargs)
                o = tuple(snap(v) for v in out) if isinstance(out, tuple) else snap(out)
                self.calls[__n].append({"args": a, "kwargs": k, "out": o})
                return out

            setattr(self.module, n, wrapper)
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(self.module, n, fn)


def pack(x):
    """[S, Dch, L] (the mixer's channel-first layout) -> [S*L, Dch] packed tokens, sequence-major."""
    s, d, l = x.shape
    return x.permute(0, 2, 1).reshape(s * l, d)


# ------------------------------------------------------------------------------------------------
# Mamba: MambaMixer's torch path (causal_conv1d_fn / causal_conv1d_update and the sequential
# selective scan / selective_state_update) for a prompt, then single-token decode steps with its cache.
# ------------------------------------------------------------------------------------------------
def make_mamba(root, name, seqs, prompt, steps, hidden, d_state, expand, dt_rank, conv_kernel):
    torch.manual_seed(SEED)
    cfg = transformers.MambaConfig(vocab_size=16, hidden_size=hidden, state_size=d_state, expand=expand,
                                   time_step_rank=dt_rank, conv_kernel=conv_kernel, use_conv_bias=True,
                                   use_bias=False, num_hidden_layers=1, use_mambapy=False)
    model = transformers.MambaModel(cfg).eval()
    mixer = model.layers[0].mixer
    dch = mixer.intermediate_size
    with torch.no_grad():
        # Non-trivial values everywhere (the default init has D = 1 and a regular A_log).
        mixer.A_log.copy_(torch.log(torch.rand(dch, d_state) * 15 + 0.5))
        mixer.D.copy_(torch.randn(dch))
        mixer.conv1d.weight.copy_(torch.randn_like(mixer.conv1d.weight) * 0.6)
        mixer.conv1d.bias.copy_(torch.randn(dch) * 0.3)
        mixer.dt_proj.weight.copy_(torch.randn_like(mixer.dt_proj.weight) * 0.5)
        mixer.dt_proj.bias.copy_(torch.randn(dch) * 1.5 - 2.0)
        for lin in (mixer.in_proj, mixer.x_proj):
            lin.weight.copy_(torch.randn_like(lin.weight) / hidden ** 0.5)

    case = Case(root, name, "transformers MambaMixer (torch path: causal_conv1d_fn + sequential "
                "mamba_selective_scan, then causal_conv1d_update + mamba_selective_state_update) on "
                f"{seqs} sequences of {prompt} prompt tokens then {steps} single-token decode steps "
                "with the model's cache. Token-major, sequences packed one after the other.")
    names = ["causal_conv1d_fn", "causal_conv1d_update", "mamba_selective_scan",
             "mamba_selective_state_update"]
    x = torch.randn(seqs, prompt + steps, hidden)
    with Recorder(modeling_mamba, names) as rec, torch.no_grad():
        out = model(inputs_embeds=x[:, :prompt], use_cache=True)
        cache = out.cache
        ssm_after_prefill = cache.layers[0].recurrent_states[0].clone()
        conv_after_prefill = cache.layers[0].conv_states[0].clone()
        decode_states = []
        for i in range(steps):
            model(inputs_embeds=x[:, prompt + i:prompt + i + 1], cache=cache, use_cache=True)
            decode_states.append((cache.layers[0].recurrent_states[0].clone(),
                                  cache.layers[0].conv_states[0].clone()))
    assert len(rec.calls["causal_conv1d_fn"]) == 1 and len(rec.calls["mamba_selective_scan"]) == 1
    assert len(rec.calls["causal_conv1d_update"]) == steps
    assert len(rec.calls["mamba_selective_state_update"]) == steps

    K = conv_kernel
    case.save("cu_seqlens", np.arange(seqs + 1) * prompt)
    case.save("conv_weight", mixer.conv1d.weight[:, 0, :])  # [Dch, K]
    case.save("conv_bias", mixer.conv1d.bias)
    case.save("A", -torch.exp(mixer.A_log.float()))
    case.save("D", mixer.D)
    case.save("delta_bias", mixer.dt_proj.bias)

    conv = rec.calls["causal_conv1d_fn"][0]
    assert conv["args"][0].shape == (seqs, dch, prompt), "prompt must be >= conv_kernel (no padding)"
    case.save("conv_x", pack(conv["args"][0]))  # [T, Dch] conv input (in_proj's first half)
    case.save("conv_y", pack(conv["out"]))  # [T, Dch] conv output after SiLU (= u)
    scan = rec.calls["mamba_selective_scan"][0]
    u, dt, A, B, C = scan["args"][:5]
    assert torch.equal(A, -torch.exp(mixer.A_log.float()))
    assert torch.equal(u, conv["out"])
    case.save("u", pack(u))
    case.save("delta", pack(dt))  # [T, Dch] before delta_bias and softplus
    case.save("B", pack(B).reshape(-1, 1, d_state))  # [T, G=1, N]
    case.save("C", pack(C).reshape(-1, 1, 1, d_state))  # [T, G=1, R=1, N]
    case.save("z", pack(scan["kwargs"]["z"]))
    y, h = scan["out"]
    case.save("y", pack(y).reshape(-1, 1, dch))  # [T, R=1, Dch] after D and the silu(z) gate
    assert torch.equal(h, ssm_after_prefill)
    case.save("ssm_state", h)  # [S, Dch, N]
    # transformers keeps the last K inputs [S, Dch, K]; the library keeps the last K-1, token-major.
    case.save("conv_state", conv_after_prefill[:, :, 1:].permute(0, 2, 1))  # [S, K-1, Dch]

    for i in range(steps):
        cu = rec.calls["causal_conv1d_update"][i]
        st = rec.calls["mamba_selective_state_update"][i]
        p = f"decode{i}_"
        case.save(p + "conv_x", cu["args"][0][:, :, 0])  # [S, Dch]
        case.save(p + "conv_y", cu["out"][:, :, 0])
        state, su, sdt, sA, sB, sC = st["args"][:6]
        assert torch.equal(su, cu["out"][:, :, 0])
        case.save(p + "u", su)
        case.save(p + "delta", sdt)  # [S, Dch] before delta_bias and softplus
        case.save(p + "B", sB.reshape(seqs, 1, d_state))
        case.save(p + "C", sC.reshape(seqs, 1, 1, d_state))
        case.save(p + "z", st["kwargs"]["z"])
        case.save(p + "y", st["out"].reshape(seqs, 1, dch))
        ssm, convs = decode_states[i]
        case.save(p + "ssm_state", ssm)
        case.save(p + "conv_state", convs[:, :, 1:].permute(0, 2, 1))

    case.finish(
        config={"sequences": seqs, "prompt": prompt, "decode_steps": steps, "d_inner": dch,
                "d_state": d_state, "dt_rank": dt_rank, "conv_kernel": K, "hidden_size": hidden,
                "groups": 1, "readers": 1, "delta_softplus": True, "conv_activation": "silu",
                "initial_state": "zero for the prompt; the decode steps continue from the cache"},
        layout={
            "prompt": "u, delta, z, conv_x, conv_y: [T = S*prompt, Dch]; B: [T, 1, N]; C: [T, 1, 1, N]; "
                      "y: [T, 1, Dch]; cu_seqlens: [S+1]; ssm_state: [S, Dch, N] after the prompt; "
                      "conv_state: [S, K-1, Dch] the last K-1 conv inputs, oldest first",
            "decode": "decode{i}_*: step i, one token per sequence: rows = sequences (slot s = row s); "
                      "states after step i",
            "delta": "dt_proj.weight @ time_step, before delta_bias and softplus",
        },
        tolerance=TOLERANCE,
    )


# ------------------------------------------------------------------------------------------------
# Llama attention: LlamaAttention (GQA, eager, causal) with the model's rotary embedding.
# ------------------------------------------------------------------------------------------------
def make_llama_attention(root, name, tokens, start, hidden, n_q, n_kv, head_dim, rope, arch="llama"):
    """arch "llama": LlamaAttention (no biases); "qwen2": Qwen2Attention (q/k/v biases), whose
    projection weights and output after o_proj are stored too (for the linear op)."""
    torch.manual_seed(SEED + 1)
    mod = modeling_qwen2 if arch == "qwen2" else modeling_llama
    common = dict(hidden_size=hidden, num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=head_dim,
                  intermediate_size=4 * hidden, num_hidden_layers=1, vocab_size=32, rope_parameters=dict(rope),
                  max_position_embeddings=131072)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
        cfg._attn_implementation = "eager"
        attn = mod.Qwen2Attention(cfg, layer_idx=0).eval()
        rotary = mod.Qwen2RotaryEmbedding(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, attention_bias=False)
        cfg._attn_implementation = "eager"
        attn = mod.LlamaAttention(cfg, layer_idx=0).eval()
        rotary = mod.LlamaRotaryEmbedding(cfg)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            lin.weight.copy_(torch.randn_like(lin.weight) / lin.weight.shape[1] ** 0.5)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn_like(lin.bias) * 0.5)

    positions = torch.arange(start, start + tokens)[None]
    x = torch.randn(1, tokens, hidden)
    captured = {}
    hooks = [getattr(attn, n).register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, (i[0].detach().clone(), o.detach().clone())))
        for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None]
    with Recorder(mod, ["apply_rotary_pos_emb", "eager_attention_forward"]) as rec, torch.no_grad():
        cos, sin = rotary(x, positions)
        out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask)
    for h in hooks:
        h.remove()
    q_rope, k_rope = rec.calls["apply_rotary_pos_emb"][0]["out"]  # [1, heads, T, hd]
    attn_out = rec.calls["eager_attention_forward"][0]["out"][0]  # [1, T, n_q, hd]
    assert torch.equal(attn_out.reshape(1, tokens, -1), captured["o_proj"][0])

    cls = type(attn).__name__
    case = Case(root, name, f"transformers {cls} (eager, causal mask, GQA {n_q}/{n_kv}, head_dim "
                f"{head_dim}) with {type(rotary).__name__} ({rope['rope_type']}), one sequence of {tokens} tokens "
                f"at positions {start}..{start + tokens - 1}")
    case.save("x", x[0])  # [T, hidden]
    case.save("positions", positions[0])  # [T]
    case.save("inv_freq", rotary.inv_freq)  # [hd/2]
    case.save("cos", cos[0])  # [T, hd]
    case.save("sin", sin[0])
    case.save("q", captured["q_proj"][1].reshape(tokens, n_q, head_dim))
    case.save("k", captured["k_proj"][1].reshape(tokens, n_kv, head_dim))
    case.save("v", captured["v_proj"][1].reshape(tokens, n_kv, head_dim))
    case.save("q_rope", q_rope[0].transpose(0, 1))  # [T, n_q, hd]
    case.save("k_rope", k_rope[0].transpose(0, 1))  # [T, n_kv, hd]
    case.save("attn", attn_out[0])  # [T, n_q, hd], before o_proj
    layout = {"q, q_rope, attn": "[T, n_q, hd]", "k, v, k_rope": "[T, n_kv, hd]",
              "cos, sin": "[T, hd] (the hd/2 angles repeated twice, rotate_half)"}
    if arch == "qwen2":  # the whole layer: projections (with biases) and o_proj
        for n in ("q", "k", "v", "o"):
            lin = getattr(attn, n + "_proj")
            case.save(n + "_weight", lin.weight)
            if lin.bias is not None:
                case.save(n + "_bias", lin.bias)
        case.save("out", out[0])
        layout.update({"q_weight, k_weight, v_weight": "[n_heads*hd, hidden] (HF [out, in]); *_bias [n_heads*hd]",
                       "o_weight": "[hidden, n_q*hd], no bias", "out": "[T, hidden] = o_proj(attn)"})
    case.finish(
        config={"tokens": tokens, "first_position": start, "hidden_size": hidden, "n_q": n_q, "n_kv": n_kv,
                "head_dim": head_dim, "rope": rope, "scale": head_dim ** -0.5, "layout": "rotate_half",
                "mask": "causal"},
        layout=layout,
        tolerance=dict(TOLERANCE, note="rope angles are fp32 products float(pos) * inv_freq as in "
                       "transformers: large positions only match to 1e-5 when computed that way"),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reductions
    os.makedirs(args.out, exist_ok=True)
    # d_inner 48 and d_state 16: not multiples of the AVX-512 width on the channel axis.
    make_mamba(args.out, "mamba_scan", seqs=2, prompt=7, steps=3, hidden=24, d_state=16, expand=2,
               dt_rank=4, conv_kernel=4)
    make_llama_attention(args.out, "llama_attention_default", tokens=11, start=0, hidden=128, n_q=4, n_kv=2,
                         head_dim=64, rope={"rope_type": "default", "rope_theta": 10000.0})
    # Llama 3.1 scaling: positions past original_max_position / factor, where the low frequencies matter.
    make_llama_attention(args.out, "llama_attention_llama3", tokens=9, start=9000, hidden=128, n_q=4, n_kv=2,
                         head_dim=64,
                         rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})
    # Qwen2: q/k/v biases; the whole attention layer including the projections (hidden 64, 2/1 heads).
    make_llama_attention(args.out, "qwen2_attention", tokens=10, start=3, hidden=64, n_q=2, n_kv=1, head_dim=64,
                         rope={"rope_type": "default", "rope_theta": 1000000.0}, arch="qwen2")
    print("wrote", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
