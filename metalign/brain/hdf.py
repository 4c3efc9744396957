"""pandas' *fixed* HDF5 frame layout, read and written with h5py.

THINGS-fMRI ships its single-trial betas as `sub-0P_ResponseData.h5`: a DataFrame saved by pandas (PyTables) in the
fixed format under the key `ResponseData`, one row per voxel (`voxel_id` column) and one column per trial. pandas can
only load such a file whole (≈16 GB for one subject), so voxel rows are selected here by id and read alone
(docs/methods.md P-21 and P-50). The layout (group attributes `pandas_type="frame"`, `nblocks`; datasets `axis0` = column names, `axis1` =
index, `block<i>_items` = the columns of block i and `block<i>_values` = their values, stored rows × items when the
node attribute `transposed` is set) is the one pandas ≥ 1 writes; `write_frame` produces it so that
`pandas.read_hdf` (which needs the `tables` package) reads the demo files like the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pandas as pd

from metalign.io import DataContractError, atomic_path

_ROW_BATCH = 1024  # rows per h5py read: bounded memory for any number of selected voxels


# ----------------------------------------------------------------------------------------------- reading


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


def _frame_group(handle: h5py.File, path: Path, key: str | None) -> h5py.Group:
    if key is None:
        groups = [name for name, node in handle.items() if isinstance(node, h5py.Group)]
        if len(groups) != 1:
            raise DataContractError(f"{path}: expected one pandas frame group, found {groups}; pass its key")
        key = groups[0]
    if key not in handle:
        raise DataContractError(f"{path}: no key {key!r}; it has {sorted(handle.keys())}")
    group = handle[key]
    kind = _text(group.attrs.get("pandas_type", b""))
    if kind != "frame" or "nblocks" not in group.attrs:
        raise DataContractError(f"{path}/{key}: not a pandas fixed-format frame (pandas_type={kind!r}); "
                                "save it with DataFrame.to_hdf(..., format='fixed')")
    return group


def _labels(node: h5py.Dataset, where: str) -> list[str]:
    """Column labels stored as fixed-width bytes or integers; pickled (mixed-type) labels cannot be read safely."""
    if node.dtype.kind == "S":
        return [_text(v) for v in node[:]]
    if node.dtype.kind in "iu":
        return [str(int(v)) for v in node[:]]
    raise DataContractError(f"{where}: column labels are stored as pickled Python objects (mixed-type columns); "
                            "re-save the frame with string column names")


class FixedFrame:
    """Lazy view of one fixed-format frame: column labels per block, values read by row positions."""

    def __init__(self, path: str | os.PathLike, key: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise DataContractError(f"response file not found: {self.path}")
        self._handle = h5py.File(self.path, "r")
        self._group = _frame_group(self._handle, self.path, key)
        self.key = self._group.name.lstrip("/")
        self.blocks: list[tuple[list[str], h5py.Dataset, bool]] = []
        for i in range(int(self._group.attrs["nblocks"])):
            items = _labels(self._group[f"block{i}_items"], f"{self.path}/{self.key}/block{i}_items")
            values = self._group[f"block{i}_values"]
            transposed = bool(values.attrs.get("transposed", True))
            self.blocks.append((items, values, transposed))
        self.n_rows = int(self._group["axis1"].shape[0])

    def __enter__(self) -> "FixedFrame":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    @property
    def columns(self) -> list[str]:
        return [label for items, _, _ in self.blocks for label in items]

    def _locate(self, column: str) -> tuple[int, int]:
        for b, (items, _, _) in enumerate(self.blocks):
            if column in items:
                return b, items.index(column)
        raise DataContractError(f"{self.path}/{self.key}: no column {column!r}")

    def column(self, name: str) -> np.ndarray:
        """One whole column (e.g. `voxel_id`): small, read once to map ids to row positions."""
        b, j = self._locate(name)
        _, values, transposed = self.blocks[b]
        return values[:, j] if transposed else values[j, :]

    def read(self, rows: np.ndarray, columns: Sequence[str]) -> np.ndarray:
        """Values at `rows` (any order, no repeats) × `columns` (in the given order) as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(np.unique(rows)) != len(rows) or (len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows)):
            raise DataContractError(f"{self.path}/{self.key}: row positions must be distinct and in "
                                    f"0..{self.n_rows - 1}")
        found = set(self.columns)
        missing = [c for c in columns if c not in found]
        if missing:
            raise DataContractError(f"{self.path}/{self.key}: no column(s) {missing[:5]}")
        order = np.argsort(rows)
        out = np.empty((len(rows), len(columns)), dtype=np.float32)
        targets = {name: k for k, name in enumerate(columns)}
        for items, values, transposed in self.blocks:
            wanted = [(j, targets[label]) for j, label in enumerate(items) if label in targets]
            if not wanted:
                continue
            src = np.array([j for j, _ in wanted])
            dst = np.array([k for _, k in wanted])
            contiguous = np.array_equal(src, np.arange(src[0], src[0] + len(src)))
            for start in range(0, len(rows), _ROW_BATCH):
                pos = order[start:start + _ROW_BATCH]
                sel = rows[pos].tolist()  # h5py needs increasing positions
                block = values[sel, :] if transposed else values[:, sel].T
                block = block[:, src[0]:src[0] + len(src)] if contiguous else block[:, src]
                out[np.ix_(pos, dst)] = block
        return out


