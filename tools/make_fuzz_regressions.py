#!/usr/bin/env python3
"""Writes fuzz/regressions/<target>/*: the inputs that once crashed a parser or made it misbehave
(issue 12's list, reduced to small files), replayed by ctest as <target>_replay (fuzz/replay_main.cpp).

Each file is in its fuzz target's input format (see the top comment of fuzz/<target>.cpp). The names
say what each once did. Deterministic: rerunning rewrites the same bytes. Usage:
    python3 tools/make_fuzz_regressions.py [OUT_DIR (default fuzz/regressions)]
Add an input here (not by hand) when a fuzzer or a probe finds a new bug, before fixing it.
"""
import json
import os
import struct
import sys

TINY_CONFIG = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 12,
               "rms_norm_eps": 1e-5}


def config_with(extra: str) -> bytes:
    """The tiny config with raw JSON text `extra` appended as more members."""
    return (json.dumps(TINY_CONFIG)[:-1] + ", " + extra + "}").encode()


def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_file(n_tensors: int, kvs: list) -> bytes:
    """Byte 0 odd: the gguf fuzzer takes the rest as the whole file."""
    out = b"\x01GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    for key, value in kvs:
        out += gguf_str(key) + value
    return out


def u32(v):  # GGUF value type 4
    return struct.pack("<II", 4, v)


def string(v):  # GGUF value type 8
    return struct.pack("<I", 8) + gguf_str(v)


def safetensors_header(header: str) -> bytes:
    """Byte 0 even: the safetensors fuzzer wraps the rest as the JSON header."""
    return b"\x00" + header.encode()


CASES = {
    "config_fuzz": {
        # 10^5 nested lists overflowed the stack in nlohmann's dump() on the error path (SIGSEGV)
        "deep_nesting_in_error_path.json": config_with('"bos_token_id": ' + "[" * 5000 + "]" * 5000),
        # a float far outside int64 cast to int64: undefined behaviour (UBSan)
        "float_to_int64_cast.json": config_with('"bos_token_id": 2.6e75'),
        # nlohmann keeps the last of two keys silently: one config ran with 1 of its 2 layers
        "duplicate_key.json": config_with('"num_hidden_layers": 2'),
        # finite as a double, infinite as the float the model keeps
        "rope_theta_infinite_as_float.json": config_with('"rope_theta": 1e39'),
        # a long value was quoted whole in the one-line error
        "long_value_in_error.json": config_with('"hidden_act": "' + "x" * 100000 + '"'),
    },
    "safetensors_fuzz": {
        "deep_nesting_in_shape.bin": safetensors_header(
            '{"w": {"dtype": "F32", "shape": ' + "[" * 5000 + "]" * 5000 + ', "data_offsets": [0, 4]}}'),
        "float_to_int64_cast_in_shape.bin": safetensors_header(
            '{"w": {"dtype": "F32", "shape": [2.6e75], "data_offsets": [0, 4]}}'),
        "shape_product_overflows.bin": safetensors_header(
            '{"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 4]}}'),
        "header_length_lies.bin": b"\x01" + struct.pack("<Q", 1 << 62) + b"{}",
    },
    "gguf_fuzz": {
        "arrays_nested_too_deep.gguf": gguf_file(0, [("k", struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6)]),
        "array_count_lies.gguf": gguf_file(0, [("k", struct.pack("<IIQ", 9, 8, 1 << 61))]),
        "key_twice.gguf": gguf_file(0, [("k", u32(1)), ("k", u32(1))]),
        # block_count = 10^9 with no tensors: once 16.9 GB of per-layer structures before any check
        "block_count_lies.gguf": gguf_file(0, [("general.architecture", string("llama")),
                                               ("llama.block_count", u32(1000000000)),
                                               ("llama.embedding_length", u32(8)),
                                               ("llama.attention.head_count", u32(2)),
                                               ("llama.feed_forward_length", u32(12)),
                                               ("llama.context_length", u32(64))]),
    },
    "tokenizer_fuzz": {
        "vocab_id_twice.json": b'{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 0}, "merges": []}}',
        "deep_nesting.json": b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "invalid_utf8_text.json": b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}\x00ok \xff bad',
    },
}


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fuzz", "regressions")
    for target, files in CASES.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(files)} inputs -> {d}")


if __name__ == "__main__":
    main()
