"""Shuffled functions: a parent set's codes with their rows permuted across images, the no-signal control.

Row r of the shuffled file holds the parent's row π(r), π a seeded permutation drawn per split (the seed and the
split name seed it, so training and evaluation splits are permuted independently). Every function keeps its values,
sparsity, statistics and co-activations; only the tie between a value and its image is broken, so a meta-learner
trained on these can learn nothing that transfers to images (docs/demo.md). Ids stay in the parent's order: the
file is aligned with the same feature file as its parent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np

from metalign.functions.codes import ARRAYS, read_codes, write_functions
from metalign.io import atomic_path, library_versions, read_attrs, set_attrs

ROW_ARRAYS = ("indices", "values", "targets")  # one row per image; the `columns/` arrays are per function


def permutation(n: int, seed: int, split: str) -> np.ndarray:
    """The seeded row permutation of one split (a stable hash of the split name, not Python's salted hash)."""
    salt = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, salt]).permutation(n)


def write_shuffled(parent: str | os.PathLike, out: str | os.PathLike, seed: int, split: str) -> np.ndarray:
    """Write `parent`'s codes with permuted rows to `out` (atomic); returns the permutation."""
    parent, out = Path(parent), Path(out)
    codes = read_codes(parent)
    order = permutation(codes.n_rows, seed, split)
    with h5py.File(parent, "r") as source:
        attrs = read_attrs(source)
        with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
            handle.create_dataset("ids", data=source["ids"][:])
            for name in ARRAYS[codes.kind]:
                data = source[name][:]
                handle.create_dataset(name, data=data[order] if name in ROW_ARRAYS else data)
            write_functions(handle, codes.latent_id, codes.nnz, codes.mean, codes.std)
            set_attrs(handle, {**attrs, "parent": str(parent), "library_versions": library_versions(),
                               "shuffle": {"method": "shuffle", "seed": int(seed), "split": split}})
    return order
