"""Collect per-subject encoding files into the brain tables: ROI values per fold, base-vs-meta statistics, and the
α-grid edge report (docs/methods.md P-22)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from metalign.brain.encoding import key_of, read_encoding
from metalign.brain.stats import alpha_edges, compare_rois, roi_fold_values
from metalign.io import DataContractError

REFERENCE = "base"
KEYS = ["scheme", "backbone", "variant", "subject"]


def fold_table(paths: Sequence[str | os.PathLike], rois: Sequence[str]) -> pd.DataFrame:
    """One row per scheme × backbone × variant × subject × ROI × fold: the noise-ceiling-normalised R²."""
    frames = []
    for path in paths:
        arrays, _, attrs = read_encoding(path)
        values = roi_fold_values(arrays["r2_norm"], attrs["roi_names"], arrays["rois"], rois)
        if values.empty:
            raise DataContractError(f"{path}: none of the ROIs {list(rois)} has a selected voxel")
        folds = np.asarray(attrs["folds"])
        values["fold_label"] = folds[values["fold"].to_numpy()]
        frames.append(values.assign(**key_of(path)))
    return pd.concat(frames, ignore_index=True)[KEYS + ["roi", "fold", "fold_label", "value", "n_voxels"]]


def stats_table(folds: pd.DataFrame) -> pd.DataFrame:
    """Every variant against `base` on the same folds, per scheme × backbone (docs/methods.md §9.5 steps 1–4)."""
    frames = []
    for (scheme, backbone), block in folds.groupby(["scheme", "backbone"], sort=True):
        if REFERENCE not in set(block["variant"]):
            raise DataContractError(f"{scheme}/{backbone}: no '{REFERENCE}' results to compare with")
        subjects = sorted(block["subject"].unique())
        table = compare_rois(block.rename(columns={"variant": "representation"}), REFERENCE, subjects)
        frames.append(table.assign(scheme=scheme, backbone=backbone))
    out = pd.concat(frames, ignore_index=True)
    first = ["scheme", "backbone", "variant", "reference", "roi"]
    return out[first + [c for c in out.columns if c not in first]]


def alpha_table(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Per encoding file: how often the chosen α is on the grid's edges, and the median chosen log10 α.

    A voxel the features cannot predict has its CV optimum at α → ∞ (predict the mean), so high-edge hits are also
    reported for the predictive voxels alone (mean held-out R² > 0): hits there mean the grid is too narrow.
    """
    rows = []
    for path in paths:
        arrays, ids, attrs = read_encoding(path)
        alphas = np.asarray(attrs["alphas"])
        index = arrays["alpha_index"]
        predictive = np.nanmean(arrays["r2"], axis=1) > 0
        edges = alpha_edges(index[predictive], len(alphas)) if predictive.any() else {}
        rows.append({**key_of(path), "n_voxels": len(ids), "n_predictive": int(predictive.sum()),
                     "n_folds": index.shape[1], "alpha_min": alphas[0], "alpha_max": alphas[-1],
                     **alpha_edges(index, len(alphas)),
                     **{f"{k}_predictive": edges.get(k, np.nan) for k in ("frac_low_edge", "frac_high_edge")},
                     "median_log10_alpha": float(np.median(np.log10(alphas[index])))})
    return pd.DataFrame(rows)
