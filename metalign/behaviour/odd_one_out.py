"""THINGS odd-one-out evaluation (docs/methods.md §9.1): zero-shot accuracy, the cross-validated per-participant choice
model, McFadden pseudo-R² (docs/methods.md §10) and the repeated-triplet noise ceiling (docs/methods.md §11)."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metalign.behaviour.choice_model import N_CHOICES, cross_validate
from metalign.io import DataContractError, align_rows

TRIPLET_COLUMNS = ("subject_id", "image1", "image2", "image3", "choice")
LOG_3 = math.log(N_CHOICES)
_GRAM_MAX_ROWS = 4096        # up to here a cosine Gram matrix (≤ 134 MB) beats gathering rows per triplet
_GATHER_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------- inputs


def load_triplets(path: str | os.PathLike, n_concepts: int | None = None) -> pd.DataFrame:
    """Read the tab-separated THINGS triplet table and convert it to 0-based integer columns.

    Returns `participant` (0-based code of `subject_id` in sorted order), `i`, `j`, `k` (0-based concept rows in
    unique_id.txt order), `choice` (0-based position of the odd one out) and `subject_id` (categorical).
    """
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"triplet file not found: {path}")
    header = list(pd.read_csv(path, sep="\t", nrows=0).columns)
    missing = [c for c in TRIPLET_COLUMNS if c not in header]
    if missing:
        raise DataContractError(f"triplet file {path} lacks column(s) {missing}; expected tab-separated columns "
                                f"{list(TRIPLET_COLUMNS)}, found {header}")
    frame = pd.read_csv(path, sep="\t", usecols=list(TRIPLET_COLUMNS), dtype={"subject_id": str})
    if frame["subject_id"].isna().any():
        _raise_bad_row(path, "subject_id", frame["subject_id"], frame["subject_id"].isna().to_numpy(), "a value")
    upper = {"image1": n_concepts, "image2": n_concepts, "image3": n_concepts, "choice": N_CHOICES}
    out = {}
    for column, name in zip(TRIPLET_COLUMNS[1:], ("i", "j", "k", "choice")):
        out[name] = _one_based(path, column, frame[column], upper[column]) - 1
    codes, subjects = pd.factorize(frame["subject_id"], sort=True)
    return pd.DataFrame({"participant": codes.astype(np.int64), **out,
                         "subject_id": pd.Categorical.from_codes(codes, subjects)})


def _one_based(path: Path, column: str, values: pd.Series, upper: int | None) -> np.ndarray:
    """Integer values in 1..upper (upper None: ≥ 1); otherwise raise, naming the first bad row."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers)) | (numbers < 1)
        if upper is not None:
            bad |= numbers > upper
    if bad.any():
        _raise_bad_row(path, column, values, bad, f"an integer in 1..{upper if upper is not None else 'n'}")
    return numbers.astype(np.int64)


def _raise_bad_row(path: Path, column: str, values: pd.Series, bad: np.ndarray, expected: str) -> None:
    row = int(np.argmax(bad))
    raise DataContractError(f"triplet file {path}: column {column!r}, data row {row} (line {row + 2}) holds "
                            f"{values.iloc[row]!r}; expected {expected} ({int(bad.sum())} bad row(s) in total)")


def read_unique_ids(path: str | os.PathLike) -> list[str]:
    """THINGS concept ids (unique_id.txt), one per line: the row order of every concept matrix."""
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"concept id file not found: {path}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicated = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(duplicated):
        raise DataContractError(f"concept id file {path} repeats concept {duplicated.iloc[0]!r}")
    return ids


def concept_matrix(features: np.ndarray, ids: list[str], manifest: pd.DataFrame, unique_ids: list[str],
                   source: str = "features") -> tuple[np.ndarray, list[str]]:
    """One row per concept (in `unique_ids` order): the feature row of the concept's first image in sorted file-name
    order (docs/methods.md P-6), joined by image id. Returns the (n_concepts, D) matrix and the chosen image ids."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(ids):
        raise DataContractError(f"{source}: features of shape {features.shape} do not match {len(ids)} ids")
    file_name = manifest["path"].astype(str).str.rsplit("/", n=1).str[-1]
    first = (manifest.assign(_file=file_name).sort_values(["label", "_file", "image_id"], kind="stable")
             .drop_duplicates("label"))
    image_of = dict(zip(first["label"], first["image_id"]))
    missing = [concept for concept in unique_ids if concept not in image_of]
    if missing:
        raise DataContractError(f"{source}: manifest has no image of concept {missing[0]!r} "
                                f"({len(missing)} of {len(unique_ids)} concepts missing)")
    chosen = [image_of[concept] for concept in unique_ids]
    return features[align_rows(ids, chosen, source)].astype(np.float64), chosen


# --------------------------------------------------------------------------------------------- scores


def triplet_logits(representation: np.ndarray, i: np.ndarray, j: np.ndarray, k: np.ndarray,
                   n_jobs: int = 1) -> np.ndarray:
    """(T, 3) logits [cos(r_j, r_k), cos(r_i, r_k), cos(r_i, r_j)]: position p's logit is the similarity of the
    other two items. Zero rows have cosine 0 with everything. Up to `n_jobs` threads gather the Gram entries."""
    rep = np.asarray(representation, dtype=np.float64)
    norms = np.linalg.norm(rep, axis=1, keepdims=True)
    unit = np.divide(rep, norms, out=np.zeros_like(rep), where=norms > 0)
    i, j, k = (np.asarray(a, dtype=np.int64) for a in (i, j, k))
    out = np.empty((len(i), 3))
    if len(unit) <= _GRAM_MAX_ROWS:
        gram = (unit @ unit.T).ravel()

        def gather(rows: slice) -> None:
            for column, (a, b) in enumerate(((j, k), (i, k), (i, j))):
                out[rows, column] = np.take(gram, a[rows] * len(unit) + b[rows])

        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            list(pool.map(gather, [slice(s, s + _GATHER_CHUNK) for s in range(0, len(i), _GATHER_CHUNK)]))
        return out
    for start in range(0, len(i), _GATHER_CHUNK):
        s = slice(start, start + _GATHER_CHUNK)
        ui, uj, uk = unit[i[s]], unit[j[s]], unit[k[s]]
        out[s] = np.stack([(uj * uk).sum(1), (ui * uk).sum(1), (ui * uj).sum(1)], axis=1)
    return out


def zero_shot_accuracy(logits: np.ndarray, choice: np.ndarray) -> float:
    """Share of triplets whose largest logit is the chosen position (first maximum on ties)."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(choice)))


