"""Precomputed features as a backbone: rows of a feature table matched to a manifest by the images' content.

A `source: precomputed` backbone entry names an HDF5 table (`id`) holding `sha256` (N,) — the hex sha256 of each
image file's bytes — and float datasets (N, D): `features` plus the entry's `extra_outputs`. Matching by content, not
by id or path, lets one table serve every image set whatever its layout. Use it for embeddings computed elsewhere
(a model this project cannot load, an API) and for the demo's planted backbone (docs/demo.md). The output file is the
one `extract` writes for a model: `ids` in manifest order, the same datasets, provenance attrs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
import pandas as pd

from metalign.images.manifest import ImageReader
from metalign.io import DataContractError, atomic_path, file_sha256, library_versions, manifest_hash, set_attrs
from metalign.progress import progress


def image_checksums(manifest: pd.DataFrame) -> list[str]:
    """The manifest's sha256 column when it has one, else each image's bytes hashed in manifest order."""
    if "sha256" in manifest:
        return manifest["sha256"].tolist()
    reader = ImageReader()
    out = []
    for path in progress(manifest["path"].tolist(), desc="hash images", unit="img"):
        try:
            out.append(hashlib.sha256(reader.read(path)).hexdigest())
        except OSError as err:
            raise DataContractError(f"cannot read image {path}: {err}") from None
    return out


def read_table(path: Path, outputs: list[str]) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """(row of each sha256, the requested datasets) of one table, checked; errors name the file and the key."""
    if not path.exists():
        raise FileNotFoundError(f"precomputed feature table {path} does not exist")
    with h5py.File(path, "r") as handle:
        missing = [key for key in ["sha256", *outputs] if key not in handle]
        if missing:
            raise DataContractError(f"{path}: no dataset(s) {missing}; it holds {sorted(handle)}")
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in handle["sha256"][:]]
        arrays = {name: np.asarray(handle[name][:], dtype=np.float32) for name in outputs}
    for name, array in arrays.items():
        if array.ndim != 2 or len(array) != len(keys):
            raise DataContractError(f"{path}: dataset {name!r} has shape {array.shape}, not ({len(keys)}, D)")
    rows = {key: n for n, key in enumerate(keys)}
    if len(rows) != len(keys):
        raise DataContractError(f"{path}: sha256 keys are not unique")
    return rows, arrays


def extract_precomputed(entry: Mapping[str, Any], manifest: pd.DataFrame, manifest_path: str | Path,
                        out: Path) -> None:
    """Copy the table's rows of every manifest image, in manifest order, into `out` (atomic)."""
    table = Path(entry["id"])
    outputs = ["features", *entry.get("extra_outputs", [])]
    rows, arrays = read_table(table, outputs)
    checksums = image_checksums(manifest)
    absent = [(image_id, s) for image_id, s in zip(manifest["image_id"], checksums) if s not in rows]
    if absent:
        raise DataContractError(f"{table}: no row for {len(absent)} image(s) of {manifest_path}, first "
                                f"{absent[0][0]!r} (sha256 {absent[0][1]})")
    index = np.asarray([rows[s] for s in checksums], dtype=np.int64)
    ids = manifest["image_id"].tolist()
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
        for name, array in arrays.items():
            handle.create_dataset(name, data=array[index])
        set_attrs(handle, {
            "backbone": entry["name"], "source": "precomputed", "model_id": str(table),
            "weights_sha256": file_sha256(table), "outputs": outputs, "manifest": str(manifest_path),
            "manifest_sha256": manifest_hash(manifest), "dtype": "float32", "library_versions": library_versions(),
            "config_entry": dict(entry),
        })
