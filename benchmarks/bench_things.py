"""THINGS odd-one-out at full scale: zero-shot + per-participant 5-fold CV choice model for one representation.

Synthetic data of the real size (4,699,160 triplets, 12,340 participants, 1,854 concepts, D = 768; choices drawn
from the evaluator's own model with per-participant temperatures).

ours      `odd_one_out.evaluate(n_jobs=2)`: logits, zero-shot accuracy, folds, batched Newton fits of all
          (participant, fold) problems.
baseline  what a competent user writes with scipy: logits and zero-shot the same way, trials sorted by participant
          once (no per-participant O(N) mask), then per participant scikit-learn `StratifiedKFold(k, shuffle=True,
          random_state=seed)` and one L-BFGS-B fit per fold with the analytic gradient (`fit_single`), the
          participants split over joblib with the same 2 workers (processes).
The baseline runs on the first `BASELINE_PARTICIPANTS` participants (≈ 8 % of the trials) and ours runs on the same
subset too: that pair is measured ("subset" line) and their out-of-fold NLLs are asserted equal per trial
(|Δ| ≤ 1e-3 per trial, as tests/test_odd_one_out.py, and ≤ 1e-5 on the mean CV NLL: both optimise the same
convex problem, L-BFGS-B to scipy's default tolerance, ours to a projected gradient of 1e-8). The full-scale baseline
time is that subset's time scaled by trials: synthetic participants hold ≈381 trials each, all kept with 5 folds, so
trials and fits grow together; the line says so. Scaling lines: ours measured on participant prefixes holding
≈0.5 M, 1 M, 2 M and all 4.7 M triplets, the baseline scaled by trials from its measured subset, which is itself a
measured point of both curves; the data go to results/bench/scaling_things.csv and .png.

    .venv/bin/python -m benchmarks things
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedKFold

from benchmarks.common import report, unmet
from metalign.behaviour import odd_one_out as ooo
from metalign.behaviour.choice_model import fit_single, log_probabilities

N_TRIPLETS, N_PARTICIPANTS, N_CONCEPTS, DIM = 4_699_160, 12_340, 1_854, 768
BASELINE_PARTICIPANTS = 1_000
N_JOBS = 2
SEED = 1234


def synthetic_things(seed: int = SEED) -> tuple[np.ndarray, pd.DataFrame]:
    """A (1854, 768) representation and THINGS-sized triplets whose choices follow a softmax of its logits."""
    rng = np.random.default_rng(seed)
    representation = rng.normal(size=(N_CONCEPTS, DIM)).astype(np.float32)
    representation += 3.0 * rng.normal(size=(N_CONCEPTS, 1)) * rng.normal(size=(1, DIM)).astype(np.float32)
    items = rng.integers(0, N_CONCEPTS, size=(N_TRIPLETS, 3))
    while (clash := (items[:, 0] == items[:, 1]) | (items[:, 0] == items[:, 2]) | (items[:, 1] == items[:, 2])).any():
        items[clash] = rng.integers(0, N_CONCEPTS, size=(int(clash.sum()), 3))
    extra = rng.integers(0, N_PARTICIPANTS, N_TRIPLETS - N_PARTICIPANTS)
    participant = np.sort(np.r_[np.arange(N_PARTICIPANTS), extra])           # every participant present
    logits = ooo.triplet_logits(representation, items[:, 0], items[:, 1], items[:, 2])
    temperature = np.exp(rng.normal(0.0, 0.5, N_PARTICIPANTS))[participant][:, None]   # zero-shot ≈ 0.55
    p = np.exp(log_probabilities(np.zeros(3), logits / temperature))
    choice = (rng.random(N_TRIPLETS)[:, None] >= np.cumsum(p, axis=1)[:, :2]).sum(axis=1)
    triplets = pd.DataFrame({"participant": participant, "i": items[:, 0], "j": items[:, 1], "k": items[:, 2],
                             "choice": choice})
    return representation, triplets


def _fit_participants(logits: np.ndarray, choice: np.ndarray, bounds: np.ndarray, seed: int) -> np.ndarray:
    """Baseline worker: out-of-fold NLL per trial (NaN where dropped) for consecutive participants' sorted trials."""
    nll = np.full(len(choice), np.nan)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x, y = logits[lo:hi], choice[lo:hi]
        counts = np.bincount(y, minlength=3)
        occurring = counts[counts > 0]
        if len(occurring) < 2 or occurring.min() < 2:
            continue
        k = int(min(5, occurring.min()))
        for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y):
            params = fit_single(x[train], y[train]).x
            nll[lo + test] = -log_probabilities(params, x[test])[np.arange(len(test)), y[test]]
    return nll


