"""Category and reward learning (docs/methods.md §9.3–9.4).

Per participant and representation an online learner turns trial t's options into values v_t, using only trials
before t; a one-parameter softmax choice model (log T ∈ [−4.6, 4.6], fitted in sample on the human choices) scores
the human choices. Each model has one free parameter, so summed NLLs compare without a complexity penalty.

Options beyond the study (docs/methods.md §9.3–9.4), each a named setting whose default is the study's:
- `c_selection`: `cv` (study: CV accuracy, ties to the smallest C), `cv_logloss` (CV log-loss: accuracy ties
  between weak Cs no longer fall to C = 1e−4, whose online learner only predicts the majority label seen so far),
  `causal` (prequential, past labels only).
- `scoring`: `in_sample` (study) or `loo` (each trial scored by a temperature fitted without it, as the published
  THINGSDecisions pseudo-R²).
- `temperature`: `individual` (study) or `hierarchical` (inverse temperatures partially pooled across participants,
  β_p ~ N(μ, τ²) by Laplace-approximated marginal likelihood, as lme4's glmer in THINGSDecisions).
- `t_bounds`: `study` (log T ∈ [−4.6, 4.6] in value units; binds for near-random participants when values are
  rewards in 0–100) or `scaled` (the same bounds on log(T / s), s = the participant's RMS value difference).

Exact and fast (docs/methods.md P-47) instead of refitting scikit-learn from scratch at every trial:
- Both learners are invariant to rotations of the feature space (isotropic L2 penalty / isotropic Gaussian prior)
  and their solutions lie in the span of the training rows, so each participant's images are first expressed in an
  orthonormal basis of their own span (r ≤ min(D, number of images) coordinates): the fits, predictions and
  hyper-parameters are identical, at r instead of D dimensions.
- Category: L2 logistic regression (scikit-learn's objective C·Σ log-loss + ½‖w‖², unpenalised intercept) solved
  to machine precision by Newton's method, warm-started from the previous trial's optimum (usually 1–3 steps).
  scikit-learn's lbfgs stops at tol 1e-4, so its values differ from the exact optimum at that level.
- Reward: scikit-learn's BayesianRidge (defaults: α₁ = α₂ = λ₁ = λ₂ = 1e−6, intercept, max_iter 300, tol 1e−3).
  Its hyper-parameters α, λ are re-estimated by evidence maximisation at every trial, so no rank-one update of a
  fixed posterior is exact; each trial instead repeats scikit-learn's algorithm (SVD of the centred data, same
  initialisation, update order and stopping rule on the L1 change of the coefficients in the original D
  coordinates) on the r span coordinates: O(n·r·min(n, r)) per trial instead of O(n·D·min(n, D)), with only
  floating-point rounding differing from a refit (`tests/test_learning.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, log_expit, log_softmax
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from metalign.io import DataContractError, align_rows
from metalign.progress import progress

CATEGORY_COLUMNS = ("participant", "image", "choice", "true_category_binary")
REWARD_COLUMNS = ("participant", "left_image", "right_image", "left_reward", "right_reward", "choice")
C_GRID = np.logspace(-4, 4, 10)
CV_FOLDS = 5
C_SELECTIONS = ("cv", "cv_logloss", "causal")
SCORINGS = ("in_sample", "loo")
TEMPERATURES = ("individual", "hierarchical")
T_BOUNDS = ("study", "scaled")
LOG_T_BOUNDS = (-4.6, 4.6)
LOG_TAU_BOUNDS = (-12.0, 6.0)            # hierarchical: log τ of standardised inverse temperatures
LOG_VALUE_FLOOR = math.log(1e-15)        # values are clipped at 1e-15 before the log (docs/methods.md §9.3)
LOG_2 = math.log(2.0)
# scikit-learn BayesianRidge defaults
PRIOR = {"alpha_1": 1e-6, "alpha_2": 1e-6, "lambda_1": 1e-6, "lambda_2": 1e-6}
BR_MAX_ITER, BR_TOL = 300, 1e-3


# --------------------------------------------------------------------------------------------- inputs


def image_key(path: str) -> str:
    """`…/stimuli/<concept>/<file>.jpg` → `<concept>/<file>.jpg`, the THINGS image id (docs/datasets.md join rule)."""
    path = str(path).replace("\\", "/")
    return path.rsplit("stimuli/", 1)[1] if "stimuli/" in path else path


def read_table(path: str | os.PathLike, columns: tuple[str, ...], binary: tuple[str, ...],
               numeric: tuple[str, ...] = ()) -> pd.DataFrame:
    """A learning-task CSV with the named columns; `binary` columns must hold 0/1, `numeric` finite numbers."""
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"learning-task table not found: {path}")
    frame = pd.read_csv(path, dtype={"participant": str})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataContractError(f"{path} lacks column(s) {missing}; expected {list(columns)}, found "
                                f"{list(frame.columns)}")
    for column in binary + numeric:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) if column in numeric else ~np.isin(values, (0.0, 1.0))
        if bad.any():
            row = int(np.argmax(bad))
            raise DataContractError(f"{path}: column {column!r}, data row {row} holds {frame[column].iloc[row]!r}; "
                                    f"expected {'a finite number' if column in numeric else '0 or 1'}")
        frame[column] = values.astype(np.int64) if column in binary else values
    if frame["participant"].isna().any():
        raise DataContractError(f"{path}: column 'participant' is empty in data row "
                                f"{int(np.argmax(frame['participant'].isna()))}")
    return frame


def read_category(path: str | os.PathLike) -> pd.DataFrame:
    return read_table(path, CATEGORY_COLUMNS, binary=("choice", "true_category_binary"))


def read_reward(path: str | os.PathLike) -> pd.DataFrame:
    return read_table(path, REWARD_COLUMNS, binary=("choice",), numeric=("left_reward", "right_reward"))


def feature_rows(paths: pd.Series, ids: list[str], source: str, column: str) -> np.ndarray:
    """Feature rows of the images named in `column` (joined by THINGS image id); every image must exist."""
    keys = paths.map(image_key)
    known = set(ids)
    missing = sorted(set(keys) - known)
    if missing:
        raise DataContractError(f"{source}: {len(missing)} image(s) of column {column!r} have no feature row, "
                                f"e.g. {missing[:5]}")
    return align_rows(ids, keys.tolist(), source)


def span_coordinates(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Z, B): coordinates Z = X B of the rows of X in an orthonormal basis B (D × r) of their span."""
    features = np.asarray(features, dtype=np.float64)
    _, s, vt = np.linalg.svd(features, full_matrices=False)
    keep = s > (s[0] if len(s) else 0.0) * max(features.shape) * np.finfo(np.float64).eps
    basis = vt[keep].T
    return features @ basis, basis


