"""THINGS odd-one-out at full scale: zero-shot + per-participant 5-fold CV choice model for one representation.

Synthetic data of the real size (4,699,160 triplets, 12,340 participants, 1,854 concepts, D = 768; choices drawn
from the evaluator's own model with per-participant temperatures). Baseline, measured in the same run: upstream's
structure (a boolean mask over all triplets per participant, then one scipy L-BFGS-B fit per fold), timed on a
subset of participants and extrapolated linearly to all of them (its cost is per participant by construction).

    .venv/bin/python -m benchmarks things
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from benchmarks.common import report, timer
from metalign.behaviour import odd_one_out as ooo
from metalign.behaviour.choice_model import fit_single, log_probabilities

N_TRIPLETS, N_PARTICIPANTS, N_CONCEPTS, DIM = 4_699_160, 12_340, 1_854, 768
BASELINE_PARTICIPANTS = 24
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


def mask_loop(logits: np.ndarray, choice: np.ndarray, participant: np.ndarray, subjects: np.ndarray,
              seed: int = SEED) -> float:
    """Upstream's structure for `subjects`: mask over all trials per participant, L-BFGS-B per fold; mean NLL."""
    nll = []
    for subject in subjects:
        mask = participant == subject                                # O(N) per participant (docs/methods.md P-46)
        x, y = logits[mask], choice[mask]
        counts = np.bincount(y, minlength=3)
        if (counts[counts > 0] < 2).any() or (counts > 0).sum() < 2:
            continue
        k = int(min(5, counts[counts > 0].min()))
        for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y):
            params = fit_single(x[train], y[train]).x
            nll.append(-log_probabilities(params, x[test])[np.arange(len(test)), y[test]])
    return float(np.concatenate(nll).mean())


def main() -> None:
    representation, triplets = synthetic_things()
    with timer() as ours:
        _, summary = ooo.evaluate(representation, triplets, seed=SEED, n_jobs=2)
    logits = ooo.triplet_logits(representation, triplets["i"], triplets["j"], triplets["k"])
    subjects = np.random.default_rng(SEED).choice(N_PARTICIPANTS, BASELINE_PARTICIPANTS, replace=False)
    with timer() as subset:
        mask_loop(logits, triplets["choice"].to_numpy(), triplets["participant"].to_numpy(), subjects)
    baseline = subset[0] * N_PARTICIPANTS / BASELINE_PARTICIPANTS
    print(f"# {len(triplets):,} triplets, {summary['n_participants']:,} participants kept, zero-shot "
          f"{summary['zero_shot_acc']:.4f}, CV NLL {summary['cv_nll']:.4f}, {summary['n_unconverged_fits']} "
          f"unconverged fits; mask loop {subset[0]:.1f} s for {BASELINE_PARTICIPANTS} participants", flush=True)
    report("things_ooo_full_scale_seconds", ours[0], baseline, goal="ours < 120 s on 2 cores")
    report("things_ooo_vs_mask_loop", ours[0], baseline, goal=">= 20x")


if __name__ == "__main__":
    main()