def scipy_baseline(representation: np.ndarray, triplets: pd.DataFrame, pool: Parallel,
                   seed: int = SEED) -> tuple[np.ndarray, float]:
    """Per-trial out-of-fold NLL (original order) and zero-shot accuracy, the way described above."""
    logits = ooo.triplet_logits(representation, triplets["i"], triplets["j"], triplets["k"])
    choice = triplets["choice"].to_numpy()
    zero_shot = ooo.zero_shot_accuracy(logits, choice)
    participant = triplets["participant"].to_numpy()
    order = np.argsort(participant, kind="stable")                      # sort once
    starts = np.flatnonzero(np.r_[True, np.diff(participant[order]) != 0])
    bounds = np.r_[starts, len(order)]
    pieces = np.array_split(np.arange(len(starts)), 4 * N_JOBS)        # a few tasks per worker for balance
    jobs = [(bounds[p[0]], bounds[p[-1] + 1], bounds[p[0]:p[-1] + 2]) for p in pieces if len(p)]
    parts = pool(delayed(_fit_participants)(logits[order[lo:hi]], choice[order[lo:hi]], b - lo, seed)
                 for lo, hi, b in jobs)
    nll = np.empty(len(order))
    nll[order] = np.concatenate(parts)
    return nll, zero_shot


def _prefix(triplets: pd.DataFrame, n: int) -> pd.DataFrame:
    """The trials of the first participants (in id order) holding about n triplets."""
    per = np.bincount(triplets["participant"].to_numpy())
    last = int(np.searchsorted(np.cumsum(per), n))
    return triplets[triplets["participant"].to_numpy() <= last].reset_index(drop=True)


def _ours(representation: np.ndarray, triplets: pd.DataFrame) -> tuple[float, pd.DataFrame, dict]:
    start = time.perf_counter()
    per_trial, summary = ooo.evaluate(representation, triplets, seed=SEED, n_jobs=N_JOBS)
    return time.perf_counter() - start, per_trial, summary


def main() -> dict:
    representation, triplets = synthetic_things()
    subset = triplets[triplets["participant"].to_numpy() < BASELINE_PARTICIPANTS].reset_index(drop=True)

    with Parallel(n_jobs=N_JOBS, backend="loky") as pool:
        scipy_baseline(representation, subset.iloc[:2000], pool)            # start the workers
        start = time.perf_counter()
        base_nll, base_zero_shot = scipy_baseline(representation, subset, pool)
        base_time = time.perf_counter() - start
    sub_time, sub_trials, sub_summary = _ours(representation, subset)
    ours_nll = np.full(len(subset), np.nan)
    ours_nll[sub_trials["trial"].to_numpy()] = sub_trials["nll"].to_numpy()
    assert np.array_equal(np.isnan(ours_nll), np.isnan(base_nll)), "kept participants differ"
    diff = float(np.nanmax(np.abs(ours_nll - base_nll)))
    assert diff <= 1e-3, f"out-of-fold NLL differs from the L-BFGS-B baseline by up to {diff:.2e}"
    assert abs(float(np.nanmean(base_nll)) - sub_summary["cv_nll"]) <= 1e-5, "mean CV NLL differs"
    assert base_zero_shot == sub_summary["zero_shot_acc"]

    per_trial_cost = base_time / len(subset)
    sizes = {"0.5M": 500_000, "1M": 1_000_000, "2M": 2_000_000}
    scaling = {}
    for label, n in sizes.items():
        part = _prefix(triplets, n)
        scaling[label] = (len(part), _ours(representation, part)[0])
    full_time, _, summary = _ours(representation, triplets)
    scaling["4.7M"] = (len(triplets), full_time)
    full_baseline = per_trial_cost * len(triplets)

    print(f"# {len(triplets):,} triplets, {summary['n_participants']:,} participants kept, zero-shot "
          f"{summary['zero_shot_acc']:.4f}, CV NLL {summary['cv_nll']:.6f}, {summary['n_unconverged_fits']} "
          f"unconverged fits; subset of {BASELINE_PARTICIPANTS} participants ({len(subset):,} triplets): baseline "
          f"{base_time:.1f} s, ours {sub_time:.2f} s, CV NLL ours {sub_summary['cv_nll']:.8f} vs baseline "
          f"{np.nanmean(base_nll):.8f}, max per-trial |ΔNLL| {diff:.1e}", flush=True)
    ok_time = full_time < 10
    ok_ratio = full_baseline / full_time >= 10
    report("things_ooo_full_scale_seconds", full_time, full_baseline,
           goal=f"ours < 10 s on 2 cores (this run: {N_JOBS} workers, {os.cpu_count()} CPUs)"
                f"{unmet(ok_time)}; baseline = scipy L-BFGS-B per fit over joblib {N_JOBS} "
                f"workers, scaled by trials from {BASELINE_PARTICIPANTS} measured participants")
    report("things_ooo_vs_lbfgsb_joblib_full_scale", full_time, full_baseline,
           goal=f">= 10x (baseline extrapolated by trials from the measured subset)"
                f"{unmet(ok_ratio)}")
    report(f"things_ooo_vs_lbfgsb_joblib_subset_{BASELINE_PARTICIPANTS}p", sub_time, base_time,
           goal=f">= 10x, both measured on {len(subset):,} triplets, NLL equal per trial (max |Δ| {diff:.0e})"
                f"{unmet(base_time / sub_time >= 10)}")
    rows = [(len(subset), sub_time, base_time, True)]  # the measured pair
    for label, (n, seconds) in scaling.items():
        report(f"things_ooo_scaling_{label}_triplets", seconds, per_trial_cost * n,
               goal=f"report ({n:,} triplets; baseline scaled by trials from the measured subset)")
        rows.append((n, seconds, per_trial_cost * n, False))
    return {"things": rows}


if __name__ == "__main__":
    main()
