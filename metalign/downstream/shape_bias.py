"""Texture vs shape bias on cue-conflict stimuli (Geirhos et al. 2019; model-vs-human's definition).

Each stimulus has the shape of one category and the texture of another, encoded in its file name
(`<shape>/<shape><i>-<texture><j>.png`, e.g. `airplane/airplane1-bear2.png`). Representations have no classifier
head, so a 16-way decision rule is fitted on ordinary training images of the categories (each category is a set of
training classes, e.g. ImageNet wnids; `train_per_category` images per category, seeded) and recorded: a
least-squares probe or the nearest class centroid, identical for base and meta. Over the stimuli whose shape and
texture categories differ, shape bias = #shape decisions / (#shape + #texture decisions).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from metalign.config.downstream import category_of
from metalign.downstream.data import SplitRef, load_rows, read_features, sample_per_class, take_shots
from metalign.downstream.probe import ProbeConfig
from metalign.io import DataContractError

STIMULUS_NAME = re.compile(r"^(?P<shape>[A-Za-z_]+?)\d+-(?P<texture>[A-Za-z_]+?)\d+\.[A-Za-z]+$")


def parse_stimuli(rows: pd.DataFrame, categories: Sequence[str], source: str) -> pd.DataFrame:
    """image_id, shape, texture of every stimulus; the shape in the name must be the folder's (the label)."""
    parsed = []
    for image_id, label in zip(rows["image_id"], rows["label"]):
        match = STIMULUS_NAME.match(image_id.rsplit("/", 1)[-1])
        if match is None:
            raise DataContractError(f"{source}: stimulus {image_id!r} is not named <shape><i>-<texture><j>.<ext>")
        shape, texture = match["shape"], match["texture"]
        if shape != label:
            raise DataContractError(f"{source}: stimulus {image_id!r} has shape {shape!r} in its name but lies in "
                                    f"folder {label!r}")
        for cue in (shape, texture):
            if cue not in categories:
                raise DataContractError(f"{source}: stimulus {image_id!r} names unknown category {cue!r}")
        parsed.append((image_id, shape, texture))
    return pd.DataFrame(parsed, columns=["image_id", "shape", "texture"])


def shape_bias(shape: Sequence[str], texture: Sequence[str], decision: Sequence[str]) -> dict[str, float | int]:
    """Counts over cue-conflict stimuli (shape ≠ texture); shape_bias is NaN when no decision hits either cue."""
    shape, texture, decision = (np.asarray(v, dtype=object) for v in (shape, texture, decision))
    conflict = shape != texture
    n_shape = int(np.sum(conflict & (decision == shape)))
    n_texture = int(np.sum(conflict & (decision == texture)))
    n_conflict = int(conflict.sum())
    return {
        "shape_bias": n_shape / (n_shape + n_texture) if n_shape + n_texture else float("nan"),
        "frac_shape": n_shape / n_conflict if n_conflict else float("nan"),
        "frac_texture": n_texture / n_conflict if n_conflict else float("nan"),
        "n_shape": n_shape, "n_texture": n_texture, "n_conflict": n_conflict,
        "n_same_cue_excluded": int(len(shape) - n_conflict),
    }


def evaluate_shape_bias(train: SplitRef, stimuli: SplitRef, categories: Mapping[str, Sequence[str]], rule: str,
                        train_per_category: int | None, seed: int, probe: ProbeConfig,
                        l2_normalise: bool) -> tuple[dict[str, Any], pd.DataFrame]:
    """Summary (shape bias overall and per shape category) and one decision row per stimulus."""
    names = list(categories)
    owner = category_of(categories)
    train_rows = load_rows(train)
    missing = sorted(set(owner) - set(train_rows["label"]))
    if missing:
        raise DataContractError(f"{train.name}: no training image of category class {missing[0]!r} "
                                f"({len(missing)} missing)")
    train_rows = train_rows[train_rows["label"].isin(owner)].reset_index(drop=True)
    y = train_rows["label"].map(owner).map({n: i for i, n in enumerate(names)}).to_numpy()
    rows = (np.sort(take_shots(sample_per_class(y, len(names), seed), train_per_category))
            if train_per_category else np.arange(len(y)))
    fit = probe.fit(read_features(train.features, train_rows["image_id"].iloc[rows], l2_normalise), y[rows],
                    len(names), rule)

    stimulus_rows = load_rows(stimuli)
    parsed = parse_stimuli(stimulus_rows, names, stimuli.name)
    decided = fit.classifier.predict(read_features(stimuli.features, parsed["image_id"], l2_normalise))
    parsed["decision"] = np.asarray(names, dtype=object)[decided]
    summary = {**shape_bias(parsed["shape"], parsed["texture"], parsed["decision"]), "decision_rule": rule,
               "n_train": len(rows), "train_per_category": train_per_category, "seed": seed, **fit.summary()}
    summary["per_category"] = {c: shape_bias(g["shape"], g["texture"], g["decision"])["shape_bias"]
                               for c, g in parsed.groupby("shape", sort=True)}
    return summary, parsed
