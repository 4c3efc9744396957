"""Representational geometry on THINGS (docs/methods.md §9.8): linear CKA against the human (SPoSE) embedding, class
separation of images by concept ("fine") and of concepts by metadata labels ("coarse"), with seeded bootstrap
uncertainty (docs/methods.md P-30); and the 2-D t-SNE maps for the figure (meta Procrustes-aligned to base).

Coarse separation: each listed metadata column is one labelling of the concepts (its distinct non-empty values are
the classes; concepts without a value are left out of that column); the coarse score is the mean over columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.linalg import orthogonal_procrustes
from threadpoolctl import threadpool_limits

from metalign.behaviour.odd_one_out import concept_matrix, read_unique_ids
from metalign.io import DataContractError, align_rows, read_h5, read_manifest

N_BOOTSTRAP = 100


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) after column-centring both (rows = the same items)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, dtype=np.float64) - np.mean(y, axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def class_separation(x: np.ndarray, labels: np.ndarray, class_weights: np.ndarray | None = None) -> np.ndarray:
    """R² = 1 − mean_k Σ_d Var(X_k,d) / Σ_d Var(X_d) on L2-normalised rows (population variances).

    `class_weights` (B, K) are cluster-bootstrap counts of the K classes (sorted label order): a class drawn c times
    enters the class mean c times and its images carry weight c in the total variance. One R² per row.
    """
    unit = _unit_rows(x)
    codes, _ = pd.factorize(pd.Series(labels), sort=True)
    k = int(codes.max()) + 1
    size = np.bincount(codes, minlength=k).astype(np.float64)
    sq = np.bincount(codes, (unit ** 2).sum(axis=1), minlength=k)
    sums = sparse.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(k, len(codes))) @ unit
    within = sq / size - (sums ** 2).sum(axis=1) / size ** 2
    weights = np.ones((1, k)) if class_weights is None else np.atleast_2d(class_weights).astype(np.float64)
    n = weights @ size
    mean = (weights @ sums) / n[:, None]
    total = (weights @ sq) / n - (mean ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - (weights @ within) / weights.sum(axis=1) / total, np.nan)


def n_classes(labels: np.ndarray) -> int:
    return int(pd.Series(labels).nunique())


def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) counts of each of n units in a resample with replacement."""
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(np.float64)


def coarse_separation(x: np.ndarray, labels: pd.DataFrame, n_boot: int = 0,
                      rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Class separation of concept rows per label column (non-empty values only) and their mean ("mean"): element
    0 is the estimate, elements 1.. the cluster-bootstrap replicates (classes of each column resampled)."""
    per_column = {}
    for column in labels.columns:
        values = labels[column].astype("string").str.strip()
        keep = (values.notna() & (values != "")).to_numpy()
        if keep.sum() < 2 or values[keep].nunique() < 2:
            continue
        k = n_classes(values[keep].to_numpy())
        weights = np.ones((1, k)) if not n_boot else np.vstack([np.ones((1, k)), bootstrap_counts(k, n_boot, rng)])
        per_column[column] = class_separation(x[keep], values[keep].to_numpy(), weights)
    if not per_column:
        raise DataContractError(f"no label column among {list(labels.columns)} has two classes")
    per_column["mean"] = np.mean(list(per_column.values()), axis=0)
    return per_column


def _interval(samples: np.ndarray) -> dict[str, float]:
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return {"boot_mean": float(np.nanmean(samples)), "boot_sd": float(np.nanstd(samples, ddof=1)),
            "ci_low": float(low), "ci_high": float(high)}


def geometry(images: np.ndarray, image_labels: np.ndarray, concepts: np.ndarray, human: np.ndarray,
             metadata: pd.DataFrame, n_boot: int = N_BOOTSTRAP, seed: int = 1234) -> dict[str, Any]:
    """CKA(concepts, human), fine separation of `images` by `image_labels`, coarse separation of `concepts` by the
    `metadata` columns, each with a seeded bootstrap: concepts for CKA, classes (cluster bootstrap, so duplicated
    items never shrink a within-class variance) for the separations."""
    rng = np.random.default_rng(seed)
    concept_counts = bootstrap_counts(len(concepts), n_boot, rng).astype(int)
    cka_samples = np.array([linear_cka(np.repeat(concepts, w, axis=0), np.repeat(human, w, axis=0))
                            for w in concept_counts])
    fine = class_separation(images, image_labels,
                            np.vstack([np.ones(n_classes(image_labels)),
                                       bootstrap_counts(n_classes(image_labels), n_boot, rng)]))
    coarse = coarse_separation(concepts, metadata, n_boot, rng)
    out: dict[str, Any] = {"cka": linear_cka(concepts, human), "class_sep_fine": float(fine[0]),
                           "class_sep_coarse": float(coarse["mean"][0]), "n_bootstrap": n_boot, "seed": seed}
    out.update({f"cka_{k}": v for k, v in _interval(cka_samples).items()})
    out.update({f"class_sep_fine_{k}": v for k, v in _interval(fine[1:]).items()})
    out.update({f"class_sep_coarse_{k}": v for k, v in _interval(coarse["mean"][1:]).items()})
    out.update({f"class_sep_coarse__{c}": float(v[0]) for c, v in coarse.items() if c != "mean"})
    return out


# --------------------------------------------------------------------------------------------- t-SNE


def tsne_map(x: np.ndarray, seed: int = 1234) -> np.ndarray:
    """2-D t-SNE (PCA init, perplexity ≤ 30 and < n/3) of L2-normalised rows. Single-threaded: a few thousand points
    take seconds, and threads make the result machine-dependent and thrash on a busy node."""
    from sklearn.manifold import TSNE

    unit = _unit_rows(x)
    perplexity = float(min(30.0, max(2.0, (len(unit) - 1) / 3.0)))
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(unit)


def procrustes_align(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`source` rotated/reflected and scaled (about its centroid) to best match `target` in least squares."""
    src, tgt = source - source.mean(axis=0), target - target.mean(axis=0)
    rotation, scale = orthogonal_procrustes(src, tgt)
    return src @ rotation * (scale / (src ** 2).sum()) + target.mean(axis=0)


# --------------------------------------------------------------------------------------------- inputs / CLI


def read_metadata(path: str | Path, unique_ids: list[str], id_column: str, columns: list[str]) -> pd.DataFrame:
    """Label columns of a THINGS-metadata-style TSV, rows joined to `unique_ids` by `id_column`."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in [id_column, *columns] if c not in frame.columns]
    if missing:
        raise DataContractError(f"{path} lacks column(s) {missing}")
    frame = frame.drop_duplicates(id_column).set_index(id_column)
    absent = [u for u in unique_ids if u not in frame.index]
    if absent:
        raise DataContractError(f"{path}: concept {absent[0]!r} has no row ({len(absent)} missing)")
    return frame.loc[unique_ids, columns].reset_index(drop=True)


def concept_inputs(features_path: Path, manifest_path: Path,
                   unique_ids_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Image features in manifest order, their concept labels, the concept matrix (docs/methods.md §9.1), unique ids, attrs."""
    arrays, ids, attrs = read_h5(features_path, ["features"])
    manifest = read_manifest(manifest_path)
    unique_ids = read_unique_ids(unique_ids_path)
    concepts, _ = concept_matrix(arrays["features"], ids, manifest, unique_ids, source=str(features_path))
    rows = align_rows(ids, manifest["image_id"].tolist(), str(features_path))
    return arrays["features"][rows].astype(np.float64), manifest["label"].to_numpy(), concepts, unique_ids, attrs
