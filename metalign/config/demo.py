"""The demo world's specs (config `demo:`): each block checked in full before any job runs, and again by the
generator that reads it. Torch-free; the demo package imports these, never the reverse."""

from __future__ import annotations

import math
from math import comb
from typing import Any, Callable, Mapping

import numpy as np

MAX_CONCEPTS = 2 * 8 * 4 * 8  # sizes × colours × textures × shapes of the demo factor space (metalign.demo.factors)


def n_repeats(n_trials: int, repeat_fraction: float) -> int:
    return int(round(repeat_fraction * n_trials))


def max_unique_triplets(n_concepts: int) -> int:
    return comb(n_concepts, 3)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


_SPEC: dict[str, tuple[Callable[[Any], bool], Callable[[Any], bool], str]] = {
    "seed": (_is_int, lambda v: v >= 0, "a non-negative integer"),
    "n_concepts": (_is_int, lambda v: 3 <= v <= MAX_CONCEPTS, f"an integer in [3, {MAX_CONCEPTS}]"),
    "images_per_concept": (_is_int, lambda v: 1 <= v <= 99, "an integer in [1, 99]"),
    "image_size": (_is_int, lambda v: 16 <= v <= 1024, "an integer in [16, 1024]"),
    "n_participants": (_is_int, lambda v: v >= 1, "a positive integer"),
    "triplets_per_participant": (_is_int, lambda v: v >= 1, "a positive integer"),
    "repeat_fraction": (_is_real, lambda v: 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "temperature": (_is_real, lambda v: v > 0, "a positive number"),
    "coco_train": (_is_int, lambda v: 1 <= v <= 200_000, "an integer in [1, 200000]"),
    "coco_val": (_is_int, lambda v: 1 <= v <= 200_000, "an integer in [1, 200000]"),
}


def validate_world(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Checked, plain-typed copy of `spec`; a ValueError names the first missing, unknown or bad key."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"demo spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_SPEC))
    if unknown:
        raise ValueError(f"demo spec has unknown key(s) {unknown}; expected {sorted(_SPEC)}")
    clean: dict[str, Any] = {}
    for key, (type_ok, range_ok, wanted) in _SPEC.items():
        if key not in spec:
            raise ValueError(f"demo spec is missing key {key!r}")
        value = spec[key]
        if not type_ok(value) or not range_ok(value):
            raise ValueError(f"demo spec key {key!r} must be {wanted}, got {value!r}")
        clean[key] = int(value) if type_ok is _is_int else float(value)
    n_fresh = clean["triplets_per_participant"] - n_repeats(clean["triplets_per_participant"], clean["repeat_fraction"])
    if n_fresh > max_unique_triplets(clean["n_concepts"]):
        raise ValueError(f"demo spec key 'triplets_per_participant' needs {n_fresh} distinct triplets per participant "
                         f"but {clean['n_concepts']} concepts give only {max_unique_triplets(clean['n_concepts'])}")
    return clean


FMRI_KEYS = {"seed": int, "things": dict, "bold5000": dict}
THINGS_KEYS = {"n_subjects": int, "n_sessions": int, "n_test_images": int, "runs_per_session": int,
               "volume": list, "image_sd": float, "session_sd": float, "trial_sd": float}
BOLD_KEYS = {"n_subjects": int, "n_sessions": int, "n_repeated": int, "n_coco": int, "voxels_per_roi": int,
             "runs_per_session": int, "image_sd": float, "session_sd": float, "trial_sd": float}
# Noise ceilings need repeats: the THINGS split-half ceiling two sessions and two test images (a correlation across
# images per voxel), the BOLD5000 one at least one image repeated over the sessions.
FMRI_MINIMUMS = {"n_subjects": 1, "n_sessions": 2, "runs_per_session": 1, "n_test_images": 2, "n_repeated": 1,
                 "voxels_per_roi": 1}


