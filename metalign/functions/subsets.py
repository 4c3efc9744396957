"""Function subsets: a fraction of a parent set's kept functions, drawn at random or by pairwise similarity.

Similarity of two functions j, l = Pearson correlation of their activation vectors over the rows of the parent's
(training) file, zeros included: sparse codes a_j (never densified: the Gram matrix AᵀA is accumulated from a sparse
matrix in column blocks), neurons x_j (the correlation ignores the median shift).

Selection at a similarity level (greedy backward elimination, deterministic, ties to the lower index): start from all
F functions and, until round(fraction·F) remain, remove the function whose removal makes the subset's mean pairwise
similarity lowest (`high`: remove the least similar, i.e. raise the mean), lowest (`low`: remove the most similar),
or closest to the full set's mean (`medium`). A random subset is `fraction·F` functions drawn without replacement
from a generator seeded with `seed`.

A subset file holds only its own `functions/` group plus HDF5 external links (relative paths) to the parent's arrays:
the codes are never rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
from scipy import sparse

from metalign.config.functions import LEVELS
from metalign.functions.codes import ARRAYS, Codes, read_codes, write_functions
from metalign.io import DataContractError, atomic_path, library_versions, read_attrs, set_attrs

SIMILARITY = "Pearson correlation of activation vectors over the parent file's rows (zeros included)"


def activation_matrix(codes: Codes) -> sparse.csc_matrix | np.ndarray:
    """(N, F) activations of the kept functions: sparse CSC for SAE codes, a dense array for neurons."""
    if codes.kind == "neurons":
        return codes.dense_targets()[0].astype(np.float64)
    columns = codes.kept_columns()
    hit = columns >= 0
    rows = np.broadcast_to(np.arange(codes.n_rows)[:, None], columns.shape)[hit]
    return sparse.csc_matrix((codes.values[hit].astype(np.float64), (rows, columns[hit])),
                             shape=(codes.n_rows, codes.n_functions))


def similarity_matrix(codes: Codes, block: int = 1024) -> np.ndarray:
    """(F, F) float32 Pearson correlations of the kept functions (diagonal 1; constant functions correlate 0)."""
    A = activation_matrix(codes)
    n, f = A.shape
    if sparse.issparse(A):
        mean = np.asarray(A.sum(axis=0)).ravel() / n
        gram = np.empty((f, f), dtype=np.float64)
        At = A.T.tocsr()
        for start in range(0, f, block):
            gram[:, start:start + block] = (At @ A[:, start:start + block]).toarray()
    else:
        mean = A.mean(axis=0)
        gram = A.T @ A
    gram /= n
    gram -= mean[:, None] * mean[None, :]  # covariance, in place: F² doubles are the largest array here
    scale = np.sqrt(np.clip(np.diag(gram), 0, None))
    scale[scale == 0] = np.inf  # a constant function correlates 0 with everything
    gram /= scale[:, None]
    gram /= scale[None, :]
    np.fill_diagonal(gram, 1.0)
    return np.clip(gram, -1.0, 1.0).astype(np.float32)


def mean_pairwise(similarity: np.ndarray, positions: np.ndarray | None = None) -> float:
    """Mean of the off-diagonal similarities among `positions` (default: all)."""
    sub = similarity if positions is None else similarity[np.ix_(positions, positions)]
    n = len(sub)
    if n < 2:
        return float("nan")
    return float((sub.sum(dtype=np.float64) - np.trace(sub, dtype=np.float64)) / (n * (n - 1)))


def n_kept(n: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, int(round(fraction * n)))


def random_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Ascending positions of round(fraction·n) of n functions, drawn without replacement."""
    return np.sort(np.random.default_rng(seed).choice(n, n_kept(n, fraction), replace=False)).astype(np.int64)


def similarity_subset(similarity: np.ndarray, fraction: float, level: str) -> np.ndarray:
    """Ascending positions chosen by greedy backward elimination towards a low, medium or high mean similarity."""
    if level not in LEVELS:
        raise ValueError(f"similarity level must be one of {LEVELS}, got {level!r}")
    sim = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(sim, 0.0)
    n = len(sim)
    keep = n_kept(n, fraction)
    alive = np.ones(n, dtype=bool)
    row_sum = sim.sum(axis=1)              # similarity of each function to the current subset
    pair_sum = row_sum.sum() / 2           # sum over unordered pairs of the current subset
    target = pair_sum / (n * (n - 1) / 2) if n > 1 else 0.0
    for size in range(n, keep, -1):
        remaining_pairs = (size - 1) * (size - 2) / 2
        if level == "low":
            score = row_sum
        elif level == "high":
            score = -row_sum
        else:
            new_mean = (pair_sum - row_sum) / remaining_pairs if remaining_pairs else np.zeros(n)
            score = -np.abs(new_mean - target)
        j = int(np.argmax(np.where(alive, score, -np.inf)))
        alive[j] = False
        pair_sum -= row_sum[j]
        row_sum -= sim[:, j]
    return np.flatnonzero(alive).astype(np.int64)


def choose(codes: Codes, fraction: float, seed: int | None = None, level: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Positions of the chosen functions and a record of how they were chosen (with achieved similarities)."""
    if (seed is None) == (level is None):
        raise ValueError("give exactly one of seed (random subset) and similarity level")
    similarity = similarity_matrix(codes)
    if level is None:
        positions = random_subset(codes.n_functions, fraction, seed)
        record: dict[str, Any] = {"method": "random", "seed": int(seed)}
    else:
        positions = similarity_subset(similarity, fraction, level)
        record = {"method": "similarity", "level": level, "procedure": "greedy backward elimination (module doc)"}
    record |= {"fraction": float(fraction), "n_parent_functions": codes.n_functions, "n_functions": len(positions),
               "similarity_definition": SIMILARITY, "mean_similarity": mean_pairwise(similarity, positions),
               "parent_mean_similarity": mean_pairwise(similarity),
               "mean_nnz": float(codes.nnz[positions].mean()), "parent_mean_nnz": float(codes.nnz.mean())}
    return positions, record


def write_subset(parent: str | os.PathLike, out: str | os.PathLike, positions: np.ndarray | None,
                 record: Mapping[str, Any]) -> None:
    """A function file that links to `parent`'s arrays and keeps the parent's functions at `positions` (all if None)."""
    parent, out = Path(parent), Path(out)
    codes = read_codes(parent)
    chosen = codes if positions is None else codes.restrict(positions)
    target = os.path.relpath(parent.resolve(), out.resolve().parent)
    with h5py.File(parent, "r") as handle:
        attrs = read_attrs(handle)
    with atomic_path(out, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            for name in ("ids", *ARRAYS[codes.kind]):
                handle[name] = h5py.ExternalLink(target, "/" + name)
            write_functions(handle, chosen.latent_id, chosen.nnz, chosen.mean, chosen.std)
            set_attrs(handle, {**attrs, "n_functions": chosen.n_functions, "parent": str(parent),
                               "parent_link": target, "subset": dict(record), "library_versions": library_versions()})
    if read_codes(out).n_functions != chosen.n_functions:
        raise DataContractError(f"{out}: the written subset does not read back")
