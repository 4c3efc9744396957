"""Function files: the targets of one image set plus the functions selected on that set.

Every file has `ids` (N), fixed-length UTF-8 bytes (one copy to read at COCO scale). Two kinds share one layout for
the kept functions (group `functions/`: `latent_id` (F) int64 ascending column ids,
`nnz` (F) int64 positives, `mean`/`std` (F) float64 of the fitted magnitudes, ddof 0):

* `sparse` (SAE codes): `indices` (N, k) int32 ascending per row, `values` (N, k) float32. Label 1[a ≠ 0], magnitude a;
  mean/std over the non-zero values.
* `neurons` (dense dimensions of a representation, docs/methods.md §3): `targets` (N, D) float32 magnitudes x − t_j and
  group `columns/` with `threshold` (D) and `dense` (D) bool. A column is dense unless more than half its values are
  zero; dense: t_j = median over this split, label 1[x > t_j], the magnitude is fitted on every row; sparse: t_j = 0,
  label 1[x ≠ 0], the magnitude is fitted on positives. mean/std are over the rows whose magnitude is fitted.

Attributes: kind, n_columns (d_sae or D), d_sae (sparse), k, min_nonzero, sl, max_draw, n_dropped, n_below_min,
provenance. A *subset* file (functions/subsets.py) holds its own `functions/` and HDF5 external links to the parent's
arrays, so choosing functions never rewrites codes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from metalign.functions.select import Selection, function_stats, select_functions
from metalign.io import DataContractError, atomic_path, library_versions, read_attrs, set_attrs

FUNCTION_FIELDS = ("latent_id", "nnz", "mean", "std")
KINDS = ("sparse", "neurons")
ARRAYS = {"sparse": ("indices", "values"), "neurons": ("targets", "columns/threshold", "columns/dense")}


def check_codes(indices: np.ndarray, values: np.ndarray, d_sae: int, ids: list[str], source: str) -> None:
    """Raise DataContractError (naming `source`) unless the arrays follow the fixed-width code contract."""
    if indices.ndim != 2 or indices.shape != values.shape:
        raise DataContractError(f"{source}: indices {indices.shape} and values {values.shape} must be equal (N, k)")
    _check_ids(ids, len(indices), source)
    if not np.issubdtype(indices.dtype, np.integer):
        raise DataContractError(f"{source}: indices must be integers, got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= d_sae):
        raise DataContractError(f"{source}: latent ids span [{indices.min()}, {indices.max()}], outside [0, d_sae={d_sae})")
    if indices.shape[1] > 1 and not (np.diff(indices, axis=1) > 0).all():
        row = int(np.flatnonzero(~(np.diff(indices, axis=1) > 0).all(axis=1))[0])
        raise DataContractError(f"{source}: latent ids of row {row} (id {ids[row]!r}) are not strictly ascending")
    if not np.isfinite(values).all():
        raise DataContractError(f"{source}: values contain non-finite entries")


def _check_ids(ids: list[str], n_rows: int, source: str) -> None:
    if n_rows != len(ids):
        raise DataContractError(f"{source}: {n_rows} rows but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise DataContractError(f"{source}: ids are not unique")


def neuron_targets(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets x − t, threshold t (D,), dense (D,) bool) of a feature matrix, following docs/methods.md §3."""
    X = np.asarray(X, dtype=np.float32)
    dense = (X == 0).mean(axis=0) <= 0.5
    threshold = np.where(dense, np.median(X, axis=0), 0.0).astype(np.float32)
    return X - threshold, threshold, dense