def validate_fmri(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Checked copy of the demo fMRI spec; a ValueError names the bad key."""
    def check(block: Mapping[str, Any], keys: Mapping[str, type], where: str) -> dict[str, Any]:
        unknown = sorted(set(block) - set(keys))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; expected {sorted(keys)}")
        out = {}
        for key, kind in keys.items():
            if key not in block:
                raise ValueError(f"{where} is missing key {key!r}")
            value = block[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 if kind is float \
                else isinstance(value, kind) and not isinstance(value, bool) and (kind is not int or value >= 0)
            if not ok:
                raise ValueError(f"{where}.{key} must be a non-negative {kind.__name__}, got {value!r}")
            out[key] = float(value) if kind is float else value
        return out

    clean = check(spec, FMRI_KEYS, "demo fmri spec")
    clean["things"] = check(spec["things"], THINGS_KEYS, "demo fmri spec things")
    clean["bold5000"] = check(spec["bold5000"], BOLD_KEYS, "demo fmri spec bold5000")
    t = clean["things"]
    if len(t["volume"]) != 3 or not all(isinstance(v, int) and v >= 6 for v in t["volume"]):
        raise ValueError(f"demo fmri spec things.volume must be three integers ≥ 6, got {t['volume']}")
    for where, block in (("things", t), ("bold5000", clean["bold5000"])):
        for key, lowest in FMRI_MINIMUMS.items():
            if key in block and block[key] < lowest:
                raise ValueError(f"demo fmri spec {where}.{key} must be ≥ {lowest}, got {block[key]}")
    return clean


LABELLED_KEYS = ("seed", "train_per_class", "val_per_class", "shifted_per_class", "conflicts_per_pair",
             "colon_train_per_class", "colon_test_per_class", "dtd_per_split")


def validate_labelled(spec: Mapping[str, Any]) -> dict[str, int]:
    if not isinstance(spec, Mapping):
        raise ValueError(f"labelled demo spec must be a mapping, got {type(spec).__name__}")
    unknown, missing = sorted(set(spec) - set(LABELLED_KEYS)), sorted(set(LABELLED_KEYS) - set(spec))
    if unknown or missing:
        raise ValueError(f"labelled demo spec: unknown key(s) {unknown}, missing key(s) {missing}")
    for key in LABELLED_KEYS:
        value = spec[key]
        lowest = 0 if key == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise ValueError(f"labelled demo spec key {key!r} must be an integer ≥ {lowest}, got {value!r}")
    return {key: int(spec[key]) for key in LABELLED_KEYS}


BEHAVIOUR_KEYS = {
    "levels": ("n_participants", "trials_per_participant", "repeat_fraction", "none_fraction", "catch_trials",
               "missing_image_trials", "temperature"),
    "category": ("n_participants", "n_trials", "temperature"),
    "reward": ("n_participants", "n_trials", "temperature"),
}
BEHAVIOUR_POSITIVE = ("n_participants", "trials_per_participant", "n_trials", "temperature")


def validate_behaviour(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The behaviour spec (config `demo.behaviour`): seed plus one block per task, every key present and ≥ 0."""
    expected = {"seed", *BEHAVIOUR_KEYS}
    if not isinstance(spec, Mapping) or set(spec) != expected:
        raise ValueError(f"demo behaviour spec needs exactly the keys {sorted(expected)}, got "
                         f"{sorted(spec) if isinstance(spec, Mapping) else spec!r}")
    for task, keys in BEHAVIOUR_KEYS.items():
        block = spec[task]
        if not isinstance(block, Mapping) or set(block) != set(keys):
            raise ValueError(f"demo behaviour spec {task!r} needs exactly the keys {sorted(keys)}")
        bad = [k for k in keys if not isinstance(block[k], (int, float)) or isinstance(block[k], bool) or block[k] < 0
               or (k in BEHAVIOUR_POSITIVE and block[k] <= 0)]
        if bad:
            raise ValueError(f"demo behaviour spec {task!r}: key(s) {bad} out of range (≥ 0; "
                             f"{'/'.join(BEHAVIOUR_POSITIVE)} > 0), got {[block[k] for k in bad]}")
    return dict(spec)


VIT_KEYS = ("image_size", "patch_size", "hidden_size", "layers", "heads", "seed")


def validate_vit(spec: Mapping[str, Any]) -> dict[str, int]:
    """The demo ViT (config `demo.vit`): what Hugging Face's ViT would refuse only inside the demo_vit job, after
    Snakemake has already deleted the old model."""
    if not isinstance(spec, Mapping) or set(spec) != set(VIT_KEYS):
        raise ValueError(f"demo vit spec needs exactly the keys {list(VIT_KEYS)}, got "
                         f"{sorted(spec) if isinstance(spec, Mapping) else spec!r}")
    for key in VIT_KEYS:
        lowest = 0 if key == "seed" else 1
        if not _is_int(spec[key]) or spec[key] < lowest:
            raise ValueError(f"demo vit spec key {key!r} must be an integer ≥ {lowest}, got {spec[key]!r}")
    if spec["patch_size"] > spec["image_size"]:
        raise ValueError(f"demo vit spec: patch_size ({spec['patch_size']}) exceeds image_size ({spec['image_size']})")
    if spec["hidden_size"] % spec["heads"]:
        raise ValueError(f"demo vit spec: heads ({spec['heads']}) must divide hidden_size ({spec['hidden_size']})")
    return {key: int(spec[key]) for key in VIT_KEYS}
