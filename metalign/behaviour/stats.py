"""Group statistics of behavioural model comparisons (docs/methods.md §10): random-effects Bayesian model selection
(Stephan et al. 2009; protected exceedance probabilities per Rigoux et al. 2014), paired Wilcoxon tests on
per-participant summed NLLs, and McFadden pseudo-R² with uncertainty across participants (not trials, docs/methods.md P-28).

Every per-trial table (`alignment/<benchmark>/<backbone>/<variant>.parquet`) holds `participant`, `trial`, `nll` and
`correct`; tables of one benchmark pair row by row on (participant, trial), and a row counts only where every model
compared has a finite NLL.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from scipy.special import betainc, digamma, expit, gammaln, log_softmax, logsumexp

from metalign.io import DataContractError

log = logging.getLogger(__name__)

COMPAT_ITERATIONS = 32        # upstream's cap (groupBMC default); reported next to the converged result (docs/methods.md P-11)
MAX_ITERATIONS = 100_000      # "converged": the fixed point is reached long before this on any real data
TOLERANCE = 1e-4              # on max_k |Δα_k|
EP_SAMPLES = 1_000_000        # Monte Carlo draws of the Dirichlet posterior for K > 2
MIN_PARTICIPANTS = 3          # a subset gets statistics only with at least this many participants (docs/methods.md §9.2)
KEY = ["participant", "trial"]


# --------------------------------------------------------------------------------------------- BMS


@dataclass(frozen=True)
class BMSResult:
    alpha: np.ndarray         # (K,) posterior Dirichlet counts
    frequency: np.ndarray     # (K,) expected model frequencies α / Σα
    ep: np.ndarray            # (K,) exceedance probabilities
    pxp: np.ndarray           # (K,) protected exceedance probabilities
    bor: float                # Bayesian omnibus risk σ(F0 − F1)
    f0: float
    f1: float
    n_iter: int
    converged: bool


def bms(log_evidence: np.ndarray, max_iter: int = MAX_ITERATIONS, tol: float = TOLERANCE,
        alpha0: np.ndarray | None = None, ep_samples: int = EP_SAMPLES, seed: int = 1234) -> BMSResult:
    """Random-effects BMS on an (N participants, K models) log-evidence matrix, entirely in log space.

    The prior is α⁰ = 1/K (groupBMC's value, which reproduces the published THINGSDecisions frequencies); the
    fixed point α ← α⁰ + Σ_n softmax(L_n + ψ(α)) runs until max|Δα| < tol or `max_iter` updates. BOR is σ(F0 − F1),
    never exp(F1 − F0), which overflows once F1 − F0 > 709 (docs/methods.md P-10).
    """
    L = np.asarray(log_evidence, dtype=np.float64)
    if L.ndim != 2 or L.shape[1] < 2 or not len(L):
        raise ValueError(f"log evidence must be (participants, models ≥ 2), got shape {L.shape}")
    if not np.isfinite(L).all():
        raise ValueError("log evidence holds non-finite values")
    k = L.shape[1]
    alpha0 = np.full(k, 1.0 / k) if alpha0 is None else np.asarray(alpha0, dtype=np.float64)
    alpha = alpha0.copy()
    converged, n_iter = False, 0
    for n_iter in range(1, max_iter + 1):
        log_g = log_softmax(L + digamma(alpha), axis=1)        # ψ(Σα) cancels inside the softmax
        new_alpha = alpha0 + np.exp(log_g).sum(axis=0)
        change = np.abs(new_alpha - alpha).max()
        alpha = new_alpha
        if change < tol:
            converged = True
            break
    log_g = log_softmax(L + digamma(alpha), axis=1)
    e_log_r = digamma(alpha) - digamma(alpha.sum())
    g = np.exp(log_g)
    kl = (gammaln(alpha.sum()) - gammaln(alpha).sum() - gammaln(alpha0.sum()) + gammaln(alpha0).sum()
          + ((alpha - alpha0) * e_log_r).sum())
    f1 = float((g * (L + e_log_r - log_g)).sum() - kl)
    f0 = float((logsumexp(L, axis=1) - math.log(k)).sum())
    bor = float(expit(f0 - f1))
    ep = exceedance_probabilities(alpha, ep_samples, seed)
    return BMSResult(alpha=alpha, frequency=alpha / alpha.sum(), ep=ep, pxp=ep * (1 - bor) + bor / k, bor=bor,
                     f0=f0, f1=f1, n_iter=n_iter, converged=converged)


def exceedance_probabilities(alpha: np.ndarray, n_samples: int = EP_SAMPLES, seed: int = 1234) -> np.ndarray:
    """P(r_k > r_j ∀ j ≠ k) under r ~ Dir(α): exact for K = 2 (regularised incomplete beta), seeded Monte Carlo
    (Dirichlet draws as normalised gammas, in chunks) for K > 2."""
    alpha = np.asarray(alpha, dtype=np.float64)
    if len(alpha) == 2:
        first = float(betainc(alpha[1], alpha[0], 0.5))     # P(r_1 > 1/2) = P(r_2 < 1/2) = I_½(α_2, α_1)
        return np.array([first, 1.0 - first])
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(alpha))
    for start in range(0, n_samples, 1 << 18):
        draws = rng.gamma(alpha, size=(min(1 << 18, n_samples - start), len(alpha)))
        wins += np.bincount(draws.argmax(axis=1), minlength=len(alpha))
    return wins / n_samples


# --------------------------------------------------------------------------------------------- pairing


def paired_trials(tables: Mapping[str, pd.DataFrame], subset_column: str | None = None) -> pd.DataFrame:
    """One row per (participant, trial) present with a finite NLL in every table, in the first table's order:
    `nll_<model>`, `correct_<model>` (and `subset_column` from the first table). Tables are joined on the key, never
    by position; tables with identical key columns (every representation of one benchmark) skip the hash merge."""
    if not tables:
        raise ValueError("no tables to pair")
    for model, table in tables.items():
        missing = [c for c in (*KEY, "nll", "correct") if c not in table.columns]
        if missing:
            raise DataContractError(f"per-trial table of {model!r} lacks column(s) {missing}")
    first = next(iter(tables.values()))
    keys = {name: first[name].to_numpy() for name in KEY}
    aligned = all(len(t) == len(first) and all(np.array_equal(t[n].to_numpy(), keys[n]) for n in KEY)
                  for t in tables.values())
    checked = [first] if aligned else list(tables.values())
    for model, table in zip(tables, checked):
        trial = table["trial"].to_numpy()
        unique = bool(np.all(trial[1:] > trial[:-1])) or not table.duplicated(KEY).any()   # cheap test first
        if not unique:
            raise DataContractError(f"per-trial table of {model!r} repeats a (participant, trial) key")
    if aligned:
        merged = pd.DataFrame({**keys, **({subset_column: first[subset_column].to_numpy()} if subset_column else {}),
                               **{f"{c}_{m}": t[c].to_numpy() for m, t in tables.items() for c in ("nll", "correct")}})
    else:
        merged = None
        for model, table in tables.items():
            columns = [*KEY, "nll", "correct"] + ([subset_column] if subset_column and merged is None else [])
            part = table[columns].rename(columns={"nll": f"nll_{model}", "correct": f"correct_{model}"})
            merged = part if merged is None else merged.merge(part, on=KEY, how="inner", validate="one_to_one")
    finite = np.logical_and.reduce([np.isfinite(merged[f"nll_{m}"].to_numpy(dtype=np.float64)) for m in tables])
    return merged[finite].reset_index(drop=True)


def participant_sums(paired: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Per participant: trial count, summed NLL and summed `correct` of every model."""
    sums = paired.groupby("participant", sort=True).agg(
        n=("trial", "size"), **{f"S_{m}": (f"nll_{m}", "sum") for m in models},
        **{f"C_{m}": (f"correct_{m}", "sum") for m in models})
    return sums


# --------------------------------------------------------------------------------------------- comparisons


def compare(paired: pd.DataFrame, models: list[str], n_choices: int, noise_ceiling: float = math.nan,
            seed: int = 1234) -> list[dict]:
    """Rows (one per model) of one comparison on paired trials: summed NLLs, accuracies, McFadden R² pooled and
    mean ± SEM across participants (also ÷ noise ceiling), BMS converged and at 32 iterations, and for two models
    the two-sided Wilcoxon signed-rank test on per-participant NLL sums (first model vs second)."""
    sums = participant_sums(paired, models)
    n_part, n_trials = len(sums), int(sums["n"].sum())
    log_k = math.log(n_choices)
    evidence = -sums[[f"S_{m}" for m in models]].to_numpy()
    full, compat = bms(evidence, seed=seed), bms(evidence, max_iter=COMPAT_ITERATIONS, seed=seed)
    wilcoxon_stat = wilcoxon_p = math.nan
    if len(models) == 2:
        diff = sums[f"S_{models[0]}"] - sums[f"S_{models[1]}"]
        if (diff != 0).any():
            test = scipy_stats.wilcoxon(sums[f"S_{models[0]}"], sums[f"S_{models[1]}"], alternative="two-sided")
            wilcoxon_stat, wilcoxon_p = float(test.statistic), float(test.pvalue)
    ceiling = noise_ceiling if noise_ceiling and noise_ceiling > 0 else math.nan
    rows = []
    for index, model in enumerate(models):
        per_participant = 1.0 - sums[f"S_{model}"] / (sums["n"] * log_k)
        mean = float(per_participant.mean())
        sem = float(per_participant.std(ddof=1) / math.sqrt(n_part)) if n_part > 1 else math.nan
        r2 = 1.0 - float(sums[f"S_{model}"].sum()) / (n_trials * log_k)
        rows.append({
            "model": model, "n_participants": n_part, "n_trials": n_trials,
            "nll_sum": float(sums[f"S_{model}"].sum()), "acc": float(sums[f"C_{model}"].sum() / n_trials),
            "r2": r2, "r2_participant_mean": mean, "r2_participant_sem": sem, "noise_ceiling": noise_ceiling,
            "r2_normalised": r2 / ceiling, "r2_normalised_participant_mean": mean / ceiling,
            "r2_normalised_participant_sem": sem / ceiling,
            "frequency": float(full.frequency[index]), "ep": float(full.ep[index]), "pxp": float(full.pxp[index]),
            "bor": full.bor, "bms_iterations": full.n_iter, "bms_converged": full.converged,
            "frequency_32": float(compat.frequency[index]), "ep_32": float(compat.ep[index]),
            "pxp_32": float(compat.pxp[index]), "bor_32": compat.bor, "bms_converged_32": compat.converged,
            "wilcoxon_stat": wilcoxon_stat, "wilcoxon_p": wilcoxon_p,
        })
    return rows


def comparison_plan(variants: Iterable[str], reference: str = "main",
                    groups: Mapping[str, list[str]] | None = None) -> list[tuple[str, list[str]]]:
    """(name, models) pairs: every variant vs base, every other variant vs `reference` (ablations), and K-way
    groups whose members are all present."""
    variants = sorted(set(variants))
    meta = [v for v in variants if v != "base"]
    plan = [(f"{v}_vs_base", [v, "base"]) for v in meta if "base" in variants]
    if reference in meta:
        plan += [(f"{v}_vs_{reference}", [v, reference]) for v in meta if v != reference]
    for name, members in (groups or {}).items():
        if len(members) < 2 or len(set(members)) != len(members):
            raise ValueError(f"comparison group {name!r} needs at least two distinct models, got {members}")
        absent = [m for m in members if m not in variants]
        if absent:
            log.warning("comparison group %s skipped: no per-trial table for %s", name, absent)
            continue
        plan.append((name, list(members)))
    return plan


def benchmark_statistics(tables: Mapping[tuple[str, str], pd.DataFrame | Path], n_choices: int,
                         noise_ceilings: Mapping[str, float] | None = None, subset_column: str | None = None,
                         reference: str = "main", groups: Mapping[str, list[str]] | None = None,
                         seed: int = 1234) -> pd.DataFrame:
    """All comparisons of one benchmark, per backbone and subset ("all", then each value of `subset_column` with
    ≥ 3 participants), one row per model; Holm-corrected Wilcoxon p-values across every pairwise test of the
    benchmark (the multiple-comparison scope is recorded in `n_tests`).

    `tables` maps (backbone, variant) to a per-trial table or its parquet path; paths are read one backbone at a
    time and only the needed columns (THINGS: 4.7 M rows per table, 11 representations per backbone)."""
    noise_ceilings = dict(noise_ceilings or {})
    columns = [*KEY, "nll", "correct"] + ([subset_column] if subset_column else [])
    rows = []
    for backbone in sorted({b for b, _ in tables}):
        variants = [v for b, v in tables if b == backbone]
        frames = {v: t if isinstance(t, pd.DataFrame) else pd.read_parquet(t, columns=columns)
                  for v, t in ((v, tables[(backbone, v)]) for v in variants)}
        for comparison, models in comparison_plan(variants, reference, groups):
            paired = paired_trials({m: frames[m] for m in models}, subset_column)
            subsets = [("all", paired)]
            if subset_column:
                subsets += [(str(value), part) for value, part in paired.groupby(subset_column, sort=True)]
            for subset, part in subsets:
                n_part = part["participant"].nunique()
                if n_part < MIN_PARTICIPANTS:
                    log.warning("%s %s %s: %d participant(s) < %d, no statistics", backbone, comparison, subset,
                                n_part, MIN_PARTICIPANTS)
                    continue
                for row in compare(part, models, n_choices, noise_ceilings.get(subset, math.nan), seed):
                    rows.append({"backbone": backbone, "comparison": comparison, "subset": subset, **row})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    tests = frame.drop_duplicates(["backbone", "comparison", "subset"])
    tests = tests[np.isfinite(tests["wilcoxon_p"])]
    holm = pd.Series(holm_adjust(tests["wilcoxon_p"].to_numpy()), index=tests.index)
    key = tests[["backbone", "comparison", "subset"]].assign(wilcoxon_p_holm=holm.to_numpy())
    frame = frame.merge(key, on=["backbone", "comparison", "subset"], how="left")
    frame["n_tests"] = len(tests)
    return frame


def holm_adjust(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted
