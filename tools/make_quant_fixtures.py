#!/usr/bin/env python3
"""Writes tests/data/quant/blocks.gguf: one small tensor of every quantised GGUF type the library
reads, and beside each its dequantisation by the `gguf` package (gguf.quants.dequantize), as F32.

tests/quant_test.cpp reads the file with the library's GGUF reader and checks that the library's
block decoders give the same floats bit for bit. Never run by the tests or CI; rerun only to change
the fixture (needs `pip install gguf numpy`), then commit this script and its output together.

The block bytes are random (every bit pattern of the packed weights and scales occurs), except the
fp16 scale fields, which are set to finite values of both signs and of very different magnitudes
(subnormals included), so no block decodes to inf or NaN.
"""
import importlib.metadata
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

# type -> byte offsets of its fp16 fields within a block (ggml's block layouts)
HALF_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    Q.IQ4_NL: [0], Q.IQ4_XS: [0],
}
ROWS, COLS = 3, 512  # two 256-weight blocks or sixteen 32-weight blocks per row


def main() -> None:
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "quant")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20261203)
    w = gguf.GGUFWriter(os.path.join(out_dir, "blocks.gguf"), arch="quant-fixtures")
    meta = {"script": "tools/make_quant_fixtures.py", "gguf": importlib.metadata.version("gguf"),
            "numpy": np.__version__, "rows": ROWS, "cols": COLS, "types": []}
    for qtype, halves in HALF_FIELDS.items():
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = ROWS * COLS // block
        raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
        for off in halves:
            mag = 10.0 ** rng.uniform(-7, 0, size=n_blocks)  # 1e-7 is a subnormal fp16
            val = (mag * rng.choice([-1.0, 1.0], size=n_blocks)).astype(np.float16)
            raw[:, off:off + 2] = val.view(np.uint8).reshape(n_blocks, 2)
        raw = raw.reshape(ROWS, COLS // block * nbytes)
        want = dequantize(raw, qtype).astype(np.float32)
        assert want.shape == (ROWS, COLS) and np.isfinite(want).all()
        w.add_tensor(qtype.name, raw, raw_dtype=qtype)
        w.add_tensor(qtype.name + ".expected", want)
        meta["types"].append(qtype.name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print("wrote", out_dir, file=sys.stderr)


if __name__ == "__main__":
    main()