def read_rows_by_id(path: str | os.PathLike, id_column: str, ids: Sequence[int], key: str | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """Rows whose `id_column` equals `ids` (in that order) × every other column, and those columns' labels.

    Only the id column and the selected rows are read: the id is looked up, never taken as a row position (docs/methods.md P-21).
    """
    with FixedFrame(path, key) as frame:
        stored = frame.column(id_column).astype(np.int64)
        index = pd.Index(stored)
        if not index.is_unique:
            raise DataContractError(f"{path}: column {id_column!r} repeats ids")
        rows = index.get_indexer(np.asarray(ids, dtype=np.int64))
        if (rows < 0).any():
            missing = np.asarray(ids)[rows < 0]
            raise DataContractError(f"{path}: {id_column} {int(missing[0])} not found ({len(missing)} missing)")
        columns = [c for c in frame.columns if c != id_column]
        return frame.read(rows, columns), columns


# ----------------------------------------------------------------------------------------------- writing


def _str_attr(node: h5py.HLObject, name: str, value: str) -> None:
    """A string attribute as PyTables writes one (UTF-8, null-terminated): PyTables then returns `str`, as pandas
    expects; h5py's default (ASCII, null-padded) comes back as bytes and pandas.read_hdf fails on it."""
    data = value.encode()
    kind = h5py.h5t.C_S1.copy()
    kind.set_size(max(1, len(data)))
    kind.set_cset(h5py.h5t.CSET_UTF8)
    kind.set_strpad(h5py.h5t.STR_NULLTERM)
    if name in node.attrs:
        del node.attrs[name]
    attr = h5py.h5a.create(node.id, name.encode(), kind, h5py.h5s.create(h5py.h5s.SCALAR))
    attr.write(np.array(data, dtype=f"S{max(1, len(data))}"), mtype=kind)


def _tables_attrs(node: h5py.HLObject, cls: str) -> None:
    """The PyTables node attributes that pandas.read_hdf expects next to pandas' own."""
    _str_attr(node, "CLASS", cls)
    _str_attr(node, "VERSION", "2.4" if cls == "ARRAY" else "1.0")
    node.attrs["TITLE"] = h5py.Empty("S1")
    if cls == "ARRAY":
        _str_attr(node, "FLAVOR", "numpy")
        node.attrs["transposed"] = np.uint8(1)


def _write_labels(group: h5py.Group, name: str, labels: Sequence[str]) -> None:
    encoded = np.array([str(v).encode() for v in labels])
    node = group.create_dataset(name, data=encoded)
    _tables_attrs(node, "ARRAY")
    _str_attr(node, "kind", "string")


def write_frame(path: str | os.PathLike, frame: pd.DataFrame, key: str) -> None:
    """Write a numeric DataFrame (string column labels) in pandas' fixed format, atomically.

    Blocks follow pandas: one per dtype, floating before integer, columns in frame order within a block.
    """
    if not all(isinstance(c, str) for c in frame.columns):
        raise ValueError("write_frame needs string column labels")
    kinds = [frame[c].dtype for c in frame.columns]
    if not all(np.issubdtype(k, np.number) for k in kinds):
        raise ValueError("write_frame supports numeric columns only")
    dtypes = sorted({np.dtype(k) for k in kinds}, key=lambda d: (d.kind != "f", d.str))
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            _tables_attrs(handle, "GROUP")
            _str_attr(handle, "PYTABLES_FORMAT_VERSION", "2.1")
            group = handle.create_group(key)
            _tables_attrs(group, "GROUP")
            for name, value in (("pandas_type", "frame"), ("encoding", "UTF-8"), ("errors", "strict"),
                                ("axis0_variety", "regular"), ("axis1_variety", "regular")):
                _str_attr(group, name, value)
            group.attrs["ndim"] = np.int64(2)
            group.attrs["nblocks"] = np.int64(len(dtypes))
            _write_labels(group, "axis0", list(frame.columns))
            index = group.create_dataset("axis1", data=np.arange(len(frame), dtype=np.int64))
            _tables_attrs(index, "ARRAY")
            _str_attr(index, "kind", "integer")
            for b, dtype in enumerate(dtypes):
                items = [c for c, k in zip(frame.columns, kinds) if np.dtype(k) == dtype]
                _str_attr(group, f"block{b}_items_variety", "regular")
                _write_labels(group, f"block{b}_items", items)
                values = group.create_dataset(f"block{b}_values", data=frame[items].to_numpy(dtype=dtype))
                _tables_attrs(values, "ARRAY")
