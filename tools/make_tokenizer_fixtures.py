#!/usr/bin/env python3
"""Builds the tokenizer test fixtures under tests/data/tokenizers/ with HF `tokenizers` only.

Small tokenizers trained here on a few KB of varied text, with the same pipeline JSON as the real
ones (no downloads):
  llama3_bpe   byte-level BPE, Llama 3 Split regex + ByteLevel(use_regex=false), ignore_merges,
               <|begin_of_text|> template, merges saved as "a b" strings
  qwen2_bpe    byte-level BPE, Qwen2 regex, NFC normalizer, merges as ["a", "b"] pairs, no BOS
  smollm_bpe   byte-level BPE, Digits(individual) + ByteLevel(use_regex=true), an lstrip/rstrip token
  gpt2_prefix_bpe  byte-level BPE, ByteLevel(add_prefix_space=true) alone, a non-special added token
  llama2_spm   SentencePiece-style BPE as Llama 2's tokenizer.json: Prepend/Replace normalizer,
               byte_fallback (<0x00>..<0xFF> at ids 3..258), fuse_unk, Replace/ByteFallback/Fuse/Strip
               decoder, merges derived from the vocabulary order as transformers' SentencePiece
               converter does (so llama.cpp's score-ordered merging gives the same ids)
  metaspace_spm  llama2_spm's model with the legacy=false pipeline (Metaspace prepend_scheme "first")
For each: tokenizer.json, tokenizer_config.json and expected.json (HF ids with and without special
tokens, and HF decodes, for the hard strings below).

It also writes src/model/detail/tokenizer_nfc_tables.hpp, the Unicode tables of the
NFC normalizer (canonical combining classes, full canonical decompositions, primary composites),
from Python's unicodedata.

Run from the repository root: python3 tools/make_tokenizer_fixtures.py
"""
import json
import os
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "tokenizers")

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a well-known pangram; we've used it before.",
    "I'm sure they'll say she'd have done it, but you're wrong: THEY'RE RIGHT and IT'S TRUE.",
    "Numbers: 0 1 2 3 42 123 2024 31415926535 1,000,000.00 and 3.14159 or 2.71828; phone 555-0199.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product\n\treturn sum;\r\n",
    "Le café est très bon à Paris. Ça coûte cher, n'est-ce pas? Élève, garçon, naïve, résumé.",
    "Die Straße ist schön und grün. Über alles! Größe, Mädchen, Fußball.",
    "Привет, как дела? Это тест русского языка. Москва и Санкт-Петербург.",
    "Γειά σου κόσμε. Η γλώσσα είναι ελληνική.",
    "你好，世界！这是一个测试。我们正在学习机器学习和自然语言处理。",
    "日本語のテキストです。カタカナとひらがなと漢字。東京は大きい都市です。",
    "한국어 텍스트입니다. 안녕하세요.",
    "مرحبا بالعالم. هذه جملة عربية.",
    "Emoji time 😀 😂 👍 🎉 ❤️ and a family 👨‍👩‍👧‍👦 and flags 🇫🇷 🇯🇵.",
    "    indented line\n        more indented\n\n\nthree newlines above\t\ttabs\n",
    "Recurrent models like Mamba use a selective scan instead of attention over a KV cache.",
    "The Llama family of models uses rotary position embeddings and grouped query attention.",
    "https://example.com/path/to/page?query=value&other=123#anchor user@example.org",
    "<html><body><p class=\"x\">Hello &amp; goodbye</p></body></html>",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
] * 3

HARD_STRINGS = [
    "",
    " ",
    "Hello, world!",
    "hello world",
    "   leading spaces",
    "trailing spaces   ",
    "\t\ttabs\tand\nnewlines\r\nCRLF line\r\n\r\n",
    "    \n\n\n    \n",
    "I'M HERE, YOU'RE THERE, IT'S FINE, WE'VE GOT IT, THEY'LL COME, HE'D GO",
    "don't can't won't shan't y'all 'tis",
    "1 12 123 1234 12345 1234567890123 3.14159 1,000,000 007",
    "naïve café résumé Ångström",
    "e\u0301 a\u0308 o\u0303 combining marks n\u0303",
    "Привет мир, как дела?",
    "Γειά σου κόσμε",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "mixed English и русский and 中文 together 123",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷",
    "🤖🤖🤖🤖🤖",
    "zero\u200bwidth\u200djoiner\u00a0nbsp\u3000ideographic space",
    "<|begin_of_text|>Hello<|eot_id|>",
    "<s>inside</s> text <unk>",
    "special <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "a <mask> b<mask>c  <mask>  d",
    "say <user tag> twice<user tag>",
    "\\xff\\xfe invalid-looking \ufffd replacement \\u0000",
    "<0xFF> <0x41> literal byte token text <0x",
    "def f(x):\n    return x**2  # comment\n",
    "https://example.com/path?q=1&r=2",
    "\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5 \U0001d400\U0001d401 \U00010348 math and gothic",
    "x" * 120,
    "The quick brown fox jumps over the lazy dog.",
]


