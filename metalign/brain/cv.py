"""Cross-validation schemes for encoding models, outer and inner, and the check that no image leaks.

THINGS-fMRI shows its test images in every session, so leave-one-session-out puts the same image in training and
test (docs/methods.md P-20); BOLD5000 repeats 113 images. The leakage-free schemes drop, from every training set, each trial whose
image appears in that fold's test set, and select α by an inner CV built the same way inside the training set.

- `heldout_session`: outer, one fold per session, training drops the test fold's images; inner, the training
  set's sessions in `n_inner` contiguous groups, with the same dropping.
- `image_kfold`: outer, images in `n_folds` seeded groups (all repetitions of an image in one fold); inner, the
  training set's images in `n_inner` seeded groups.
- `upstream_leaky`: the study's own scheme (bin/eval_brain.py): outer, one fold per session with nothing dropped
  (leaks); α by scikit-learn's efficient leave-one-out over trials (`ridge.LooRidgeCV`; repetitions of the left-out
  image stay in training) on the study's grid, `STUDY_ALPHAS`, unless the benchmark sets `leaky_alphas`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from metalign.io import DataContractError

Split = tuple[np.ndarray, np.ndarray]

SCHEMES = {
    "heldout_session": "outer: leave one session out, trials of any image shown in the held-out session dropped "
                       "from training; inner: sessions of the training set in contiguous groups, same dropping",
    "image_kfold": "outer: images assigned to seeded folds (all repetitions of an image in one fold); "
                   "inner: images of the training set in seeded groups",
    "upstream_leaky": "outer: leave one session out without dropping repeated images (the study's scheme, leaky); "
                      "inner: efficient leave-one-out over trials (scikit-learn RidgeCV)",
}
LEAKY = {"upstream_leaky"}
LOO = {"upstream_leaky"}  # α by efficient leave-one-out instead of inner splits
# the study's grid, np.logspace(-6, 3, 100) in bin/eval_brain.py; the leakage-free schemes use the benchmark's `alphas`
STUDY_ALPHAS = {"log10_min": -6, "log10_max": 3, "n": 100}


def scheme_alphas(benchmark: Mapping[str, Any], scheme: str) -> Mapping[str, Any]:
    """The α grid spec of `scheme`: the study's scheme reproduces the study, so its grid defaults to the study's."""
    if scheme in LOO:
        return benchmark.get("leaky_alphas", STUDY_ALPHAS)
    return benchmark["alphas"]


def group_splits(groups: np.ndarray, images: np.ndarray, drop_shared: bool = True) -> list[Split]:
    """Leave one group out; with `drop_shared`, training also loses every trial whose image is in the test group."""
    splits = []
    for label in np.unique(groups):
        test = np.flatnonzero(groups == label)
        train = groups != label
        if drop_shared:
            train &= ~np.isin(images, images[test])
        splits.append((np.flatnonzero(train), test))
    return splits


def _image_groups(images: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
    """Each distinct image to one of `n_groups` folds of near-equal image counts, by a seeded permutation."""
    uniques, codes = np.unique(images, return_inverse=True)
    if n_groups > len(uniques):
        raise DataContractError(f"{n_groups} image folds requested but only {len(uniques)} distinct images")
    order = np.random.default_rng(seed).permutation(len(uniques))
    fold_of_image = np.empty(len(uniques), dtype=np.int64)
    fold_of_image[order] = np.arange(len(uniques)) % n_groups
    return fold_of_image[codes]


def _session_groups(sessions: np.ndarray, n_groups: int) -> np.ndarray:
    """Sessions in sorted order, cut into `n_groups` contiguous groups of near-equal session counts."""
    uniques, codes = np.unique(sessions, return_inverse=True)
    if n_groups > len(uniques):
        raise DataContractError(f"{n_groups} inner session groups requested but the training set has only "
                                f"{len(uniques)} sessions")
    return (np.arange(len(uniques)) * n_groups // len(uniques))[codes]


def outer_folds(scheme: str, sessions: np.ndarray, images: np.ndarray, n_folds: int | None, seed: int
                ) -> tuple[np.ndarray, list[Split]]:
    """Fold label per trial and the (train, test) splits of the outer CV."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown CV scheme {scheme!r}; choose from {sorted(SCHEMES)}")
    images = np.asarray(images)
    if scheme == "image_kfold":
        if not n_folds:
            raise ValueError("scheme 'image_kfold' needs n_folds")
        labels = _image_groups(images, n_folds, seed)
    else:
        labels = np.asarray(sessions)
    splits = group_splits(labels, images, drop_shared=scheme not in LEAKY)
    return labels, splits


def inner_splits(scheme: str, sessions: np.ndarray, images: np.ndarray, n_inner: int, seed: int) -> list[Split]:
    """Splits of one outer training set for α selection, grouped as the outer scheme is."""
    images = np.asarray(images)
    if scheme == "heldout_session":
        return group_splits(_session_groups(np.asarray(sessions), n_inner), images)
    if scheme == "image_kfold":
        return group_splits(_image_groups(images, n_inner, seed), images)
    if scheme in LOO:
        raise ValueError(f"scheme {scheme!r} selects α by efficient leave-one-out, without inner splits")
    raise ValueError(f"unknown CV scheme {scheme!r}; choose from {sorted(SCHEMES)}")


def shared_images(splits: Sequence[Split], images: np.ndarray) -> int:
    """Number of (split, image) pairs with the image on both sides: 0 for a leakage-free scheme."""
    images = np.asarray(images)
    return int(sum(len(np.intersect1d(images[train], images[test])) for train, test in splits))


def check_splits(splits: Sequence[Split], images: np.ndarray, leaky_ok: bool, where: str) -> None:
    for k, (train, test) in enumerate(splits):
        if len(train) == 0 or len(test) == 0:
            raise DataContractError(f"{where}: fold {k} has an empty training or test set")
    if not leaky_ok and (n := shared_images(splits, images)):
        raise DataContractError(f"{where}: {n} image(s) are in both training and test folds")
