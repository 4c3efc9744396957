"""Code files: fixed-width sparse SAE codes of one image set plus the functions selected on that set.

Layout (HDF5): `ids` (N) str, `indices` (N, k) int32 ascending per row, `values` (N, k) float32, group
`functions/` with `latent_id` (F) int64 ascending raw SAE ids, `nnz` (F) int64, `mean`/`std` (F) float64 of the
non-zero values (ddof 0); attributes d_sae, k, min_nonzero, sl, max_draw, n_dropped, n_below_min, provenance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from metalign.functions.select import Selection, function_stats, select_functions
from metalign.io import DataContractError, atomic_path, library_versions, read_attrs, set_attrs

FUNCTION_FIELDS = ("latent_id", "nnz", "mean", "std")


def check_codes(indices: np.ndarray, values: np.ndarray, d_sae: int, ids: list[str], source: str) -> None:
    """Raise DataContractError (naming `source`) unless the arrays follow the fixed-width code contract."""
    if indices.ndim != 2 or indices.shape != values.shape:
        raise DataContractError(f"{source}: indices {indices.shape} and values {values.shape} must be equal (N, k)")
    if len(indices) != len(ids):
        raise DataContractError(f"{source}: {len(indices)} code rows but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise DataContractError(f"{source}: ids are not unique")
    if not np.issubdtype(indices.dtype, np.integer):
        raise DataContractError(f"{source}: indices must be integers, got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= d_sae):
        raise DataContractError(f"{source}: latent ids span [{indices.min()}, {indices.max()}], outside [0, d_sae={d_sae})")
    if indices.shape[1] > 1 and not (np.diff(indices, axis=1) > 0).all():
        row = int(np.flatnonzero(~(np.diff(indices, axis=1) > 0).all(axis=1))[0])
        raise DataContractError(f"{source}: latent ids of row {row} (id {ids[row]!r}) are not strictly ascending")
    if not np.isfinite(values).all():
        raise DataContractError(f"{source}: values contain non-finite entries")


def write_codes(path: str | os.PathLike, ids: list[str], indices: np.ndarray, values: np.ndarray, d_sae: int,
                min_nonzero: int, sl: int, provenance: Mapping[str, Any]) -> Selection:
    """Compute function statistics, select functions and write one code file atomically."""
    check_codes(indices, values, d_sae, ids, source=str(path))
    stats = function_stats(indices, values, d_sae)
    selection = select_functions(stats.nnz, min_nonzero, sl, len(ids))
    kept = selection.latent_id
    rows = max(1, min(len(ids), 1 << 14))
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
            handle.create_dataset("indices", data=indices.astype(np.int32), chunks=(rows, indices.shape[1]))
            handle.create_dataset("values", data=values.astype(np.float32), chunks=(rows, values.shape[1]))
            group = handle.create_group("functions")
            group.create_dataset("latent_id", data=kept)
            group.create_dataset("nnz", data=stats.nnz[kept].astype(np.int64))
            group.create_dataset("mean", data=stats.mean[kept])
            group.create_dataset("std", data=stats.std[kept])
            set_attrs(handle, {
                **provenance,
                "d_sae": int(d_sae), "k": int(indices.shape[1]), "min_nonzero": int(min_nonzero), "sl": int(sl),
                "max_draw": selection.max_draw, "n_dropped": selection.n_dropped,
                "n_below_min": selection.n_below_min, "n_functions": int(kept.size), "std_ddof": 0,
                "library_versions": library_versions(),
            })
    return selection


@dataclass(frozen=True)
class Codes:
    """Contents of a code file; `latent_id` etc. describe only the kept functions (F of them)."""

    ids: list[str]
    indices: np.ndarray
    values: np.ndarray
    latent_id: np.ndarray
    nnz: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_functions(self) -> int:
        return int(self.latent_id.size)

    def kept_columns(self) -> np.ndarray:
        """(N, k) int64: column of each entry among the kept functions (0..F−1), −1 for dropped latents or zeros."""
        position = np.searchsorted(self.latent_id, self.indices).clip(max=self.n_functions - 1)
        hit = (self.latent_id[position] == self.indices) & (self.values != 0)
        return np.where(hit, position, -1)

    def kept_mask(self) -> np.ndarray:
        """(N, k) bool: entries that are positives of a kept function."""
        return self.kept_columns() >= 0

    def by_function(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positive lists per kept function in CSR form: offsets (F+1), image rows and magnitudes (rows ascending)."""
        columns = self.kept_columns().ravel()
        hit = columns >= 0
        rows = np.repeat(np.arange(len(self.ids), dtype=np.int64), self.indices.shape[1])[hit]
        order = np.argsort(columns[hit], kind="stable")
        counts = np.bincount(columns[hit], minlength=self.n_functions)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return offsets, rows[order], self.values.ravel()[hit][order]


def read_codes(path: str | os.PathLike) -> Codes:
    """Read a code file written by `write_codes`, checking the arrays against each other."""
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"code file not found: {path}")
    with h5py.File(path, "r") as handle:
        required = ["ids", "indices", "values", *(f"functions/{name}" for name in FUNCTION_FIELDS)]
        missing = [name for name in required if name not in handle]
        if missing:
            raise DataContractError(f"{path} lacks dataset(s) {missing}")
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][:]]
        functions = {name: handle[f"functions/{name}"][:] for name in FUNCTION_FIELDS}
        codes = Codes(ids=ids, indices=handle["indices"][:], values=handle["values"][:], attrs=read_attrs(handle),
                      **functions)
    if "d_sae" not in codes.attrs:
        raise DataContractError(f"{path} lacks attribute 'd_sae'")
    check_codes(codes.indices, codes.values, int(codes.attrs["d_sae"]), codes.ids, source=str(path))
    if codes.n_functions == 0 or not all(len(functions[name]) == codes.n_functions for name in FUNCTION_FIELDS):
        raise DataContractError(f"{path}: datasets under functions/ are empty or differ in length")
    if codes.n_functions > 1 and not (np.diff(codes.latent_id) > 0).all():
        raise DataContractError(f"{path}: functions/latent_id is not strictly ascending")
    return codes
