"""Closed-form least-squares classification on frozen features: big_vision's `fewshot_lsr` evaluator.

big_vision (`big_vision/evaluators/fewshot_lsr.py`) standardises the features with the *few-shot training set's*
mean and std (+1e-5), appends a constant feature of 100 (a bias that is almost unregularised), maps labels to
one-hot targets rescaled into {-1, 1}, and solves L2-regularised least squares in the primal (zᵀz + λI, when
n ≥ d) or dual (z zᵀ + λI, when n < d) form. Per seed it permutes each class's training rows once
(`np.random.default_rng(seed)`); the k-shot set is the first k rows of every class, so shot counts are nested
within a seed. Accuracy is the argmax over all classes.

Like big_vision, the features enter raw (only standardised); `l2_normalise` (off by default) first scales every row to
unit length, the project's earlier default, kept as an option for comparing representations of different scale.

Differences that do not change the solution: big_vision eigendecomposes the Gram matrix (to sweep λ); with one λ
per fit one Cholesky factorisation is several times cheaper, and the probes' λ grid costs one Cholesky per λ. The
standardisation and the bias are folded into the weights, so test rows are scored raw (x W + b, float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.sparse import csr_matrix

from metalign.downstream.data import (
    SplitRef,
    class_index,
    load_rows,
    read_features,
    resolve_classes,
    sample_per_class,
    take_shots,
)

BIAS_CONSTANT = 100.0
STD_EPS = 1e-5
GRAM_BLOCK = 1 << 14  # rows per block when accumulating zᵀz (bounds float64 memory on 10⁵-row probes)
SCORE_BLOCK = 1 << 14


@dataclass(frozen=True)
class LinearClassifier:
    """Scores x W + b (on unit rows when `normalise_inputs`); `predict` may restrict the argmax to some classes."""

    weight: np.ndarray  # (D, C) float32
    bias: np.ndarray  # (C,) float32
    normalise_inputs: bool = False

    def scores(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.normalise_inputs:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        return x @ self.weight + self.bias

    def predict(self, x: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """Class numbers; with `allowed` (class numbers), the argmax runs over those classes only."""
        out = np.empty(len(x), dtype=np.int64)
        for start in range(0, len(x), SCORE_BLOCK):
            block = self.scores(x[start:start + SCORE_BLOCK])
            if allowed is None:
                out[start:start + len(block)] = block.argmax(axis=1)
            else:
                out[start:start + len(block)] = allowed[block[:, allowed].argmax(axis=1)]
        return out

    def accuracy(self, x: np.ndarray, y: np.ndarray, allowed: np.ndarray | None = None) -> float:
        return float(np.mean(self.predict(x, allowed) == y)) if len(y) else float("nan")


@dataclass(frozen=True)
class LsrSystem:
    """The regularisation-free parts of one least-squares problem; `classifier(λ)` solves it for any λ > 0.

    Primal (n ≥ D + 1): gram = zᵀz, rhs = zᵀT, W = (gram + λI)⁻¹ rhs.
    Dual (n < D + 1): gram = z zᵀ, rhs = T, W = zᵀ (gram + λI)⁻¹ T, with `z` kept.
    """

    mean: np.ndarray
    std: np.ndarray
    gram: np.ndarray
    rhs: np.ndarray
    z: np.ndarray | None = None  # whitened, bias-augmented rows; only for the dual form

    def classifier(self, l2: float) -> LinearClassifier:
        if not l2 > 0:
            raise ValueError(f"the ridge strength must be positive, got {l2}")
        solved = cho_solve(cho_factor(self.gram + l2 * np.eye(len(self.gram))), self.rhs)
        w = solved if self.z is None else self.z.T @ solved  # (D + 1, C) on whitened features
        weight = w[:-1] / self.std[:, None]
        bias = BIAS_CONSTANT * w[-1] - (self.mean / self.std) @ w[:-1]
        return LinearClassifier(weight.astype(np.float32), bias.astype(np.float32))


def signed_one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    """big_vision's targets: 2 · one_hot(y) − 1, i.e. +1 for the class and −1 for every other class."""
    return 2.0 * np.eye(n_classes)[y] - 1.0


def _whiten(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, dtype=np.float64) - mean) / std
    return np.hstack([z, np.full((len(z), 1), BIAS_CONSTANT)])


