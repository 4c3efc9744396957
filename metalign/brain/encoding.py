"""Voxelwise encoding of one prepared subject from one representation (docs/methods.md §9.5–9.6).

For every outer fold: ridge with intercept, one α per voxel from the grid chosen by the inner CV of the scheme
(`cv.py`; efficient leave-one-out for the study's `upstream_leaky`), fitted on the fold's training trials, R² per
voxel on its held-out trials (SS_tot around the held-out mean), divided by the voxel's noise ceiling. The folds
depend only on the subject's trials, never on the representation, so base and meta results are paired fold by fold.

Output HDF5 (rows = the subject's selected voxels, `ids` = voxel ids):
    r2 (n_voxels, n_folds) float32, r2_norm = r2 / nc (float32), alpha_index (int16, into attr `alphas`),
    nc (float64, fraction), rois (uint8, columns = attr `roi_names`), xyz (int64; THINGS-fMRI only)
attrs: dataset, subject, scheme, scheme_description, leaky, inner ("loo" or "grouped"), folds (outer fold labels),
per_fold (n_train, n_test, n_dropped, shared_images), alphas, alpha_grid, n_inner (null for "loo"), seed, standardize,
backend, frac_low_edge, frac_high_edge, features (path), features_sha256, library_versions.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metalign.brain import cv
from metalign.brain.ridge import GroupedRidgeCV, LooRidgeCV, alpha_grid
from metalign.brain.stats import alpha_edges, r2_columns
from metalign.brain.subject import Subject
from metalign.io import DataContractError, file_sha256, library_versions, read_h5, write_h5
from metalign.progress import progress
from metalign.results import read_features

log = logging.getLogger(__name__)
EDGE_WARNING = 0.05  # warn when more than 5 % of voxels pick an α on the grid's edge (docs/methods.md P-22)


@dataclass
class Encoding:
    """Per voxel × outer fold results; rows follow the subject's voxels."""

    r2: np.ndarray            # (n_voxels, n_folds) raw held-out R²
    r2_norm: np.ndarray       # (n_voxels, n_folds) R² / noise ceiling
    alpha_index: np.ndarray   # (n_voxels, n_folds) index into `alphas`
    alphas: np.ndarray
    folds: np.ndarray         # outer fold labels (sessions or image folds)
    attrs: dict[str, Any] = field(default_factory=dict)


def stimulus_rows(subject: Subject, ids: list[str], where: str) -> np.ndarray:
    """Feature row of every trial's image: by id (THINGS `<concept>/<file>`) or by file name (BOLD5000)."""
    keys = ids if subject.match == "id" else [posixpath.basename(i) for i in ids]
    index: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key in index:
            raise DataContractError(f"{where}: image key {key!r} matches two feature rows ({ids[index[key]]!r}, "
                                    f"{ids[row]!r})")
        index[key] = row
    missing = sorted({s for s in subject.stimulus if s not in index})
    if missing:
        raise DataContractError(f"{where}: {len(missing)} stimulus image(s) of {subject.subject} have no features, "
                                f"e.g. {missing[:3]}")
    return np.fromiter((index[s] for s in subject.stimulus), dtype=np.int64, count=len(subject.stimulus))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [(a - mean) / sd for a in (train, *others)]


