#!/usr/bin/env python3
"""Tiny random-weight checkpoints with golden logits, for the model runner's tests.

Writes tests/data/models/<name>/ (see tools/README.md for the exact format):
  config.json, generation_config.json, model.safetensors (F32), tokenizer.json, tokenizer_config.json,
  golden/ids.npy [T] int32, golden/logits.npy [T, vocab] float32, golden/residual.npy [L+1, T, d],
  golden/meta.json; for llama_gqa also model-f32.gguf and model-f16.gguf (llama.cpp layout).

Golden logits of the plain models come from transformers' own forward (fp32, eager attention) after
loading the written directory with from_pretrained. The RecurFormer checkpoint's come from the plain
float64 reference of spec section 3 written below (ref_forward), which is first checked against
transformers on the plain models. The files are committed; tests and CI never run this script:

    python3 tools/make_golden_models.py [--out tests/data/models]
"""
import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import save_file

SEED = 4321
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a")]
TEXT = "The theory: in winter, the other inner tree."


# ------------------------------------------------------------------------------------------------
# A byte-level BPE vocabulary: 256 byte tokens (GPT-2's byte-to-unicode alphabet), a few merges, and
# two control tokens. vocab_size = 256 + len(MERGES) + 2 = 264.
# ------------------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocabulary():
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + [a + b for a, b in MERGES] + [BOS, EOS]
    types = [1] * (256 + len(MERGES)) + [3, 3]  # llama.cpp token types: 1 normal, 3 control
    return tokens, types


def write_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    tokens, _ = vocabulary()
    vocab = {t: i for i, t in enumerate(tokens[:-2])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    bos = len(tokens) - 2
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "add_bos_token": True, "model_max_length": 2048}, f, indent=1)
        f.write("\n")


