"""Per-participant softmax choice model for 3-alternative odd-one-out choices, cross-validated (docs/methods.md §9.1).

P(c) = softmax((l + b) / T)_c with b = (b1, 0, b3); parameters (log T, b1, b3) within `BOUNDS`, fitted on the mean
training NLL (log-softmax, no probability clipping, docs/methods.md P-12). Every (participant, fold) fit is an independent
3-parameter problem; all of them are solved together, vectorised, so 4.7 M THINGS trials need no loop over fits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

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
    random_state=seed)` test folds (tests/test_odd_one_out.py checks them against it), without its per-call
    validation: per participant, classes in order of first appearance, a round-robin allocation of each class's
    trials to folds over the class-sorted labels, one `shuffle` per class in that order by a RandomState freshly
    seeded with `seed`, the class's trials taking the shuffled folds in file order. All but the shuffles is done for
    all participants at once; the shuffles act in place on slices of one array.
    """
    choice = np.asarray(choice)
    fold = np.full(len(choice), -1, dtype=np.int64)
    n_folds = np.zeros(len(groups.labels), dtype=np.int64)
    sorted_choice = choice[groups.order]
    group_of = np.repeat(np.arange(len(groups.labels)), groups.counts)
    position_counts = np.bincount(group_of * N_CHOICES + sorted_choice,
                                  minlength=len(groups.labels) * N_CHOICES).reshape(-1, N_CHOICES)
    occurring = np.where(position_counts > 0, position_counts, np.iinfo(np.int64).max).min(axis=1)
    kept = ((position_counts > 0).sum(axis=1) >= 2) & (occurring >= 2)
    n_folds[kept] = np.minimum(MAX_FOLDS, occurring[kept])

    first = np.full(len(groups.labels) * N_CHOICES, len(choice))           # first position of each class
    np.minimum.at(first, group_of * N_CHOICES + sorted_choice, np.arange(len(choice)))
    classes = np.argsort(first.reshape(-1, N_CHOICES), axis=1, kind="stable")    # by first appearance
    rank = np.argsort(classes, axis=1)                                      # class -> its rank
    counts = np.take_along_axis(position_counts, classes, axis=1)           # (G, 3) in rank order (absent last)
    ends = np.cumsum(counts, axis=1)
    # class of rank r holds positions [end - n, end) of the class-sorted labels; position p goes to fold p mod k
    k = np.maximum(n_folds, 1)[:, None, None]
    f = np.arange(MAX_FOLDS)
    below = [(x[:, :, None] - f + k - 1) // k for x in (ends, ends - counts)]   # #{p < x: p ≡ f (mod k)}
    per_fold = np.where(f < k, below[0] - below[1], 0) * kept[:, None, None]
    flat = np.repeat(np.tile(f, per_fold.shape[0] * N_CHOICES), per_fold.ravel())   # fold blocks per class
    bounds = np.concatenate([[0], np.cumsum(counts * kept[:, None])]).reshape(-1)
    rng = np.random.RandomState(seed)
    for g in progress(np.flatnonzero(kept).tolist(), desc="folds", unit="participant"):
        rng.seed(seed)
        for lo, hi in pairwise(bounds[g * N_CHOICES:(g + 1) * N_CHOICES + 1].tolist()):
            if hi > lo:
                rng.shuffle(flat[lo:hi])
    member = kept[group_of]
    key = (group_of * N_CHOICES + rank[group_of, sorted_choice])[member]   # (participant, class rank), file order
    key = key.astype(np.min_scalar_type(key.max(initial=0)))                # ≤ 16 bits: a radix sort
    fold[groups.order[member][np.argsort(key, kind="stable")]] = flat
    return fold, n_folds


# --------------------------------------------------------------------------------------------- batched fit
#
# Upstream fits each (participant, fold) with scipy's L-BFGS-B: ~60k fits of 3 parameters on THINGS, dominated by
# per-call overhead (≈15 min here). Instead all fits of a chunk of participants take damped, bound-projected Newton
# steps together. Each fit stays an independent problem (steps accepted or rejected on its own objective), so results
# do not depend on chunking or threads. The target is the same as L-BFGS-B's: in (1/T, b/T) coordinates the objective
# is convex and the bounds map to a convex set, so every local minimum is the global one (`tests/test_odd_one_out.py`
# compares both optimisers).
#
# The cost is one term per (trial, fit trained on it). Trials are sorted by (participant, test fold): the trials of one
# such block train the participant's other K-1 fits, one per column, and the terms are summed per block and column in
# cache-sized segments of whole participants; a fit adds up the K-1 block sums it trains on. Per term only the
# softmax of a linear model in φ = (1/T, b1/T, b3/T) is needed (its gradient and Hessian depend on p alone; the parts
# linear in the chosen item are per-fit constants), carried to (log T, b1, b3) by the chain rule once per fit.

_LOWER, _UPPER = np.array(BOUNDS).T
_TOL = 1e-8                 # max |projected gradient| of a fit's mean NLL
_POOLED_TOL = 1e-3          # the per-participant fit on all trials only seeds the fold fits
_MAX_ITER = 200            # fits walking a flat valley (uninformative logits) converge linearly
_SEGMENT_TRIALS = 1 << 13   # trials per evaluated segment: its (columns x trials) temporaries stay in a core's cache
_CHUNK_TRIALS = 1 << 18     # trials per thread task (whole participants)
_N_SUMS = 10                # per-term sums: log-sum-exp, E_p[d], p0, p2, Var_p[d], p0 (d0 - E_p[d]), p2 (d2 - E_p[d]),
                            # p0², p0 p2, p2²


@dataclass(frozen=True)
class _Design:
    """Trials of whole participants sorted by (participant, test fold); block b is rows start[b]:start[b+1]. Column c
    of block b is evaluated at the parameters of fit `block_fit[b, c]` (a last, dummy fit where none); fit i sums
    the block-column sums `pairs[i]` (flat (block, column) indices; one past the last is zero) over n_train[i]
    trials."""

    logits: np.ndarray       # (R, 3)
    diffs: np.ndarray        # (2, R) logits of positions 0 and 2 minus that of position 1
    start: np.ndarray        # (n_blocks + 1,)
    block_fit: np.ndarray    # (n_blocks, C)
    pairs: np.ndarray        # (n_fits, M)
    n_train: np.ndarray      # (n_fits,)
    chosen: np.ndarray       # (n_fits, 3) training means of the chosen position's diff (0 for 1) and of y = 0, 2
    segments: np.ndarray     # block boundaries of runs of whole participants with about _SEGMENT_TRIALS trials
    fit_segment: np.ndarray  # (n_fits,) the segment holding each fit's trials


def _designs(logits: np.ndarray, choice: np.ndarray, fold: np.ndarray, group: np.ndarray,
             k: np.ndarray) -> tuple[_Design, _Design, np.ndarray]:
    """Fold fits (participant g's fit j at row first[g] + j, trained on its trials outside test fold j) and pooled
    fits (one per participant, all its trials) of trials of participants group = 0..G-1 with k[g] folds; plus the
    order that sorts the trials by (participant, fold). Every fold holds trials (stratified, each position at least
    k times), so participant g's blocks are first[g] + fold, as are its fits."""
    key = group * MAX_FOLDS + fold
    order = np.argsort(key.astype(np.min_scalar_type(key.max(initial=0))), kind="stable")  # ≤ 16 bits: radix sort
    logits, choice, group = logits[order], choice[order], group[order]
    diffs = np.stack([logits[:, 0] - logits[:, 1], logits[:, 2] - logits[:, 1]])
    first = np.concatenate([[0], np.cumsum(k)[:-1]])
    n_fits = int(k.sum())
    start = np.concatenate([[0], np.cumsum(np.bincount(first[group] + fold[order], minlength=n_fits))])
    size = np.diff(start)
    fit_group = np.repeat(np.arange(len(k)), k)
    fit_fold = np.arange(n_fits) - first[fit_group]
    per_group = np.add.reduceat(size, first) if n_fits else size
    chosen_rows = np.stack([np.where(choice == 0, diffs[0], np.where(choice == 2, diffs[1], 0.0)), choice == 0,
                            choice == 2], axis=1)
    chosen = np.add.reduceat(chosen_rows, start[:-1], axis=0) if n_fits else np.zeros((0, 3))
    group_start = start[first]
    cuts = np.searchsorted(group_start, np.arange(0, start[-1], _SEGMENT_TRIALS), side="right") - 1
    segments = np.unique(np.concatenate([first[cuts], [n_fits]])) if n_fits else np.zeros(1, dtype=np.int64)
    fit_segment = np.searchsorted(segments, np.arange(n_fits), side="right") - 1

    columns = MAX_FOLDS - 1
    s = np.arange(1, MAX_FOLDS)
    k_fit = k[fit_group][:, None]
    block_fit = np.where(s < k_fit, first[fit_group][:, None] + (fit_fold[:, None] + s) % k_fit, n_fits)
    pairs = np.where(s < k_fit, (first[fit_group][:, None] + (fit_fold[:, None] - s) % k_fit) * columns + s - 1,
                     n_fits * columns)
    n_train = per_group[fit_group] - size
    folds = _Design(logits, diffs, start, block_fit, pairs, n_train,
                    (_fit_sums(np.broadcast_to(chosen[:, None], (n_fits, columns, 3)), pairs)
                     / np.maximum(n_train, 1)[:, None]),
                    segments, fit_segment)

    wide = np.arange(MAX_FOLDS)
    pooled_pairs = np.where(wide < k[:, None], first[:, None] + wide, n_fits)
    pooled = _Design(logits, diffs, start, fit_group[:, None], pooled_pairs, per_group,
                     _fit_sums(chosen[:, None], pooled_pairs) / np.maximum(per_group, 1)[:, None],
                     segments, np.searchsorted(segments, first, side="right") - 1)
    return folds, pooled, order


def _fit_sums(block_sums: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(n_fits, Q) sums over each fit's (block, column) pairs of (n_blocks, C, Q) block sums."""
    flat = np.concatenate([block_sums.reshape(-1, block_sums.shape[-1]), np.zeros((1, block_sums.shape[-1]))])
    return flat[pairs].sum(axis=1)


def _block_sums(params: np.ndarray, d: _Design, segments: np.ndarray | None = None) -> np.ndarray:
    """(n_blocks, C, _N_SUMS) sums of the per-term quantities over each block's trials at its columns' fits
    (zero outside `segments`, indices into d.segments, if given)."""
    params = np.concatenate([np.asarray(params, dtype=np.float64), np.zeros((1, 3))])  # the dummy fit
    inv_t = np.exp(-params[:, 0])
    phi = np.stack([inv_t, params[:, 1] * inv_t, params[:, 2] * inv_t])  # (3, n_fits + 1)
    sums = np.zeros((len(d.start) - 1, d.block_fit.shape[1], _N_SUMS))
    for index in range(len(d.segments) - 1) if segments is None else segments:
        lo, hi = d.segments[index], d.segments[index + 1]
        sums[lo:hi] = _segment_sums(phi, d, lo, hi)
    return sums


def _segment_sums(phi: np.ndarray, d: _Design, lo: int, hi: int) -> np.ndarray:
    """Block sums of blocks lo..hi-1. Softmax is shift-invariant, so terms use z - β·l1 = (β·d0 + γ0, 0, β·d2 + γ2)
    (d = logits minus position 1's; the shift is a per-fit constant), p0, p2 and the _N_SUMS quantities."""
    rows = slice(d.start[lo], d.start[hi])
    size = np.diff(d.start[lo:hi + 1])
    beta, gamma0, gamma2 = (np.repeat(a[d.block_fit[lo:hi].T], size, axis=1) for a in phi)   # (C, n)
    d0, d2 = d.diffs[:, rows]
    z0 = beta * d0
    z0 += gamma0
    z2 = np.multiply(beta, d2, out=beta)
    z2 += gamma2
    top = np.maximum(z0, 0.0)
    np.maximum(top, z2, out=top)
    e0 = np.exp(np.subtract(z0, top, out=z0), out=z0)
    e2 = np.exp(np.subtract(z2, top, out=z2), out=z2)
    total = np.exp(np.negative(top, out=gamma0), out=gamma0)
    total += e0
    total += e2
    out = np.empty((_N_SUMS,) + total.shape)
    np.log(total, out=out[0])
    out[0] += top                                                       # log-sum-exp
    np.reciprocal(total, out=total)
    p0 = np.multiply(e0, total, out=out[2])
    p2 = np.multiply(e2, total, out=out[3])
    a0, a2 = np.multiply(p0, d0, out=e0), np.multiply(p2, d2, out=e2)   # p_c d_c
    dbar = np.add(a0, a2, out=out[1])                                  # E_p[d]
    np.multiply(a0, d0, out=out[4])
    out[4] += np.multiply(a2, d2, out=total)
    out[4] -= np.multiply(dbar, dbar, out=top)                           # Var_p[d]
    np.subtract(a0, np.multiply(p0, dbar, out=top), out=out[5])           # p0 (d0 - E[d])
    np.subtract(a2, np.multiply(p2, dbar, out=top), out=out[6])           # p2 (d2 - E[d])
    np.multiply(p0, p0, out=out[7])
    np.multiply(p0, p2, out=out[8])
    np.multiply(p2, p2, out=out[9])
    return np.add.reduceat(out, np.concatenate([[0], np.cumsum(size)[:-1]]), axis=2).transpose(2, 1, 0)


def _fit_terms(params: np.ndarray, d: _Design, block_sums: np.ndarray, which: np.ndarray | slice = slice(None),
               exact: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean training NLL, gradient (n, 3) and Hessian (n, 3, 3) w.r.t. (log T, b1, b3) of fits `which` from block
    sums at `params` (all fits).

    In φ = (β, γ0, γ2) = (1/T, b1/T, b3/T) the mean NLL is F = E[lse(z')] - (β·d_y + γ0·y0 + γ2·y2) with
    ∇F = E[(Σ p_c d_c, p0, p2)] - (d_y, y0, y2) and ∇²F = E[Cov_p(x)] for x = (d_c, [c = 0], [c = 2]); with
    J = ∂φ/∂θ, g = Jᵀ∇F and H = Jᵀ ∇²F J + Σ_k ∂F/∂φ_k ∇²φ_k. `exact=False` drops the last term (which vanishes
    at an optimum): Jᵀ ∇²F J is positive semi-definite, and its Newton step is the convex problem's step in φ.
    """
    mean = _fit_sums(block_sums, d.pairs[which]) / np.maximum(d.n_train[which], 1)[:, None]
    params = params[which]
    beta = np.exp(-params[:, 0])
    gamma0, gamma2 = params[:, 1] * beta, params[:, 2] * beta
    chosen_diff, y0, y2 = d.chosen[which].T
    f = mean[:, 0] - (beta * chosen_diff + gamma0 * y0 + gamma2 * y2)
    f_beta, f_0, f_2 = mean[:, 1] - chosen_diff, mean[:, 2] - y0, mean[:, 3] - y2
    g_u = -(beta * f_beta + gamma0 * f_0 + gamma2 * f_2)
    grad = np.stack([g_u, beta * f_0, beta * f_2], axis=1)
    h_phi = np.stack([np.stack([mean[:, 4], mean[:, 5], mean[:, 6]], 1),
                      np.stack([mean[:, 5], mean[:, 2] - mean[:, 7], -mean[:, 8]], 1),
                      np.stack([mean[:, 6], -mean[:, 8], mean[:, 3] - mean[:, 9]], 1)], axis=1)
    zero = np.zeros_like(beta)
    jac = np.stack([np.stack([-beta, zero, zero], 1), np.stack([-gamma0, beta, zero], 1),
                    np.stack([-gamma2, zero, beta], 1)], axis=1)                  # jac[:, k, i] = ∂φ_k/∂θ_i
    curvature = np.stack([np.stack([-g_u, -beta * f_0, -beta * f_2], 1), np.stack([-beta * f_0, zero, zero], 1),
                          np.stack([-beta * f_2, zero, zero], 1)], axis=1)
    hess = np.einsum("nki,nkl,nlj->nij", jac, h_phi, jac)
    return f, grad, hess + curvature if exact else hess


def _terms(params: np.ndarray, d: _Design) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean training NLL, gradient and Hessian of every fit of `d` at `params`."""
    return _fit_terms(params, d, _block_sums(params, d))


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


def _solve(d: _Design, x0: np.ndarray, sums: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit all problems of `d` from `x0` (n_fits, 3), given `sums` = _block_sums(x0, d). Returns parameters,
    convergence flags (projected gradient ≤ tol) and the block sums at the parameters. Each iteration evaluates only
    the segments of fits still moving."""
    x = np.array(x0, dtype=np.float64)
    sums = np.array(sums)
    f, g, hess = _fit_terms(x, d, sums, exact=False)
    pg = _projected_gradient(x, g)
    damping = np.full(len(x), 1e-3)
    live = np.flatnonzero(pg > tol)
    for _ in range(_MAX_ITER):
        if not len(live):
            break
        x_try = x.copy()
        x_try[live] = np.clip(x[live] + _newton_step(x[live], g[live], hess[live], damping[live]), _LOWER, _UPPER)
        trial = _block_sums(x_try, d, np.unique(d.fit_segment[live]))
        f_try, g_try, hess_try = _fit_terms(x_try, d, trial, live, exact=False)
        pg_try = _projected_gradient(x_try[live], g_try)
        armijo = f_try <= f[live] + 1e-4 * ((x_try[live] - x[live]) * g[live]).sum(axis=1)
        at_precision = (f_try <= f[live] + 1e-13 * np.abs(f[live])) & (pg_try < pg[live])  # f cannot resolve it
        accept = armijo | at_precision
        ok = live[accept]
        x[ok], f[ok], g[ok], hess[ok], pg[ok] = (
            x_try[ok], f_try[accept], g_try[accept], hess_try[accept], pg_try[accept])
        moved = np.zeros(len(x) + 1, dtype=bool)
        moved[ok] = True
        moved = moved[d.block_fit]
        sums[moved] = trial[moved]
        damping[live] = np.where(accept, np.maximum(damping[live] * 0.1, 1e-12), damping[live] * 10.0)
        live = live[(pg[live] > tol) & (damping[live] < 1e12)]
    return x, pg <= tol, sums


def _fit_chunk(args: tuple) -> tuple[np.ndarray, ...]:
    """Fold fits of the trials `rows` (whole participants) and their out-of-fold scores (NLL, correct) per trial in
    that order.

    The fold fits start from each participant's fit on all of their trials (a quarter of the work per iteration),
    itself started from `x0`; at that start all columns of a block share one fit's parameters, so the pooled fit's
    block sums give the fold fits' first terms without another pass.
    """
    logits, choice, fold, rows, group, k, x0 = args
    choice = choice[rows]
    folds, pooled, order = _designs(logits[rows], choice, fold[rows], group, k)
    x0 = np.tile(x0, (len(k), 1))
    start, _, sums = _solve(pooled, x0, _block_sums(x0, pooled), _POOLED_TOL)
    shared = np.broadcast_to(sums, (len(folds.start) - 1, MAX_FOLDS - 1, _N_SUMS))
    params, converged, _ = _solve(folds, np.repeat(start, k, axis=0), shared, _TOL)
    nll, correct = np.empty(len(order)), np.empty(len(order), dtype=bool)
    nll[order], correct[order] = _test_scores(params, folds, choice[order])
    return params, converged, nll, correct


def _common_start(logits: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """One fit to all given trials: the pooled fits' start, nearer their optima than `INIT`."""
    zeros = np.zeros(len(choice), dtype=np.int64)                      # one participant, one fold
    _, pooled, _ = _designs(logits, choice, zeros, zeros, np.ones(1, dtype=np.int64))
    x0 = np.asarray(INIT, dtype=np.float64)[None]
    return _solve(pooled, x0, _block_sums(x0, pooled), _POOLED_TOL)[0][0]


def _test_scores(params: np.ndarray, d: _Design, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NLL and correctness (largest logit, first on ties, is the choice) of each trial under the fit of its test
    fold (block b's, since fits and blocks share the (participant, fold) order), trials in `d`'s order; the
    arithmetic of `log_probabilities`, one position at a time."""
    size = np.diff(d.start)
    inv_t, bias1, bias3 = (np.repeat(a, size) for a in (np.exp(-params[:, 0]), params[:, 1], params[:, 2]))
    z = [(d.logits[:, 0] + bias1) * inv_t, d.logits[:, 1] * inv_t, (d.logits[:, 2] + bias3) * inv_t]
    top = np.maximum(np.maximum(z[0], z[1]), z[2])
    predicted = np.where(z[0] == top, 0, np.where(z[1] == top, 1, 2))
    chosen = np.choose(choice, z)
    total = sum(np.exp(np.subtract(zc, top, out=zc)) for zc in z)
    return np.log(total) - (chosen - top), predicted == choice


def fit_folds(logits: np.ndarray, choice: np.ndarray, fold: np.ndarray, groups: Groups, n_folds: np.ndarray,
              n_jobs: int = 2, solver: str = "newton") -> tuple[np.ndarray, np.ndarray]:
    """Parameters (sum n_folds, 3) of every (kept participant, fold) fit, ordered by participant then fold, each
    fitted on the participant's trials outside that fold; plus per-fit convergence flags.

    `solver="lbfgsb"` fits each problem separately with scipy's L-BFGS-B (upstream's optimiser; slow reference).
    """
    return _fit_all(logits, choice, fold, groups, n_folds, n_jobs, solver)[:2]


def _fit_all(logits: np.ndarray, choice: np.ndarray, fold: np.ndarray, groups: Groups, n_folds: np.ndarray,
             n_jobs: int, solver: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`fit_folds` plus out-of-fold NLL and correctness per trial (original order; NaN and False for dropped
    participants)."""
    kept = np.flatnonzero(n_folds)
    k, counts = n_folds[kept], groups.counts[kept]
    edges = np.concatenate([[0], np.cumsum(counts)])
    rows = np.concatenate([groups.order[s:s + c] for s, c in zip(groups.starts[kept], counts)]
                          or [np.zeros(0, dtype=np.int64)])
    if solver == "lbfgsb":
        fits = [fit_single(logits[train], choice[train])
                for r, n in zip(np.split(rows, edges[1:-1]), k) for train in (r[fold[r] != f] for f in range(n))]
        params = np.reshape([fit.x for fit in fits], (-1, 3))
        first = np.concatenate([[0], np.cumsum(k)[:-1]])
        fit_of = np.repeat(first, counts) + fold[rows]
        nll, correct = np.full(len(choice), np.nan), np.zeros(len(choice), dtype=bool)
        logp = log_probabilities(params[fit_of], logits[rows])
        nll[rows], correct[rows] = -logp[np.arange(len(rows)), choice[rows]], logp.argmax(axis=1) == choice[rows]
        return params, np.array([fit.success for fit in fits], dtype=bool).reshape(-1), nll, correct
    if solver != "newton":
        raise ValueError(f"unknown solver {solver!r}; expected 'newton' or 'lbfgsb'")
    sample = rows[::max(1, len(rows) >> 15)]                             # a regular subsample of the trials
    x0 = _common_start(logits[sample], choice[sample]) if len(rows) else None
    chunks = []
    cuts = _chunk_bounds(counts, min(_CHUNK_TRIALS, -(-int(edges[-1]) // max(1, n_jobs))))
    for lo, hi in pairwise(cuts):
        r = rows[edges[lo]:edges[hi]]
        chunks.append((logits, choice, fold, r, np.repeat(np.arange(hi - lo), counts[lo:hi]), k[lo:hi], x0))
    with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        results = list(pool.map(_fit_chunk, chunks))
    nll, correct = np.full(len(choice), np.nan), np.zeros(len(choice), dtype=bool)
    if not results:
        return np.zeros((0, 3)), np.zeros(0, dtype=bool), nll, correct
    nll[rows], correct[rows] = np.concatenate([r[2] for r in results]), np.concatenate([r[3] for r in results])
    return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]), nll, correct)


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
    params, converged, nll, correct = _fit_all(logits, choice, fold, groups, n_folds, n_jobs, solver)
    scored = np.flatnonzero(fold >= 0)
    scores = np.full(len(choice), np.nan)
    scores[scored] = correct[scored]
    return CVResult(nll=nll, correct=scores, fold=fold, kept=n_folds > 0, n_folds=n_folds, params=params,
                    converged=converged)