def template(bos, bos_id):
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def write(name, tok, config, merges_as_strings=False):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "tokenizer.json")
    tok.save(path)
    data = json.load(open(path, encoding="utf-8"))
    if merges_as_strings:
        data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    tok = Tokenizer.from_file(path)  # expectations from the file as saved
    cases = []
    for s in HARD_STRINGS:
        with_special = tok.encode(s).ids
        cases.append({
            "text": s,
            "ids": with_special,
            "ids_no_special": tok.encode(s, add_special_tokens=False).ids,
            "decode": tok.decode(with_special, skip_special_tokens=False),
            "decode_skip_special": tok.decode(with_special, skip_special_tokens=True),
            "nfc_changes": unicodedata.normalize("NFC", s) != s,
        })
    with open(os.path.join(d, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer": name, "cases": cases}, f, ensure_ascii=False, indent=0)


def train_byte_level(pre, normalizer=None, ignore_merges=False, vocab_size=700):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama3():
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok = train_byte_level(pre, ignore_merges=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template("<|begin_of_text|>", bos_id)])
    write("llama3_bpe", tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                              "tokenizer_class": "PreTrainedTokenizerFast"}, merges_as_strings=True)


def qwen2():
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok = train_byte_level(pre, normalizer=normalizers.NFC())
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    write("qwen2_bpe", tok, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                             "tokenizer_class": "Qwen2Tokenizer"})


def smollm():
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok = train_byte_level(pre)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, rstrip=True, normalized=False)])
    write("smollm_bpe", tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                              "tokenizer_class": "GPT2Tokenizer"})


def gpt2_prefix():
    pre = pre_tokenizers.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok = train_byte_level(pre)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<user tag>", special=False, normalized=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    write("gpt2_prefix_bpe", tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                   "tokenizer_class": "GPT2Tokenizer"})


def llama2():
    # Train with a Metaspace pre-tokenizer so tokens stay within words, as SentencePiece's do; the
    # saved pipeline is Llama 2's (normalizer + no pre-tokenizer).
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=90,
                                  show_progress=False)
    t.train_from_iterator(CORPUS, trainer)
    trained = sorted(t.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for tok_str, _ in trained:
        if tok_str not in vocab:
            vocab[tok_str] = len(vocab)
    # Merges as transformers' SentencePiece converter derives them: every split of a piece into two
    # vocabulary pieces, ordered by the merged piece's rank (its id here), then by the parts' ids.
    merges = []
    for piece, pid in vocab.items():
        if pid < 259 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((pid, vocab[a], vocab[b], a, b))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab, [(a, b) for _, _, _, a, b in merges], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ["<unk>", "<s>", "</s>"]])
    tok.post_processor = template("<s>", 1)
    write("llama2_spm", tok, {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                              "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"})


def nfc_tables():
    ccc, decomp, data, pairs = [], [], [], []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        if unicodedata.combining(c):
            ccc.append((cp, unicodedata.combining(c)))
        if 0xAC00 <= cp <= 0xD7A3:
            continue  # Hangul syllables: algorithmic
        d = unicodedata.normalize("NFD", c)
        if d != c:
            decomp.append((cp, len(data), len(d)))
            data.extend(ord(x) for x in d)
        raw = unicodedata.decomposition(c)
        if raw and not raw.startswith("<"):
            parts = [int(x, 16) for x in raw.split()]
            if len(parts) == 2 and unicodedata.normalize("NFC", chr(parts[0]) + chr(parts[1])) == c:
                pairs.append((parts[0], parts[1], cp))
    pairs.sort()

    def rows(items, per_line):
        lines = []
        for i in range(0, len(items), per_line):
            lines.append("    " + " ".join(items[i:i + per_line]))
        return "\n".join(lines)

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "model", "detail",
                        "tokenizer_nfc_tables.hpp")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""// src/model/detail/tokenizer_nfc_tables.hpp: Unicode {unicodedata.unidata_version} tables for the NFC
