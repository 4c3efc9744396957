"""ImageNet-A (Hendrycks et al. 2021): top-1 of an ImageNet linear probe on natural adversarial examples.

The probe is fitted on a fixed, seeded subset of ImageNet training images (`train_per_class` per class, the first
rows of big_vision's per-class permutation) over all ImageNet classes. ImageNet-A covers 200 of them (its folder
names); as in the benchmark's own evaluation (`indices_in_1k`), the argmax runs over those 200 classes only. The
class mapping (wnid → probe class number) is recorded. For reference, the same probe is scored on the ImageNet
validation images (all classes, and the 200-class subset with the same mask).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from metalign.downstream.data import (
    SplitRef,
    class_index,
    load_rows,
    read_features,
    resolve_classes,
    sample_per_class,
    take_shots,
)
from metalign.downstream.probe import ProbeConfig
from metalign.io import DataContractError


def class_mapping(probe_classes: Sequence[str], subset: Sequence[str], source: str) -> np.ndarray:
    """Probe class number of every `subset` wnid, in `subset` order; a wnid unknown to the probe is an error."""
    lookup = {wnid: i for i, wnid in enumerate(probe_classes)}
    missing = [w for w in subset if w not in lookup]
    if missing:
        raise DataContractError(f"{source}: class {missing[0]!r} is not a class of the ImageNet probe "
                                f"({len(missing)} of {len(subset)} unknown)")
    return np.asarray([lookup[w] for w in subset], dtype=np.int64)


def evaluate_imagenet_a(train: SplitRef, test: SplitRef, shifted: SplitRef, train_per_class: int, seed: int,
                        probe: ProbeConfig, l2_normalise: bool) -> dict[str, Any]:
    train_rows = load_rows(train)
    classes = resolve_classes(None, train_rows["label"], train.name)
    labels = class_index(train_rows["label"], classes, train.name)
    rows = np.sort(take_shots(sample_per_class(labels, len(classes), seed), train_per_class))
    fit = probe.fit(read_features(train.features, train_rows["image_id"].iloc[rows], l2_normalise), labels[rows],
                    len(classes))

    shifted_rows = load_rows(shifted)
    subset = sorted(set(shifted_rows["label"]))
    allowed = class_mapping(classes, subset, shifted.name)
    x_a = read_features(shifted.features, shifted_rows["image_id"], l2_normalise)
    y_a = class_index(shifted_rows["label"], classes, shifted.name)

    test_rows = load_rows(test)
    y_val = class_index(test_rows["label"], classes, test.name)
    if (y_val < 0).any():
        raise DataContractError(f"{test.name}: label {test_rows['label'][y_val < 0].iloc[0]!r} is not an ImageNet "
                                "training class")
    x_val = read_features(test.features, test_rows["image_id"], l2_normalise)
    in_subset = np.isin(y_val, allowed)
    return {
        "imagenet_a_top1": fit.classifier.accuracy(x_a, y_a, allowed),
        "imagenet_val_top1": fit.classifier.accuracy(x_val, y_val),
        "imagenet_val_subset_top1": fit.classifier.accuracy(x_val[in_subset], y_val[in_subset], allowed),
        "n_imagenet_a": len(y_a), "n_imagenet_val": len(y_val), "n_classes": len(classes), "n_subset_classes":
            len(subset), "n_train": len(rows), "train_per_class": train_per_class, "seed": seed,
        **fit.summary(),
        "class_mapping": dict(zip(subset, allowed.tolist())),
    }
