"""Downstream evaluations: least-squares math against naive references, big_vision's sampling, BREEDS split
construction on hand-made hierarchies, the ImageNet-A class mask, shape-bias counts, and every CLI end to end on a
small labelled demo set with planted (class-informative) vs random features."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge

from metalign.demo import cli as demo_cli
from metalign.demo import labelled
from metalign.downstream import cli
from metalign.downstream.breeds import Hierarchy, make_task, read_hierarchy, split_superclass
from metalign.downstream.fewshot import (
    BIAS_CONSTANT,
    STD_EPS,
    LinearClassifier,
    draw_samples,
    fewshot_lsr,
    lsr_system,
    signed_one_hot,
)
from metalign.downstream.imagenet_a import class_mapping
from metalign.downstream.probe import fit_centroids, fit_lsr_probe, holdout_split
from metalign.downstream.shape_bias import parse_stimuli, shape_bias
from metalign.images.manifest import build_manifest
from metalign.io import DataContractError, manifest_hash, write_csv, write_h5

# ----------------------------------------------------------------------------------------------- least squares


def _naive_lsr_scores(x, y, n_classes, l2, x_test):
    """Textbook ridge on big_vision's whitened, bias-augmented features (no eigendecomposition, no folding)."""
    mean, std = x.mean(0), x.std(0) + STD_EPS
    aug = lambda a: np.hstack([(a - mean) / std, np.full((len(a), 1), BIAS_CONSTANT)])  # noqa: E731
    z = aug(x)
    targets = 2.0 * np.eye(n_classes)[y] - 1.0
    w = np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ targets)
    ridge = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(z, targets)
    np.testing.assert_allclose(ridge.coef_.T, w, rtol=1e-6, atol=1e-9)
    return aug(x_test) @ w


@pytest.mark.parametrize("n", [12, 200])  # dual (n < D + 1) and primal (n ≥ D + 1) forms
def test_lsr_matches_naive_ridge(n):
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(n, 40)) * 3 + 1, rng.normal(size=(50, 40)) * 3 + 1
    y = np.arange(n) % 5
    for l2 in (1e-2, 1.0, 2.0 ** 10):
        ours = lsr_system(x, y, 5).classifier(l2).scores(x_test)
        np.testing.assert_allclose(ours, _naive_lsr_scores(x, y, 5, l2, x_test), rtol=2e-4, atol=2e-4)


def test_gram_blocks_give_the_same_solution(monkeypatch):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 10)), rng.integers(0, 3, 300)
    whole = lsr_system(x, y, 3).classifier(4.0)
    monkeypatch.setattr("metalign.downstream.fewshot.GRAM_BLOCK", 7)
    blocked = lsr_system(x, y, 3).classifier(4.0)
    np.testing.assert_allclose(blocked.weight, whole.weight, rtol=1e-5, atol=1e-7)


def test_targets_are_signed_one_hot():
    np.testing.assert_array_equal(signed_one_hot(np.array([2, 0]), 3), [[-1, -1, 1], [1, -1, -1]])


def test_sampling_is_big_vision_per_class_permutation():
    labels = np.array([0, 1, 1, 0, 2, 2, 2, 0, 1, 0])
    samples = draw_samples(labels, 3, shots=[1, 2, 5], seeds=[0, 1])
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(np.where(labels == c)[0]) for c in range(3)]
        for k in (1, 2, 5):
            np.testing.assert_array_equal(samples[(seed, k)], np.concatenate([p[:k] for p in perms]))
        assert set(samples[(seed, 1)]) <= set(samples[(seed, 2)])  # nested within a seed
    assert np.bincount(labels[samples[(0, 5)]]).tolist() == [4, 3, 3]  # small classes give all they have


def test_class_lists_are_frozen_and_checked(tmp_path):
    from metalign.downstream.data import class_index, resolve_classes

    labels = pd.Series(["b", "a", "c", "a"])
    assert resolve_classes(None, labels, "train") == ["a", "b", "c"]
    (tmp_path / "classes.txt").write_text("c\na\n")
    assert resolve_classes(str(tmp_path / "classes.txt"), labels, "train") == ["c", "a"]
    np.testing.assert_array_equal(class_index(labels, ["c", "a"], "train"), [-1, 1, 0, 1])  # b is dropped
    with pytest.raises(DataContractError, match="'z' has no training image"):
        resolve_classes(["a", "z"], labels, "train")


