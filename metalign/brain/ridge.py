"""Ridge regression for many targets with one α per target, chosen by (grouped) K-fold CV over an α grid.

himalaya's `RidgeCV` does the same thing but forms, per inner split, the (n_alphas, n_val, n_train) resolution
matrix and multiplies it with the targets: O(n_alphas · n_val · n_train · n_targets), hours for THINGS-sized
folds. Here the validation error of every α comes from the eigenbasis of each split's training Gram matrix
S = V diag(λ) Vᵀ, at O(D² · n_targets) per split and only O(D · n_targets) per α:

    W(α) = V diag(g) P,   g_i = 1/(λ_i + α),   P = Vᵀ X̃_trᵀ Ỹ_tr
    SSE(α) = ‖ỹ_val‖² − 2 Σ_i g_i Z_i P_i + Σ_ij g_i g_j G_ij P_i P_j
    with A = X̃_val V, G = AᵀA, Z = Aᵀ ỹ_val.

By partial fractions, g_i g_j = (g_i − g_j)/(λ_j − λ_i), so the double sum is Σ_i g_i² G_ii P_i² +
2 Σ_i g_i P_i (G̃P)_i with G̃_ij = G_ij/(λ_j − λ_i) for i ≠ j: one D × D product per split, then two
(n_alphas × D) @ (D × targets) products for the whole grid. Eigenvalues within `CLUSTER_RTOL` (relative to
λ + α_min) of each other are given their mean, a perturbation of that relative size that keeps the division well
conditioned (their mutual pairs are summed directly); directions with λ below the eigensolver's noise floor carry
no signal (P = 0 in exact arithmetic) and are dropped.

When D exceeds the number of training rows, features are first expressed in an orthonormal basis of the rows'
span (exact, and every eigenproblem shrinks to at most n × n). Centering follows himalaya: each inner split is
centred by its own training means, and the refit on the whole training set uses the selected α per target, so α
selection, weights and predictions match `himalaya.ridge.RidgeCV(alphas, fit_intercept=True, cv=splits)`
(tests/test_brain.py). Array work runs on a himalaya backend: "numpy" on CPU, "torch_cuda" on a GPU.

`LooRidgeCV` is the study's α selection instead: scikit-learn's efficient leave-one-out (`RidgeCV` with its default
`cv=None`, `alpha_per_target=True`), used by the leaky `upstream_leaky` scheme only (docs/methods.md §9.5).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.linalg
from himalaya.backend import set_backend
from threadpoolctl import threadpool_limits

CLUSTER_RTOL = 1e-8      # eigenvalues closer than this (relative to λ + α_min) share one g
NOISE_FLOOR = 4.0        # × D × eps × λ_max: eigenvalues below it are numerical zeros
TARGET_BATCH = 4096      # targets per pass: bounds memory at O(D · batch) per split
# Below this n · D · targets, BLAS runs single-threaded: threads only add overhead there, and spinning BLAS threads
# slow small LAPACK calls ~50× on an oversubscribed machine.
SMALL_WORK = 5e7


def alpha_grid(log10_min: float, log10_max: float, n: int) -> np.ndarray:
    """`n` log-spaced ridge penalties from 10^log10_min to 10^log10_max (the study's: `cv.STUDY_ALPHAS`)."""
    if n < 2 or log10_max <= log10_min:
        raise ValueError(f"alpha grid needs n ≥ 2 and log10_max > log10_min, got {log10_min}, {log10_max}, {n}")
    return np.logspace(log10_min, log10_max, n)


def resolve_backend(name: str) -> str:
    """`auto` → torch_cuda when a GPU is visible, else numpy."""
    if name != "auto":
        return name
    try:
        import torch
    except ImportError:
        return "numpy"
    return "torch_cuda" if torch.cuda.is_available() else "numpy"


def _blas_threads(X: np.ndarray, Y: np.ndarray) -> AbstractContextManager[Any]:
    """One BLAS thread for small problems (threads cost more than they save there), the default otherwise."""
    small = np.prod(X.shape, dtype=np.float64) * Y.shape[-1] < SMALL_WORK
    return threadpool_limits(limits=1 if small else None, user_api="blas")


@dataclass
class _Split:
    """Target-independent quantities of one inner split."""

    out: Any          # training-set rows not in this split's training part (validation + dropped)
    val: Any
    val_is_out: bool
    n_train: int
    n_val: int
    sum_x_train: Any  # (D,)
    sum_x_val: Any
    vecs: Any         # (D, r)
    g: Any            # (n_alphas, n_clusters)
    g_tilde: Any      # (r, r)
    g_block: Any      # (r, r) same-cluster part of G (diagonal when no eigenvalues were merged)
    members: Any      # (n_clusters, r) 0/1, or None when every cluster is one eigenvalue
    g_diag: Any       # (r,)


class GroupedRidgeCV:
    """Fit on (X, Y) with α per target chosen on `splits` (index pairs into the rows of X), predict new rows."""

    def __init__(self, alphas: Sequence[float], splits: Sequence[tuple[np.ndarray, np.ndarray]],
                 backend: str = "numpy", target_batch: int = TARGET_BATCH, dtype: str = "float32"):
        self.alphas = np.asarray(alphas, dtype=np.float64)
        if self.alphas.ndim != 1 or len(self.alphas) == 0 or (self.alphas <= 0).any():
            raise ValueError("alphas must be a non-empty 1-d array of positive values")
        self.splits = [(np.asarray(t, dtype=np.int64), np.asarray(v, dtype=np.int64)) for t, v in splits]
        if not self.splits:
            raise ValueError("GroupedRidgeCV needs at least one inner split")
        self.backend = set_backend(resolve_backend(backend))
        self.target_batch = target_batch
        self.dtype = dtype  # of the O(n · D · targets) products; everything in the eigenbasis is float64

    # ------------------------------------------------------------------------------------------- geometry

    def _asarray(self, x: Any, dtype: str = "float64") -> Any:
        return self.backend.asarray(x, dtype=dtype)

    def _clusters(self, lam: np.ndarray) -> np.ndarray:
        """Cluster id per (ascending) eigenvalue: a new cluster starts when λ leaves the first one's tolerance."""
        ids = np.zeros(len(lam), dtype=np.int64)
        floor = NOISE_FLOOR * len(lam) * np.finfo(np.float64).eps * lam.max(initial=0.0)
        start = 0
        for i in range(1, len(lam)):
            if lam[i] - lam[start] > CLUSTER_RTOL * (lam[start] + self.alphas.min()) + floor:
                start = i
                ids[i] = ids[i - 1] + 1
            else:
                ids[i] = ids[i - 1]
        return ids

    def _split(self, x: Any, gram: Any, sum_x: Any, train: np.ndarray, val: np.ndarray) -> _Split:
        B = self.backend
        n = x.shape[0]
        out = np.setdiff1d(np.arange(n), train)
        out_b, val_b = self._asarray(out, "int64"), self._asarray(val, "int64")
        x_out = x[out_b]
        n_train = n - len(out)
        sum_x_train = sum_x - x_out.sum(0)
        mean_train = sum_x_train / n_train
        s = gram - B.matmul(x_out.T, x_out) - n_train * mean_train[:, None] * mean_train[None, :]
        lam, vecs = _eigh(self.backend, s)
        a = B.matmul(x[val_b] - mean_train, vecs)
        g_full = B.to_numpy(B.matmul(a.T, a)).astype(np.float64)
        ids = self._clusters(lam)
        n_clusters = int(ids[-1]) + 1 if len(ids) else 0
        lam_bar = np.bincount(ids, weights=lam, minlength=n_clusters) / np.maximum(np.bincount(ids), 1)
        same = ids[:, None] == ids[None, :]
        gap = lam_bar[ids][None, :] - lam_bar[ids][:, None]
        g_tilde = np.where(same, 0.0, g_full / np.where(same, 1.0, gap))
        members = None
        if n_clusters < len(lam):
            members = self._asarray((np.arange(n_clusters)[:, None] == ids[None, :]).astype(np.float64))
        return _Split(out=out_b, val=val_b, val_is_out=np.array_equal(out, np.sort(val)),
                      n_train=n_train, n_val=len(val), sum_x_train=sum_x_train, sum_x_val=x[val_b].sum(0),
                      vecs=vecs, g=self._asarray(1.0 / (lam_bar[None, :] + self.alphas[:, None])),
                      g_tilde=self._asarray(g_tilde), g_block=self._asarray(np.where(same, g_full, 0.0)),
                      members=members, g_diag=self._asarray(np.diag(g_full).copy()))

    # ------------------------------------------------------------------------------------------- CV errors

    def _cross(self, x: Any, y: Any) -> Any:
        return self._asarray(self.backend.matmul(x.T, y))

    def _split_mse(self, sp: _Split, x: Any, y: Any, cross_all: Any, sum_y: Any) -> Any:
        """Validation MSE (n_alphas, n_targets) of one split for one batch of targets (x, y in `self.dtype`)."""
        B = self.backend
        y_out = y[sp.out]
        cross_out = self._cross(x[sp.out], y_out)
        sum_y_train = sum_y - self._asarray(y_out.sum(0))
        mean_y = sum_y_train / sp.n_train
        q = cross_all - cross_out - sp.sum_x_train[:, None] * mean_y[None, :]
        p = B.matmul(sp.vecs.T, self._asarray(q))
        y_val = self._asarray(y[sp.val])
        cross_val = cross_out if sp.val_is_out else self._cross(x[sp.val], y[sp.val])
        sum_y_val = y_val.sum(0)
        mean_x = sp.sum_x_train / sp.n_train
        w = (cross_val - sp.sum_x_val[:, None] * mean_y[None, :] - mean_x[:, None] * sum_y_val[None, :]
             + sp.n_val * mean_x[:, None] * mean_y[None, :])
        z = B.matmul(sp.vecs.T, w)
        yy = (y_val ** 2).sum(0) - 2 * mean_y * sum_y_val + sp.n_val * mean_y ** 2
        lin = 2 * p * (B.matmul(sp.g_tilde, p) - z)
        quad = p * B.matmul(sp.g_block, p) if sp.members is not None else sp.g_diag[:, None] * p ** 2
        if sp.members is not None:
            lin, quad = B.matmul(sp.members, lin), B.matmul(sp.members, quad)
        sse = yy[None, :] + B.matmul(sp.g, lin) + B.matmul(sp.g ** 2, quad)
        return sse / sp.n_val

    # ------------------------------------------------------------------------------------------- public

    def fit_predict(self, X: np.ndarray, Y: np.ndarray, X_test: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predictions for `X_test` (n_test, n_targets) float32, the selected α index and CV MSE per target."""
        X, Y, X_test = np.asarray(X), np.asarray(Y), np.asarray(X_test)
        with _blas_threads(X, Y):
            return self._fit_predict(X, Y, X_test)

    def _fit_predict(self, X: np.ndarray, Y: np.ndarray, X_test: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B = self.backend
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or X_test.shape[1:] != X.shape[1:]:
            raise ValueError(f"shapes do not match: X {X.shape}, Y {Y.shape}, X_test {X_test.shape}")
        for train, val in self.splits:
            if len(train) == 0 or len(val) == 0 or max(train.max(), val.max()) >= len(X):
                raise ValueError("inner splits must be non-empty and index rows of X")
            if np.intersect1d(train, val).size:
                raise ValueError("an inner split has rows in both its training and validation parts")
        if X.shape[1] > X.shape[0]:
            X, X_test = _row_space(X, X_test)
        x_mean = X.mean(0, dtype=np.float64)
        x = self._asarray(X - x_mean)
        x_big = self._asarray(x, self.dtype)
        gram = B.matmul(x.T, x)
        sum_x = x.sum(0)
        geometry = [self._split(x, gram, sum_x, train, val) for train, val in self.splits]
        lam_full, vecs_full = _eigh(self.backend, gram - sum_x[:, None] * sum_x[None, :] / len(X))
        x_test = B.matmul(self._asarray(X_test - x_mean), vecs_full)

        n_targets = Y.shape[1]
        pred = np.empty((len(X_test), n_targets), dtype=np.float32)
        best = np.empty(n_targets, dtype=np.int64)
        best_mse = np.empty(n_targets, dtype=np.float64)
        for start in range(0, n_targets, self.target_batch):
            cols = slice(start, start + self.target_batch)
            y_mean = Y[:, cols].mean(0, dtype=np.float64)
            y = self._asarray(Y[:, cols] - y_mean, self.dtype)
            cross_all = self._cross(x_big, y)
            sum_y = self._asarray(y.sum(0))
            mse = sum(self._split_mse(sp, x_big, y, cross_all, sum_y) for sp in geometry) / len(geometry)
            mse = B.to_numpy(mse)
            idx = mse.argmin(0)
            best[cols], best_mse[cols] = idx, mse[idx, np.arange(mse.shape[1])]
            p = B.matmul(vecs_full.T, cross_all - sum_x[:, None] * sum_y[None, :] / len(X))
            g = 1.0 / (self._asarray(lam_full)[:, None] + self._asarray(self.alphas[idx])[None, :])
            pred[:, cols] = B.to_numpy(B.matmul(x_test, g * p)) + y_mean
        return pred, best, best_mse


def _eigh(backend: Any, gram: Any) -> tuple[np.ndarray, Any]:
    """Eigenpairs of a symmetric PSD matrix, numerical zeros (below the eigensolver's noise floor) dropped."""
    if backend.name == "numpy":  # the divide-and-conquer driver: ≈2× scipy's default on D ≈ 1000
        lam, vecs = scipy.linalg.eigh(gram, driver="evd")
    else:
        lam, vecs = backend.eigh(gram)
    lam = backend.to_numpy(lam).astype(np.float64)
    floor = NOISE_FLOOR * gram.shape[0] * np.finfo(np.float64).eps * max(lam.max(initial=0.0), 0.0)
    keep = np.flatnonzero(lam > floor)
    return lam[keep], vecs[:, backend.asarray(keep, dtype="int64")]


class LooRidgeCV:
    """scikit-learn's `RidgeCV(alphas, alpha_per_target=True)` (efficient leave-one-out, intercept unpenalised): the
    study's α selection (bin/eval_brain.py), in target batches on a himalaya backend, float64 as scikit-learn.

    With centred features x, xᵀx = V diag(λ) Vᵀ, A = x V and g = 1/(λ + α), the hat matrix including the intercept is
    H = A diag(g) Aᵀ + 11ᵀ/n, and the leave-one-out residual of row i is exactly r_i / (1 − H_ii) with
    r = ỹ − A diag(g) Aᵀ ỹ: no refits, one n × r × targets product per α (as in scikit-learn). When one trial of a
    repeated image is left out, its repetitions stay in training: the leak of the study's scheme (docs/methods.md P-20).
    """

    def __init__(self, alphas: Sequence[float], backend: str = "numpy", target_batch: int = TARGET_BATCH):
        self.alphas = np.asarray(alphas, dtype=np.float64)
        if self.alphas.ndim != 1 or len(self.alphas) == 0 or (self.alphas <= 0).any():
            raise ValueError("alphas must be a non-empty 1-d array of positive values")
        self.backend = set_backend(resolve_backend(backend))
        self.target_batch = target_batch

    def fit_predict(self, X: np.ndarray, Y: np.ndarray, X_test: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predictions for `X_test` (n_test, n_targets) float32, the selected α index and LOO MSE per target."""
        X, Y, X_test = np.asarray(X), np.asarray(Y), np.asarray(X_test)
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or len(X) < 3 or X_test.shape[1:] != X.shape[1:]:
            raise ValueError(f"shapes do not match (or < 3 rows): X {X.shape}, Y {Y.shape}, X_test {X_test.shape}")
        with _blas_threads(X, Y):
            return self._fit_predict(X, Y, X_test)

    def _fit_predict(self, X: np.ndarray, Y: np.ndarray, X_test: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B = self.backend
        if X.shape[1] > X.shape[0]:
            X, X_test = _row_space(X, X_test)
        x_mean = X.mean(0, dtype=np.float64)
        x = B.asarray(X - x_mean, dtype="float64")
        lam, vecs = _eigh(B, B.matmul(x.T, x))
        a = B.matmul(x, vecs)
        g = B.asarray(1.0 / (lam[None, :] + self.alphas[:, None]), dtype="float64")  # (n_alphas, r)
        keep = 1.0 - B.matmul(a ** 2, g.T) - 1.0 / len(X)  # (n, n_alphas): 1 − H_ii(α)
        x_test = B.matmul(B.asarray(X_test - x_mean, dtype="float64"), vecs)
        n_targets = Y.shape[1]
        pred = np.empty((len(X_test), n_targets), dtype=np.float32)
        best = np.empty(n_targets, dtype=np.int64)
        best_mse = np.empty(n_targets, dtype=np.float64)
        for start in range(0, n_targets, self.target_batch):
            cols = slice(start, start + self.target_batch)
            y_mean = Y[:, cols].mean(0, dtype=np.float64)
            y = B.asarray(Y[:, cols] - y_mean, dtype="float64")
            p = B.matmul(a.T, y)  # (r, targets)
            mse = B.to_numpy(B.stack([(((y - B.matmul(a, g[k][:, None] * p)) / keep[:, k:k + 1]) ** 2).mean(0)
                                      for k in range(len(self.alphas))]))
            idx = mse.argmin(0)  # the first of equal scores, as scikit-learn keeps an α unless a later one is better
            best[cols], best_mse[cols] = idx, mse[idx, np.arange(mse.shape[1])]
            refit = p / (B.asarray(lam, dtype="float64")[:, None] + B.asarray(self.alphas[idx], dtype="float64"))
            pred[:, cols] = B.to_numpy(B.matmul(x_test, refit)) + y_mean
        return pred, best, best_mse


def _row_space(X: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in an orthonormal basis of the training rows' span (exact when D > n: every inner split's
    centred rows, hence every ridge weight vector, lie in it, and test rows enter only through their projection)."""
    X = np.asarray(X, dtype=np.float64)
    lam, u = scipy.linalg.eigh(X @ X.T, driver="evd")  # n × n: cheaper than an SVD of the n × D matrix
    keep = lam > NOISE_FLOOR * len(X) * np.finfo(np.float64).eps * lam.max(initial=0.0)
    basis = X.T @ (u[:, keep] / np.sqrt(lam[keep]))
    return X @ basis, X_test @ basis


def himalaya_fit_predict(X: np.ndarray, Y: np.ndarray, X_test: np.ndarray, alphas: Sequence[float],
                         splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Reference: himalaya's own RidgeCV with the same splits (slow at scale; used to check `GroupedRidgeCV`)."""
    from himalaya.ridge import RidgeCV

    set_backend("numpy")
    alphas = np.asarray(alphas, dtype=np.float64)
    model = RidgeCV(alphas=alphas, fit_intercept=True, cv=list(splits), solver_params={"warn": False})
    model.fit(np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64))
    # himalaya returns α as exp(−log(1/α)): map back to the nearest grid point in log space
    best = np.abs(np.log(np.asarray(model.best_alphas_))[:, None] - np.log(alphas)[None, :]).argmin(1)
    return np.asarray(model.predict(np.asarray(X_test, dtype=np.float64))), best
