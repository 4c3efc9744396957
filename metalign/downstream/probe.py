"""Full-data linear probes (BREEDS, ImageNet-A, shape-bias decisions) and the nearest-centroid alternative.

The probe is the same closed-form least-squares classifier as the few-shot evaluation (`fewshot.lsr_system`), fitted
on all training rows. Its ridge strength is chosen from a grid on a stratified, seeded hold-out of the training rows
(one Gram matrix serves the whole grid), then refitted on all rows; whether the choice sits on a grid edge is
recorded (docs/methods.md P-22), since base and meta representations have very different scales and spectra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from metalign.downstream.data import sample_per_class
from metalign.downstream.fewshot import LinearClassifier, lsr_system


@dataclass(frozen=True)
class ProbeFit:
    classifier: LinearClassifier
    l2: float | None  # None for rules without a ridge strength (nearest centroid)
    l2_at_edge: bool = False
    val_acc: dict[float, float] = field(default_factory=dict)

    def summary(self, prefix: str = "") -> dict[str, float | bool | None]:
        return {f"{prefix}l2": self.l2, f"{prefix}l2_at_edge": self.l2_at_edge,
                f"{prefix}val_acc": max(self.val_acc.values()) if self.val_acc else None}


def holdout_split(y: np.ndarray, n_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): per class, the first ⌈fraction · n_c⌉ rows of a seeded permutation are held
    out, but every class keeps at least one fitting row."""
    fit, val = [], []
    for rows in sample_per_class(y, n_classes, seed):
        n_val = min(int(np.ceil(fraction * len(rows))), len(rows) - 1)
        val.append(rows[:max(n_val, 0)])
        fit.append(rows[max(n_val, 0):])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def fit_lsr_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2_grid: Sequence[float], val_fraction: float,
                  seed: int) -> ProbeFit:
    """Least-squares probe with the ridge strength chosen on a hold-out (ties go to the stronger ridge)."""
    grid = sorted(float(v) for v in l2_grid)
    if not grid:
        raise ValueError("the probe's l2 grid is empty")
    val_acc: dict[float, float] = {}
    if len(grid) > 1:
        fit, val = holdout_split(y, n_classes, val_fraction, seed)
        if len(val) == 0:
            raise ValueError(f"val_fraction {val_fraction} leaves no validation rows for {len(y)} training rows")
        system = lsr_system(x[fit], y[fit], n_classes)
        val_acc = {l2: system.classifier(l2).accuracy(x[val], y[val]) for l2 in grid}
    best = max(grid, key=lambda l2: (val_acc.get(l2, 0.0), l2))
    edge = len(grid) > 1 and best in (grid[0], grid[-1])
    return ProbeFit(lsr_system(x, y, n_classes).classifier(best), best, edge, val_acc)


def fit_centroids(x: np.ndarray, y: np.ndarray, n_classes: int) -> ProbeFit:
    """Nearest class centroid by cosine: unit-length class means of unit-length training rows."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    counts = np.bincount(y, minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(f"class {int(np.argmin(counts))} has no training row")
    means = np.zeros((n_classes, x.shape[1]))
    np.add.at(means, y, unit)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    classifier = LinearClassifier(means.T.astype(np.float32), np.zeros(n_classes, np.float32), normalise_inputs=True)
    return ProbeFit(classifier, None)


def fit_decision_rule(rule: str, x: np.ndarray, y: np.ndarray, n_classes: int, l2_grid: Sequence[float],
                      val_fraction: float, seed: int) -> ProbeFit:
    if rule == "probe":
        return fit_lsr_probe(x, y, n_classes, l2_grid, val_fraction, seed)
    if rule == "centroid":
        return fit_centroids(x, y, n_classes)
    raise ValueError(f"unknown decision rule {rule!r}; known: probe, centroid")


@dataclass(frozen=True)
class ProbeConfig:
    """Ridge grid, hold-out fraction and hold-out seed shared by every full-data probe."""

    l2_grid: tuple[float, ...]
    val_fraction: float
    seed: int

    def fit(self, x: np.ndarray, y: np.ndarray, n_classes: int, rule: str = "probe") -> ProbeFit:
        return fit_decision_rule(rule, x, y, n_classes, self.l2_grid, self.val_fraction, self.seed)
