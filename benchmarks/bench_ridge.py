"""Voxelwise ridge encoding at THINGS-fMRI scale: one outer fold of 9,840 trials (12 sessions of 820) × 768 features
× 20,000 voxels, α per voxel from 100 values.

ours: `metalign.brain.ridge.GroupedRidgeCV` on the numpy backend, inner CV over 5 groups of the 11 training
sessions, all 20,000 voxels. baseline: the upstream per-fold step, scikit-learn `RidgeCV(alpha_per_target=True)`
(efficient leave-one-out), timed in the same run on 1 and 200 voxels and extrapolated linearly
(time = a + b · voxels, so the voxel-independent SVD is not multiplied) to 20,000 voxels; running it on all voxels
would take tens of minutes on 2 cores. Both are per outer fold; the full protocol repeats them 12 times.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import report, timer
from metalign.brain import cv
from metalign.brain.ridge import GroupedRidgeCV, alpha_grid

N_SESSIONS, PER_SESSION, N_FEATURES, N_VOXELS = 12, 820, 768, 20_000
BASELINE_VOXELS = (1, 200)  # 1 voxel ≈ the voxel-independent cost (SVD of X); 200 gives the slope
N_INNER = 5


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = N_SESSIONS * PER_SESSION
    x = rng.standard_normal((n, N_FEATURES), dtype=np.float32)
    low_rank = rng.standard_normal((N_FEATURES, 32), dtype=np.float32)
    y = x @ (low_rank @ rng.standard_normal((32, N_VOXELS), dtype=np.float32) / np.sqrt(32 * N_FEATURES))
    y += rng.standard_normal(y.shape, dtype=np.float32) * 2.0
    return x, y, np.repeat(np.arange(N_SESSIONS), PER_SESSION)


def main() -> None:
    from sklearn.linear_model import RidgeCV

    x, y, sessions = _data()
    images = np.arange(len(x)).astype(str)  # synthetic: every trial its own image
    train, test = cv.outer_folds("heldout_session", sessions, images, None, seed=0)[1][0]
    inner = cv.inner_splits("heldout_session", sessions[train], images[train], N_INNER, seed=0)
    alphas = alpha_grid(-6, 3, 100)

    with timer() as ours:
        GroupedRidgeCV(alphas, inner, backend="numpy").fit_predict(x[train], y[train], x[test])
    times = []
    for n_voxels in BASELINE_VOXELS:
        with timer() as took:
            model = RidgeCV(alphas=alphas, alpha_per_target=True).fit(x[train], y[train, :n_voxels])
            model.predict(x[test])
        times.append(took[0])
    slope = (times[1] - times[0]) / (BASELINE_VOXELS[1] - BASELINE_VOXELS[0])
    baseline = times[0] + slope * (N_VOXELS - BASELINE_VOXELS[0])
    report("ridge_fold_9840x768x20000", ours[0], baseline, "≥5x faster than sklearn RidgeCV per fold (CPU)")


if __name__ == "__main__":
    main()
