"""The fixture directories the golden-gradient generators write (tools/make_golden_grads_*.py).

One directory per case: .npy arrays (float32 '<f4' / int32 '<i4', C order) and meta.json (the case,
how it was generated, seed, library versions, the tolerance the C++ test applies, each array's
dtype and shape). Needs only torch and numpy.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch

# What the tests check: |got - want| <= rel * |want| + abs_of_max * max|want| per array.
TOLERANCE = {"rel": 1e-5, "abs_of_max": 2e-6,
             "why": "fp32 against fp32 with another summation order; the floor covers elements that "
                    "cancel to near zero"}


def versions():
    return {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}


class Case:
    """One fixture directory: .npy files plus meta.json, written by `generator` with `seed`."""

    def __init__(self, root, name, description, generator, seed, tolerance=TOLERANCE):
        self.dir = os.path.join(root, name)
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.meta = {"case": name, "description": description, "generator": generator, "seed": seed,
                     "versions": versions(), "tolerance": tolerance, "arrays": {}}

    def save(self, name, a):
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        a = a.astype("<i4") if a.dtype.kind in "iu" else a.astype("<f4")
        a = np.ascontiguousarray(a)
        np.save(os.path.join(self.dir, name + ".npy"), a, allow_pickle=False)
        self.meta["arrays"][name] = {"dtype": a.dtype.str, "shape": list(a.shape)}

    def finish(self, **fields):
        self.meta.update(fields)
        with open(os.path.join(self.dir, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1, sort_keys=True)
            f.write("\n")