# ------------------------------------------------------------------------------------------------
# Random weights (HF names), scaled so activations and logits are O(1).
# ------------------------------------------------------------------------------------------------
def random_weights(c, gen, bias=False, tied=False):
    d, hd, nq, nkv, ff, V = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], \
        c["intermediate_size"], c["vocab_size"]
    lin = lambda o, i: torch.randn(o, i, generator=gen) / i ** 0.5
    norm = lambda n: 1 + 0.2 * torch.randn(n, generator=gen)
    sd = {"model.embed_tokens.weight": torch.randn(V, d, generator=gen)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = norm(d)
        sd[p + "self_attn.q_proj.weight"] = lin(nq * hd, d)
        sd[p + "self_attn.k_proj.weight"] = lin(nkv * hd, d)
        sd[p + "self_attn.v_proj.weight"] = lin(nkv * hd, d)
        if bias:
            for n, o in (("q", nq * hd), ("k", nkv * hd), ("v", nkv * hd)):
                sd[p + f"self_attn.{n}_proj.bias"] = 0.5 * torch.randn(o, generator=gen)
        sd[p + "self_attn.o_proj.weight"] = lin(d, nq * hd)
        sd[p + "post_attention_layernorm.weight"] = norm(d)
        sd[p + "mlp.gate_proj.weight"] = lin(ff, d)
        sd[p + "mlp.up_proj.weight"] = lin(ff, d)
        sd[p + "mlp.down_proj.weight"] = lin(d, ff)
    sd["model.norm.weight"] = norm(d)
    if not tied:
        sd["lm_head.weight"] = lin(V, d)
    return {k: v.float().contiguous() for k, v in sd.items()}


def random_recurrent(c, rf, gen):
    """Spec section 7 tensors for every recurrent group, random and non-trivial."""
    d, hd, N, r, K = c["hidden_size"], c["head_dim"], rf["d_state"], rf["dt_rank"], rf["conv_kernel"]
    sd = {}
    for l, layer in enumerate(rf["layers"]):
        for j in layer["recurrent"]:
            p = f"model.layers.{l}.self_attn.recurrent.{j}."
            sd[p + "dt_down.weight"] = torch.randn(r, d, generator=gen) / d ** 0.5
            sd[p + "dt_up.weight"] = torch.randn(hd, r, generator=gen) / r ** 0.5
            # dt around softplus^-1 of [1e-2, 0.5], plus a few > 20 (softplus(x) = x there): no, keep dt
            # moderate so exp(dt A) neither vanishes nor stays 1.
            sd[p + "dt_bias"] = torch.log(torch.expm1(torch.exp(torch.empty(hd).uniform_(-4.5, -0.7, generator=gen))))
            sd[p + "A_log"] = torch.log(torch.empty(hd, N).uniform_(0.2, 4.0, generator=gen))
            sd[p + "D"] = torch.randn(hd, generator=gen)
            sd[p + "conv1d.weight"] = 0.6 * torch.randn(hd, K, generator=gen)
            sd[p + "conv1d.bias"] = 0.2 * torch.randn(hd, generator=gen)
    return {k: v.float().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# The float64 reference forward: Llama / Qwen2 with any head layout (spec sections 3 and 7).
# ------------------------------------------------------------------------------------------------
def inv_freq64(c):
    hd, theta = c["head_dim"], c["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    s = c.get("rope_scaling")
    if s and s.get("rope_type") == "llama3":
        f, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wl = 2 * torch.pi / inv
        scaled = torch.where(wl > old / lo, inv / f, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wl >= old / hi) & (wl <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def ref_forward(c, sd, ids, rf=None, interleaved=False):
    """Returns (logits [T, V], residual stream [L+1, T, d]) in float64. interleaved: RoPE pairs
    (2i, 2i+1), for q/k rows in llama.cpp's GGUF order; otherwise rotate_half (HF order)."""
    W = {k: v.double() for k, v in sd.items()}
    d, hd, nq, nkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    g, eps, T = nq // nkv, c["rms_norm_eps"], len(ids)
    pos = torch.arange(T, dtype=torch.float64)
    ang = pos[:, None] * inv_freq64(c)[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)  # [T, hd/2]

    def rope(x):  # [T, H, hd]
        if interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1).flatten(-2)
        a, b = x[..., : hd // 2], x[..., hd // 2:]  # rotate_half pairs (i, i + hd/2)
        return torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def softplus(x):
        return torch.where(x > 20, x, torch.log1p(torch.exp(x)))

    i_idx, j_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    residual = [x.clone()]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, W[p + "input_layernorm.weight"])
        proj = lambda n: h @ W[p + f"self_attn.{n}_proj.weight"].T + W.get(p + f"self_attn.{n}_proj.bias", 0)
        q, k, v = proj("q").view(T, nq, hd), proj("k").view(T, nkv, hd), proj("v").view(T, nkv, hd)
        qr, kr = rope(q), rope(k)
        layer = rf["layers"][l] if rf else {"recurrent": [], "streaming": []}
        out = torch.zeros(T, nq, hd, dtype=torch.float64)
        for grp in range(nkv):
            heads = range(grp * g, (grp + 1) * g)
            if grp in layer["recurrent"]:
                rp = p + f"self_attn.recurrent.{grp}."
                Kc = rf["conv_kernel"]
                cw, cb = W[rp + "conv1d.weight"], W[rp + "conv1d.bias"]
                vp = torch.cat([torch.zeros(Kc - 1, hd, dtype=torch.float64), v[:, grp]])
                u = torch.stack([cb + (vp[t:t + Kc].T * cw).sum(-1) for t in range(T)])  # [T, hd]
                dt = softplus((h @ W[rp + "dt_down.weight"].T) @ W[rp + "dt_up.weight"].T + W[rp + "dt_bias"])
                A = -torch.exp(W[rp + "A_log"])  # [hd, N]
                state = torch.zeros(hd, rf["d_state"], dtype=torch.float64)
                for t in range(T):
                    state = torch.exp(dt[t][:, None] * A) * state + dt[t][:, None] * k[t, grp][None, :] * u[t][:, None]
                    for qh in heads:
                        out[t, qh] = state @ (q[t, qh] / hd ** 0.5) + W[rp + "D"] * u[t]
            else:
                mask = j_idx <= i_idx
                if grp in layer["streaming"]:
                    s = rf["streaming"]
                    mask = mask & ((j_idx < s["sink"]) | (j_idx > i_idx - s["window"]))
                for qh in heads:
                    logit = (qr[:, qh] @ kr[:, grp].T) / hd ** 0.5
                    logit = logit.masked_fill(~mask, float("-inf"))
                    out[:, qh] = torch.softmax(logit, -1) @ v[:, grp]
        x = x + out.reshape(T, nq * hd) @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        gate, up = h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
        residual.append(x.clone())
    x = rms(x, W["model.norm.weight"])
    head = W["lm_head.weight"] if "lm_head.weight" in W else W["model.embed_tokens.weight"]
    return x @ head.T, torch.stack(residual)


# ------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's layout: convert_hf_to_gguf's names, its q/k row permutation for interleaved RoPE)
# ------------------------------------------------------------------------------------------------
def permute_for_gguf(w, n_head):
    """HF rotate_half rows -> llama.cpp's interleaved rows, per head (as convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, c, sd, f16):
    nq, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(os.path.basename(os.path.dirname(path)))
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(nq)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    tokens, types = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_add_bos_token(True)

    def put(name, t, permute_heads=None):
        a = t.numpy()
        if permute_heads:
            a = permute_for_gguf(a, permute_heads)
        a = np.ascontiguousarray(a.astype(np.float16 if (f16 and a.ndim == 2) else np.float32))
        w.add_tensor(name, a)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for l in range(c["num_hidden_layers"]):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(b + "attn_q.weight", sd[p + "self_attn.q_proj.weight"], nq)
        put(b + "attn_k.weight", sd[p + "self_attn.k_proj.weight"], nkv)
        put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd:
        put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def read_gguf_as_hf(path):
    """The GGUF's tensors under HF names, rows as stored (q/k in interleaved order), as float32."""
    sd = {}
    for t in gguf.GGUFReader(path).tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        else:
            name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        shape = [int(n) for n in reversed(t.shape)]
        sd[name] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    return sd


# ------------------------------------------------------------------------------------------------
def base_config(arch, layers, n_q, n_kv, tied, vocab):
    c = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": layers,
        "num_attention_heads": n_q, "num_key_value_heads": n_kv, "head_dim": 64,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": tied,
        "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "torch_dtype": "float32",
    }
    if arch == "llama":
        c.update({"attention_bias": False, "mlp_bias": False, "rope_scaling": None})
    else:
        c.update({"use_sliding_window": False, "sliding_window": None})
    return c


def write_model(root, name, c, sd, ids, description, rf=None, gguf_copies=False, weights_from=None):
    d = os.path.join(root, name)
    if os.path.isdir(d) or os.path.islink(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "golden"))
    cfg = dict(c)
    if rf:
        cfg["recurformer"] = rf
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"], "do_sample": False}, f, indent=1)
        f.write("\n")
    if weights_from:  # same tensors as another model: a relative link keeps the repository small
        os.symlink(os.path.join("..", weights_from, "model.safetensors"), os.path.join(d, "model.safetensors"))
    else:
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(d)

    ref_logits, residual = ref_forward(c, sd, ids, rf)
    meta = {"model": name, "description": description, "generator": "tools/make_golden_models.py",
            "seed": SEED, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                       "gguf": getattr(gguf, "__version__", "?"), "numpy": np.__version__},
            "tokens": len(ids), "positions": f"0..{len(ids) - 1}", "text": TEXT}
    if rf is None:
        # transformers' own forward on the directory as written (config.json + model.safetensors).
        model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert err < 2e-6, f"{name}: float64 reference and transformers differ by {err} (relative to max)"
        meta["logits_source"] = f"transformers {model.__class__.__name__} forward, fp32, eager attention"
        meta["reference_check"] = {"max_abs_diff_fp64_reference_vs_transformers_over_max_abs": err}
        if gguf_copies:
            write_gguf(os.path.join(d, "model-f32.gguf"), c, sd, f16=False)
            write_gguf(os.path.join(d, "model-f16.gguf"), c, sd, f16=True)
            # Read back, run the reference with interleaved RoPE on the rows as stored: the permutation
            # is what makes llama.cpp's layout give the same model.
            gg = {}
            for fname in ("model-f32.gguf", "model-f16.gguf"):
                gl, _ = ref_forward(c, read_gguf_as_hf(os.path.join(d, fname)), ids, interleaved=True)
                gg[fname] = ((gl - logits).abs().max() / logits.abs().max()).item()
            assert gg["model-f32.gguf"] < 2e-6, gg
            meta["gguf_check"] = {"max_abs_diff_vs_golden_over_max_abs (float64 reference, interleaved RoPE, "
                                  "rows as stored)": gg}
            meta["gguf"] = {
                "model-f32.gguf": "all tensors F32; logits as golden/logits.npy",
                "model-f16.gguf": "2-D tensors F16 (1-D norms F32): logits differ from golden/logits.npy by "
                                  "the F16 rounding of the weights (see tolerance.f16_gguf)",
                "q_k_rows": "attn_q / attn_k rows permuted as convert_hf_to_gguf.py does (interleaved RoPE "
                            "order); un-permute to use rotate_half, or use the interleaved layout as is",
            }
    else:
        logits = ref_logits
        meta["logits_source"] = "float64 reference forward of spec sections 3 and 7 (ref_forward in the tool)"
    mx = logits.abs().max().item()
    meta["max_abs_logit"] = mx
    meta["tolerance"] = {"rel": 1e-5, "abs": 1e-5 * mx,
                         "why": "an fp32 forward (another summation order, fp32 exp/softmax/scan) against this "
                                "reference; the library's LlamaModel measured 5e-7 * max|logit| on every "
                                "fixture, prefill, chunked prefill and decode alike: 20x margin"}
    if gguf_copies:
        meta["tolerance"]["f16_gguf"] = {"rel": 0, "abs": 3e-3 * mx,
                                         "why": "weights rounded to F16 (2^-11 relative) through 2 layers: "
                                                "measured 7e-4 * max|logit| (float64 reference and LlamaModel)"}
    np.save(os.path.join(d, "golden", "ids.npy"), np.asarray(ids, dtype="<i4"))
    np.save(os.path.join(d, "golden", "logits.npy"), np.ascontiguousarray(logits.numpy().astype("<f4")))
    np.save(os.path.join(d, "golden", "residual.npy"), np.ascontiguousarray(residual.numpy().astype("<f4")))
    meta["arrays"] = {"ids": ["<i4", [len(ids)]], "logits": ["<f4", list(logits.shape)],
                      "residual": ["<f4", list(residual.shape)]}
    with open(os.path.join(d, "golden", "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    return logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "models"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    vocab = 256 + len(MERGES) + 2

    # The token ids: the tokenizer written beside each model, on a fixed text (BOS first).
    tmp = os.path.join(args.out, ".tok")
    os.makedirs(tmp, exist_ok=True)
    write_tokenizer(tmp)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    ids = tok(TEXT)["input_ids"]
    shutil.rmtree(tmp)
    assert ids[0] == vocab - 2 and all(0 <= i < vocab for i in ids), ids
    assert any(i >= 256 for i in ids[1:]), "the text should use some merges"

    # 1. Llama, GQA (2 query heads per KV head), untied head; plus its GGUF copies.
    c = base_config("llama", 2, 2, 1, False, vocab)
    sd = random_weights(c, gen)
    write_model(args.out, "llama_gqa", c, sd, ids, "Llama, 2 layers, GQA 2/1, head_dim 64, untied lm_head",
                gguf_copies=True)
    # 2. The same weights with Llama 3.1 rope scaling and theta 500000 (config and logits differ only).
    c3 = dict(c, rope_theta=500000.0, max_position_embeddings=131072,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    write_model(args.out, "llama3_rope", c3, sd, ids, "llama_gqa's weights (linked) with rope_theta 500000 "
                "and rope_scaling llama3 (factor 8, low 1, high 4, original 8192)", weights_from="llama_gqa")
    # 3. SmolLM-like: tied embeddings (no lm_head.weight), 1 layer.
    c = base_config("llama", 1, 2, 1, True, vocab)
    write_model(args.out, "llama_tied", c, random_weights(c, gen, tied=True), ids,
                "Llama, 1 layer, GQA 2/1, tie_word_embeddings (no lm_head.weight), SmolLM-like")
    # 4. Qwen2: q/k/v biases, 1 layer.
    c = base_config("qwen2", 1, 2, 1, False, vocab)
    write_model(args.out, "qwen2_bias", c, random_weights(c, gen, bias=True), ids,
                "Qwen2, 1 layer, GQA 2/1, q/k/v biases, untied lm_head")
    # 5. RecurFormer: 2 layers of 2 KV groups (4 query heads), every kind present.
    c = base_config("llama", 2, 4, 2, True, vocab)
    rf = {"version": 1, "d_state": 64, "dt_rank": 8, "conv_kernel": 4, "recency_window": 16,
          "streaming": {"sink": 2, "window": 5},
          "layers": [{"recurrent": [1], "streaming": []}, {"recurrent": [0], "streaming": [1]}],
          "recency_scores": [[0.25, 0.875], [0.75, 0.5]]}
    assert len(ids) > rf["streaming"]["sink"] + rf["streaming"]["window"] + 4
    sd = random_weights(c, gen, tied=True)
    sd.update(random_recurrent(c, rf, gen))
    write_model(args.out, "recurformer_mixed", c, sd, ids,
                "RecurFormer checkpoint: Llama 2 layers, GQA 4/2, tied; layer 0 = [attention, recurrent], "
                "layer 1 = [recurrent, streaming(sink 2, window 5)]", rf=rf)
    print("wrote", os.path.abspath(args.out), "ids", len(ids))


if __name__ == "__main__":
    main()
