"""Voxelwise ridge encoding at THINGS-fMRI scale: one outer fold of 9,840 trials (12 sessions of 820) × 768
features × 20,000 voxels, α per voxel from 100 values (the study's grid, 10⁻⁶ … 10³), inner CV over 5 session groups
of the 11 training sessions. Every fit below runs under one BLAS thread limit, `THREADS` = os.cpu_count(), for all
sides alike.

ours      `metalign.brain.ridge.GroupedRidgeCV` (numpy backend, float32 products, float64 eigenbasis).
baseline  himalaya's `RidgeCV(alphas, fit_intercept=True, cv=<the same 5 grouped splits>)` on float32 arrays, numpy
          backend: the same CV scheme, dtype, α grid and thread count.
himalaya costs O(n_alphas · n_val · n_train) per voxel and split (per split it forms the (n_alphas, n_val, n_train)
resolution matrix, a voxel-independent O(n_alphas · D · n_train · (D + n_val)), and multiplies it with the targets),
so it runs on `HIMALAYA_VOXELS` (100 and 1,000) voxels only; its 20,000-voxel time is extrapolated linearly
(time = a + b · voxels through those two measured points, 900 voxels apart so that b is not lost in timing noise),
which the line states. Ours runs measured on every voxel count.

second baseline  the plain per-split eigendecomposition ridge a competent numpy user would write (`numpy_eigh_ridge`):
          per inner split, centre by the split's training means, eigendecompose the training Gram matrix (float64,
          D × D, as ours), then for every α predict the validation rows in the eigenbasis (float32 products, as ours)
          and average the validation MSE over splits; refit on all training rows with each voxel's α. Same splits, α
          grid, dtype and threads; O(n_alphas · n_val · D) per voxel and split, so it runs on the first
          `NUMPY_VOXELS` (1,000) voxels, where ours is also measured: both measured, nothing extrapolated.

Outputs checked inside the benchmark, on the first 1,000 voxels (all three ran them; the fits are per voxel, so ours is
sliced from its 20,000-voxel run): predictions agree within `PRED_RTOL` of the prediction scale, and every voxel's
selected α is a minimiser of the numpy baseline's CV-MSE curve within `ALPHA_MSE_RTOL` (relative): near-flat curves
(high-SNR voxels barely change between α = 10⁻⁶ and 1) let float32 rounding pick different grid points of equal
error, so exact α agreement is printed but not required. The synthetic voxels' signal scale spans 1 … 100× (log-
uniform) so that the selected α spread over the grid instead of all sitting at its top.
Scaling lines: ours measured at each of `SCALING_VOXELS` vs himalaya at the same count (measured at 100 and 1,000
voxels, extrapolated above, as labelled); the data go to results/bench/scaling_ridge.csv (and .png).
"""

from __future__ import annotations

import os
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from benchmarks.common import report, unmet
from metalign.brain import cv
from metalign.brain.ridge import GroupedRidgeCV, alpha_grid

N_SESSIONS, PER_SESSION, N_FEATURES, N_VOXELS = 12, 820, 768, 20_000
HIMALAYA_VOXELS = (100, 1_000)
NUMPY_VOXELS = 1_000
SCALING_VOXELS = (100, 1_000, 2_000, 5_000, 10_000, 20_000)
N_INNER = 5
PRED_RTOL = 1e-3
ALPHA_MSE_RTOL = 1e-5
THREADS = os.cpu_count() or 1


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = N_SESSIONS * PER_SESSION
    x = rng.standard_normal((n, N_FEATURES), dtype=np.float32)
    low_rank = rng.standard_normal((N_FEATURES, 32), dtype=np.float32)
    y = x @ (low_rank @ rng.standard_normal((32, N_VOXELS), dtype=np.float32) / np.sqrt(32 * N_FEATURES))
    y *= rng.permutation(np.logspace(0, 2, N_VOXELS)).astype(np.float32)  # SNR per voxel: selected α spread
    y += rng.standard_normal(y.shape, dtype=np.float32) * 2.0
    return x, y, np.repeat(np.arange(N_SESSIONS), PER_SESSION)