def test_planted_features_beat_random_ones():
    rng = np.random.default_rng(2)
    n_classes, dim = 20, 64
    means = rng.normal(size=(n_classes, dim))
    y_train, y_test = np.repeat(np.arange(n_classes), 30), np.repeat(np.arange(n_classes), 10)
    planted = lambda y: means[y] + 0.5 * rng.normal(size=(len(y), dim))  # noqa: E731
    acc = fewshot_lsr(planted(y_train), y_train, planted(y_test), y_test, n_classes, [1, 10], [0, 1, 2], 2.0 ** 10)
    noise = fewshot_lsr(rng.normal(size=(len(y_train), dim)), y_train, rng.normal(size=(len(y_test), dim)), y_test,
                        n_classes, [1, 10], [0, 1, 2], 2.0 ** 10)
    assert min(acc[(s, 10)] for s in range(3)) > 0.9
    assert max(noise[(s, 10)] for s in range(3)) < 0.2


def test_probe_picks_ridge_on_holdout_and_flags_grid_edges():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 25)
    x = np.eye(4)[y] @ rng.normal(size=(4, 30)) + 0.3 * rng.normal(size=(100, 30))
    fit, val = holdout_split(y, 4, 0.2, seed=0)
    assert not set(fit) & set(val) and len(val) == 20 and np.bincount(y[val]).tolist() == [5] * 4
    probe = fit_lsr_probe(x, y, 4, [1e-3, 1.0, 1e3], 0.2, seed=0)
    assert probe.l2 == max(probe.val_acc, key=lambda l2: (probe.val_acc[l2], l2))
    assert probe.l2_at_edge == (probe.l2 in (1e-3, 1e3))
    np.testing.assert_allclose(probe.classifier.weight, lsr_system(x, y, 4).classifier(probe.l2).weight, rtol=1e-6)
    assert fit_lsr_probe(x, y, 4, [5.0], 0.2, seed=0).l2 == 5.0  # a single strength needs no hold-out


def test_nearest_centroid_is_cosine_to_class_means():
    x = np.array([[1.0, 0.1], [2.0, -0.1], [0.1, 1.0], [-0.1, 3.0]])
    rule = fit_centroids(x, np.array([0, 0, 1, 1]), 2)
    assert rule.l2 is None
    np.testing.assert_array_equal(rule.classifier.predict(np.array([[5.0, 1.0], [0.2, 0.3], [1.0, 0.9]])), [0, 1, 0])


# ----------------------------------------------------------------------------------------------- BREEDS


def _hand_hierarchy() -> Hierarchy:
    """root → A (→ A1 → {a, b}, A2 → {c, d}), B (→ B1 → {e, f, g, h}), C → {i} (too small); plus a pruned
    node X without dataset classes and a shortcut root → B1 that must not shorten B1's level (longest path)."""
    edges = [("root", "A"), ("root", "B"), ("root", "C"), ("root", "X"), ("X", "x1"), ("A", "A1"), ("A", "A2"),
             ("A1", "a"), ("A1", "b"), ("A2", "c"), ("A2", "d"), ("B", "B1"), ("root", "B1"), ("B1", "e"),
             ("B1", "f"), ("B1", "g"), ("B1", "h"), ("C", "i")]
    return Hierarchy(list("abcdefghi"), edges, {"A": "animal", "B": "building"}, root="root")


def test_hierarchy_levels_pruning_and_leaves():
    h = _hand_hierarchy()
    assert "X" not in h.children and "X" not in h.level  # no dataset class below X
    assert h.level["B1"] == 2 and h.level["e"] == 3  # longest path root → B → B1
    assert h.nodes_at_level(1) == ["A", "B", "C"]
    assert h.leaves_reachable("A") == set("abcd") and h.leaves_reachable("a") == {"a"}
    assert h.nodes_at_level(2, ancestor="A") == ["A1", "A2"]