def encode(subject: Subject, features: np.ndarray, scheme: str, alphas: np.ndarray, n_inner: int, seed: int,
           n_folds: int | None = None, backend: str = "numpy", standardize: bool = False) -> Encoding:
    """Outer-CV encoding of `subject` from `features` (one row per trial, already matched); `n_inner` is unused by
    the leave-one-out scheme."""
    if len(features) != len(subject.betas):
        raise DataContractError(f"{len(features)} feature rows for {len(subject.betas)} trials")
    images = np.asarray(subject.stimulus)
    labels, outer = cv.outer_folds(scheme, subject.session, images, n_folds, seed)
    leaky, loo = scheme in cv.LEAKY, scheme in cv.LOO
    cv.check_splits(outer, images, leaky, f"{subject.subject} outer folds ({scheme})")
    r2 = np.empty((subject.betas.shape[1], len(outer)), dtype=np.float64)
    alpha_index = np.empty_like(r2, dtype=np.int16)
    per_fold = []
    for k, (train, test) in enumerate(progress(outer, desc=f"{subject.subject} folds")):
        x_train, x_test = features[train], features[test]
        if standardize:
            x_train, x_test = _standardise(x_train, x_test)
        if loo:
            model: GroupedRidgeCV | LooRidgeCV = LooRidgeCV(alphas, backend=backend)
        else:
            inner = cv.inner_splits(scheme, subject.session[train], images[train], n_inner, seed + k)
            cv.check_splits(inner, images[train], leaky, f"{subject.subject} fold {k} inner folds ({scheme})")
            model = GroupedRidgeCV(alphas, inner, backend=backend)
        pred, best, _ = model.fit_predict(x_train, subject.betas[train], x_test)
        r2[:, k] = r2_columns(subject.betas[test], pred)
        alpha_index[:, k] = best
        per_fold.append({"n_train": len(train), "n_test": len(test), "n_dropped": len(images) - len(test) - len(train),
                         "shared_images": cv.shared_images([(train, test)], images)})
    edges = alpha_edges(alpha_index, len(alphas))
    # unpredictable voxels rightly pick the largest α (predict the mean): judge the grid on the predictive ones
    predictive = np.nanmean(r2, axis=1) > 0
    if predictive.any() and max(alpha_edges(alpha_index[predictive], len(alphas)).values()) > EDGE_WARNING:
        log.warning("%s: more than %.0f%% of the predictive voxels' folds select α on an edge of the grid; "
                    "consider widening it (docs/methods.md P-22)", subject.subject, 100 * EDGE_WARNING)
    attrs = {"scheme": scheme, "scheme_description": cv.SCHEMES[scheme], "leaky": leaky,
             "inner": "loo" if loo else "grouped", "n_inner": None if loo else n_inner,
             "seed": seed, "standardize": standardize, "per_fold": per_fold, **edges}
    return Encoding(r2=r2, r2_norm=r2 / subject.nc[:, None], alpha_index=alpha_index, alphas=np.asarray(alphas),
                    folds=np.unique(labels), attrs=attrs)


def write_encoding(path: str | os.PathLike, subject: Subject, result: Encoding, provenance: dict[str, Any]) -> None:
    arrays = {"r2": result.r2.astype(np.float32), "r2_norm": result.r2_norm.astype(np.float32),
              "alpha_index": result.alpha_index, "nc": subject.nc, "rois": subject.rois.astype(np.uint8)}
    if subject.xyz is not None:
        arrays["xyz"] = subject.xyz
    write_h5(path, arrays, list(subject.voxel_id), {
        **result.attrs, **provenance, "dataset": subject.dataset, "subject": subject.subject,
        "roi_names": subject.roi_names, "folds": result.folds.tolist(), "alphas": result.alphas.tolist(),
        "library_versions": library_versions()})


def read_encoding(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str], dict[str, Any]]:
    return read_h5(path)


def run(subject: Subject, features_path: str | os.PathLike, out: str | os.PathLike, scheme: str,
        alphas_spec: dict[str, float], n_inner: int, seed: int, n_folds: int | None, backend: str,
        standardize: bool) -> Encoding:
    """Match the subject's trials to the feature file by image id, encode, and write the result."""
    features, ids, _ = read_features(features_path)
    features = features.astype(np.float32)
    rows = stimulus_rows(subject, ids, str(features_path))
    alphas = alpha_grid(alphas_spec["log10_min"], alphas_spec["log10_max"], int(alphas_spec["n"]))
    result = encode(subject, features[rows], scheme, alphas, n_inner, seed, n_folds, backend, standardize)
    write_encoding(out, subject, result, {"features": str(features_path),
                                          "features_sha256": file_sha256(features_path),
                                          "alpha_grid": dict(alphas_spec), "backend": backend})
    return result


def key_of(path: str | os.PathLike) -> dict[str, str]:
    """`…/<scheme>/<backbone>/<variant>/<subject>.h5`: the DAG's layout labels every result."""
    path = Path(path)
    return {"scheme": path.parents[2].name, "backbone": path.parents[1].name, "variant": path.parent.name,
            "subject": path.stem}
