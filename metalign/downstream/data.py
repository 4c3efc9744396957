"""Labelled feature sets: manifest rows (label, split) joined by image id to the rows of a feature file.

Train/test splits come from the manifests' `split` column (or from separate manifests); a split is addressed by a
`SplitRef`. Only the rows an evaluation needs are read, in file order and by blocks, so a 1.28 M-row ImageNet file
costs one sequential pass, not 1.28 M random reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pandas as pd

from metalign.io import DataContractError, align_rows, manifest_hash, read_attrs, read_manifest

READ_BLOCK = 1 << 16  # rows per sequential block read


@dataclass(frozen=True)
class SplitRef:
    """One split of one image set: its manifest, its feature file and the `split` value to keep (None: all rows)."""

    manifest: str
    features: str
    split: str | None = None

    @property
    def name(self) -> str:
        return f"{self.manifest}[{self.split}]" if self.split else self.manifest


def load_rows(ref: SplitRef) -> pd.DataFrame:
    """The manifest rows of the split (image_id, label, split), in manifest order."""
    frame = read_manifest(ref.manifest)
    if ref.split is not None:
        frame = frame[frame["split"] == ref.split]
        if frame.empty:
            raise DataContractError(f"manifest {ref.manifest} has no row with split {ref.split!r}")
    return frame.reset_index(drop=True)


def check_provenance(ref: SplitRef) -> None:
    """Refuse features computed from a different manifest than the one that labels them (stale file, docs/methods.md P-64)."""
    with h5py.File(_existing(ref.features), "r") as handle:
        attrs = read_attrs(handle)
    recorded = attrs.get("manifest_sha256") or (attrs.get("source_attrs") or {}).get("manifest_sha256")
    if recorded and recorded != manifest_hash(read_manifest(ref.manifest)):
        raise DataContractError(f"{ref.features} was computed from a different manifest than {ref.manifest} "
                                f"(manifest_sha256 {recorded[:12]}… differs); rerun extraction")


def _existing(path: str) -> Path:
    if not Path(path).exists():
        raise DataContractError(f"feature file not found: {path}")
    return Path(path)


def read_features(path: str, wanted: Sequence[str], l2_normalise: bool) -> np.ndarray:
    """(len(wanted), D) float32 rows of `path` for the image ids `wanted`, in that order."""
    with h5py.File(_existing(path), "r") as handle:
        if "features" not in handle:
            raise DataContractError(f"{path} lacks dataset 'features'; it has {sorted(handle.keys())}")
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][:]]
        rows = align_rows(ids, list(wanted), str(path))
        data = handle["features"]
        out = np.empty((len(rows), data.shape[1]), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for start in range(0, len(ids), READ_BLOCK):
            lo, hi = np.searchsorted(sorted_rows, [start, start + READ_BLOCK])
            if lo < hi:
                block = data[start:min(start + READ_BLOCK, len(ids))]
                out[order[lo:hi]] = block[sorted_rows[lo:hi] - start]
    if not np.isfinite(out).all():
        raise DataContractError(f"{path}: non-finite feature values")
    return l2_normalised(out) if l2_normalise else out


def l2_normalised(x: np.ndarray) -> np.ndarray:
    """Unit rows, so that base and meta (an affine map of base with its own scale) are compared on equal footing."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def class_index(labels: pd.Series, classes: Sequence[str], source: str) -> np.ndarray:
    """Class number of every label; -1 where the label is not one of `classes` (dropped by the caller)."""
    lookup = {name: i for i, name in enumerate(classes)}
    if len(lookup) != len(classes):
        raise DataContractError(f"{source}: the class list repeats a class")
    return labels.map(lookup).fillna(-1).to_numpy(dtype=np.int64)


def resolve_classes(classes: Sequence[str] | str | None, train_labels: pd.Series, source: str) -> list[str]:
    """The frozen class list: given inline, as a file (one class per line), or the sorted training labels.

    Every listed class must occur in the training split: a typo would otherwise silently drop a class.
    """
    if classes is None:
        resolved = sorted(set(train_labels))
    elif isinstance(classes, str):
        path = Path(classes)
        if not path.exists():
            raise DataContractError(f"{source}: class list file not found: {path}")
        resolved = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        resolved = [str(c) for c in classes]
    if "" in resolved:
        raise DataContractError(f"{source}: unlabelled rows (empty label) cannot be classified")
    missing = sorted(set(resolved) - set(train_labels))
    if missing:
        raise DataContractError(f"{source}: class {missing[0]!r} has no training image ({len(missing)} missing)")
    return resolved


def sample_per_class(labels: np.ndarray, n_classes: int, seed: int) -> list[np.ndarray]:
    """big_vision's draw: one seeded permutation of each class's rows, in class order; the first k rows are the
    k-shot sample, so samples are nested across shot counts within a seed."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)]


def take_shots(permutations: list[np.ndarray], shots: int) -> np.ndarray:
    return np.concatenate([p[:shots] for p in permutations])