// normalizer, generated by tools/make_tokenizer_fixtures.py from Python's unicodedata. Do not edit.
// Sorted by code point (pairs by first, second) for binary search; Hangul syllables are algorithmic.
#pragma once

#include <cstdint>

namespace recurformer {{
namespace detail {{
namespace tok {{
namespace nfc {{

struct Ccc {{ uint32_t cp; uint8_t ccc; }};
struct Decomp {{ uint32_t cp; uint16_t offset; uint8_t len; }};
struct Pair {{ uint32_t first, second, composite; }};

inline constexpr Ccc kCcc[] = {{
{rows([f"{{0x{cp:X},{v}}}," for cp, v in ccc], 8)}
}};
inline constexpr Decomp kDecomp[] = {{
{rows([f"{{0x{cp:X},{o},{n}}}," for cp, o, n in decomp], 6)}
}};
inline constexpr uint32_t kDecompData[] = {{
{rows([f"0x{x:X}," for x in data], 12)}
}};
inline constexpr Pair kPairs[] = {{
{rows([f"{{0x{a:X},0x{b:X},0x{c:X}}}," for a, b, c in pairs], 5)}
}};

}}  // namespace nfc
}}  // namespace tok
}}  // namespace detail
}}  // namespace recurformer
""")


def nfc_cases():
    """Inputs and their NFC for the normalizer's unit test: hand-picked hard cases + random mixes of
    bases, combining marks (out of canonical order), Hangul jamo, singletons and exclusions."""
    import random
    rng = random.Random(1234)
    hand = ["e\u0301", "A\u030A\u0301", "\u212B \u2126 \u0958 \u2ADC", "a\u0323\u0302 a\u0302\u0323",
            "\u1100\u1161\u11A8 \u1100\u1161 \uAC00\u11A8", "Vie\u0323\u0302t Nam", "o\u0308\u0304 \u01D5\u0301",
            "\u0041\u0327\u0301\u0300", "x\u0301\u0316\u0301", "\u0F71\u0F72\u0F74 \u0F73", "\U0001D15E\U0001D165",
            "plain ascii", "caf\u00E9", "\u3099\u304B\u3099", "\u0300abc"]
    pool = ([chr(c) for c in range(0x41, 0x5B)] + [chr(c) for c in range(0x300, 0x370)] +
            [chr(c) for c in range(0x1100, 0x1113)] + [chr(c) for c in range(0x1161, 0x1176)] +
            [chr(c) for c in range(0x11A8, 0x11C3)] + ["\u212B", "\u2126", "\u0958", "\u00C5", "\u01D5", "\uAC00",
                                                        "\u0591", "\u05B0", "\u0F71", "\u0F72", "\u3099", "\u304B"])
    rand = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(400)]
    cases = [{"in": x, "nfc": unicodedata.normalize("NFC", x)} for x in hand + rand]
    with open(os.path.join(OUT, "nfc.json"), "w", encoding="utf-8") as f:
        json.dump({"unicode": unicodedata.unidata_version, "cases": cases}, f, ensure_ascii=False, indent=0)


def metaspace_spm():
    """The Llama 2 fixture's model with the newer (legacy=false) pipeline: no normalizer, a Metaspace
    pre-tokenizer that prepends '\u2581' to the first piece only, and a Metaspace decoder."""
    src = Tokenizer.from_file(os.path.join(OUT, "llama2_spm", "tokenizer.json"))
    src.normalizer = None
    src.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    src.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    write("metaspace_spm", src, {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                                 "unk_token": "<unk>", "legacy": False, "tokenizer_class": "LlamaTokenizer"})


def added_strip_cases():
    """lstrip / rstrip of smollm_bpe's <mask> over Unicode white space, from the committed tokenizer."""
    tok = Tokenizer.from_file(os.path.join(OUT, "smollm_bpe", "tokenizer.json"))
    texts = ["a\u3000<mask>\u00a0b", "x \u2003\t<mask>\n\u3000 y", "<mask>\u2028z", "q\u00a0\u00a0<mask><mask> r",
             "\u3000<mask>", "w<mask>\u200bv"]
    cases = [{"text": t, "ids": tok.encode(t).ids} for t in texts]
    with open(os.path.join(OUT, "smollm_bpe", "added_strip.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False, indent=0)


if __name__ == "__main__":
    nfc_tables()
    nfc_cases()
    llama3()
    qwen2()
    smollm()
    added_strip_cases()
    gpt2_prefix()
    llama2()
    metaspace_spm()