# --------------------------------------------------------------------------------------------- logistic learner


def _logistic_objective(design: np.ndarray, y: np.ndarray, c: float, theta: np.ndarray) -> float:
    z = design @ theta
    return float(c * (np.logaddexp(0.0, z) - y * z).sum() + 0.5 * theta[:-1] @ theta[:-1])


def fit_logistic(design: np.ndarray, y: np.ndarray, c: float, theta: np.ndarray | None = None,
                 max_iter: int = 100) -> np.ndarray:
    """argmin C·Σ log-loss + ½‖w‖² over θ = (w, b), by damped Newton from `theta`; `design` = [Z, 1]."""
    theta = np.zeros(design.shape[1]) if theta is None else theta.copy()
    penalty = np.ones(design.shape[1])
    penalty[-1] = 0.0
    value = _logistic_objective(design, y, c, theta)
    for _ in range(max_iter):
        p = expit(design @ theta)
        grad = c * design.T @ (p - y) + penalty * theta
        hess = c * (design.T * (p * (1.0 - p))) @ design + np.diag(penalty)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrement = float(grad @ step)           # ≈ 2 (f − f*) near the optimum
        if decrement <= 1e-10 * max(1.0, abs(value)):
            return theta - step                  # quadratic convergence: this step reaches machine precision
        size = 1.0
        while True:                              # backtracking: Newton can overshoot on near-separable data
            candidate = theta - size * step
            new_value = _logistic_objective(design, y, c, candidate)
            if new_value <= value - 1e-4 * size * decrement:
                break
            size *= 0.5
            if size < 1e-10:                     # f no longer resolves the step: at precision
                return theta
        theta, value = candidate, new_value
    return theta


