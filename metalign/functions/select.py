"""Per-latent statistics from fixed-width codes and the choice of training/evaluation functions (docs/methods.md §3).

Everything works on the (N, k) index/value arrays: a dense (N, d_sae) matrix is never built (docs/methods.md P-41).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPISODE_SD_BOUND = 4.0


@dataclass(frozen=True)
class FunctionStats:
    """Per latent (length d_sae): number of images where it is non-zero, mean and std (ddof 0) of those values."""

    nnz: np.ndarray
    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True)
class Selection:
    latent_id: np.ndarray  # kept raw latent ids, int64, ascending
    n_below_min: int       # latents that fire at least once but fewer than min_nonzero times
    n_dropped: int         # latents with nnz >= min_nonzero that cannot fill the largest episode draw
    max_draw: int          # largest n_pos (and n_neg) an episode may ask for; samplers must clamp to it


def function_stats(indices: np.ndarray, values: np.ndarray, d_sae: int) -> FunctionStats:
    """nnz, mean and std of the non-zero magnitudes per latent with np.bincount (two passes for a stable std)."""
    nonzero = values.ravel() != 0
    latent = indices.ravel()[nonzero].astype(np.int64)
    magnitude = values.ravel()[nonzero].astype(np.float64)
    nnz = np.bincount(latent, minlength=d_sae)
    safe = np.maximum(nnz, 1)
    mean = np.bincount(latent, weights=magnitude, minlength=d_sae) / safe
    variance = np.bincount(latent, weights=(magnitude - mean[latent]) ** 2, minlength=d_sae) / safe
    return FunctionStats(nnz=nnz, mean=mean, std=np.sqrt(variance))


def max_episode_draw(sl: int, n_sd: float = EPISODE_SD_BOUND) -> int:
    """Largest n_pos (= largest n_neg, by symmetry) of an episode: ceil(sl/2 + n_sd·sl/20), at most sl.

    n_pos ~ round(N(sl/2, sl/20)); episode samplers clamp draws to [sl − max_draw, max_draw], which makes
    the validation in `select_functions` a guarantee rather than a probability (docs/methods.md P-16).
    """
    if sl < 1:
        raise ValueError(f"sl must be positive, got {sl}")
    return min(sl, math.ceil(sl / 2 + n_sd * sl / 20))


def select_functions(nnz: np.ndarray, min_nonzero: int, sl: int, n_images: int) -> Selection:
    """Keep latents with nnz >= min_nonzero whose positives and negatives both cover the largest episode draw."""
    nnz = np.asarray(nnz, dtype=np.int64)
    if min_nonzero < 1:
        raise ValueError(f"min_nonzero must be positive, got {min_nonzero}")
    if nnz.size and (nnz.min() < 0 or nnz.max() > n_images):
        raise ValueError(f"nnz must lie in [0, n_images={n_images}], got range [{nnz.min()}, {nnz.max()}]")
    draw = max_episode_draw(sl)
    frequent = nnz >= min_nonzero
    fillable = (nnz >= draw) & (n_images - nnz >= draw)
    kept = np.flatnonzero(frequent & fillable).astype(np.int64)
    n_dropped = int((frequent & ~fillable).sum())
    if kept.size == 0:
        raise ValueError(
            f"no function survives selection: {int(frequent.sum())} of {nnz.size} latents have nnz >= "
            f"min_nonzero={min_nonzero}, {n_dropped} of those lack {draw} positives or {draw} negatives needed for "
            f"sl={sl} among n_images={n_images} (largest nnz: {int(nnz.max()) if nnz.size else 0})")
    return Selection(latent_id=kept, n_below_min=int(((nnz > 0) & ~frequent).sum()), n_dropped=n_dropped,
                     max_draw=draw)