def himalaya_ridge(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, alphas: np.ndarray,
                   splits: list) -> tuple[np.ndarray, np.ndarray]:
    """himalaya RidgeCV in float32 on the given splits: predictions and the selected α's index in `alphas`."""
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV

    set_backend("numpy")
    model = RidgeCV(alphas=alphas.astype(np.float32), fit_intercept=True, cv=list(splits),
                    solver_params={"warn": False, "n_alphas_batch": 10})
    model.fit(x.astype(np.float32), y.astype(np.float32))
    best = np.abs(np.log(np.asarray(model.best_alphas_, dtype=np.float64))[:, None]
                  - np.log(alphas)[None, :]).argmin(1)
    return np.asarray(model.predict(x_test.astype(np.float32))), best


def _centred_eigh(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training mean, centred rows (float32), eigenvalues and eigenvectors of their Gram matrix (float64 eigh)."""
    mean = x[rows].mean(0, dtype=np.float64).astype(np.float32)
    xc = x[rows] - mean
    xc64 = xc.astype(np.float64)
    lam, vecs = np.linalg.eigh(xc64.T @ xc64)
    return mean, xc, lam, vecs.astype(np.float32)


def numpy_eigh_ridge(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, alphas: np.ndarray, splits: list,
                     target_batch: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain per-split eigendecomposition ridge with α per voxel (fit_intercept, grouped splits): predictions, the
    selected α's index and the CV-MSE curve (n_alphas, voxels), averaged over splits as ours and himalaya do."""
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
    mse = np.zeros((len(alphas), y.shape[1]))
    for train, val in splits:
        mean, xc, lam, vecs = _centred_eigh(x, train)
        a = (x[val] - mean) @ vecs  # validation rows in the eigenbasis
        g = (1.0 / (lam[None, :] + alphas[:, None])).astype(np.float32)  # (n_alphas, D)
        for start in range(0, y.shape[1], target_batch):
            cols = slice(start, start + target_batch)
            y_mean = y[train, cols].mean(0, dtype=np.float64).astype(np.float32)
            p = vecs.T @ (xc.T @ (y[train, cols] - y_mean))  # (D, voxels)
            y_val = y[val, cols] - y_mean
            for k in range(len(alphas)):
                mse[k, cols] += ((y_val - a @ (g[k][:, None] * p)) ** 2).mean(0) / len(splits)
    best = mse.argmin(0)
    mean, xc, lam, vecs = _centred_eigh(x, np.arange(len(x)))
    a_test = (np.asarray(x_test, dtype=np.float32) - mean) @ vecs
    y_mean = y.mean(0, dtype=np.float64).astype(np.float32)
    p = vecs.T @ (xc.T @ (y - y_mean))
    g = (1.0 / (lam[:, None] + alphas[best][None, :])).astype(np.float32)
    return a_test @ (g * p) + y_mean, best, mse


def _check(name: str, pred: np.ndarray, best: np.ndarray, ref_pred: np.ndarray, ref_mse: np.ndarray) -> str:
    """Predictions vs the numpy reference's, and `best` against the reference's CV-MSE curve; one summary."""
    err = float(np.abs(pred - ref_pred).max() / np.abs(ref_pred).max())
    low = ref_mse.min(0)
    excess = float(((ref_mse[best, np.arange(len(best))] - low) / low).max())
    exact = float((best == ref_mse.argmin(0)).mean())
    assert err <= PRED_RTOL, f"{name}: predictions differ from the numpy reference by {err:.2e} of their scale"
    assert excess <= ALPHA_MSE_RTOL, (f"{name}: a selected α's CV MSE exceeds the minimum by {excess:.1e} "
                                      f"(relative; tolerance {ALPHA_MSE_RTOL:.0e})")
    return f"{name}: max |Δpred| {err:.1e} of scale, α CV-MSE excess ≤ {excess:.1e}, same α on {exact:.1%}"


def main() -> dict:
    with threadpool_limits(limits=THREADS, user_api="blas"):
        return _run()


def _run() -> dict:
    x, y, sessions = _data()
    images = np.arange(len(x)).astype(str)  # synthetic: every trial its own image
    train, test = cv.outer_folds("heldout_session", sessions, images, None, seed=0)[1][0]
    inner = cv.inner_splits("heldout_session", sessions[train], images[train], N_INNER, seed=0)
    alphas = alpha_grid(-6, 3, 100)
    x_tr, x_te = x[train], x[test]

    ours_at, ours_out = {}, None
    for n_vox in SCALING_VOXELS:
        start = time.perf_counter()
        out = GroupedRidgeCV(alphas, inner, backend="numpy").fit_predict(x_tr, y[train, :n_vox], x_te)
        ours_at[n_vox] = time.perf_counter() - start
        if n_vox == N_VOXELS:
            ours_out = out
    himalaya_at = {}
    for n_vox in HIMALAYA_VOXELS:
        start = time.perf_counter()
        him_pred, him_best = himalaya_ridge(x_tr, y[train, :n_vox], x_te, alphas, inner)
        himalaya_at[n_vox] = time.perf_counter() - start
    him_vox = max(HIMALAYA_VOXELS)  # him_pred / him_best are from this, the last and largest, run
    start = time.perf_counter()
    np_pred, np_best, np_mse = numpy_eigh_ridge(x_tr, y[train, :NUMPY_VOXELS], x_te, alphas, inner)
    numpy_s = time.perf_counter() - start
    blas = sorted({(i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"})

    # outputs on the voxels all three ran (fits are per voxel: independent of the rest)
    n_check = min(him_vox, NUMPY_VOXELS)
    ref_pred, ref_mse = np_pred[:, :n_check], np_mse[:, :n_check]
    checks = [_check("ours", ours_out[0][:, :n_check], ours_out[1][:n_check], ref_pred, ref_mse),
              _check("himalaya", him_pred[:, :n_check], him_best[:n_check], ref_pred, ref_mse)]
    spread = np.bincount(np_best[:n_check], minlength=len(alphas))
    print(f"# ridge checks on {n_check} voxels vs the numpy eigh reference ({'; '.join(checks)}); selected α index "
          f"spans {int(np.flatnonzero(spread)[0])}…{int(np.flatnonzero(spread)[-1])} of 0…{len(alphas) - 1}; "
          f"BLAS {blas}; himalaya measured {', '.join(f'{t:.1f} s @ {n}' for n, t in himalaya_at.items())} voxels",
          flush=True)

    (v0, t0), (v1, t1) = sorted(himalaya_at.items())
    # under heavy load the measured slope can come out <= 0: then himalaya's measured time at v1 voxels is a lower
    # bound for any larger voxel count (its work only grows with voxels)
    slope = (t1 - t0) / (v1 - v0)
    if slope > 0:
        how_extra = f"extrapolated linearly through its measured {v0}- and {v1}-voxel times"
        himalaya_time = lambda n: himalaya_at.get(n, t0 + slope * (n - v0))  # noqa: E731
    else:
        how_extra = f"lower bound = its measured {v1}-voxel time (measured slope {v0}→{v1} voxels not positive)"
        himalaya_time = lambda n: himalaya_at.get(n, t1)  # noqa: E731
    threads = f"{THREADS} BLAS threads both sides"
    ratio = himalaya_time(N_VOXELS) / ours_at[N_VOXELS]
    report(f"ridge_fold_9840x768x{N_VOXELS}", ours_at[N_VOXELS], himalaya_time(N_VOXELS),
           f">=2x vs himalaya RidgeCV float32 on the same 5 grouped splits (CPU, {threads}; ours measured on "
           f"{N_VOXELS} voxels, baseline {how_extra}; outputs checked on {n_check} voxels)"
           f"{unmet(ratio >= 2)}")
    report(f"ridge_fold_9840x768x{v1}_both_measured", ours_at[v1], t1,
           f">=2x vs himalaya RidgeCV float32, same splits, {threads}, both measured on {v1} voxels"
           f"{unmet(t1 / ours_at[v1] >= 2)}")
    report(f"ridge_fold_9840x768x{NUMPY_VOXELS}_vs_numpy_eigh", ours_at[NUMPY_VOXELS], numpy_s,
           f"report (vs numpy eigh ridge: per-split eigendecomposition, float32 products, same 5 grouped splits and "
           f"100-α grid, {threads}; both measured on {NUMPY_VOXELS} voxels, nothing extrapolated; predictions within "
           f"{PRED_RTOL:.0e} of scale, α minimising CV MSE within {ALPHA_MSE_RTOL:.0e})")
    rows = []
    for n_vox in SCALING_VOXELS:
        how = "measured" if n_vox in himalaya_at else how_extra
        report(f"ridge_scaling_voxels_{n_vox}", ours_at[n_vox], himalaya_time(n_vox),
               f"report (ours measured; himalaya {how}; {threads})")
        rows.append((n_vox, ours_at[n_vox], himalaya_time(n_vox), n_vox in himalaya_at))
    return {"ridge": rows}


if __name__ == "__main__":
    main()
