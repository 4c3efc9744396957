"""Demo world: real dataset formats, determinism, and simulated choices that match the planted ground truth."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from metalign.demo import world as world_module
from metalign.demo.cli import register
from metalign.demo.world import generate_world

SPEC = {"seed": 3, "n_concepts": 12, "images_per_concept": 3, "image_size": 32, "n_participants": 20,
        "triplets_per_participant": 60, "repeat_fraction": 0.1, "temperature": 0.15, "coco_train": 40, "coco_val": 10}


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, generate_world(out, SPEC)


def _read(out: Path) -> tuple[list[str], np.ndarray, pd.DataFrame, dict]:
    ids = (out / "things/unique_id.txt").read_text().split("\n")[:-1]
    truth = json.loads((out / "things/ground_truth.json").read_text())
    embedding = np.loadtxt(out / "things" / truth["embedding_file"], ndmin=2)
    return ids, embedding, pd.read_csv(out / "things/triplets.tsv", sep="\t"), truth


def test_things_layout_and_formats(world):
    out, summary = world
    ids, embedding, triplets, truth = _read(out)
    assert ids == sorted(ids) and len(set(ids)) == SPEC["n_concepts"]
    assert all(i.islower() and " " not in i for i in ids)
    assert sorted(p.name for p in (out / "things/images").iterdir()) == ids
    for concept in ids:
        files = sorted((out / "things/images" / concept).iterdir())
        assert [f.name[:-5] for f in files] == [f"{concept}_{n:02d}" for n in range(1, SPEC["images_per_concept"] + 1)]
        assert all(f.name[-5].isalpha() and f.suffix == ".jpg" for f in files)
        with Image.open(files[0]) as image:
            assert image.format == "JPEG" and image.size == (SPEC["image_size"], SPEC["image_size"])
    assert embedding.shape == (SPEC["n_concepts"], truth["embedding_dim"]) and (embedding >= 0).all()
    assert truth["embedding_file"] == f"spose_embedding_{truth['embedding_dim']}d_sorted.txt"
    assert len(truth["dimension_labels"]) == truth["embedding_dim"]
    assert [c["unique_id"] for c in truth["concepts"]] == ids
    assert list(triplets.columns) == ["subject_id", "image1", "image2", "image3", "choice"]
    assert len(triplets) == truth["n_triplets"] == SPEC["n_participants"] * SPEC["triplets_per_participant"]
    items = triplets[["image1", "image2", "image3"]].to_numpy()
    assert items.min() == 1 and items.max() == SPEC["n_concepts"]
    assert (np.sort(items, axis=1)[:, 1:] != np.sort(items, axis=1)[:, :-1]).all()  # three distinct concepts
    assert set(triplets["choice"]) == {1, 2, 3}
    assert json.loads((out / "world.json").read_text()) == json.loads(json.dumps(summary))


def test_coco_pool_layout(world):
    out, _ = world
    splits = {s: sorted((out / "coco" / s).iterdir()) for s in ("train2017", "val2017")}
    assert [len(splits["train2017"]), len(splits["val2017"])] == [SPEC["coco_train"], SPEC["coco_val"]]
    names = [p.name for files in splits.values() for p in files]
    assert len(set(names)) == len(names) and all(len(n) == 16 and n[:12].isdigit() for n in names)
    with Image.open(splits["val2017"][0]) as image:
        assert image.format == "JPEG" and image.size == (round(SPEC["image_size"] * 4 / 3), SPEC["image_size"])
    objects = pd.read_csv(out / "coco/objects.csv", dtype={"image_id": str})
    assert set(objects["image_id"]) == set(names)
    assert objects.groupby("image_id").size().isin([1, 2]).all() and objects["shape"].nunique() >= 4


def _naive_probabilities(embedding: np.ndarray, row: tuple[int, int, int], temperature: float) -> list[float]:
    """Reference implementation of the docs/methods.md §9.1 logit rule, one triplet at a time."""
    def cos(a: int, b: int) -> float:
        x, y = embedding[a - 1], embedding[b - 1]
        return float(x @ y / math.sqrt((x @ x) * (y @ y)))
    i, j, k = row
    logits = [cos(j, k) / temperature, cos(i, k) / temperature, cos(i, j) / temperature]
    total = sum(math.exp(v) for v in logits)
    return [math.exp(v) / total for v in logits]


def test_planted_embedding_is_the_ideal_observer(world):
    out, _ = world
    _, embedding, triplets, truth = _read(out)
    probs = np.array([_naive_probabilities(embedding, tuple(r), truth["temperature"])
                      for r in triplets[["image1", "image2", "image3"]].itertuples(index=False)])
    best = probs.argmax(axis=1)
    choice = triplets["choice"].to_numpy() - 1
    p_best = probs[np.arange(len(best)), best]
    assert truth["expected_accuracy"] == pytest.approx(p_best.mean(), abs=1e-9)
    assert truth["expected_nll"] == pytest.approx(-np.log(probs[np.arange(len(choice)), choice]).mean(), abs=1e-9)
    hits = (best == choice).sum()
    assert truth["planted_accuracy"] == pytest.approx(hits / len(choice))
    # Empirical accuracy of the participants against the planted argmax: Poisson-binomial mean and spread.
    assert abs(hits - p_best.sum()) < 4 * math.sqrt((p_best * (1 - p_best)).sum())
    assert 1 / 3 + 0.1 < truth["expected_accuracy"] < 0.95  # informative but noisy choices


def test_repeats_are_exact_and_only_planted(world):
    out, _ = world
    triplets = _read(out)[2]
    n_repeat = round(SPEC["repeat_fraction"] * SPEC["triplets_per_participant"])
    for _, trials in triplets.groupby("subject_id"):
        keys = list(trials[["image1", "image2", "image3"]].itertuples(index=False, name=None))
        assert len(keys) - len(set(keys)) == n_repeat  # exact repeats, same position order
        assert len({frozenset(k) for k in keys}) == len(set(keys))  # no accidental repeats in another order
        assert max(keys.count(k) for k in keys) == 2


def _object_hue_and_area(path: Path) -> tuple[float, float]:
    """Circular mean hue and area fraction of the saturated (object) pixels; backgrounds are near-grey."""
    with Image.open(path) as image:
        hsv = np.asarray(image.convert("HSV"), dtype=float) / 255.0
    solid = hsv[..., 1] > 0.45
    angle = np.angle(np.exp(2j * np.pi * hsv[..., 0][solid]).mean()) / (2 * np.pi)
    return float(angle % 1.0), float(solid.mean())


def test_images_vary_within_concept_but_share_its_factors(world):
    out, _ = world
    truth = _read(out)[3]
    areas: dict[str, list[float]] = {"small": [], "large": []}
    for concept in truth["concepts"]:
        files = sorted((out / "things/images" / concept["unique_id"]).iterdir())
        assert len({f.read_bytes() for f in files}) == len(files)  # no two views are identical
        for path in files:
            hue, area = _object_hue_and_area(path)
            assert abs((hue - concept["hue"] + 0.5) % 1.0 - 0.5) < 0.05, path.name
            areas[concept["size_label"]].append(area)
    assert np.mean(areas["large"]) > 1.5 * np.mean(areas["small"])


def test_same_seed_is_byte_identical_and_another_seed_differs(world, tmp_path):
    out, summary = world
    again = generate_world(tmp_path / "again", SPEC)
    assert _hashes(tmp_path / "again") == _hashes(out)
    assert again["content_sha256"] == summary["content_sha256"]
    other = generate_world(tmp_path / "other", {**SPEC, "seed": 4})
    assert other["content_sha256"] != summary["content_sha256"]
    assert set(_hashes(tmp_path / "other").values()).isdisjoint(
        h for name, h in _hashes(out).items() if name.endswith(".jpg"))


@pytest.mark.parametrize("key, value", [("seed", None), ("n_concepts", 2), ("image_size", 8.5),
                                        ("repeat_fraction", 0.7), ("temperature", 0), ("coco_val", True),
                                        ("triplets_per_participant", 500)])
def test_bad_spec_names_the_key(tmp_path, key, value):
    spec = {**SPEC, key: value, "n_concepts": 4} if key == "triplets_per_participant" else {**SPEC, key: value}
    with pytest.raises(ValueError, match=key):
        generate_world(tmp_path, spec)
    missing = {k: v for k, v in SPEC.items() if k != key}
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        generate_world(tmp_path, missing)


def test_unknown_spec_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="tempreature"):
        generate_world(tmp_path, {**SPEC, "tempreature": 1.0})


def test_interrupted_rerun_leaves_no_world_json(tmp_path, monkeypatch):
    generate_world(tmp_path, SPEC)
    assert (tmp_path / "world.json").exists()

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(world_module, "_write_coco", crash)
    with pytest.raises(RuntimeError):
        generate_world(tmp_path, SPEC)
    assert not (tmp_path / "world.json").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") and p.name != ".demo-world"]  # no temp files


def test_refuses_to_clear_a_foreign_folder(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "real.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="refusing"):
        generate_world(tmp_path, SPEC)
    assert (tmp_path / "coco" / "real.jpg").exists()


def test_cli_takes_the_spec_as_json(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo-world", "--spec", json.dumps(SPEC), "--out", str(tmp_path / "w")])
    args.func(args)
    assert json.loads((tmp_path / "w/world.json").read_text())["spec"] == SPEC
    args = parser.parse_args(["demo-world", "--spec", json.dumps({**SPEC, "sede": 1}), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="sede"):
        args.func(args)


def test_config_bound_on_concepts_is_the_factor_space():
    """The torch-free config check bounds n_concepts by the demo factor space without importing the demo."""
    from metalign.config.demo import MAX_CONCEPTS
    from metalign.demo.factors import n_combinations

    assert MAX_CONCEPTS == n_combinations()
