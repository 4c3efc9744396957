"""Levels odd-one-out (docs/methods.md §9.2): the THINGS protocol (docs/methods.md §9.1) on image-level triplets, per triplet type.

The pickle maps participant id → list of trial dicts (`image1Path`, `image2Path`, `image3Path`, `selected_image`,
`exp_trial_type`, `triplet_type`). Images are keyed by file stem and resolved to feature rows through the manifest by
id, never by position (docs/methods.md P-2): a trial whose image has no feature row is excluded and reported (count and first
stems), and no other trial moves. `triplet_type` None is its own subset, "none", never silently dropped.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pandas as pd

from metalign.behaviour.odd_one_out import cv_scores, entropy_ceiling, score_logits, triplet_logits, zero_shot_accuracy
from metalign.io import DataContractError

log = logging.getLogger(__name__)

TRIPLET_TYPES = ("within_class", "between_class", "class_border")
NONE_TYPE = "none"                       # triplet_type None in the pickle
TRIAL_KEYS = ("image1Path", "image2Path", "image3Path", "selected_image", "exp_trial_type", "triplet_type")
KEPT_TRIAL_TYPE = "exp_trial"


def stem(path: str) -> str:
    """File name without extension, for POSIX or Windows separators."""
    name = PureWindowsPath(PurePosixPath(str(path)).name).name
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass(frozen=True)
class LevelsData:
    """Valid trials (`trial` = index in the flattened pickle, participants in the pickle's order) and counts of the
    trials left out while reading."""

    trials: pd.DataFrame      # subject_id, participant, trial, stem1..3, choice (0..2), triplet_type
    n_raw: int
    n_not_exp: int
    n_bad_selection: int


def load_levels(path: str | os.PathLike) -> LevelsData:
    """Read the Levels pickle; keep `exp_trial`s whose selected image is exactly one of the three (by stem)."""
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"Levels pickle not found: {path}")
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    if not isinstance(data, dict):
        raise DataContractError(f"{path}: expected a dict participant → list of trials, got {type(data).__name__}")
    rows, n_raw, n_not_exp, n_bad = [], 0, 0, 0
    for subject, trials in data.items():
        if not isinstance(trials, (list, tuple)):
            raise DataContractError(f"{path}: participant {subject!r} maps to {type(trials).__name__}, not a list")
        for position, trial in enumerate(trials):
            index = n_raw
            n_raw += 1
            missing = [k for k in TRIAL_KEYS if not isinstance(trial, dict) or k not in trial]
            if missing:
                raise DataContractError(f"{path}: participant {subject!r}, trial {position} lacks key(s) {missing}")
            if trial["exp_trial_type"] != KEPT_TRIAL_TYPE:
                n_not_exp += 1
                continue
            stems = [stem(trial[f"image{p}Path"]) for p in (1, 2, 3)]
            matches = [p for p, s in enumerate(stems) if s == stem(trial["selected_image"])]
            if len(matches) != 1:
                n_bad += 1
                continue
            rows.append((str(subject), index, *stems, matches[0], _triplet_type(trial["triplet_type"], path,
                                                                                subject, position)))
    trials = pd.DataFrame(rows, columns=["subject_id", "trial", "stem1", "stem2", "stem3", "choice", "triplet_type"])
    codes, _ = pd.factorize(trials["subject_id"], sort=True)
    trials.insert(1, "participant", codes.astype(np.int64))
    return LevelsData(trials=trials, n_raw=n_raw, n_not_exp=n_not_exp, n_bad_selection=n_bad)


def _triplet_type(value: Any, path: Path, subject: Any, position: int) -> str:
    if value is None:
        return NONE_TYPE
    if value not in TRIPLET_TYPES:
        raise DataContractError(f"{path}: participant {subject!r}, trial {position} has triplet_type {value!r}; "
                                f"expected one of {list(TRIPLET_TYPES)} or None")
    return str(value)


# --------------------------------------------------------------------------------------------- images


def stem_rows(manifest: pd.DataFrame, ids: list[str], source: str) -> dict[str, int]:
    """File stem of each manifest image → its row in the feature file (joined by image id). Stems must be unique."""
    stems = manifest["path"].astype(str).map(stem)
    duplicated = stems[stems.duplicated()]
    if len(duplicated):
        raise DataContractError(f"{source}: manifest file stem {duplicated.iloc[0]!r} is not unique, so Levels "
                                "images cannot be resolved by stem")
    row_of_id = {image_id: row for row, image_id in enumerate(ids)}
    return {s: row_of_id[i] for s, i in zip(stems, manifest["image_id"]) if i in row_of_id}


def resolve(trials: pd.DataFrame, rows: dict[str, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(T, 3) feature rows (−1 where missing), mask of fully resolved trials, and the sorted missing stems."""
    stems = trials[["stem1", "stem2", "stem3"]].to_numpy()
    index = pd.Series(stems.ravel()).map(rows).fillna(-1).to_numpy(dtype=np.int64).reshape(-1, 3)
    missing = sorted(set(stems[index < 0].tolist()))
    return index, (index >= 0).all(axis=1), missing


# --------------------------------------------------------------------------------------------- scores


def evaluate_levels(features: np.ndarray, trials: pd.DataFrame, index: np.ndarray, seed: int = 1234,
                    n_jobs: int = 2) -> tuple[pd.DataFrame, dict[str, Any]]:
    """docs/methods.md §9.1 on resolved trials (`index` = their (T, 3) feature rows), overall and per triplet type.

    Per-trial `trial` is the index in the flattened pickle, so tables of two representations pair by key.
    """
    triplets = pd.DataFrame({"participant": trials["participant"].to_numpy(), "choice": trials["choice"].to_numpy()})
    logits = triplet_logits(features, index[:, 0], index[:, 1], index[:, 2])
    per_trial, summary = score_logits(logits, triplets, seed=seed, n_jobs=n_jobs)
    rows = per_trial["trial"].to_numpy()
    per_trial["trial"] = trials["trial"].to_numpy()[rows]
    per_trial["subject_id"] = trials["subject_id"].to_numpy()[rows]
    per_trial["triplet_type"] = trials["triplet_type"].to_numpy()[rows]
    types = trials["triplet_type"].to_numpy()
    choice = trials["choice"].to_numpy()
    for kind in (*TRIPLET_TYPES, NONE_TYPE):
        subset = types == kind
        part = per_trial[per_trial["triplet_type"] == kind]
        summary[f"n_triplets__{kind}"] = int(subset.sum())
        summary[f"zero_shot_acc__{kind}"] = zero_shot_accuracy(logits[subset], choice[subset]) if subset.any() \
            else math.nan
        summary[f"n_participants__{kind}"] = int(part["participant"].nunique())
        summary.update({f"{name}__{kind}": value for name, value in cv_scores(part).items()})
    return per_trial, summary


def noise_ceiling_summary(trials: pd.DataFrame) -> dict[str, Any]:
    """Levels ceiling (docs/methods.md §11): repeats are (participant, sorted triplet) within a type; the choice is the selected
    image's place in the sorted triplet, so a repeat shown in another order still counts as the same choice."""
    stems = trials[["stem1", "stem2", "stem3"]].to_numpy(dtype=object)
    order = np.argsort(stems, axis=1, kind="stable")
    sorted_stems = np.take_along_axis(stems, order, axis=1)
    chosen = np.argmax(order == trials["choice"].to_numpy()[:, None], axis=1)
    key = pd.DataFrame({"participant": trials["participant"].to_numpy(), "a": sorted_stems[:, 0],
                        "b": sorted_stems[:, 1], "c": sorted_stems[:, 2], "type": trials["triplet_type"].to_numpy()})
    group = key.groupby(list(key.columns), sort=False).ngroup().to_numpy()
    overall, n_repeated = entropy_ceiling(group, chosen)
    by_type, repeated_by_type = {}, {}
    for kind in sorted(set(key["type"])):
        subset = key["type"].to_numpy() == kind
        by_type[kind], repeated_by_type[kind] = entropy_ceiling(np.unique(group[subset], return_inverse=True)[1],
                                                                chosen[subset])
    return {"overall": overall, "n_repeated_triplets": n_repeated, "by_type": by_type,
            "n_repeated_triplets_by_type": repeated_by_type}
