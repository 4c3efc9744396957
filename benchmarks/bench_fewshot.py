"""Few-shot evaluation of one representation: 11 datasets × shots {1, 5, 10, 25} × 3 seeds on cached synthetic
features (D = 768, the real class counts, test sets capped at 5,000 rows to keep `make bench` short).

ours: `metalign.downstream.fewshot.fewshot_lsr` (one Gram matrix + one Cholesky per fit, dual form when
n < D + 1, standardisation folded into the weights, float32 test scoring).
baseline: the textbook route: standardise train and test explicitly (float64) and fit scikit-learn `Ridge` on the
bias-augmented features for every (dataset, shots, seed); identical accuracies (checked).
One line per goal: the total, and ImageNet-sized vs smallest class counts (how time scales with classes).
BLAS runs single-threaded for both: on a shared 2-core machine multi-threaded OpenBLAS spins against other jobs and
swings wall times 4×, hiding the algorithmic difference.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.linear_model import Ridge
from threadpoolctl import threadpool_limits

from benchmarks.common import report
from metalign.downstream.fewshot import BIAS_CONSTANT, STD_EPS, draw_samples, fewshot_lsr

DIM = 768
SHOTS = (1, 5, 10, 25)
SEEDS = (0, 1, 2)
L2 = 2.0 ** 10
POOL_PER_CLASS = 30  # ≥ the largest shot count; the CLI reads only the sampled rows of the real pool
TEST_CAP = 5_000
# dataset: (classes, standard test-set size)
DATASETS = {"birds": (200, 5_794), "caltech101": (102, 6_084), "cars": (196, 8_041), "cifar100": (100, 10_000),
            "colon": (9, 7_180), "dtd": (47, 1_880), "flowers": (102, 6_149), "imagenet": (1000, 50_000),
            "pets": (37, 3_669), "places365": (365, 36_500), "ucmerced": (21, 1_050)}


def _features(rng: np.random.Generator, n_classes: int, n_test: int):
    means = rng.normal(size=(n_classes, DIM)).astype(np.float32)
    y_train = np.repeat(np.arange(n_classes), POOL_PER_CLASS)
    y_test = rng.integers(0, n_classes, min(n_test, TEST_CAP))
    noise = lambda n: rng.normal(scale=4.0, size=(n, DIM)).astype(np.float32)  # noqa: E731
    return means[y_train] + noise(len(y_train)), y_train, means[y_test] + noise(len(y_test)), y_test


def _baseline(x_train, y_train, x_test, y_test, n_classes):
    out = {}
    for (seed, k), idx in draw_samples(y_train, n_classes, SHOTS, SEEDS).items():
        x = x_train[idx].astype(np.float64)
        mean, std = x.mean(0), x.std(0) + STD_EPS
        aug = lambda a: np.hstack([(a - mean) / std, np.full((len(a), 1), BIAS_CONSTANT)])  # noqa: E731
        model = Ridge(alpha=L2, fit_intercept=False).fit(aug(x), 2.0 * np.eye(n_classes)[y_train[idx]] - 1.0)
        out[(seed, k)] = float(np.mean(model.predict(aug(x_test.astype(np.float64))).argmax(1) == y_test))
    return out


def main() -> None:
    with threadpool_limits(limits=1, user_api="blas"):
        _run()


def _run() -> None:
    rng = np.random.default_rng(0)
    data = {name: _features(rng, c, n) for name, (c, n) in DATASETS.items()}
    ours_s, base_s = {}, {}
    for name, (x_train, y_train, x_test, y_test) in data.items():
        n_classes = DATASETS[name][0]
        start = time.perf_counter()
        ours = fewshot_lsr(x_train, y_train, x_test, y_test, n_classes, SHOTS, SEEDS, L2)
        ours_s[name] = time.perf_counter() - start
        start = time.perf_counter()
        base = _baseline(x_train, y_train, x_test, y_test, n_classes)
        base_s[name] = time.perf_counter() - start
        worst = max(abs(ours[key] - base[key]) for key in ours)
        if worst > 2.0 / len(y_test):  # at most a tie or two may flip between float32 and float64 scoring
            raise AssertionError(f"{name}: accuracies differ from the reference by {worst}")
    report("fewshot_11datasets_4shots_3seeds", sum(ours_s.values()), sum(base_s.values()),
           "seconds (not minutes) for all 11 datasets × 4 shot counts × 3 seeds of one representation")
    report("fewshot_imagenet_1000_classes", ours_s["imagenet"], base_s["imagenet"],
           f"seconds per dataset at 1000 classes; vs {ours_s['colon']:.3g}s at 9 classes (colon), "
           f"{ours_s['places365']:.3g}s at 365 (places365)")


if __name__ == "__main__":
    main()
