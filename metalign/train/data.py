"""Training inputs: backbone feature files, joined to SAE codes by image id (docs/methods.md P-1), never by position."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from metalign.functions.codes import Codes
from metalign.io import DataContractError, align_rows, read_h5


class Features(NamedTuple):
    ids: list[str]
    values: np.ndarray  # (N, D) float32


def read_features(path: str | os.PathLike) -> Features:
    arrays, ids, _ = read_h5(path, ["features"])
    values = arrays["features"]
    if values.ndim != 2 or len(values) != len(ids):
        raise DataContractError(f"{path}: dataset 'features' {values.shape} must be (N, D) with N = {len(ids)} ids")
    return Features(ids, values.astype(np.float32, copy=False))


def aligned_features(features: Features, codes: Codes, source: str) -> np.ndarray:
    """Feature rows in the row order of `codes`; both files must hold exactly the same image ids."""
    feature_ids = set(features.ids)
    if len(feature_ids) != len(features.ids):
        raise DataContractError(f"{source}: feature ids are not unique")
    missing = next((i for i in codes.ids if i not in feature_ids), None)
    if missing is not None:
        raise DataContractError(f"{source}: image id {missing!r} has SAE codes but no features")
    code_ids = set(codes.ids)
    extra = next((i for i in features.ids if i not in code_ids), None)
    if extra is not None:
        raise DataContractError(f"{source}: image id {extra!r} has features but no SAE codes")
    rows = align_rows(features.ids, codes.ids, source)
    if np.array_equal(rows, np.arange(len(rows))):  # same order (the usual case): no copy of a large matrix
        return np.ascontiguousarray(features.values, dtype=np.float32)
    return np.ascontiguousarray(features.values[rows], dtype=np.float32)
