"""Per-participant softmax choice model for 3-alternative odd-one-out choices, cross-validated (docs/methods.md §9.1).

P(c) = softmax((l + b) / T)_c with b = (b1, 0, b3); parameters (log T, b1, b3) within `BOUNDS`, fitted on the mean
training NLL (log-softmax, no probability clipping, docs/methods.md P-12). Every (participant, fold) fit is an independent
3-parameter problem; all of them are solved together, vectorised, so 4.7 M THINGS trials need no loop over fits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeResult, minimize
from scipy.special import log_softmax

from metalign.progress import progress

BOUNDS = ((-4.6, 4.6), (-10.0, 10.0), (-10.0, 10.0))
INIT = (0.0, 0.0, 0.0)
MAX_FOLDS = 5
N_CHOICES = 3


@dataclass(frozen=True)
class Groups:
    """Trials grouped by participant once (stable sort + offsets); `order[starts[g]:starts[g]+counts[g]]` are group g's
    trials in their original file order."""

    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    labels: np.ndarray


def group_trials(participant: np.ndarray) -> Groups:
    participant = np.asarray(participant)
    order = np.argsort(participant, kind="stable")
    labels, starts, counts = np.unique(participant[order], return_index=True, return_counts=True)
    return Groups(order=order, starts=starts, counts=counts, labels=labels)


@dataclass(frozen=True)
class CVResult:
    """Out-of-fold scores in original trial order (NaN for dropped participants) and the fitted parameters."""

    nll: np.ndarray
    correct: np.ndarray
    fold: np.ndarray          # fold of each trial, -1 where the participant was dropped
    kept: np.ndarray          # per group (Groups.labels order): participant passed the CV inclusion rule
    n_folds: np.ndarray       # per group; 0 where dropped
    params: np.ndarray        # (sum n_folds, 3) (log T, b1, b3) per kept participant (label order), then fold
    converged: np.ndarray     # (sum n_folds,) the fit reached the projected-gradient tolerance


# --------------------------------------------------------------------------------------------- single fit


def _full_bias(params: np.ndarray) -> np.ndarray:
    """(…, 3) parameters (log T, b1, b3) -> (…, 3) bias vectors (b1, 0, b3)."""
    params = np.asarray(params, dtype=np.float64)
    return np.stack([params[..., 1], np.zeros_like(params[..., 1]), params[..., 2]], axis=-1)


def log_probabilities(params: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """log P(c) for one parameter vector (or one per trial, shape (T, 3)); log-softmax, never clipped probabilities."""
    params = np.asarray(params, dtype=np.float64)
    return log_softmax((logits + _full_bias(params)) * np.exp(-params[..., :1]), axis=-1)


def mean_nll_and_grad(params: np.ndarray, logits: np.ndarray, choice: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of one participant's trials and its analytic gradient w.r.t. (log T, b1, b3)."""
    inv_t = np.exp(-params[0])
    z = (logits + _full_bias(params)) * inv_t
    logp = log_softmax(z, axis=1)
    rows = np.arange(len(choice))
    resid = np.exp(logp)
    resid[rows, choice] -= 1.0                                  # dNLL/dz = p - onehot(y)
    grad = np.array([-(resid * z).sum(axis=1).mean(), resid[:, 0].mean() * inv_t, resid[:, 2].mean() * inv_t])
    return float(-logp[rows, choice].mean()), grad


def fit_single(logits: np.ndarray, choice: np.ndarray) -> OptimizeResult:
    """Fit one training set with scipy's L-BFGS-B from `INIT` (upstream's optimiser; the batched Newton fit's
    reference)."""
    return minimize(mean_nll_and_grad, np.array(INIT), args=(logits, choice), jac=True, method="L-BFGS-B",
                    bounds=BOUNDS)


# --------------------------------------------------------------------------------------------- folds