def test_rand_split_reproduces_robustness_randomstate_draws():
    h = _hand_hierarchy()
    task = make_task(h, "toy", level=1, n_subclasses=4, split="rand", seed=2)
    assert task.superclasses == ["A", "B"] and task.names == ["animal", "building"]  # C has 1 < 4 subclasses
    rng = np.random.RandomState(2)
    expected = [list(rng.choice(pool, 4, replace=False)) for pool in (list("abcd"), list("efgh"))]
    assert task.source == [e[:2] for e in expected] and task.target == [e[2:] for e in expected]
    assert make_task(h, "toy", 1, 4, split="rand", seed=2) == task  # deterministic


def test_good_split_spreads_siblings_and_bad_split_keeps_them_together():
    h = _hand_hierarchy()
    good = split_superclass(h, "A", 4, "good", np.random.RandomState(0))
    bad = split_superclass(h, "A", 4, "bad", np.random.RandomState(0))
    assert good == (["a", "c"], ["b", "d"])
    assert bad == (["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="even"):
        split_superclass(h, "A", 3, "rand", np.random.RandomState(0))


def test_demo_hierarchy_files_give_shape_superclasses(tmp_path):
    classes = labelled.demo_classes()
    labelled._hierarchy(tmp_path, classes)
    h = read_hierarchy(tmp_path / "dataset_class_info.json", tmp_path / "class_hierarchy.txt",
                       tmp_path / "node_names.txt")
    task = make_task(h, "shapes8", level=2, n_subclasses=4)
    shape_of = {c.wnid: c.shape for c in classes}
    assert len(task.superclasses) == 8
    for name, src, tgt in zip(task.names, task.source, task.target):
        assert len(src) == len(tgt) == 2 and not set(src) & set(tgt)
        assert {shape_of[w] for w in src + tgt} == {name}
    pointed = make_task(h, "pointed4", level=2, n_subclasses=4, ancestor="n80000001")
    assert sorted(pointed.names) == ["arrow", "diamond", "star", "triangle"]
    (tmp_path / "class_hierarchy.txt").write_text("n00001740\n")
    with pytest.raises(DataContractError, match="line 1"):
        read_hierarchy(tmp_path / "dataset_class_info.json", tmp_path / "class_hierarchy.txt",
                       tmp_path / "node_names.txt")


BREEDS_FILES = Path(__file__).resolve().parents[1] / "resources" / "breeds"


# The reference: robustness 1.2.1.post2 (MadryLab), tools/breeds_helpers.py make_<task>(info_dir, split=...) run on
# BREEDS-Benchmarks' imagenet_class_hierarchy/modified files; its class numbers mapped back to wnids, and the first
# 16 hex digits of the sha256 of json.dumps({"superclasses": …, "source": …, "target": …}) kept.
REFERENCE_SPLITS = {
    ("rand", "entity13"): "0903e0a5a8d69a44",
    ("rand", "entity30"): "bae4938c7ee201ac",
    ("rand", "living17"): "c3c25ad5b0121e31",
    ("rand", "nonliving26"): "5ed7ce5aefe14b23",
    ("good", "entity13"): "d5650b4eace2748d",
    ("good", "entity30"): "b331a5f96075b3fb",
    ("good", "living17"): "a2405a53bb1e8e90",
    ("good", "nonliving26"): "b8f7e55d3a162769",
    ("bad", "entity13"): "c5765f60cd4fd60c",
    ("bad", "entity30"): "5fd455e97df76004",
    ("bad", "living17"): "e118cc49a9444075",
    ("bad", "nonliving26"): "a1fc824a2daf4b01",
}


@pytest.mark.skipif(not (BREEDS_FILES / "class_hierarchy.txt").exists(),
                    reason="BREEDS hierarchy files absent from resources/breeds (rule download_breeds_hierarchy)")
@pytest.mark.parametrize("split", ["rand", "good", "bad"])
def test_real_breeds_tasks_equal_the_reference_library(split):
    from metalign.downstream.breeds import STANDARD_TASKS, make_tasks

    h = read_hierarchy(BREEDS_FILES / "dataset_class_info.json", BREEDS_FILES / "class_hierarchy.txt",
                       BREEDS_FILES / "node_names.txt")
    tasks = make_tasks(h, STANDARD_TASKS, split, 2)
    sizes = {t.name: (len(t.superclasses), len(t.source[0])) for t in tasks}
    assert sizes == {"entity13": (13, 10), "entity30": (30, 4), "living17": (17, 2), "nonliving26": (26, 2)}
    for t in tasks:
        record = {"superclasses": list(t.superclasses), "source": [list(c) for c in t.source],
                  "target": [list(c) for c in t.target]}
        digest = hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]
        assert digest == REFERENCE_SPLITS[(split, t.name)], f"{t.name} ({split}) differs from breeds_helpers"


# ----------------------------------------------------------------------------------------------- ImageNet-A, shape bias


def test_imagenet_a_mapping_and_masked_argmax():
    probe_classes = ["n01", "n02", "n03", "n04"]
    allowed = class_mapping(probe_classes, ["n03", "n01"], "imagenet-a")
    np.testing.assert_array_equal(allowed, [2, 0])
    with pytest.raises(DataContractError, match="n09"):
        class_mapping(probe_classes, ["n03", "n09"], "imagenet-a")
    rule = LinearClassifier(np.eye(4, dtype=np.float32), np.zeros(4, np.float32))
    x = np.array([[0.1, 0.9, 0.5, 0.0], [0.2, 0.0, 0.1, 0.7]], dtype=np.float32)
    np.testing.assert_array_equal(rule.predict(x), [1, 3])  # unrestricted: classes outside the subset win
    np.testing.assert_array_equal(rule.predict(x, allowed), [2, 0])
    assert rule.accuracy(x, np.array([2, 0]), allowed) == 1.0


def test_shape_bias_counts_on_a_hand_made_case():
    shape = ["cat", "cat", "dog", "dog", "bear", "bear"]
    texture = ["dog", "bear", "cat", "bear", "bear", "cat"]
    decision = ["cat", "bear", "dog", "knife", "bear", "bear"]
    counts = shape_bias(shape, texture, decision)
    # conflicts: rows 0,1,2,3,5 (row 4 has shape == texture and is excluded)
    assert counts == {"shape_bias": 3 / 4, "frac_shape": 3 / 5, "frac_texture": 1 / 5, "n_shape": 3,
                      "n_texture": 1, "n_conflict": 5, "n_same_cue_excluded": 1}


def test_cue_conflict_names_are_parsed_and_checked():
    rows = pd.DataFrame({"image_id": ["airplane/airplane1-bear2.png", "bear/bear10-bear3.png"],
                         "label": ["airplane", "bear"]})
    parsed = parse_stimuli(rows, ["airplane", "bear"], "cue-conflict")
    assert parsed[["shape", "texture"]].values.tolist() == [["airplane", "bear"], ["bear", "bear"]]
    with pytest.raises(DataContractError, match="folder"):
        parse_stimuli(rows.assign(label=["bear", "bear"]), ["airplane", "bear"], "cue-conflict")
    with pytest.raises(DataContractError, match="unknown category 'bear'"):
        parse_stimuli(rows, ["airplane"], "cue-conflict")


# ----------------------------------------------------------------------------------------------- end to end


SPEC = {"seed": 7, "train_per_class": 6, "val_per_class": 3, "shifted_per_class": 2, "conflicts_per_pair": 1,
        "colon_train_per_class": 6, "colon_test_per_class": 4, "dtd_per_split": 2}
SETS = {"imagenet_train": "imagenet/train", "imagenet_val": "imagenet/val", "imagenet_a": "imagenet-a",
        "cue_conflict": "cue-conflict", "colon_train": "NCT-CRC-HE-100K", "colon_test": "CRC-VAL-HE-7K"}


def _run(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(required=True)
    cli.register(subparsers)
    demo_cli.register(subparsers)
    args = parser.parse_args([str(a) for a in argv])
    args.func(args)


@pytest.fixture(scope="module")
def demo_sets(tmp_path_factory):
    """The labelled demo sets (32 px), their manifests, and planted / appearance-only / random features."""
    root = tmp_path_factory.mktemp("downstream")
    world = root / "world.json"
    world.write_text(json.dumps({"spec": {"image_size": 32}}))
    _run("demo-labelled", "--world", world, "--spec", json.dumps(SPEC), "--out", root / "labelled")
    factors = pd.read_csv(root / "labelled" / "factors.csv").set_index("image_id")
    rng = np.random.default_rng(0)
    for name, folder in SETS.items():
        frame = build_manifest("class_folders", root / "labelled" / folder, split=name.rsplit("_", 1)[-1])
        write_csv(root / f"{name}.csv", frame)
        rows = factors.loc[frame["image_id"]]
        one_hot = lambda column: pd.get_dummies(rows[column].fillna("")).reindex(  # noqa: E731
            columns=sorted(set(factors[column].dropna())), fill_value=0).to_numpy(float)
        blocks = {"shape": one_hot("shape"), "look": np.hstack([one_hot("colour"), one_hot("texture")]),
                  "label": one_hot("label")}
        features = {"planted": np.hstack([blocks["label"], blocks["shape"]]), "shape": blocks["shape"],
                    "look": blocks["look"], "random": np.zeros((len(frame), 1))}
        for kind, x in features.items():
            x = np.hstack([x * 3, rng.normal(size=(len(frame), 8))]).astype(np.float32)
            write_h5(root / kind / f"{name}.h5", {"features": x}, frame["image_id"].tolist(),
                     attrs={"manifest_sha256": manifest_hash(frame)})
    return root


def _split_args(root: Path, kind: str, **roles: str) -> list:
    args = []
    for role, name in roles.items():
        args += [f"--{role}-manifest", root / f"{name}.csv", f"--{role}-features", root / kind / f"{name}.h5"]
    return args


PROBE = ["--l2-grid", "0.01", "1", "100", "--val-fraction", "0.25"]


def test_labelled_demo_layouts(demo_sets):
    summary = json.loads((demo_sets / "labelled" / "labelled.json").read_text())
    assert summary["counts"] == {"CRC-VAL-HE-7K": 36, "NCT-CRC-HE-100K": 54, "cue-conflict": 64, "dtd": 24,
                                 "imagenet-a": 32, "imagenet/train": 192, "imagenet/val": 96}
    val = pd.read_csv(demo_sets / "imagenet_val.csv")
    assert val["image_id"].str.fullmatch(r"n9\d{7}/ILSVRC2012_val_\d{8}\.JPEG").all()
    assert pd.read_csv(demo_sets / "colon_train.csv")["image_id"].str.fullmatch(r"([A-Z]+)/\1-[A-Z]{8}\.tif").all()
    dtd = build_manifest("dtd", demo_sets / "labelled" / "dtd")  # the DTD split files: 2 per texture and split
    assert dtd.groupby(["label", "split"]).size().eq(2).all() and len(dtd) == 24
    assert list(dtd["split"].unique()) == ["train", "val", "test"]
    with pytest.raises(ValueError, match="marker"):
        labelled.generate_labelled(demo_sets, SPEC, 32)  # a folder the generator does not own


def test_fewshot_cli_planted_beats_random(demo_sets, tmp_path):
    accuracy = {}
    for kind in ("planted", "random"):
        out = tmp_path / f"{kind}.json"
        _run("downstream-fewshot", "--task", "colon", *_split_args(demo_sets, kind, train="colon_train",
                                                                  test="colon_test"),
             "--shots", "1", "5", "--seeds", "0", "1", "2", "--l2-reg", "1024", "--out", out)
        accuracy[kind] = json.loads(out.read_text())
    assert accuracy["planted"]["acc_5shot"] > 0.95 > 0.5 > accuracy["random"]["acc_5shot"]
    assert accuracy["planted"]["n_classes"] == 9 and len(accuracy["planted"]["acc_1shot_per_seed"]) == 3


def _big_vision_accuracy(x, y, x_test, y_test, n_classes, l2):
    """big_vision's fewshot_lsr (`_precompute_cache`, `_eig_fewshot_acc_fn`) transcribed: standardise with the shots'
    mean and std + 1e-5, a constant feature of 100, targets 2·one_hot − 1, eigendecomposition of the smaller Gram."""
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5

    def pad(a):
        return np.pad((a - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)

    z, t = pad(x), 2.0 * np.eye(n_classes)[y] - 1.0
    if len(z) >= z.shape[1]:
        eigs, q = np.linalg.eigh(z.T @ z)
        rhs, lhs = q.T @ (z.T @ t), q
    else:
        eigs, q = np.linalg.eigh(z @ z.T)
        rhs, lhs = q.T @ t, z.T @ q
    w = (lhs * (1.0 / (eigs + l2))[None, :]) @ rhs
    return float(np.mean(np.argmax(pad(x_test) @ w, axis=1) == y_test))


def _big_vision_fewshot(x, y, x_test, y_test, n_classes, shots, seeds, l2):
    """big_vision's `compute_fewshot_metrics`: per seed one permutation of each class's rows, the first k per class."""
    out = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(np.where(y == c)[0]) for c in range(n_classes)]
        for k in shots:
            idx = np.concatenate([p[:k] for p in perms])
            out[k, seed] = _big_vision_accuracy(x[idx], y[idx], x_test, y_test, n_classes, l2)
    return out


def test_fewshot_default_is_big_vision_and_l2_is_an_option(tmp_path):
    """Row norms carry the class here, so unit rows (the old default) lose it: the two settings must differ."""
    rng = np.random.default_rng(11)
    n_classes, per_class, dim = 3, 40, 6
    y = np.tile(np.arange(n_classes), 2 * per_class)  # classes interleaved in manifest order
    split = np.repeat(["train", "test"], n_classes * per_class)
    x = (1.0 + y[:, None]) * rng.uniform(1, 2, dim) + rng.normal(scale=0.4, size=(len(y), dim))
    ids = [f"c{c}/{i:03d}.jpg" for i, c in enumerate(y)]
    frame = pd.DataFrame({"image_id": ids, "path": ids, "label": [f"c{c}" for c in y], "split": split})
    write_csv(tmp_path / "set.csv", frame)
    write_h5(tmp_path / "set.h5", {"features": x.astype(np.float32)}, ids,
             attrs={"manifest_sha256": manifest_hash(frame)})
    train, test = split == "train", split == "test"
    shots, seeds = [1, 3, 10], [0, 1, 2]
    splits = ["--train-manifest", tmp_path / "set.csv", "--train-features", tmp_path / "set.h5", "--train-split",
              "train", "--test-manifest", tmp_path / "set.csv", "--test-features", tmp_path / "set.h5",
              "--test-split", "test", "--shots", *shots, "--seeds", *seeds, "--l2-reg", 1024]
    x32 = x.astype(np.float32).astype(np.float64)
    unit = x32 / np.linalg.norm(x32, axis=1, keepdims=True)
    for flags, rows, normalised in (([], x32, False), (["--l2-normalise"], unit, True)):
        _run("downstream-fewshot", "--task", "planted", *splits, *flags, "--out", tmp_path / "out.json")
        got = json.loads((tmp_path / "out.json").read_text())
        want = _big_vision_fewshot(rows[train], y[train], rows[test], y[test], n_classes, shots, seeds, 1024.0)
        assert got["l2_normalise"] is normalised
        for k in shots:
            assert got[f"acc_{k}shot_per_seed"] == [want[k, seed] for seed in seeds]
    raw = _big_vision_fewshot(x32[train], y[train], x32[test], y[test], n_classes, shots, seeds, 1024.0)
    l2 = _big_vision_fewshot(unit[train], y[train], unit[test], y[test], n_classes, shots, seeds, 1024.0)
    assert np.mean(list(raw.values())) > np.mean(list(l2.values())) + 0.2


def test_breeds_cli_separates_shape_from_appearance(demo_sets, tmp_path):
    h = demo_sets / "labelled" / "breeds"
    splits = tmp_path / "splits.json"
    _run("downstream-breeds-splits", "--class-info", h / "dataset_class_info.json", "--class-hierarchy",
         h / "class_hierarchy.txt", "--node-names", h / "node_names.txt",
         "--tasks", json.dumps({"shapes8": {"level": 2, "n_subclasses": 4}}), "--out", splits)
    result = {}
    for kind in ("shape", "look"):
        out = tmp_path / f"{kind}.json"
        _run("downstream-breeds", "--splits", splits, *_split_args(demo_sets, kind, train="imagenet_train",
                                                                   test="imagenet_val"), *PROBE, "--out", out)
        result[kind] = json.loads(out.read_text())
    assert result["shape"]["shapes8_target_acc"] > 0.95 and abs(result["shape"]["shapes8_gap"]) < 0.05
    # colour and texture identify most source breeds but say nothing about unseen breeds of the same shape
    assert result["look"]["shapes8_source_acc"] > 0.7 and result["look"]["shapes8_target_acc"] < 0.3
    assert result["look"]["mean_gap"] > 0.5


def test_imagenet_a_and_shape_bias_cli(demo_sets, tmp_path):
    top1 = {}
    for kind in ("planted", "random"):
        out = tmp_path / f"a_{kind}.json"
        _run("downstream-imagenet-a", *_split_args(demo_sets, kind, train="imagenet_train", test="imagenet_val",
                                                   shifted="imagenet_a"),
             "--train-per-class", "5", *PROBE, "--out", out)
        top1[kind] = json.loads(out.read_text())
    assert top1["planted"]["imagenet_a_top1"] > 0.9 > 0.3 > top1["random"]["imagenet_a_top1"]
    assert top1["planted"]["n_subset_classes"] == 16 and len(top1["planted"]["class_mapping"]) == 16

    categories = json.dumps(labelled.categories(labelled.demo_classes()))
    bias = {}
    for kind, rule in (("shape", "probe"), ("look", "probe"), ("shape", "centroid")):
        out = tmp_path / f"sb_{kind}_{rule}.json"
        _run("downstream-shape-bias", *_split_args(demo_sets, kind, train="imagenet_train", stimuli="cue_conflict"),
             "--categories", categories, "--decision", rule, *PROBE, "--out-summary", out,
             "--out-decisions", tmp_path / f"{kind}_{rule}.csv")
        bias[kind, rule] = json.loads(out.read_text())
    assert bias["shape", "probe"]["shape_bias"] == 1.0 and bias["shape", "centroid"]["shape_bias"] == 1.0
    assert bias["look", "probe"]["shape_bias"] == 0.0
    assert bias["shape", "probe"]["n_conflict"] == 56 and bias["shape", "probe"]["n_same_cue_excluded"] == 8


def test_stale_features_are_refused(demo_sets, tmp_path):
    other = pd.read_csv(demo_sets / "colon_test.csv").iloc[::-1]
    write_csv(tmp_path / "colon_test.csv", other)
    with pytest.raises(DataContractError, match="different manifest"):
        _run("downstream-fewshot", "--task", "colon", *_split_args(demo_sets, "planted", train="colon_train"),
             "--test-manifest", tmp_path / "colon_test.csv", "--test-features", demo_sets / "planted" / "colon_test.h5",
             "--shots", "1", "--seeds", "0", "--l2-reg", "1024", "--out", tmp_path / "x.json")
    with pytest.raises(DataContractError, match="no training image"):
        _run("downstream-fewshot", "--task", "colon", *_split_args(demo_sets, "planted", train="colon_train",
                                                                  test="colon_test"),
             "--classes", '["ADI", "TYPO"]', "--shots", "1", "--seeds", "0", "--l2-reg", "1024",
             "--out", tmp_path / "x.json")


def test_tables_and_gain_figure(demo_sets, tmp_path, monkeypatch):
    """effnet's meta accuracies are lowered by `shift` in its summaries, so its rows and points differ from vit's and
    a mix-up of backbones shows in the table and in the figure."""
    from metalign.downstream import figures as downstream_figures

    results = tmp_path / "downstream"
    accuracies = {}  # (backbone, variant, task) → {k: accuracy over seeds}, as the summaries hold them
    for backbone, shift in (("vit", 0.0), ("effnet", 0.1)):
        for variant, kind in (("base", "random"), ("main", "planted")):
            for task in ("colon", "colon_copy"):
                out = results / "fewshot" / task / backbone / f"{variant}.json"
                _run("downstream-fewshot", "--task", task, *_split_args(demo_sets, kind, train="colon_train",
                                                                       test="colon_test"),
                     "--shots", "1", "5", "--seeds", "0", "1", "--l2-reg", "1024", "--out", out)
                summary = json.loads(out.read_text())
                if variant == "main":
                    summary.update({f"acc_{k}shot": summary[f"acc_{k}shot"] - shift for k in (1, 5)})
                    out.write_text(json.dumps(summary))
                accuracies[backbone, variant, task] = {k: summary[f"acc_{k}shot"] for k in (1, 5)}
    _run("downstream-fewshot-table", "--summaries", *sorted((results / "fewshot").rglob("*.json")),
         "--out", results / "fewshot.csv")
    table = pd.read_csv(results / "fewshot.csv")
    assert list(table.columns[:5]) == ["backbone", "variant", "representation", "mean_1shot", "mean_5shot"]
    assert len(table) == 4 and {"colon_5shot", "colon_5shot_sd", "colon_copy_1shot"} <= set(table.columns)
    mean = {(b, v, k): np.mean([accuracies[b, v, t][k] for t in ("colon", "colon_copy")])
            for b in ("vit", "effnet") for v in ("base", "main") for k in (1, 5)}
    for row in table.itertuples():
        assert (row.mean_1shot, row.mean_5shot) == pytest.approx((mean[row.backbone, row.variant, 1],
                                                                  mean[row.backbone, row.variant, 5]), abs=1e-12)
        assert row.colon_copy_5shot == pytest.approx(accuracies[row.backbone, row.variant, "colon_copy"][5])
    assert mean["vit", "main", 5] - mean["effnet", "main", 5] == pytest.approx(0.1)
    alignment = pd.DataFrame({"backbone": ["effnet", "effnet", "vit", "vit"], "variant": ["base", "main"] * 2,
                              "representation": ["base", "meta"] * 2, "zero_shot_acc": [0.4, 0.45, 0.35, 0.34]})
    write_csv(tmp_path / "things_ooo.csv", alignment)
    drawn, draw = [], downstream_figures.draw_gain

    def keep(*args):
        drawn.append(draw(*args))
        return drawn[-1]

    monkeypatch.setattr(downstream_figures, "draw_gain", keep)  # the figure the CLI saves, kept to read its points
    _run("figure-downstream", "--alignment", tmp_path / "things_ooo.csv", "--tables", results / "fewshot.csv",
         "--out", tmp_path / "gain.png")
    assert (tmp_path / "gain.png").read_bytes()[:4] == b"\x89PNG"
    # one panel per shot count; per backbone one point (Δ zero-shot accuracy, Δ mean k-shot accuracy), meta − base
    (fig,) = drawn
    panels = [ax for ax in fig.axes if ax.collections]
    assert [ax.get_ylabel().split("\n")[0] for ax in panels] == ["Δ 1-shot accuracy", "Δ 5-shot accuracy"]
    gain = {"effnet": 0.45 - 0.4, "vit": 0.34 - 0.35}
    for ax, k in zip(panels, (1, 5)):
        offsets = {c.get_gid(): c.get_offsets() for c in ax.collections}
        assert set(offsets) == {"vit", "effnet"}
        for backbone, points in offsets.items():
            delta = mean[backbone, "main", k] - mean[backbone, "base", k]
            np.testing.assert_allclose(points, [[gain[backbone], delta]], atol=1e-12)
        assert offsets["vit"][0, 1] - offsets["effnet"][0, 1] == pytest.approx(0.1)


def test_config_checks_name_the_key():
    from metalign.config.check import check_demo
    from metalign.config.downstream import check_downstream
    from metalign.config.schema import ConfigError

    split = {"dataset": "imagenet_train"}
    config = {"datasets": {"imagenet_train": {"layout": "class_folders", "root": "x", "split": "train"}},
              "downstream": {"fewshot": {
        "shots": [1], "seeds": [0], "l2_reg": 1.0, "tasks": {"pets": {"train": split, "test": {"dataset": "pets"}}}}}}
    with pytest.raises(ConfigError, match=r"downstream\.fewshot\.tasks\.pets\.test\.dataset: unknown dataset 'pets'"):
        check_downstream(config)
    config["downstream"] = {"imagenet_a": {"train": split, "test": split, "shifted": split}}
    with pytest.raises(ConfigError, match="downstream.probe: required by downstream.imagenet_a"):
        check_downstream(config)
    config["downstream"] = {"probe": {}, "shape_bias": {"train": split, "stimuli": split,
                                                        "categories": {"cat": ["n1", "n2"], "dog": ["n2"]}}}
    with pytest.raises(ConfigError, match=r"downstream\.shape_bias\.categories: .*'n2' is listed under both 'cat' and 'dog'"):
        check_downstream(config)
    config["downstream"], config["demo"] = {}, {"labelled": {**SPEC, "train_per_class": 0}}
    with pytest.raises(ConfigError, match="demo.labelled: .*'train_per_class' must be an integer ≥ 1"):
        check_demo(config)