def _design(z: np.ndarray) -> np.ndarray:
    return np.hstack([z, np.ones((len(z), 1))])


def choose_c(z: np.ndarray, y: np.ndarray, grid: np.ndarray = C_GRID, scoring: str = "accuracy") -> float:
    """C with the best mean held-out `scoring` (`accuracy`, the study's; or `log_loss`) of stratified K-fold CV
    (K = min(5, smallest class count), no shuffle, as scikit-learn's grid search); ties go to the smallest C. 1.0
    (scikit-learn's default) when a class has fewer than two trials."""
    k = min(CV_FOLDS, int(np.bincount(y, minlength=2).min()))
    if k < 2:
        return 1.0
    design = _design(z)
    score = np.zeros(len(grid))
    for train, test in StratifiedKFold(n_splits=k).split(z, y):
        theta = None
        for g, c in enumerate(grid):             # warm start along the regularisation path
            theta = fit_logistic(design[train], y[train], c, theta)
            margin = design[test] @ theta
            score[g] += (np.mean((margin > 0) == y[test]) if scoring == "accuracy"
                         else np.mean(log_expit(np.where(y[test] == 1, margin, -margin))))
    return float(grid[int(np.argmax(score))])


def online_logistic(z: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """(n, 2) log values: log(0.5) until both classes occurred before trial t, then the log class probabilities of
    trial t under the fit on trials < t (warm-started from the previous trial's optimum)."""
    design = _design(z)
    log_values = np.full((len(y), 2), -LOG_2)
    seen = np.zeros(2, dtype=bool)
    theta = None
    for t in range(len(y)):
        if seen.all():
            theta = fit_logistic(design[:t], y[:t], c, theta)
            score = design[t] @ theta
            log_values[t] = (log_expit(-score), log_expit(score))
        seen[y[t]] = True
    return log_values


def online_logistic_causal(z: np.ndarray, y: np.ndarray, grid: np.ndarray = C_GRID) -> tuple[np.ndarray, np.ndarray]:
    """The causal variant (docs/methods.md P-25): at trial t use the C whose online predictions of the true labels of trials < t
    had the highest log-likelihood (prequential selection; ties → smallest C). Returns log values and C per trial."""
    paths = np.stack([online_logistic(z, y, c) for c in grid])               # (G, n, 2)
    scored = paths[:, np.arange(len(y)), y]                                 # (G, n) log v of the true label
    past = np.concatenate([np.zeros((len(grid), 1)), np.cumsum(scored, axis=1)[:, :-1]], axis=1)
    best = np.argmax(past, axis=0)
    return paths[best, np.arange(len(y))], grid[best]


# --------------------------------------------------------------------------------------------- reward learner


def online_bayesian_ridge(z_left: np.ndarray, z_right: np.ndarray, reward_left: np.ndarray,
                          reward_right: np.ndarray, basis: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) predicted rewards of trial t's options from BayesianRidge fitted on both options of trials < t
    (v_0 = 0). `basis` (D × r) maps span coordinates back to the original ones for the stopping rule."""
    n_trials, r = z_left.shape
    basis = np.eye(r) if basis is None else basis
    rows = np.empty((2 * n_trials, r))
    rows[0::2], rows[1::2] = z_left, z_right
    targets = np.empty(2 * n_trials)
    targets[0::2], targets[1::2] = reward_left, reward_right
    values = np.zeros((n_trials, 2))
    for t in range(1, n_trials):
        coef, x_mean, y_mean = bayesian_ridge(rows[:2 * t], targets[:2 * t], basis)
        values[t] = (np.stack([z_left[t], z_right[t]]) - x_mean) @ coef + y_mean
    return values


def bayesian_ridge(x: np.ndarray, y: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """scikit-learn's BayesianRidge.fit on span coordinates `x` (posterior-mean coefficients, x mean, y mean).

    Same initialisation (α = 1/(Var y + eps), λ = 1), update order and stopping rule (L1 change of the coefficients
    in the original coordinates `basis @ coef` below tol), with the residual computed from the rows: a
    sufficient-statistics residual (yᵀy − 2 cᵀXᵀy + cᵀXᵀXc) cancels catastrophically when the fit interpolates
    (n ≤ r, every early trial), and α depends on it through 1 / (sse + 2e−6).
    """
    x_mean, y_mean = x.mean(axis=0), float(y.mean())
    xc, yc = x - x_mean, y - y_mean
    _, singular, vh = np.linalg.svd(xc, full_matrices=False)
    eigval = singular ** 2
    projected = vh @ (xc.T @ yc)
    to_original = basis @ vh.T
    rows_in_svd = xc @ vh.T                     # the rows in the SVD's coordinates: fitted values = rows_in_svd @ coef
    alpha, lam = 1.0 / (float(y.var()) + np.finfo(np.float64).eps), 1.0
    previous = None
    for iteration in range(BR_MAX_ITER):      # a few dozen iterations of small arrays: one call per quantity
        coef = projected / (eigval + lam / alpha)
        residual = yc - rows_in_svd @ coef
        sse = float(residual @ residual)
        gamma = float((alpha * eigval / (lam + alpha * eigval)).sum())
        lam = (gamma + 2 * PRIOR["lambda_1"]) / (coef @ coef + 2 * PRIOR["lambda_2"])
        alpha = (len(y) - gamma + 2 * PRIOR["alpha_1"]) / (sse + 2 * PRIOR["alpha_2"])
        original = to_original @ coef
        if iteration != 0 and np.abs(previous - original).sum() < BR_TOL:
            break
        previous = original
    return vh.T @ (projected / (eigval + lam / alpha)), x_mean, y_mean


# --------------------------------------------------------------------------------------------- choice model


def choice_nll(log_t: float, values: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-trial NLL of softmax(values / T) and its derivative w.r.t. log T."""
    scaled = values * math.exp(-log_t)
    log_p = log_softmax(scaled, axis=1)
    rows = np.arange(len(choice))
    resid = np.exp(log_p)
    resid[rows, choice] -= 1.0
    return -log_p[rows, choice], -(resid * scaled).sum(axis=1)


def fit_temperature(values: np.ndarray, choice: np.ndarray,
                    bounds: tuple[float, float] = LOG_T_BOUNDS) -> float:
    """log T minimising the mean NLL of the human choices (L-BFGS-B from log T = 0 clipped into `bounds`, the
    study's ±4.6 by default)."""
    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        nll, grad = choice_nll(float(x[0]), values, choice)
        return float(nll.mean()), np.array([grad.mean()])

    start = np.clip(np.zeros(1), *bounds)
    return float(minimize(objective, start, jac=True, method="L-BFGS-B", bounds=[bounds]).x[0])


def log_t_bounds(values: np.ndarray, t_bounds: str = "study") -> tuple[float, float]:
    """The study's ±4.6 on log T, or (`scaled`) the same on log(T / s) with s the RMS of the value differences, so
    the bound means the same whatever the values' units (log-probabilities, or rewards in 0–100)."""
    if t_bounds == "study":
        return LOG_T_BOUNDS
    rms = float(np.sqrt(np.mean((values[:, 1] - values[:, 0]) ** 2)))
    shift = math.log(rms) if rms > 0 else 0.0
    return LOG_T_BOUNDS[0] + shift, LOG_T_BOUNDS[1] + shift


def choice_margins(values: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """a_t = ±(v1 − v0), signed so that the two-option softmax gives P(choice_t) = σ(β a_t) with β = 1/T."""
    return np.where(choice == 1, 1.0, -1.0) * (values[:, 1] - values[:, 0])


def fit_beta(margins: np.ndarray, weights: np.ndarray, lower: float, upper: float, prior_mean: float = 0.0,
             prior_precision: float = 0.0) -> np.ndarray:
    """Per row k: argmin over β ∈ [lower, upper] of Σ_t w_kt·(−log σ(β a_kt)) + ½ prior_precision (β − prior_mean)².

    The objective is convex in β, so Newton steps kept inside a shrinking bracket reach machine precision; rows are
    solved together (one row per left-out trial, or per participant). `margins` is (n,) or (K, n), `weights`
    (K, n); the bounds may be infinite when there is a prior (the optimum lies within Σ w|a| / precision of its
    mean). A row without information (all w·a = 0, no prior) gets β = 1 (log T = 0, the study's start)."""
    margins = np.broadcast_to(margins, weights.shape)
    lo, hi = np.full(len(weights), float(lower)), np.full(len(weights), float(upper))
    if prior_precision > 0:
        reach = (weights * np.abs(margins)).sum(axis=1) / prior_precision + 1.0
        lo, hi = np.maximum(lo, prior_mean - reach), np.minimum(hi, prior_mean + reach)

    def derivatives(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = expit(-beta[:, None] * margins)
        grad = -(weights * margins * s).sum(axis=1) + prior_precision * (beta - prior_mean)
        hess = (weights * margins ** 2 * s * (1.0 - s)).sum(axis=1) + prior_precision
        return grad, hess

    at_lower, at_upper = derivatives(lo)[0] >= 0, derivatives(hi)[0] <= 0
    beta = np.clip(np.ones(len(weights)), lo, hi)
    for _ in range(200):
        grad, hess = derivatives(beta)
        lo, hi = np.where(grad < 0, beta, lo), np.where(grad > 0, beta, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = beta - grad / hess
        inside = (newton > lo) & (newton < hi)
        new = np.where(grad == 0, beta, np.where(inside, newton, 0.5 * (lo + hi)))
        converged = np.all(np.abs(new - beta) <= 1e-13 * np.maximum(1.0, np.abs(beta)))
        beta = new
        if converged:
            break
    flat = ~(weights * margins != 0).any(axis=1) & (prior_precision == 0)
    beta = np.where(at_lower, lo, np.where(at_upper, hi, beta))
    return np.where(flat, np.clip(1.0, lower, upper), beta)


def loo_nll(margins: np.ndarray, lower: float, upper: float, prior_mean: float = 0.0,
            prior_precision: float = 0.0) -> np.ndarray:
    """Per-trial NLL with β refitted on all the participant's other trials (leave-one-trial-out)."""
    n = len(margins)
    beta = fit_beta(margins, 1.0 - np.eye(n), lower, upper, prior_mean, prior_precision)
    return -log_expit(beta * margins)


@dataclass(frozen=True)
class Pooled:
    """Hierarchical inverse temperatures: group mean μ and sd τ of β = 1/T, and each participant's β (posterior
    mode given μ, τ), all in value units."""

    mean: float
    sd: float
    beta: np.ndarray


def fit_hierarchical(margins: list[np.ndarray]) -> Pooled:
    """β_p ~ N(μ, τ²), P(choice) = σ(β_p a): (μ, τ) maximise the Laplace-approximated marginal likelihood (lme4's
    glmer default, nAGQ = 1), then β_p = the conditional modes. Unbounded β, like glmer's random slopes. Fitted on
    margins standardised by their overall RMS (the fit is equivariant to that scale; THINGSDecisions scales too)."""
    width = max(len(m) for m in margins)
    padded, weights = np.zeros((len(margins), width)), np.zeros((len(margins), width))
    for p, m in enumerate(margins):
        padded[p, :len(m)], weights[p, :len(m)] = m, 1.0
    scale = float(np.sqrt((padded ** 2).sum() / weights.sum())) or 1.0
    padded /= scale

    def modes(mu: float, log_tau: float) -> tuple[np.ndarray, float]:
        precision = math.exp(-2.0 * log_tau)
        return fit_beta(padded, weights, -np.inf, np.inf, mu, precision), precision

    def negative_marginal(x: np.ndarray) -> float:
        beta, precision = modes(float(x[0]), float(x[1]))
        z = beta[:, None] * padded
        s = expit(z)
        curvature = (weights * padded ** 2 * s * (1.0 - s)).sum(axis=1)
        return float(-(weights * log_expit(z)).sum() + 0.5 * precision * ((beta - x[0]) ** 2).sum()
                     + 0.5 * np.log1p(curvature / precision).sum())

    pooled = float(fit_beta(padded.ravel(), weights.reshape(1, -1), -1e3, 1e3)[0])
    start = np.array([pooled, math.log(max(abs(pooled), 0.1))])
    best = minimize(negative_marginal, start, method="L-BFGS-B", bounds=[(None, None), LOG_TAU_BOUNDS]).x
    beta, _ = modes(float(best[0]), float(best[1]))
    return Pooled(float(best[0]) / scale, math.exp(float(best[1])) / scale, beta / scale)


def _hit(values: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1 if the target option has the larger value, 0.5 on ties, 0 otherwise."""
    other = values[np.arange(len(target)), 1 - target]
    mine = values[np.arange(len(target)), target]
    return np.where(mine > other, 1.0, np.where(mine == other, 0.5, 0.0))


# --------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Session:
    """One participant's trials in table order: `rows` of the table, the learner's values and its extra outputs."""

    rows: np.ndarray
    values: np.ndarray
    info: dict[str, Any]


def _sessions(table: pd.DataFrame, learn: Callable[[np.ndarray], Session], desc: str) -> list[Session]:
    """`learn` per participant, with single-threaded BLAS: thousands of ≤ 120-dimensional solves and SVDs gain
    nothing from threads, and on a busy machine threaded BLAS slows them down by an order of magnitude."""
    groups = table.groupby("participant", sort=True).indices
    with threadpool_limits(limits=1):
        return [learn(np.sort(rows)) for rows in progress(groups.values(), desc=desc, unit="participant")]


def category_sessions(table: pd.DataFrame, features: np.ndarray, rows: np.ndarray,
                      c_selection: str = "cv") -> list[Session]:
    """Category learner per participant (`rows` = feature row of each table row's image); `c_selection` as in
    the module docstring."""
    labels = table["true_category_binary"].to_numpy()

    def learn(trials: np.ndarray) -> Session:
        z, _ = span_coordinates(features[rows[trials]])
        y = labels[trials]
        if c_selection == "causal":
            log_values, c = online_logistic_causal(z, y)
            return Session(trials, np.maximum(log_values, LOG_VALUE_FLOOR), {"C": c.tolist()})
        c = choose_c(z, y, scoring="accuracy" if c_selection == "cv" else "log_loss")
        return Session(trials, np.maximum(online_logistic(z, y, c), LOG_VALUE_FLOOR), {"C": c})

    return _sessions(table, learn, "category learners")


def reward_sessions(table: pd.DataFrame, features: np.ndarray, left: np.ndarray, right: np.ndarray) -> list[Session]:
    """Reward learner per participant (`left`/`right` = feature rows of each table row's options)."""
    rewards = table[["left_reward", "right_reward"]].to_numpy(dtype=np.float64)

    def learn(trials: np.ndarray) -> Session:
        z, basis = span_coordinates(np.vstack([features[left[trials]], features[right[trials]]]))
        values = online_bayesian_ridge(z[:len(trials)], z[len(trials):], rewards[trials, 0], rewards[trials, 1],
                                       basis)
        return Session(trials, values, {})

    return _sessions(table, learn, "reward learners")


def score_sessions(table: pd.DataFrame, sessions: list[Session], target: np.ndarray, scoring: str = "in_sample",
                   temperature: str = "individual", t_bounds: str = "study") -> tuple[pd.DataFrame, dict]:
    """Fit the choice model's temperature on the human choices (per participant, or `hierarchical`ly pooled) and
    score every trial in sample or leave-one-trial-out (`scoring`); per-trial NLL (`trial` = table row), `correct`
    (the model's choice probability of the human choice > ½; ½ on ties) and `learner_correct` (values vs `target`)."""
    for name, value, allowed in (("scoring", scoring, SCORINGS), ("temperature", temperature, TEMPERATURES),
                                 ("t_bounds", t_bounds, T_BOUNDS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
    choice = table["choice"].to_numpy()
    codes, subjects = pd.factorize(table["participant"], sort=True)
    margins = [choice_margins(session.values, choice[session.rows]) for session in sessions]
    pooled = fit_hierarchical(margins) if temperature == "hierarchical" and sessions else None
    frames, params, at_bound = [], {}, 0
    for p, (session, margin) in enumerate(zip(sessions, margins)):
        if pooled is None:
            bounds = log_t_bounds(session.values, t_bounds)
            log_t = fit_temperature(session.values, choice[session.rows], bounds)
            at_bound += int(min(log_t - bounds[0], bounds[1] - log_t) < 1e-6)
            fitted = {"log_t": log_t}
            nll = (choice_nll(log_t, session.values, choice[session.rows])[0] if scoring == "in_sample"
                   else loo_nll(margin, math.exp(-bounds[1]), math.exp(-bounds[0])))
        else:
            beta = float(pooled.beta[p])
            fitted = {"beta": beta, "log_t": -math.log(beta) if beta > 0 else None}
            nll = (-log_expit(beta * margin) if scoring == "in_sample"
                   else loo_nll(margin, -np.inf, np.inf, pooled.mean, pooled.sd ** -2))
        p_choice = np.exp(-nll)
        frames.append(pd.DataFrame({
            "participant": codes[session.rows], "subject_id": table["participant"].to_numpy()[session.rows],
            "trial": session.rows, "nll": nll,
            "correct": np.where(p_choice > 0.5, 1.0, np.where(p_choice == 0.5, 0.5, 0.0)),
            "value0": session.values[:, 0], "value1": session.values[:, 1],
            "learner_correct": _hit(session.values, target[session.rows])}))
        params[str(subjects[codes[session.rows[0]]])] = {**fitted, **session.info}
    per_trial = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["participant", "subject_id", "trial", "nll", "correct", "value0", "value1", "learner_correct"])
    mean_nll = float(per_trial["nll"].mean())
    log_ts = [p["log_t"] for p in params.values() if p["log_t"] is not None]
    summary = {"nll": mean_nll, "nll_sum": float(per_trial["nll"].sum()), "mcfadden_r2": 1.0 - mean_nll / LOG_2,
               "acc": float(per_trial["correct"].mean()), "learner_acc": float(per_trial["learner_correct"].mean()),
               "n_participants": len(sessions), "n_trials": int(len(per_trial)),
               "median_log_t": float(np.median(log_ts)) if log_ts else None,
               "scoring": scoring, "temperature": temperature, "t_bounds": t_bounds,
               **({"n_log_t_at_bound": at_bound} if pooled is None else
                  {"beta_mean": pooled.mean, "beta_sd": pooled.sd}),
               "participants": params}
    return per_trial, summary


def evaluate_category(table: pd.DataFrame, features: np.ndarray, ids: list[str], source: str = "features",
                      c_selection: str = "cv", **choice_model: str) -> tuple[pd.DataFrame, dict]:
    """Category learning; `choice_model` = score_sessions' scoring / temperature / t_bounds. The summary counts the
    sessions whose C is the grid's smallest (for `causal`: on the last trial), where the learner degenerates."""
    if c_selection not in C_SELECTIONS:
        raise ValueError(f"c_selection must be one of {C_SELECTIONS}, not {c_selection!r}")
    rows = feature_rows(table["image"], ids, source, "image")
    sessions = category_sessions(table, features, rows, c_selection)
    per_trial, summary = score_sessions(table, sessions, table["true_category_binary"].to_numpy(), **choice_model)
    smallest = sum(np.atleast_1d(s.info["C"])[-1] == C_GRID[0] for s in sessions)
    return per_trial, {**summary, "c_selection": c_selection, "n_sessions_smallest_c": int(smallest)}


def evaluate_reward(table: pd.DataFrame, features: np.ndarray, ids: list[str], source: str = "features",
                    **choice_model: str) -> tuple[pd.DataFrame, dict]:
    """Reward learning; `choice_model` = score_sessions' scoring / temperature / t_bounds."""
    left = feature_rows(table["left_image"], ids, source, "left_image")
    right = feature_rows(table["right_image"], ids, source, "right_image")
    better = (table["right_reward"].to_numpy() > table["left_reward"].to_numpy()).astype(np.int64)
    return score_sessions(table, reward_sessions(table, features, left, right), better, **choice_model)