def assign_folds(choice: np.ndarray, groups: Groups, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified K-fold test-fold index per trial (original order; -1 = participant dropped) and K per group.

    Folds depend only on the participant's choices (in file order) and `seed`, so fits of different representations
    on the same triplets are paired. They are exactly scikit-learn's `StratifiedKFold(k, shuffle=True,
    random_state=seed)` test folds (`_stratified_folds`; tests/test_odd_one_out.py checks them against it).
    """
    choice = np.asarray(choice)
    fold = np.full(len(choice), -1, dtype=np.int64)
    n_folds = np.zeros(len(groups.labels), dtype=np.int64)
    sorted_choice = choice[groups.order]
    position_counts = _position_counts(sorted_choice, groups)
    occurring = np.where(position_counts > 0, position_counts, np.iinfo(np.int64).max).min(axis=1)
    kept = ((position_counts > 0).sum(axis=1) >= 2) & (occurring >= 2)
    n_folds[kept] = np.minimum(MAX_FOLDS, occurring[kept])
    rng = np.random.RandomState(seed)
    state = rng.get_state()
    for g in progress(np.flatnonzero(kept), desc="folds", unit="participant"):
        start, count = groups.starts[g], groups.counts[g]
        rng.set_state(state)
        fold[groups.order[start:start + count]] = _stratified_folds(sorted_choice[start:start + count],
                                                                    int(n_folds[g]), rng)
    return fold, n_folds


def _stratified_folds(y: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """`StratifiedKFold(k, shuffle=True, random_state=rng's seed)._make_test_folds(y)` for choices y in 0..2, without
    its per-call validation: classes in order of first appearance, a round-robin allocation of each class's trials
    to folds over the class-sorted labels, one `rng.shuffle` per class in that order."""
    first = np.full(N_CHOICES, len(y))
    np.minimum.at(first, y, np.arange(len(y)))
    classes = np.argsort(first, kind="stable")[:int((first < len(y)).sum())]  # by first appearance
    counts = np.bincount(y, minlength=N_CHOICES)[classes]
    ends = np.cumsum(counts)
    test_folds = np.empty(len(y), dtype=np.int64)
    for c, n, end in zip(classes, counts, ends):
        # class c holds positions end-n .. end-1 of the class-sorted labels; position p goes to fold p mod k
        per_fold = np.bincount(np.arange(end - n, end) % k, minlength=k)
        folds_for_class = np.arange(k).repeat(per_fold)
        rng.shuffle(folds_for_class)
        test_folds[y == c] = folds_for_class
    return test_folds


def _position_counts(sorted_choice: np.ndarray, groups: Groups) -> np.ndarray:
    group_of = np.repeat(np.arange(len(groups.labels)), groups.counts)
    return np.bincount(group_of * N_CHOICES + sorted_choice, minlength=len(groups.labels) * N_CHOICES).reshape(-1, 3)


# --------------------------------------------------------------------------------------------- batched fit
#
# Upstream fits each (participant, fold) with scipy's L-BFGS-B: ~60k fits of 3 parameters on THINGS, dominated by
# per-call overhead (≈15 min here). Instead all fits of a chunk of participants take damped, bound-projected Newton
# steps together, with analytic gradients and Hessians reduced per fit. Each fit stays an independent problem
# (steps accepted or rejected on its own objective), so results do not depend on chunking or threads. The target is
# the same as L-BFGS-B's: in (1/T, b/T) coordinates the objective is convex and the bounds map to a convex set, so
# every local minimum is the global one (`tests/test_odd_one_out.py` compares both optimisers).

_LOWER, _UPPER = np.array(BOUNDS).T
_TOL = 1e-8                 # max |projected gradient| of a fit's mean NLL
_MAX_ITER = 200            # fits walking a flat valley (uninformative logits) converge linearly
_CHUNK_TRIALS = 1 << 18     # bounds the (trials x folds) temporaries to tens of MB


@dataclass(frozen=True)
class _Design:
    """Trials of whole participants; trial t enters fit `fit[t, s]` with weight `weight[t, s]` = 1 / n_train of
    that fit (0 for padding), so per-fit weighted sums are mean training NLLs."""

    logits: np.ndarray   # (R, 3)
    onehot: np.ndarray   # (R, 3) float
    fit: np.ndarray      # (R, MAX_FOLDS - 1) fit index within the chunk (a trial trains all folds but its own)
    weight: np.ndarray   # (R, MAX_FOLDS - 1)
    group: np.ndarray    # (R,) participant within the chunk

    def subset(self, rows: np.ndarray) -> "_Design":
        return _Design(self.logits[rows], self.onehot[rows], self.fit[rows], self.weight[rows], self.group[rows])


def _design(logits: np.ndarray, choice: np.ndarray, fold: np.ndarray, group: np.ndarray, k: np.ndarray) -> _Design:
    """A trial in test fold f of a K-fold participant trains fits (f + s) mod K, s = 1..K-1."""
    first_fit = np.concatenate([[0], np.cumsum(k)[:-1]])
    k_t = k[group][:, None]
    shift = np.arange(1, MAX_FOLDS)
    fit = first_fit[group][:, None] + (fold[:, None] + shift) % k_t
    test_size = np.bincount(first_fit[group] + fold, minlength=int(k.sum()))
    n_train = np.repeat(np.bincount(group, minlength=len(k)), k) - test_size
    weight = np.where(shift < k_t, 1.0 / n_train[fit], 0.0)
    onehot = np.eye(N_CHOICES)[choice]
    return _Design(logits, onehot, fit, weight, group)


def _terms(params: np.ndarray, d: _Design, n_fits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-fit mean training NLL, gradient (n, 3) and Hessian (n, 3, 3) w.r.t. (log T, b1, b3); zero for fits
    without rows in `d`.

    With z_c = (l_c + b_c)/T, r = p - onehot(y), z̄ = Σ p_c z_c:  dz_c/dlogT = -z_c, so
    g = (-Σ r_c z_c, r_1/T, r_3/T) and H = Jᵀ (diag p - p pᵀ) J + Σ_c r_c ∇²z_c.
    """
    inv_t = np.exp(-params[:, 0])[d.fit]
    z0 = (d.logits[:, :1] + params[:, 1][d.fit]) * inv_t
    z1 = d.logits[:, 1:2] * inv_t
    z2 = (d.logits[:, 2:] + params[:, 2][d.fit]) * inv_t
    top = np.maximum(np.maximum(z0, z1), z2)
    e0, e1, e2 = np.exp(z0 - top), np.exp(z1 - top), np.exp(z2 - top)
    total = e0 + e1 + e2
    p0, p1, p2 = e0 / total, e1 / total, e2 / total
    y0, y1, y2 = d.onehot[:, :1], d.onehot[:, 1:2], d.onehot[:, 2:]
    nll = top + np.log(total) - (y0 * z0 + y1 * z1 + y2 * z2)
    r0, r2 = p0 - y0, p2 - y2
    z_bar = p0 * z0 + p1 * z1 + p2 * z2
    g_u = -(r0 * z0 + (p1 - y1) * z1 + r2 * z2)
    h_bb = inv_t * inv_t
    per_row = (nll, g_u, r0 * inv_t, r2 * inv_t,
               p0 * z0 * z0 + p1 * z1 * z1 + p2 * z2 * z2 - z_bar * z_bar - g_u,      # H_uu
               -inv_t * (p0 * (z0 - z_bar) + r0),                                     # H_u,b1
               -inv_t * (p2 * (z2 - z_bar) + r2),                                     # H_u,b3
               h_bb * p0 * (1.0 - p0), -h_bb * p0 * p2, h_bb * p2 * (1.0 - p2))       # H_b1b1, H_b1b3, H_b3b3
    fit = d.fit.ravel()
    sums = [np.bincount(fit, (d.weight * q).ravel(), minlength=n_fits) for q in per_row]
    f, g = sums[0], np.stack(sums[1:4], axis=1)
    h_uu, h_u1, h_u3, h_11, h_13, h_33 = sums[4:]
    hess = np.stack([np.stack([h_uu, h_u1, h_u3], 1), np.stack([h_u1, h_11, h_13], 1),
                     np.stack([h_u3, h_13, h_33], 1)], axis=1)
    return f, g, hess


def _projected_gradient(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """max |P(x - g) - x| per fit: L-BFGS-B's stationarity measure under box bounds."""
    return np.abs(np.clip(x - g, _LOWER, _UPPER) - x).max(axis=1)


def _newton_step(x: np.ndarray, g: np.ndarray, hess: np.ndarray, damping: np.ndarray) -> np.ndarray:
    """Damped Newton step on the free variables (those not held at a bound by their gradient).

    |eigenvalues| keep the step a descent direction where the Hessian is indefinite (log T is not a convex
    coordinate); the damping grows on rejected steps and shrinks on accepted ones.
    """
    free = ~(((x <= _LOWER) & (g > 0)) | ((x >= _UPPER) & (g < 0)))
    h = hess * (free[:, :, None] & free[:, None, :]) + np.eye(3) * ~free[:, None, :]
    eigval, eigvec = np.linalg.eigh(h)
    scale = np.abs(eigval).max(axis=1, keepdims=True)
    eigval = np.abs(eigval) + damping[:, None] * scale + 1e-300
    coef = np.einsum("nij,ni->nj", eigvec, g * free) / eigval
    return -np.einsum("nij,nj->ni", eigvec, coef)


def _solve(d: _Design, x0: np.ndarray, fit_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit all problems of `d` from `x0` (n_fits, 3); fit i belongs to participant fit_group[i]. Returns parameters
    and convergence flags. Work per iteration shrinks with the fits still moving (`live`)."""
    x = np.array(x0, dtype=np.float64)
    n_fits = len(x)
    f, g, hess = _terms(x, d, n_fits)
    pg = _projected_gradient(x, g)
    damping = np.full(n_fits, 1e-3)
    live = np.flatnonzero(pg > _TOL)
    n_groups = int(fit_group.max()) + 1 if n_fits else 0
    active, active_groups = d, n_groups
    for _ in range(_MAX_ITER):
        if not len(live):
            break
        live_groups = np.zeros(n_groups, dtype=bool)
        live_groups[fit_group[live]] = True
        if live_groups.sum() < active_groups // 2:   # drop converged participants' rows
            active, active_groups = d.subset(live_groups[d.group]), int(live_groups.sum())
        x_try = x.copy()
        x_try[live] = np.clip(x[live] + _newton_step(x[live], g[live], hess[live], damping[live]), _LOWER, _UPPER)
        f_try, g_try, hess_try = (a[live] for a in _terms(x_try, active, n_fits))
        pg_try = _projected_gradient(x_try[live], g_try)
        armijo = f_try <= f[live] + 1e-4 * ((x_try[live] - x[live]) * g[live]).sum(axis=1)
        at_precision = (f_try <= f[live] + 1e-13 * np.abs(f[live])) & (pg_try < pg[live])  # f cannot resolve it
        accept = armijo | at_precision
        ok = live[accept]
        x[ok], f[ok], g[ok], hess[ok], pg[ok] = (
            x_try[ok], f_try[accept], g_try[accept], hess_try[accept], pg_try[accept])
        damping[live] = np.where(accept, np.maximum(damping[live] * 0.1, 1e-12), damping[live] * 10.0)
        live = live[(pg[live] > _TOL) & (damping[live] < 1e12)]
    return x, pg <= _TOL


def _fit_chunk(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Fold fits of one chunk, warm-started from each participant's fit on all of their trials: the pooled problem
    is a quarter of the work per iteration and lands the fold fits near their optima."""
    logits, choice, fold, group, k = args
    folds = _design(logits, choice, fold, group, k)
    pooled = _Design(folds.logits, folds.onehot, group[:, None], (1.0 / np.bincount(group))[group][:, None], group)
    start, _ = _solve(pooled, np.tile(np.asarray(INIT, dtype=np.float64), (len(k), 1)), np.arange(len(k)))
    return _solve(folds, np.repeat(start, k, axis=0), np.repeat(np.arange(len(k)), k))


def fit_folds(logits: np.ndarray, choice: np.ndarray, fold: np.ndarray, groups: Groups, n_folds: np.ndarray,
              n_jobs: int = 2, solver: str = "newton") -> tuple[np.ndarray, np.ndarray]:
    """Parameters (sum n_folds, 3) of every (kept participant, fold) fit, ordered by participant then fold, each
    fitted on the participant's trials outside that fold; plus per-fit convergence flags.

    `solver="lbfgsb"` fits each problem separately with scipy's L-BFGS-B (upstream's optimiser; slow reference).
    """
    kept = np.flatnonzero(n_folds)
    k, counts = n_folds[kept], groups.counts[kept]
    edges = np.concatenate([[0], np.cumsum(counts)])
    rows = np.concatenate([groups.order[s:s + c] for s, c in zip(groups.starts[kept], counts)]
                          or [np.zeros(0, dtype=np.int64)])
    if solver == "lbfgsb":
        fits = [fit_single(logits[train], choice[train])
                for r, n in zip(np.split(rows, edges[1:-1]), k) for train in (r[fold[r] != f] for f in range(n))]
        return (np.reshape([fit.x for fit in fits], (-1, 3)),
                np.array([fit.success for fit in fits], dtype=bool).reshape(-1))
    if solver != "newton":
        raise ValueError(f"unknown solver {solver!r}; expected 'newton' or 'lbfgsb'")
    chunks = []
    cuts = _chunk_bounds(counts, min(_CHUNK_TRIALS, -(-int(edges[-1]) // max(1, n_jobs))))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        r = rows[edges[lo]:edges[hi]]
        chunks.append((logits[r], choice[r], fold[r], np.repeat(np.arange(hi - lo), counts[lo:hi]), k[lo:hi]))
    with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        results = list(pool.map(_fit_chunk, chunks))
    if not results:
        return np.zeros((0, 3)), np.zeros(0, dtype=bool)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def _chunk_bounds(counts: np.ndarray, target: int) -> np.ndarray:
    """Participant boundaries such that each chunk holds about `target` trials (a participant is never split)."""
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(target, ends[-1] if len(ends) else 0, max(1, target))) + 1
    return np.unique(np.concatenate([[0], cuts, [len(counts)]]))


def cross_validate(logits: np.ndarray, choice: np.ndarray, participant: np.ndarray, seed: int = 1234,
                   n_jobs: int = 2, solver: str = "newton") -> CVResult:
    """Out-of-fold NLL and accuracy of the per-participant choice model for every trial of every kept participant."""
    logits = np.asarray(logits, dtype=np.float64)
    choice = np.asarray(choice, dtype=np.int64)
    groups = group_trials(participant)
    fold, n_folds = assign_folds(choice, groups, seed)
    params, converged = fit_folds(logits, choice, fold, groups, n_folds, n_jobs=n_jobs, solver=solver)

    group_index = np.empty(len(choice), dtype=np.int64)
    group_index[groups.order] = np.repeat(np.arange(len(groups.labels)), groups.counts)
    first_fit = np.concatenate([[0], np.cumsum(n_folds)[:-1]])
    scored = np.flatnonzero(fold >= 0)
    logp = log_probabilities(params[first_fit[group_index[scored]] + fold[scored]], logits[scored])
    y = choice[scored]
    nll = np.full(len(choice), np.nan)
    correct = np.full(len(choice), np.nan)
    nll[scored] = -logp[np.arange(len(y)), y]
    correct[scored] = logp.argmax(axis=1) == y
    return CVResult(nll=nll, correct=correct, fold=fold, kept=n_folds > 0, n_folds=n_folds, params=params,
                    converged=converged)