def column_labels(targets: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Labels of neuron targets: x > median for dense columns, x ≠ 0 for sparse ones (broadcast over rows)."""
    return np.where(dense, targets > 0, targets != 0)


def neuron_stats(targets: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nnz, mean and std (ddof 0) of the fitted magnitudes of each column (all rows if dense, positives if sparse)."""
    labels = column_labels(targets, dense)
    fitted = labels | dense
    count = np.maximum(fitted.sum(axis=0), 1)
    mean = np.where(fitted, targets, 0).sum(axis=0, dtype=np.float64) / count
    variance = np.where(fitted, (targets - mean) ** 2, 0).sum(axis=0, dtype=np.float64) / count
    return labels.sum(axis=0).astype(np.int64), mean, np.sqrt(variance)


def _write(path: str | os.PathLike, ids: list[str], arrays: Mapping[str, np.ndarray], nnz: np.ndarray,
           mean: np.ndarray, std: np.ndarray, min_nonzero: int, sl: int, attrs: Mapping[str, Any]) -> Selection:
    selection = select_functions(nnz, min_nonzero, sl, len(ids))
    kept = selection.latent_id
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            # fixed-length UTF-8: read back with one copy, ~10x faster than variable-length strings at COCO scale
            handle.create_dataset("ids", data=np.array([i.encode() for i in ids], dtype=bytes))
            for name, array in arrays.items():  # contiguous layout: one read per array
                handle.create_dataset(name, data=array)
            write_functions(handle, kept, nnz[kept], mean[kept], std[kept])
            set_attrs(handle, {
                **attrs, "min_nonzero": int(min_nonzero), "sl": int(sl), "max_draw": selection.max_draw,
                "n_dropped": selection.n_dropped, "n_below_min": selection.n_below_min,
                "n_functions": int(kept.size), "std_ddof": 0, "library_versions": library_versions(),
            })
    return selection


def write_functions(handle: h5py.File, latent_id: np.ndarray, nnz: np.ndarray, mean: np.ndarray,
                    std: np.ndarray) -> None:
    group = handle.create_group("functions")
    group.create_dataset("latent_id", data=np.asarray(latent_id, dtype=np.int64))
    group.create_dataset("nnz", data=np.asarray(nnz, dtype=np.int64))
    group.create_dataset("mean", data=np.asarray(mean, dtype=np.float64))
    group.create_dataset("std", data=np.asarray(std, dtype=np.float64))


def write_codes(path: str | os.PathLike, ids: list[str], indices: np.ndarray, values: np.ndarray, d_sae: int,
                min_nonzero: int, sl: int, provenance: Mapping[str, Any]) -> Selection:
    """Compute function statistics of sparse codes, select functions and write one file atomically."""
    check_codes(indices, values, d_sae, ids, source=str(path))
    stats = function_stats(indices, values, d_sae)
    arrays = {"indices": indices.astype(np.int32), "values": values.astype(np.float32)}
    attrs = {**provenance, "kind": "sparse", "d_sae": int(d_sae), "n_columns": int(d_sae), "k": int(indices.shape[1])}
    return _write(path, ids, arrays, stats.nnz, stats.mean, stats.std, min_nonzero, sl, attrs)


def write_neurons(path: str | os.PathLike, ids: list[str], X: np.ndarray, min_nonzero: int, sl: int,
                  provenance: Mapping[str, Any]) -> Selection:
    """The dimensions of a representation as functions (median split of this split's rows), written atomically."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise DataContractError(f"{path}: features must be (N, D), got {X.shape}")
    _check_ids(ids, len(X), str(path))
    if not np.isfinite(X).all():
        raise DataContractError(f"{path}: features contain non-finite values")
    targets, threshold, dense = neuron_targets(X)
    nnz, mean, std = neuron_stats(targets, dense)
    arrays = {"targets": targets, "columns/threshold": threshold, "columns/dense": dense}
    attrs = {**provenance, "kind": "neurons", "n_columns": int(X.shape[1]), "n_dense_columns": int(dense.sum())}
    return _write(path, ids, arrays, nnz, mean, std, min_nonzero, sl, attrs)


@dataclass(frozen=True)
class Codes:
    """Contents of a function file; `latent_id`, `nnz`, `mean`, `std` describe only the kept functions (F of them)."""

    ids: list[str]
    latent_id: np.ndarray
    nnz: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    indices: np.ndarray | None = None       # sparse: (N, k)
    values: np.ndarray | None = None        # sparse: (N, k)
    targets: np.ndarray | None = None       # neurons: (N, D) magnitudes x − threshold
    column_dense: np.ndarray | None = None  # neurons: (D,) bool

    @property
    def kind(self) -> str:
        return "sparse" if self.indices is not None else "neurons"

    @property
    def n_functions(self) -> int:
        return int(self.latent_id.size)

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    def restrict(self, positions: np.ndarray) -> "Codes":
        """The same targets with only the kept functions at `positions` (ascending)."""
        positions = np.asarray(positions, dtype=np.int64)
        return replace(self, latent_id=self.latent_id[positions], nnz=self.nnz[positions],
                       mean=self.mean[positions], std=self.std[positions])

    def function_dense(self) -> np.ndarray:
        """(F,) bool: functions whose magnitude is fitted on every token (dense neurons), not only on positives."""
        if self.kind == "sparse":
            return np.zeros(self.n_functions, dtype=bool)
        return self.column_dense[self.latent_id]

    def columns_for(self, latent_id: np.ndarray) -> np.ndarray:
        """Sparse codes: (N, k) int64 position of each entry in `latent_id` (ascending), −1 where absent or zero."""
        latent_id = np.asarray(latent_id, dtype=np.int64)
        position = np.searchsorted(latent_id, self.indices).clip(max=len(latent_id) - 1)
        hit = (latent_id[position] == self.indices) & (self.values != 0)
        return np.where(hit, position, -1)

    def kept_columns(self) -> np.ndarray:
        """(N, k) int64: column of each entry among the kept functions (0..F−1), −1 for dropped latents or zeros."""
        return self.columns_for(self.latent_id)

    def kept_mask(self) -> np.ndarray:
        """(N, k) bool: entries that are positives of a kept function."""
        return self.kept_columns() >= 0

    def dense_targets(self, latent_id: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Neurons: (N, F) float32 magnitudes and (F,) bool dense flags of the columns `latent_id` (default: kept)."""
        columns = self.latent_id if latent_id is None else np.asarray(latent_id, dtype=np.int64)
        if self.kind != "neurons":
            raise ValueError("dense_targets is defined for neuron function files only")
        return np.ascontiguousarray(self.targets[:, columns]), self.column_dense[columns]

    def by_function(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positive lists per kept function in CSR form: offsets (F+1), image rows and magnitudes (rows ascending)."""
        if self.kind == "sparse":
            columns = self.kept_columns().ravel()
            hit = columns >= 0
            rows = np.repeat(np.arange(self.n_rows, dtype=np.int64), self.indices.shape[1])[hit]
            order = np.argsort(columns[hit], kind="stable")
            counts = np.bincount(columns[hit], minlength=self.n_functions)
            rows, mags = rows[order], self.values.ravel()[hit][order]
        else:
            targets, dense = self.dense_targets()
            function, rows = np.nonzero(column_labels(targets, dense).T)
            counts = np.bincount(function, minlength=self.n_functions)
            mags = targets[rows, function]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return offsets, rows.astype(np.int64), mags.astype(np.float32)


def read_array(dataset: h5py.Dataset) -> np.ndarray:
    """All of a dataset. Contiguous, unfiltered data is read from its byte offset in the (possibly linked) file with
    one call, at memory-copy speed; anything else goes through HDF5."""
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None or dataset.dtype.hasobject:
        return dataset[()]
    out = np.empty(dataset.shape, dtype=dataset.dtype)
    with open(dataset.file.filename, "rb", buffering=0) as stream:
        stream.seek(offset)
        if stream.readinto(out) != out.nbytes:
            raise DataContractError(f"{dataset.file.filename}: dataset {dataset.name} is truncated")
    return out


def read_code_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Only the (N, k) indices and values of a sparse code file."""
    with h5py.File(path, "r") as handle:
        return read_array(handle["indices"]), read_array(handle["values"])


def _ids(handle: h5py.File) -> list[str]:
    ids = handle["ids"][:]
    if ids.dtype.kind == "S":
        ascii_only = not (np.ascontiguousarray(ids).view(np.uint8) >= 0x80).any()
        return ids.astype(str).tolist() if ascii_only else np.char.decode(ids, "utf-8").tolist()
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


def read_codes(path: str | os.PathLike) -> Codes:
    """Read a function file written by `write_codes`, `write_neurons` or a subset; check the arrays."""
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"code file not found: {path}")
    with h5py.File(path, "r") as handle:
        attrs = read_attrs(handle)
        kind = attrs.get("kind", "sparse")
        if kind not in KINDS:
            raise DataContractError(f"{path}: unknown kind {kind!r}; known: {list(KINDS)}")
        required = ["ids", *ARRAYS[kind], *(f"functions/{name}" for name in FUNCTION_FIELDS)]
        missing = [_missing(handle, name) for name in required]
        if any(missing):
            raise DataContractError(f"{path} lacks dataset(s) {[m for m in missing if m]}")
        functions = {name: handle[f"functions/{name}"][:] for name in FUNCTION_FIELDS}
        arrays = {name.split("/")[-1]: read_array(handle[name]) for name in ARRAYS[kind]}
        ids = _ids(handle)
    if kind == "sparse":
        if "d_sae" not in attrs:
            raise DataContractError(f"{path} lacks attribute 'd_sae'")
        check_codes(arrays["indices"], arrays["values"], int(attrs["d_sae"]), ids, source=str(path))
        codes = Codes(ids=ids, attrs=attrs, indices=arrays["indices"], values=arrays["values"], **functions)
    else:
        _check_ids(ids, len(arrays["targets"]), str(path))
        codes = Codes(ids=ids, attrs=attrs, targets=arrays["targets"], column_dense=arrays["dense"].astype(bool),
                      **functions)
    n_columns = int(attrs.get("n_columns", attrs.get("d_sae", 0)))
    if codes.n_functions == 0 or not all(len(functions[name]) == codes.n_functions for name in FUNCTION_FIELDS):
        raise DataContractError(f"{path}: datasets under functions/ are empty or differ in length")
    if codes.n_functions > 1 and not (np.diff(codes.latent_id) > 0).all():
        raise DataContractError(f"{path}: functions/latent_id is not strictly ascending")
    if codes.latent_id.min() < 0 or codes.latent_id.max() >= n_columns:
        raise DataContractError(f"{path}: functions/latent_id lies outside [0, n_columns={n_columns})")
    return codes


def _missing(handle: h5py.File, name: str) -> str:
    """'' if `name` opens; else its name, with the target of a broken external link (a subset whose parent is gone)."""
    try:
        handle[name]
        return ""
    except (KeyError, OSError):
        link = handle.get(name, getlink=True) if name.split("/")[0] in handle else None
        if isinstance(link, h5py.ExternalLink):
            return f"{name} (external link to {link.filename} is broken)"
        return name