def lsr_system(x: np.ndarray, y: np.ndarray, n_classes: int) -> LsrSystem:
    """The Gram matrix of the smaller side (primal if n ≥ D + 1, else dual), accumulated in float64 blocks."""
    x = np.asarray(x)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need a non-empty (n, D) feature matrix with one label per row; got {x.shape}, {len(y)}")
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64) + STD_EPS
    y = np.asarray(y)
    n, dim = len(x), x.shape[1] + 1
    if n >= dim:
        gram, class_sums = np.zeros((dim, dim)), np.zeros((n_classes, dim))
        for start in range(0, n, GRAM_BLOCK):
            z = _whiten(x[start:start + GRAM_BLOCK], mean, std)
            gram += z.T @ z
            rows = y[start:start + GRAM_BLOCK]
            class_sums += csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), (n_classes, len(rows))) @ z
        # zᵀ(2·onehot − 1) = 2·(per-class sums of z) − (sum of z): O(n·D) instead of O(n·D·C)
        return LsrSystem(mean, std, gram, (2.0 * class_sums - class_sums.sum(axis=0)).T)
    z = _whiten(x, mean, std)
    return LsrSystem(mean, std, z @ z.T, signed_one_hot(y, n_classes), z)


def draw_samples(y_train: np.ndarray, n_classes: int, shots: Sequence[int],
                 seeds: Sequence[int]) -> dict[tuple[int, int], np.ndarray]:
    """Training row numbers of every (seed, shots) few-shot set, drawn as big_vision does."""
    samples = {}
    for seed in seeds:
        permutations = sample_per_class(y_train, n_classes, seed)
        samples.update({(seed, k): take_shots(permutations, k) for k in shots})
    return samples


def evaluate_samples(rows: Callable[[np.ndarray], np.ndarray], y_train: np.ndarray,
                     samples: dict[tuple[int, int], np.ndarray], x_test: np.ndarray, y_test: np.ndarray,
                     n_classes: int, l2: float) -> dict[tuple[int, int], float]:
    """Test accuracy of the least-squares classifier fitted on each sample; `rows(idx)` returns their features."""
    return {key: lsr_system(rows(idx), y_train[idx], n_classes).classifier(l2).accuracy(x_test, y_test)
            for key, idx in samples.items()}


def fewshot_lsr(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n_classes: int,
                shots: Iterable[int], seeds: Iterable[int], l2: float) -> dict[tuple[int, int], float]:
    """In-memory few-shot evaluation: accuracy per (seed, shots)."""
    samples = draw_samples(y_train, n_classes, list(shots), list(seeds))
    return evaluate_samples(lambda idx: x_train[idx], y_train, samples, x_test, y_test, n_classes, l2)


def evaluate_fewshot(train: SplitRef, test: SplitRef, classes: Sequence[str] | str | None, shots: Sequence[int],
                     seeds: Sequence[int], l2: float, l2_normalise: bool = False) -> dict[str, Any]:
    """Few-shot accuracies of one representation on one dataset; only the sampled training rows are read.
    `l2_normalise` scales rows to unit length before big_vision's standardisation (big_vision: off)."""
    train_rows = load_rows(train)
    names = resolve_classes(classes, train_rows["label"], train.name)
    y_pool = class_index(train_rows["label"], names, train.name)
    samples = draw_samples(y_pool, len(names), shots, seeds)
    needed = np.unique(np.concatenate(list(samples.values())))
    x_needed = read_features(train.features, train_rows["image_id"].iloc[needed], l2_normalise)
    test_rows = load_rows(test)
    y_test = class_index(test_rows["label"], names, test.name)
    kept = y_test >= 0
    x_test = read_features(test.features, test_rows["image_id"][kept], l2_normalise)
    acc = evaluate_samples(lambda idx: x_needed[np.searchsorted(needed, idx)], y_pool, samples, x_test,
                           y_test[kept], len(names), l2)
    out: dict[str, Any] = {"n_classes": len(names), "n_train_pool": int((y_pool >= 0).sum()),
                           "n_test": int(kept.sum()), "n_test_dropped": int((~kept).sum()), "l2_reg": l2,
                           "seeds": list(seeds), "shots": list(shots), "l2_normalise": l2_normalise}
    for k in shots:
        values = [acc[(seed, k)] for seed in seeds]
        out[f"acc_{k}shot"] = float(np.mean(values))
        out[f"acc_{k}shot_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[f"acc_{k}shot_per_seed"] = values
    return out