def evaluate(representation: np.ndarray, triplets: pd.DataFrame, seed: int = 1234,
             n_jobs: int = 2) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Zero-shot accuracy over all triplets and out-of-fold scores of the per-participant choice model.

    The per-trial table holds the kept participants' trials (`trial` = row of `triplets`); folds depend only on the
    choices and `seed`, so tables of two representations of the same triplets pair row by row.
    """
    logits = triplet_logits(representation, triplets["i"], triplets["j"], triplets["k"], n_jobs=n_jobs)
    return score_logits(logits, triplets, seed=seed, n_jobs=n_jobs)


def score_logits(logits: np.ndarray, triplets: pd.DataFrame, seed: int = 1234,
                 n_jobs: int = 2) -> tuple[pd.DataFrame, dict[str, Any]]:
    """`evaluate` for precomputed (T, 3) logits of the rows of `triplets` (columns participant, choice)."""
    choice = triplets["choice"].to_numpy()
    cv = cross_validate(logits, choice, triplets["participant"].to_numpy(), seed=seed, n_jobs=n_jobs)
    trial = np.flatnonzero(cv.fold >= 0)
    per_trial = pd.DataFrame({"participant": triplets["participant"].to_numpy()[trial], "trial": trial,
                              "nll": cv.nll[trial], "correct": cv.correct[trial].astype(bool)},
                             copy=False)                                    # fresh arrays: no consolidating copy
    if "subject_id" in triplets:
        per_trial["subject_id"] = triplets["subject_id"].to_numpy()[trial]
    hit = np.argmax(logits, axis=1) == choice                                # as zero_shot_accuracy, once
    summary = {
        "zero_shot_acc": float(np.mean(hit)),                                   # all triplets (docs/methods.md P-29)
        "zero_shot_acc_cv_population": float(np.mean(hit[trial])) if len(trial) else math.nan,
        **cv_scores(per_trial),
        "n_participants": int(cv.kept.sum()),
        "n_dropped_participants": int((~cv.kept).sum()),
        "n_triplets": int(len(triplets)),
        "n_unconverged_fits": int((~cv.converged).sum()),
        "seed": int(seed),
    }
    return per_trial, summary


def cv_scores(per_trial: pd.DataFrame) -> dict[str, float]:
    """Mean out-of-fold NLL and accuracy, McFadden R² (docs/methods.md §10) and the trial count of a per-trial table."""
    cv_nll = float(per_trial["nll"].mean()) if len(per_trial) else math.nan
    return {"cv_nll": cv_nll, "cv_acc": float(per_trial["correct"].mean()) if len(per_trial) else math.nan,
            "mcfadden_r2": 1.0 - cv_nll / LOG_3, "n_trials": int(len(per_trial))}


def noise_ceiling(triplets: pd.DataFrame) -> float:
    """1 - mean entropy / log 3 over triplets repeated within a participant (same items in the same order); NaN if
    no triplet is repeated."""
    return noise_ceiling_summary(triplets)["overall"]


def noise_ceiling_summary(triplets: pd.DataFrame) -> dict[str, Any]:
    """The THINGS ceiling (docs/methods.md §11) with the number of repeated triplets it rests on; computed once per triplet file."""
    group = triplets.groupby(["participant", "i", "j", "k"], sort=False).ngroup().to_numpy()
    ceiling, n_repeated = entropy_ceiling(group, triplets["choice"].to_numpy())
    return {"overall": ceiling, "n_repeated_triplets": n_repeated}


def entropy_ceiling(group: np.ndarray, choice: np.ndarray) -> tuple[float, int]:
    """1 - mean over groups with ≥ 2 trials of H(empirical choice distribution) / log 3, and the number of such
    groups. `group` codes repeated presentations, `choice` (0..2) the chosen item in a fixed per-group order."""
    group, choice = np.asarray(group, dtype=np.int64), np.asarray(choice, dtype=np.int64)
    counts = np.bincount(group)
    repeated = np.flatnonzero(counts >= 2)
    if not len(repeated):
        return math.nan, 0
    choice_counts = np.bincount(group * N_CHOICES + choice,
                                minlength=len(counts) * N_CHOICES).reshape(-1, N_CHOICES)[repeated]
    share = choice_counts / counts[repeated, None]
    entropy = -np.sum(share * np.log(np.where(share > 0, share, 1.0)), axis=1)
    return float(1.0 - entropy.mean() / LOG_3), int(len(repeated))
