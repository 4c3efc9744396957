"""Simulated odd-one-out participants whose ideal observer is the planted embedding.

They use the evaluator's logit rule (docs/methods.md §9.1): the logit for "position p is odd" is the cosine similarity of
the other two items, and choices are softmax(logits / temperature) draws.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from metalign.config.demo import n_repeats

TRIPLET_COLUMNS = ("subject_id", "image1", "image2", "image3", "choice")


def odd_one_out_logits(embedding: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """(n, 3) logits [cos(r_j, r_k), cos(r_i, r_k), cos(r_i, r_j)] for 0-based concept triplets (i, j, k)."""
    unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    i, j, k = (unit[triplets[:, p]] for p in range(3))
    return np.stack([(j * k).sum(1), (i * k).sum(1), (i * j).sum(1)], axis=1)


def log_choice_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Log-softmax in log space, so that near-deterministic choices never give log(0) (pitfall docs/methods.md P-12)."""
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _fresh_triplets(rng: np.random.Generator, n_concepts: int, count: int) -> np.ndarray:
    """`count` triplets in random position order, no two sharing the same concept set (so repeats are only planted)."""
    seen: set[tuple[int, ...]] = set()
    rows: list[np.ndarray] = []
    while len(rows) < count:
        for row in np.argsort(rng.random((count, n_concepts)), axis=1)[:, :3]:
            key = tuple(sorted(row.tolist()))
            if key not in seen and len(rows) < count:
                seen.add(key)
                rows.append(row)
    return np.asarray(rows, dtype=np.int64).reshape(count, 3)


def participant_triplets(rng: np.random.Generator, n_concepts: int, n_trials: int,
                         repeat_fraction: float) -> np.ndarray:
    """One participant's trial sequence: fresh triplets plus exact repeats (same order) placed after their source."""
    n_repeat = n_repeats(n_trials, repeat_fraction)
    n_fresh = n_trials - n_repeat
    fresh = _fresh_triplets(rng, n_concepts, n_fresh)
    sources = rng.choice(n_fresh, size=n_repeat, replace=False)
    # Fresh trial i sits at time i; a repeat of source s lands uniformly in (s, n_fresh].
    times = np.concatenate([np.arange(n_fresh, dtype=float),
                            sources + (1.0 - rng.random(n_repeat)) * (n_fresh - sources)])
    order = np.argsort(times, kind="stable")
    return np.concatenate([fresh, fresh[sources]])[order]


def simulate_participants(embedding: np.ndarray, rngs: Iterable[np.random.Generator], n_trials: int,
                          repeat_fraction: float, temperature: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """THINGS-format triplet table (1-based concept indices and choice positions) and its ground-truth statistics."""
    frames, log_probs, chosen, ideal = [], [], [], []
    for subject, rng in enumerate(rngs, start=1):
        triplets = participant_triplets(rng, len(embedding), n_trials, repeat_fraction)
        logits = odd_one_out_logits(embedding, triplets)
        log_p = log_choice_probabilities(logits, temperature)
        cumulative = np.cumsum(np.exp(log_p), axis=1)
        choice = (rng.random(n_trials)[:, None] >= cumulative[:, :2]).sum(axis=1)
        frames.append(pd.DataFrame({"subject_id": subject, "image1": triplets[:, 0] + 1, "image2": triplets[:, 1] + 1,
                                    "image3": triplets[:, 2] + 1, "choice": choice + 1}))
        log_probs.append(log_p)
        chosen.append(choice)
        ideal.append(logits.argmax(axis=1))
    log_p, choice, best = np.concatenate(log_probs), np.concatenate(chosen), np.concatenate(ideal)
    rows = np.arange(len(choice))
    stats = {
        "expected_accuracy": float(np.exp(log_p[rows, best]).mean()),
        "expected_nll": float(-log_p[rows, choice].mean()),
        "planted_accuracy": float((best == choice).mean()),
    }
    return pd.concat(frames, ignore_index=True)[list(TRIPLET_COLUMNS)], stats
