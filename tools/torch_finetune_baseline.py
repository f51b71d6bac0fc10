#!/usr/bin/env python3
"""An independent PyTorch implementation of a RecurFormer checkpoint's forward and of one step of
`recurformer finetune`: a cross-check of the C++ numbers on a real model, and the PyTorch
throughput baseline of issue 9 (finetune tokens/s against PyTorch, same step, same machine).

Nothing in the library, its tests or CI runs this script; it needs torch, numpy, tokenizers and
safetensors (`pip install torch numpy tokenizers safetensors`). Written from the spec
(docs: shared design spec sections 2, 3 and 7) and the top comment of
include/recurformer/model/finetune.hpp, not from the C++ code.

The model (plain PyTorch, fp32, CPU; `RecurFormerTorch` below):
  x = embed(tokens); per layer: xn = rmsnorm(x) (eps from config.json); q, k, v = projections
  (+ biases when attention_bias);
    attention group:  RoPE (rotate_half, HF's layout; rope_theta, default or llama3 rope_scaling),
                      F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)
    streaming group:  the same with a boolean sink + window mask (spec section 7)
    recurrent group:  u = causal depthwise conv1d of v (F.conv1d, left zero padding), Δ = softplus(
                      dt_up(dt_down(xn)) + dt_bias) (threshold 20), A = -exp(A_log), B = k, C = q/sqrt(hd)
                      (no RoPE), scan, y = C·h + D·u; g query heads read one state
  then x += o_proj(heads); x += down(silu(gate(h)) * up(h)), h = rmsnorm(x); logits = rmsnorm(x) W^T
  with W = lm_head.weight, or the embedding when tied / absent. `windowed` groups are refused.

The selective scan is the reference formulation a PyTorch / mamba user has on the CPU, in the
style of mamba_ssm's selective_scan_ref: discretise for all steps at once (dA = exp(Δ A),
dBu = Δ B u, [T, groups, hd, N]), then a Python loop over time, h = dA[t] * h + dBu[t], under
autograd. Two departures from selective_scan_ref, both plain PyTorch: the states are stacked and C
is applied after the loop in one einsum (selective_scan_ref does an einsum per step), so the loop
holds two elementwise ops per token; and the loop walks dA.unbind(0) rather than indexing dA[:, :, i]
as selective_scan_ref does (indexing in a loop makes the backward quadratic in T: each step's
gradient is a full-size zero tensor; measured ~10x slower for the whole step at 512 tokens).
All recurrent groups of a layer are scanned together. No custom kernels, no torch.compile.

Modes (any combination; each prints labelled lines):
  --check-ppl TEXT      llama.cpp's perplexity protocol at -c CTX (default 512), as `recurformer
                        perplexity -m DIR -f TEXT -c 512` (include/recurformer/model/perplexity.hpp):
                        the text tokenised once (tokenizers' tokenizer.json, with BOS when the
                        tokenizer adds one), floor(n / ctx) chunks, each from scratch with its first
                        token replaced by BOS (if added), logits at ctx/2 .. ctx-2 scored against the
                        next token, NLL in float64. --chunks N scores only the first N chunks;
                        --write-truncated PATH writes a prefix of TEXT whose tokenisation starts with
                        exactly those N chunks' tokens (checked), for the C++ binary to run on.
  --check-grad OUT      with -f TEXT holding exactly one training sequence (2 or 3 sequences of ctx
                        tokens; one is held out): compares the loss, the held-out CE and the clipped
                        gradient with `recurformer finetune -f TEXT -o OUT --steps 1` (its trainer.json
                        and optimizer.safetensors, whose first moment m is 0.1 x the clipped gradient,
                        in the C++ flat parameter layout); --float64 runs the model in float64 to see
                        how far each fp32 implementation is from it.
  --check-heldout TEXT  the mean next-token CE on the sequences `recurformer finetune` holds out of
                        TEXT (the last max(1, floor(5% of floor(n / ctx))) sequences of ctx tokens),
                        the number it prints as held-out loss before training.
  --bench               the training step of `recurformer finetune` with its defaults: one sequence
                        of ctx = 512 tokens from TEXT (-f), mean next-token CE over the whole sequence
                        (ctx - 1 targets), backward, global-norm clip 1.0, AdamW (lr 1e-4 peak,
                        betas 0.9/0.999, eps 1e-8, weight decay 0) with warmup (5%) + cosine to 10%.
                        Trainable: each recurrent group's tensors (dt_down, dt_up, dt_bias, A_log, D,
                        conv1d weight/bias) and the group's own rows of Wq/Wk/Wv (+ biases). Those
                        weights are split into row blocks: trained blocks are Parameters, frozen blocks
                        are buffers, and each block is its own F.linear (outputs concatenated), so no
                        gradient is computed for frozen rows. Everything else is frozen (embedding /
                        tied lm_head included). --checkpoint-layers wraps each layer in
                        torch.utils.checkpoint (recompute per layer, as the C++ trainer does);
                        without it autograd keeps every layer's activations (less work).
                        --warmup W untimed steps, then --steps N timed; per-step tokens/s and median.
                        --ours BIN then runs `BIN finetune` on the same model and text with the same
                        threads and prints its tokens/s and the ratio ours / PyTorch.

Timing: PyTorch's OpenMP threads spin-wait between parallel regions; with other work on the cores
the step's thousands of small scan ops make that collapse (72 s instead of ~6 s a step measured at 2
threads, load 3.5 on 2 CPUs). Time on a quiet machine; on a busy one OMP_WAIT_POLICY=PASSIVE (set in
the environment before Python starts) avoids the collapse. The bench prints the load average.

Examples:
    python3 tools/torch_finetune_baseline.py -m CONVERTED --check-ppl eval.txt --threads 2
    python3 tools/torch_finetune_baseline.py -m CONVERTED -f train.txt --bench --threads 2 --steps 10 \\
        --ours build/bin/recurformer
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


# ---- checkpoint --------------------------------------------------------------------------------

def load_tensors(model_dir):
    """All tensors of model.safetensors (or its shards) as fp32 torch tensors."""
    from safetensors.torch import load_file
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        files = [single]
    else:
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            files = sorted({os.path.join(model_dir, v) for v in json.load(f)["weight_map"].values()})
    out = {}
    for path in files:
        for k, v in load_file(path).items():
            out[k] = v.float()
    return out


def rope_inv_freq(cfg, hd):
    theta = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = cfg.get("rope_scaling")
    if sc:
        kind = sc.get("rope_type", sc.get("type"))
        if kind == "llama3":  # transformers' _compute_llama3_parameters
            factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
            old = sc["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            lo_wl, hi_wl = old / lo, old / hi
            scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            mid = (1 - smooth) * scaled / factor + smooth * scaled
            is_mid = (wavelen >= hi_wl) & (wavelen <= lo_wl)
            inv = torch.where(is_mid, mid, scaled)
        elif kind == "linear":
            inv = inv / sc["factor"]
        elif kind != "default":
            raise SystemExit(f"rope_scaling {sc} is not supported by this script")
    return inv


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class RowSplitLinear(torch.nn.Module):
    """y = x W^T (+ b) with W's rows cut into contiguous blocks; the blocks in `train_rows` (a set of
    row indices) are Parameters, the others frozen buffers; one F.linear per block."""

    def __init__(self, w, b, train_rows):
        super().__init__()
        rows = w.shape[0]
        flags = [r in train_rows for r in range(rows)]
        self.blocks = []
        start = 0
        for r in range(1, rows + 1):
            if r == rows or flags[r] != flags[start]:
                self.blocks.append((start, r, flags[start]))
                start = r
        for i, (a, e, tr) in enumerate(self.blocks):
            wb = w[a:e].clone()
            bb = b[a:e].clone() if b is not None else None
            if tr:
                self.register_parameter(f"w{i}", torch.nn.Parameter(wb))
                self.register_parameter(f"b{i}", torch.nn.Parameter(bb) if bb is not None else None)
            else:
                self.register_buffer(f"w{i}", wb)
                self.register_buffer(f"b{i}", bb)

    def forward(self, x):
        outs = [F.linear(x, getattr(self, f"w{i}"), getattr(self, f"b{i}")) for i in range(len(self.blocks))]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def frozen(t):
    return torch.nn.Parameter(t, requires_grad=False)


class RecurrentGroup(torch.nn.Module):
    def __init__(self, t, prefix, train):
        super().__init__()
        mk = (lambda x: torch.nn.Parameter(x.clone())) if train else frozen
        self.dt_down = mk(t[prefix + "dt_down.weight"])
        self.dt_up = mk(t[prefix + "dt_up.weight"])
        self.dt_bias = mk(t[prefix + "dt_bias"])
        self.A_log = mk(t[prefix + "A_log"])
        self.D = mk(t[prefix + "D"])
        self.conv_w = mk(t[prefix + "conv1d.weight"])
        self.conv_b = mk(t[prefix + "conv1d.bias"])


def selective_scan_ref(u, delta, A, B, C, D):
    """u, delta [T, G, hd]; A [G, hd, N]; B [T, G, N]; C [T, G, R, N]; D [G, hd] -> y [T, G, R, hd].
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t;  y_t = C_t · h_t + D u_t (zero initial state)."""
    dA = torch.exp(delta.unsqueeze(-1) * A)                         # [T, G, hd, N]
    dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)                # [T, G, hd, N]
    h = torch.zeros_like(dA[0])
    hs = []
    # unbind, not dA[t]: indexing a tensor in the loop makes each step's backward write a full-size
    # zero gradient of dA (quadratic in T: ~60 s instead of ~6 s a step on SmolLM2's shape)
    for a_t, b_t in zip(dA.unbind(0), dBu.unbind(0)):
        h = a_t * h + b_t
        hs.append(h)
    H = torch.stack(hs)                                             # [T, G, hd, N]
    y = torch.einsum("tgcn,tgrn->tgrc", H, C)
    return y + (D * u).unsqueeze(2)


class Layer(torch.nn.Module):
    def __init__(self, t, cfg, l, kinds, train):
        super().__init__()
        p = f"model.layers.{l}."
        self.nq, self.nkv, self.hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim_"]
        self.g = self.nq // self.nkv
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.kinds = kinds
        self.rec = [j for j, k in enumerate(kinds) if k == "recurrent"]
        self.att = [j for j, k in enumerate(kinds) if k == "attention"]
        self.stream = [j for j, k in enumerate(kinds) if k == "streaming"]
        order = self.att + self.stream + self.rec  # the groups in the order their outputs are computed
        self.inv_order = [order.index(j) for j in range(self.nkv)]
        tr = train and bool(self.rec)
        g, hd = self.g, self.hd
        qrows = {r for j in self.rec for r in range(j * g * hd, (j + 1) * g * hd)} if tr else set()
        kvrows = {r for j in self.rec for r in range(j * hd, (j + 1) * hd)} if tr else set()
        b = (lambda n: t.get(p + f"self_attn.{n}_proj.bias"))
        self.q = RowSplitLinear(t[p + "self_attn.q_proj.weight"], b("q"), qrows)
        self.k = RowSplitLinear(t[p + "self_attn.k_proj.weight"], b("k"), kvrows)
        self.v = RowSplitLinear(t[p + "self_attn.v_proj.weight"], b("v"), kvrows)
        self.o = frozen(t[p + "self_attn.o_proj.weight"])
        self.attn_norm = frozen(t[p + "input_layernorm.weight"])
        self.mlp_norm = frozen(t[p + "post_attention_layernorm.weight"])
        self.gate = frozen(t[p + "mlp.gate_proj.weight"])
        self.up = frozen(t[p + "mlp.up_proj.weight"])
        self.down = frozen(t[p + "mlp.down_proj.weight"])
        self.groups = torch.nn.ModuleList(
            [RecurrentGroup(t, p + f"self_attn.recurrent.{j}.", train) for j in self.rec])

    def forward(self, x, cos, sin, stream_mask):
        T = x.shape[0]
        nkv, g, hd = self.nkv, self.g, self.hd
        xn = rms_norm(x, self.attn_norm, self.eps)
        q = self.q(xn).view(T, nkv, g, hd)
        k = self.k(xn).view(T, nkv, hd)
        v = self.v(xn).view(T, nkv, hd)
        parts = []
        for idx, mask in ((self.att, None), (self.stream, stream_mask)):
            if not idx:
                continue
            qa = q[:, idx] * cos[:, None, None] + rotate_half(q[:, idx]) * sin[:, None, None]
            ka = k[:, idx] * cos[:, None] + rotate_half(k[:, idx]) * sin[:, None]
            qa = qa.permute(1, 2, 0, 3).reshape(1, len(idx) * g, T, hd)
            ka = ka.permute(1, 0, 2).unsqueeze(0)
            va = v[:, idx].permute(1, 0, 2).unsqueeze(0)
            o = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            parts.append(o.view(len(idx), g, T, hd).permute(2, 0, 1, 3))  # [T, groups, g, hd]
        if self.rec:
            G = len(self.rec)
            vr = v[:, self.rec]                                        # [T, G, hd]
            cw = torch.stack([m.conv_w for m in self.groups]).view(G * hd, 1, -1)
            cb = torch.stack([m.conv_b for m in self.groups]).view(G * hd)
            K = cw.shape[-1]
            u = F.conv1d(vr.reshape(T, G * hd).t().unsqueeze(0), cw, cb, padding=K - 1, groups=G * hd)
            u = u[0, :, :T].t().reshape(T, G, hd)
            down = torch.cat([m.dt_down for m in self.groups])          # [G * r, d]
            dtl = F.linear(xn, down).view(T, G, -1)
            up = torch.stack([m.dt_up for m in self.groups])           # [G, hd, r]
            bias = torch.stack([m.dt_bias for m in self.groups])       # [G, hd]
            delta = F.softplus(torch.einsum("tgr,ghr->tgh", dtl, up) + bias, beta=1.0, threshold=20.0)
            A = -torch.exp(torch.stack([m.A_log for m in self.groups]))  # [G, hd, N]
            D = torch.stack([m.D for m in self.groups])
            Bm = k[:, self.rec]                                        # [T, G, N]
            Cm = q[:, self.rec] * (1.0 / math.sqrt(hd))                # [T, G, g, N]
            parts.append(selective_scan_ref(u, delta, A, Bm, Cm, D))
        heads = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if heads.shape[1] > 1 and self.inv_order != list(range(nkv)):
            heads = heads[:, self.inv_order]
        x = x + F.linear(heads.reshape(T, nkv * g * hd), self.o)
        h = rms_norm(x, self.mlp_norm, self.eps)
        return x + F.linear(F.silu(F.linear(h, self.gate)) * F.linear(h, self.up), self.down)


class RecurFormerTorch(torch.nn.Module):
    def __init__(self, model_dir, train=False):
        super().__init__()
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.cfg = cfg
        nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or cfg["hidden_size"] // nq
        cfg["head_dim_"] = hd
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        rf = cfg.get("recurformer")
        L = cfg["num_hidden_layers"]
        self.kinds = [["attention"] * nkv for _ in range(L)]
        self.sink = self.window = 0
        if rf:
            if rf.get("version") != 1:
                raise SystemExit(f"recurformer version {rf.get('version')} is not supported")
            if rf["d_state"] != hd:
                raise SystemExit("d_state != head_dim is not supported (spec v1)")
            self.sink, self.window = rf["streaming"]["sink"], rf["streaming"]["window"]
            for l, lay in enumerate(rf["layers"]):
                if lay.get("windowed"):
                    raise SystemExit(f"layer {l} has windowed groups: not supported by this script")
                for j in lay.get("recurrent", []):
                    self.kinds[l][j] = "recurrent"
                for j in lay.get("streaming", []):
                    self.kinds[l][j] = "streaming"
        t = load_tensors(model_dir)
        self.embed = frozen(t["model.embed_tokens.weight"])
        self.tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in t
        self.lm_head = self.embed if self.tied else frozen(t["lm_head.weight"])
        self.norm = frozen(t["model.norm.weight"])
        self.layers = torch.nn.ModuleList([Layer(t, cfg, l, self.kinds[l], train) for l in range(L)])
        self.inv_freq = rope_inv_freq(cfg, hd)
        self.checkpoint_layers = False

    def hidden(self, tokens):
        """tokens [T] (one sequence from position 0) -> the final normalised hidden states [T, d]."""
        T = tokens.shape[0]
        pos = torch.arange(T, dtype=torch.float64)
        fr = torch.outer(pos, self.inv_freq)
        emb = torch.cat((fr, fr), dim=-1)
        cos, sin = emb.cos().to(self.embed.dtype), emb.sin().to(self.embed.dtype)
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        stream_mask = (j <= i) & ((j < self.sink) | (j > i - self.window))
        x = F.embedding(tokens, self.embed)
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, stream_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, stream_mask)
        return rms_norm(x, self.norm, self.eps)

    def logits(self, h):
        return F.linear(h, self.lm_head)


# ---- tokenizer ---------------------------------------------------------------------------------

class Tok:
    def __init__(self, model_dir):
        from tokenizers import Tokenizer
        self.t = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        tc = {}
        p = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(p):
            with open(p) as f:
                tc = json.load(f)
        empty = self.t.encode("", add_special_tokens=True).ids
        self.bos = -1
        self.prepend = False
        if empty:  # the post-processor adds a token in front (BOS)
            self.bos = empty[0]
        elif tc.get("add_bos_token"):
            b = tc.get("bos_token")
            b = b.get("content") if isinstance(b, dict) else b
            self.bos = self.t.token_to_id(b)
            self.prepend = True

    def encode(self, text):
        e = self.t.encode(text, add_special_tokens=True)
        ids, offs = e.ids, e.offsets
        if self.prepend:
            ids, offs = [self.bos] + ids, [(0, 0)] + offs
        return ids, offs


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


# ---- modes -------------------------------------------------------------------------------------

def check_ppl(model, tok, a):
    text = read_text(a.check_ppl)
    ids, offs = tok.encode(text)
    ctx = a.ctx
    n_chunks = len(ids) // ctx
    print(f"check-ppl: {a.check_ppl}: {len(ids)} tokens (tokenizers, BOS {'added' if tok.bos >= 0 else 'not added'}), "
          f"{n_chunks} chunks of {ctx}", flush=True)
    if n_chunks < 2:
        raise SystemExit("check-ppl: at least 2 * ctx tokens are needed")
    if a.chunks:
        n_chunks = min(n_chunks, a.chunks)
        if a.write_truncated:
            # cut the text a few tokens past the last used chunk; check the prefix tokenises the same
            end_tok = n_chunks * ctx + 8
            cut = offs[min(end_tok, len(offs) - 1)][1]
            sub = text[:cut]
            # tokenizers' offsets are in characters of the str
            ids2, _ = tok.encode(sub)
            assert ids2[:n_chunks * ctx] == ids[:n_chunks * ctx], "truncated text tokenises differently"
            assert n_chunks * ctx <= len(ids2) < (n_chunks + 1) * ctx, len(ids2)
            with open(a.write_truncated, "wb") as f:
                f.write(sub.encode("utf-8"))
            print(f"check-ppl: wrote {a.write_truncated}: {len(sub.encode('utf-8'))} bytes, {len(ids2)} tokens, "
                  f"its first {n_chunks} chunks are the ones scored here", flush=True)
    first = ctx // 2
    nll = nll2 = 0.0
    n = 0
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for c in range(n_chunks):
            src = ids[c * ctx:(c + 1) * ctx]
            chunk = list(src)
            if tok.bos >= 0:
                chunk[0] = tok.bos
            h = model.hidden(torch.tensor(chunk, dtype=torch.long))
            lg = model.logits(h[first:ctx - 1]).double()
            lp = torch.log_softmax(lg, dim=-1)
            tgt = torch.tensor(src[first + 1:ctx], dtype=torch.long)
            l = -lp.gather(1, tgt[:, None])[:, 0]
            nll += l.sum().item()
            nll2 += (l * l).sum().item()
            n += l.numel()
            out.append(f"[{c + 1}]{math.exp(nll / n):.4f},")
            print(out[-1], end="", flush=True)
    mean = nll / n
    ppl = math.exp(mean)
    var = nll2 / n - mean * mean
    err = math.sqrt(var / (n - 1)) * ppl if var > 0 and n > 1 else 0.0
    print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    print(f"check-ppl: torch PPL {ppl:.6f} (mean NLL {mean:.8f}) over {n} predictions in {n_chunks} chunks, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def split_sequences(ids, ctx, holdout=0.05):
    n_seq = len(ids) // ctx
    n_hold = max(1, int(math.floor(n_seq * holdout)))
    seqs = [ids[s * ctx:(s + 1) * ctx] for s in range(n_seq)]
    return seqs[:n_seq - n_hold], seqs[n_seq - n_hold:]


def seq_loss(model, seq):
    x = torch.tensor(seq, dtype=torch.long)
    h = model.hidden(x)
    return F.cross_entropy(model.logits(h[:-1]), x[1:])


def check_heldout(model, tok, a):
    ids, _ = tok.encode(read_text(a.check_heldout))
    train, hold = split_sequences(ids, a.ctx)
    t0 = time.perf_counter()
    s = 0.0
    with torch.inference_mode():
        for seq in hold:
            s += seq_loss(model, seq).item()
    ce = s / len(hold)  # every sequence has ctx - 1 targets
    print(f"check-heldout: {a.check_heldout}: {len(ids)} tokens, {len(train)} training + {len(hold)} held-out "
          f"sequences of {a.ctx}; held-out CE {ce:.6f} (ppl {math.exp(ce):.4f}), "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def flat_grad(model):
    """The trained parameters' gradients in the flat layout of the C++ FinetuneModel (FinetuneTrain::
    recurrent): per layer, in tensor order, Wq's, Wk's and Wv's row ranges of each recurrent group (then
    the biases'), then each recurrent group's dt_down, dt_up, dt_bias, A_log, D, conv1d weight and bias.
    Returns (flat numpy vector, [(name, offset, size)])."""
    parts, names, off = [], [], 0

    def put(name, t):
        nonlocal off
        a = t.detach().reshape(-1).double().numpy()
        parts.append(a)
        names.append((name, off, a.size))
        off += a.size

    def full(lin, rows, cols):  # a RowSplitLinear's weight (or bias) gradient, frozen rows zero
        w, b = torch.zeros(rows, cols, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
        for i, (a, e, tr) in enumerate(lin.blocks):
            if tr:
                w[a:e] = getattr(lin, f"w{i}").grad
                if getattr(lin, f"b{i}") is not None:
                    b[a:e] = getattr(lin, f"b{i}").grad
        return w, b

    for l, L in enumerate(model.layers):
        if not L.rec:
            continue
        g, hd = L.g, L.hd
        d = L.o.shape[0]
        gq, gqb = full(L.q, L.nq * hd, d)
        gk, gkb = full(L.k, L.nkv * hd, d)
        gv, gvb = full(L.v, L.nkv * hd, d)
        p = f"model.layers.{l}.self_attn."
        for name, gw, rows in (("q_proj", gq, g * hd), ("k_proj", gk, hd), ("v_proj", gv, hd)):
            for j in L.rec:
                put(f"{p}{name}.weight[{j}]", gw[j * rows:(j + 1) * rows])
        if getattr(L.q, "b0", None) is not None:
            for name, gb, rows in (("q_proj", gqb, g * hd), ("k_proj", gkb, hd), ("v_proj", gvb, hd)):
                for j in L.rec:
                    put(f"{p}{name}.bias[{j}]", gb[j * rows:(j + 1) * rows])
        for j, m in zip(L.rec, L.groups):
            for n in ("dt_down", "dt_up", "dt_bias", "A_log", "D", "conv_w", "conv_b"):
                put(f"{p}recurrent.{j}.{n}", getattr(m, n).grad)
    return np.concatenate(parts), names


def check_grad(model, tok, a):
    """Compares one training step with `recurformer finetune --steps 1` run on a text of exactly one
    training sequence (2 or 3 sequences of ctx: one is held out), whose output directory is a.check_grad:
    trainer.json's loss and held-out CE, and optimizer.safetensors' first moment m = (1 - beta1) * the
    clipped gradient."""
    from safetensors.numpy import load_file
    ids, _ = tok.encode(read_text(a.file))
    train, hold = split_sequences(ids, a.ctx)
    if len(train) != 1:
        raise SystemExit(f"--check-grad: {a.file} has {len(train)} training sequences of {a.ctx}; it needs exactly 1 "
                         f"(a text of {2 * a.ctx} to {3 * a.ctx - 1} tokens)")
    with open(os.path.join(a.check_grad, "trainer.json")) as f:
        tj = json.load(f)
    if tj.get("step") != 1 or tj.get("train") != "recurrent":
        raise SystemExit(f"--check-grad: {a.check_grad} is not a `finetune --steps 1 --train recurrent` output")
    opt = load_file(os.path.join(a.check_grad, "optimizer.safetensors"))
    with torch.no_grad():
        hce = sum(seq_loss(model, s).item() for s in hold) / len(hold)
    loss = seq_loss(model, train[0])
    loss.backward()
    g, names = flat_grad(model)
    norm = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
    if norm > 1.0:
        g = g * (1.0 / (norm + 1e-12))
    ours = opt["m"].astype(np.float64) / 0.1
    if ours.size != g.size:
        raise SystemExit(f"--check-grad: {ours.size} parameters in {a.check_grad}, {g.size} here")
    if a.save_grad:
        np.save(a.save_grad, g)
    print(f"check-grad: loss torch {loss.item():.6f}, ours {tj['loss']:.6f} (rel {abs(loss.item() / tj['loss'] - 1):.2e}); "
          f"held-out CE torch {hce:.6f}, ours {tj['heldout_ce_before']:.6f} "
          f"(rel {abs(hce / tj['heldout_ce_before'] - 1):.2e})")
    err = np.linalg.norm(g - ours) / np.linalg.norm(g)
    print(f"check-grad: gradient norm before clipping {norm:.6f}; {g.size} values, ||ours - torch|| / ||torch|| = "
          f"{err:.2e}, max |diff| / max |torch| = {np.max(np.abs(g - ours)) / np.max(np.abs(g)):.2e}")
    worst = sorted(((np.linalg.norm(g[o:o + n] - ours[o:o + n]) / max(np.linalg.norm(g[o:o + n]), 1e-30), name)
                    for name, o, n in names), reverse=True)[:5]
    for e, name in worst:
        print(f"check-grad:   {e:.2e}  {name}")


def warmup_cosine(step, warmup, total, final_fraction=0.1):
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = min(1.0, (step - warmup) / (total - warmup)) if total > warmup else 1.0
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))


def bench(model, tok, a):
    if not a.file:
        raise SystemExit("--bench needs -f TEXT")
    ids, _ = tok.encode(read_text(a.file))
    train, _ = split_sequences(ids, a.ctx)
    order = np.random.default_rng(a.seed).permutation(len(train))
    model.checkpoint_layers = a.checkpoint_layers
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    matrices = [p for p in params if p.dim() == 2]
    vectors = [p for p in params if p.dim() != 2]
    total = a.warmup + a.steps
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.0}, {"params": vectors, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, int(0.05 * total), total))
    load = os.getloadavg()
    print("bench: load average %.2f %.2f %.2f, %d CPUs, OMP_WAIT_POLICY=%s" % (
        load + (os.cpu_count(), os.environ.get("OMP_WAIT_POLICY", "(unset)"))), flush=True)
    if load[0] > 0.5 and a.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("bench: WARNING: the machine is busy; PyTorch's OpenMP threads spin-wait between ops, and with "
              "other work on the cores a step can take 10x longer (measured: 72 s instead of 6 s a step at 2 "
              "threads, load 3.5 on 2 CPUs). Time on a quiet machine, or set OMP_WAIT_POLICY=PASSIVE.", flush=True)
    print(f"bench: torch {torch.__version__}, {torch.get_num_threads()} threads, {n_params} trainable parameters "
          f"({len(params)} tensors), {len(train)} training sequences of {a.ctx} tokens, "
          f"activation checkpointing per layer: {'on' if a.checkpoint_layers else 'off'}; "
          f"{a.warmup} warm-up + {a.steps} timed steps", flush=True)
    rates = []
    for step in range(total):
        seq = train[order[step % len(train)]]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = seq_loss(model, seq)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        timed = step >= a.warmup
        if timed:
            rates.append(a.ctx / dt)
        print(f"bench: step {step + 1}/{total}{'' if timed else ' (warm-up)'}: loss {loss.item():.4f}, "
              f"{dt:.3f} s, {a.ctx / dt:.1f} tokens/s", flush=True)
    med = statistics.median(rates)
    mean = len(rates) * a.ctx / sum(a.ctx / r for r in rates)
    print(f"bench: torch median {med:.1f} tokens/s (mean {mean:.1f}) over {len(rates)} steps, "
          f"{torch.get_num_threads()} threads", flush=True)
    return med


def run_ours(a, torch_rate):
    """Runs `BIN finetune` with the same model, text, ctx and threads; parses its progress lines."""
    out_dir = a.ours_out
    cmd = [a.ours, "finetune", "-m", a.model, "-f", a.file, "-o", out_dir, "-c", str(a.ctx),
           "--steps", str(a.ours_steps), "-t", str(a.threads), "--force"]
    print("ours: load average %.2f %.2f %.2f; " % os.getloadavg() + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cum = []
    for line in p.stdout.splitlines():
        m = re.search(r"step (\d+)/\d+, loss [-\d.]+, ([\d.]+) tokens/s", line)
        if m:
            cum.append(float(m.group(2)))
        elif line.strip():
            print("ours: " + line, flush=True)
    if p.returncode != 0 or not cum:
        raise SystemExit(f"ours: exit {p.returncode}, no progress lines")
    # the C++ prints the rate since the first step (cumulative); per-step rates from the differences
    el = [a.ctx * (i + 1) / r for i, r in enumerate(cum)]
    per = [a.ctx / (el[i] - el[i - 1]) for i in range(1, len(el)) if el[i] > el[i - 1]]
    med = statistics.median(per) if per else cum[-1]
    print(f"ours: {len(cum)} steps, {cum[-1]:.1f} tokens/s over all steps (its last progress line); "
          f"per-step median {med:.1f} tokens/s (from the rounded cumulative rates)", flush=True)
    print(f"ratio: ours / torch = {cum[-1] / torch_rate:.3f} (all steps) , {med / torch_rate:.3f} (median), "
          f"{a.threads} threads", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="RecurFormer (or plain Llama) HF directory")
    ap.add_argument("-f", "--file", help="training text for --bench (and --ours)")
    ap.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk / sequence (default 512)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--check-ppl", metavar="TEXT", help="llama.cpp perplexity protocol on TEXT")
    ap.add_argument("--chunks", type=int, default=0, help="--check-ppl: score only the first N chunks")
    ap.add_argument("--write-truncated", metavar="PATH", help="--check-ppl --chunks N: write the prefix of TEXT "
                    "that holds those chunks (for the C++ binary)")
    ap.add_argument("--check-heldout", metavar="TEXT", help="held-out CE of `recurformer finetune -f TEXT`")
    ap.add_argument("--check-grad", metavar="OUT", help="compare with `recurformer finetune -f TEXT -o OUT --steps 1` "
                    "(TEXT, given with -f, must hold exactly one training sequence)")
    ap.add_argument("--save-grad", metavar="NPY", help="--check-grad: also save torch's clipped flat gradient")
    ap.add_argument("--float64", action="store_true", help="check modes: run the model in float64 (a reference "
                    "for judging fp32 rounding in both implementations)")
    ap.add_argument("--bench", action="store_true", help="time the finetune step")
    ap.add_argument("--steps", type=int, default=10, help="--bench: timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="--bench: untimed steps first (default 2)")
    ap.add_argument("--lr", type=float, default=1e-4, help="--bench: peak learning rate (default 1e-4)")
    ap.add_argument("--seed", type=int, default=1, help="--bench: sequence order")
    ap.add_argument("--checkpoint-layers", action="store_true", help="--bench: recompute per layer in backward")
    ap.add_argument("--ours", metavar="BIN", help="--bench: then run `BIN finetune` the same way and print the ratio")
    ap.add_argument("--ours-steps", type=int, default=15, help="--ours: its --steps (default 15)")
    ap.add_argument("--ours-out", default="/tmp/torch_baseline_ours", help="--ours: its -o (replaced)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = RecurFormerTorch(a.model, train=a.bench or bool(a.check_grad))
    if a.float64:
        model.double()
    tok = Tok(a.model)
    nrec = sum(k.count("recurrent") for k in model.kinds)
    nstr = sum(k.count("streaming") for k in model.kinds)
    print(f"model: {a.model}: {len(model.layers)} layers, {nrec} recurrent + {nstr} streaming of "
          f"{sum(len(k) for k in model.kinds)} KV groups, tied embeddings: {model.tied}; loaded in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    if a.check_ppl:
        check_ppl(model, tok, a)
    if a.check_heldout:
        check_heldout(model, tok, a)
    if a.check_grad:
        check_grad(model, tok, a)
    if a.bench:
        rate = bench(model, tok, a)
        if a.ours:
            run_ours(a, rate)


if __name__ == "__main__":
    main()
