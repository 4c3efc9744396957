"""The planted mechanism's parts: the demo's planted feature table, the precomputed-features backbone that reads it,
shuffled function sets, and variants restricted to some backbones (docs/demo.md)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from metalign.config.check import check
from metalign.config.schema import ConfigError, variant_backbones
from metalign.demo.planted import generate
from metalign.demo.world import generate_world
from metalign.embed.extract import extract
from metalign.functions.codes import read_codes, write_codes
from metalign.functions.shuffle import write_shuffled
from metalign.io import DataContractError
from tests.conftest import REPO

WORLD = {"seed": 3, "n_concepts": 12, "images_per_concept": 2, "image_size": 32, "n_participants": 10,
         "triplets_per_participant": 40, "repeat_fraction": 0.1, "temperature": 0.15, "coco_train": 30, "coco_val": 10}
PLANTED = {"seed": 7, "nuisance_dim": 64, "nuisance_sd": 0.4}  # as config/demo.yaml


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("planted")
    generate_world(root / "world", WORLD)
    return root, generate(root / "world", None, root / "planted", PLANTED)


def _table(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {name: handle[name][:] for name in handle}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_things_rows_carry_their_concepts_planted_embedding(planted):
    root, summary = planted
    table = _table(root / "planted" / "features.h5")
    row = {key.decode(): n for n, key in enumerate(table["sha256"])}
    things = root / "world" / "things"
    embedding = np.loadtxt(next(things.glob("spose_embedding_*d_sorted.txt")))
    concepts = (things / "unique_id.txt").read_text().split()
    images = sorted((things / "images").rglob("*.jpg"))
    assert summary["n_images"] == len(images) + WORLD["coco_train"] + WORLD["coco_val"] == len(row)
    for image in images:
        # the embedding file holds 6 decimals; the table float32
        assert np.allclose(table["factors"][row[_sha(image)]], embedding[concepts.index(image.parent.name)], atol=1e-5)


def test_features_are_a_rotation_of_factors_and_nuisance(planted):
    root, _ = planted
    table = _table(root / "planted" / "features.h5")
    x, f, n = (table[k].astype(np.float64) for k in ("features", "factors", "nuisance"))
    assert x.shape[1] == f.shape[1] + n.shape[1] == 23 + PLANTED["nuisance_dim"]
    # an orthogonal map keeps every inner product: the Gram matrix of x is that of [f ; n]
    joined = np.hstack([f, n])
    assert np.allclose(x @ x.T, joined @ joined.T, atol=1e-4)
    assert not np.allclose(np.abs(x[:, :23]), np.abs(f), atol=0.05)  # and the parts are not on the axes
    sd, size = PLANTED["nuisance_sd"], n.size  # i.i.d. N(0, sd²): 4-standard-error bounds on the mean and the sd
    assert abs(n.mean()) < 4 * sd / np.sqrt(size) and abs(n.std() - sd) < 4 * sd / np.sqrt(2 * size)
    assert n.var(axis=0).sum() > 2 * f.var(axis=0).sum()  # the nuisance dominates the variance across images


def test_expected_effect_is_the_zero_shot_accuracy_of_each_part(planted):
    """Independent reference: cosine odd-one-out on the first image of each concept, by hand."""
    root, summary = planted
    table = _table(root / "planted" / "features.h5")
    row = {key.decode(): n for n, key in enumerate(table["sha256"])}
    things = root / "world" / "things"
    concepts = (things / "unique_id.txt").read_text().split()
    first = [min((things / "images" / c).glob("*.jpg")) for c in concepts]
    triplets = pd.read_csv(things / "triplets.tsv", sep="\t")
    for part in ("features", "factors", "nuisance"):
        emb = table[part][[row[_sha(p)] for p in first]].astype(np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        correct = []
        for t in triplets.itertuples():
            i, j, k = t.image1 - 1, t.image2 - 1, t.image3 - 1
            sims = [emb[j] @ emb[k], emb[i] @ emb[k], emb[i] @ emb[j]]
            correct.append(int(np.argmax(sims)) == t.choice - 1)
        assert summary["expected"][f"zero_shot_{part}"] == pytest.approx(np.mean(correct))
    assert summary["expected"]["zero_shot_factors"] > summary["expected"]["zero_shot_features"] + 0.1


def test_same_spec_same_table_and_seed_changes_it(planted, tmp_path):
    root, _ = planted
    generate(root / "world", None, tmp_path / "again", PLANTED)
    a, b = _table(root / "planted" / "features.h5"), _table(tmp_path / "again" / "features.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    generate(root / "world", None, tmp_path / "other", {**PLANTED, "seed": 8})
    assert not np.allclose(_table(tmp_path / "other" / "features.h5")["nuisance"], a["nuisance"])


# ----------------------------------------------------------------------------------------------- precomputed


def _images(folder: Path, n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        path = folder / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 10, 200 - i * 30)).save(path)
        rows.append({"image_id": f"img{i}.png", "path": str(path), "label": "x", "split": "test"})
    return pd.DataFrame(rows)


def _write_table(path: Path, keys: list[str], features: np.ndarray, extra: dict[str, np.ndarray]) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("sha256", data=np.asarray([k.encode() for k in keys]))
        handle.create_dataset("features", data=features)
        for name, array in extra.items():
            handle.create_dataset(name, data=array)


def test_precomputed_backbone_copies_rows_by_image_content(tmp_path):
    manifest = _images(tmp_path / "images", 4)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    keys = [_sha(Path(p)) for p in manifest["path"]]
    order = [2, 0, 3, 1]  # the table's rows in another order, plus a row no image uses
    features = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    parts = np.arange(5 * 2, dtype=np.float32).reshape(5, 2) + 100
    _write_table(tmp_path / "table.h5", [keys[i] for i in order] + ["0" * 64], features, {"parts": parts})
    entry = {"name": "pre", "source": "precomputed", "id": str(tmp_path / "table.h5"), "extra_outputs": ["parts"]}
    extract(entry, tmp_path / "manifest.csv", tmp_path / "out.h5")
    with h5py.File(tmp_path / "out.h5", "r") as handle:
        assert [i.decode() for i in handle["ids"][:]] == manifest["image_id"].tolist()
        where = [order.index(i) for i in range(4)]
        assert np.array_equal(handle["features"][:], features[where])
        assert np.array_equal(handle["parts"][:], parts[where])
        assert handle.attrs["source"] == "precomputed" and handle.attrs["backbone"] == "pre"


def test_precomputed_backbone_names_a_missing_image_and_a_missing_dataset(tmp_path):
    manifest = _images(tmp_path / "images", 3)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    keys = [_sha(Path(p)) for p in manifest["path"]]
    _write_table(tmp_path / "table.h5", keys[:2], np.zeros((2, 3), np.float32), {})
    entry = {"name": "pre", "source": "precomputed", "id": str(tmp_path / "table.h5")}
    with pytest.raises(DataContractError, match=r"img2\.png"):
        extract(entry, tmp_path / "manifest.csv", tmp_path / "out.h5")
    with pytest.raises(DataContractError, match=r"no dataset\(s\) \['parts'\]"):
        extract({**entry, "extra_outputs": ["parts"]}, tmp_path / "manifest.csv", tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


# ----------------------------------------------------------------------------------------------- shuffle


def test_shuffled_functions_keep_their_values_but_lose_their_images(tmp_path):
    rng = np.random.default_rng(0)
    n, k, d_sae = 200, 3, 12
    indices = np.sort(np.stack([rng.choice(d_sae, k, replace=False) for _ in range(n)]), axis=1)
    values = rng.random((n, k)).astype(np.float32) + 0.1
    ids = [f"im{i}" for i in range(n)]
    write_codes(tmp_path / "parent.h5", ids, indices, values, d_sae, min_nonzero=5, sl=8, provenance={})
    order = write_shuffled(tmp_path / "parent.h5", tmp_path / "train.h5", seed=1, split="train")
    parent, shuffled = read_codes(tmp_path / "parent.h5"), read_codes(tmp_path / "train.h5")
    assert shuffled.ids == parent.ids  # aligned with the same feature rows
    assert np.array_equal(shuffled.indices, parent.indices[order])
    assert np.array_equal(shuffled.values, parent.values[order])
    for key in ("latent_id", "nnz", "mean", "std"):
        assert np.array_equal(getattr(shuffled, key), getattr(parent, key))
    assert (order != np.arange(n)).mean() > 0.9
    again = write_shuffled(tmp_path / "parent.h5", tmp_path / "again.h5", seed=1, split="train")
    other = write_shuffled(tmp_path / "parent.h5", tmp_path / "val.h5", seed=1, split="val")
    assert np.array_equal(again, order) and not np.array_equal(other, order)


# ----------------------------------------------------------------------------------------------- config


@pytest.fixture
def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def test_variants_train_on_their_backbones_only(demo_config):
    assert variant_backbones(demo_config, "planted") == ["planted"]
    assert variant_backbones(demo_config, "main") == ["vit_tiny", "effnet_lite0"]
    config = copy.deepcopy(demo_config)
    del config["variants"]["main"]["backbones"]
    assert variant_backbones(config, "main") == list(config["backbones"])


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["variants"]["planted"].update(backbones=["plantd"]), r"variants\.planted\.backbones: unknown backbone"),
    (lambda c: c["function_sets"]["planted"]["source"].update(output="factorz"),
     r"function_sets\.planted\.source\.output: backbone 'planted' has no output 'factorz'"),
    (lambda c: c["function_sets"]["shuffled"].update(parent="nope"), r"function_sets\.shuffled\.parent: unknown"),
    (lambda c: c["function_sets"]["shuffled"].pop("seed"), r"function_sets\.shuffled: method 'shuffle' needs"),
])
def test_planted_config_errors_name_the_key(demo_config, edit, message):
    edit(demo_config)
    with pytest.raises(ConfigError, match=message):
        check(demo_config)


def test_demo_summary_json_is_readable(planted):
    root, summary = planted
    assert json.loads((root / "planted" / "planted.json").read_text())["expected"] == summary["expected"]


# ----------------------------------------------------------------------------------------------- effect table


def _results(root: Path, acc: dict[str, float]) -> None:
    """A minimal results tree: every table the effect table reads, one backbone `pb`, accuracies from `acc`."""
    variants = list(acc)
    def frame(**columns):
        return pd.DataFrame({"backbone": "pb", "variant": variants, **columns})
    (root / "alignment").mkdir(parents=True)
    (root / "downstream").mkdir()
    for bench in ("things_ooo", "levels_ooo", "category_learning", "reward_learning"):
        metric = "zero_shot_acc" if "ooo" in bench else "acc"
        frame(**{metric: list(acc.values()), "n_trials": 1000}).to_csv(root / "alignment" / f"{bench}.csv")
        stats_rows = []
        for v in variants[1:]:
            for model, value in (("base", 0.1), (v, 0.1 + acc[v] - acc["base"])):
                stats_rows.append({"backbone": "pb", "subset": "all", "comparison": f"{v}_vs_base", "model": model,
                                   "r2_participant_mean": value, "r2_participant_sem": 0.01,
                                   "pxp": 0.99 if value == max(0.1, 0.1 + acc[v] - acc["base"]) else 0.01})
        pd.DataFrame(stats_rows).to_csv(root / "alignment" / f"{bench}_stats.csv")
    frame(imagenet_a_top1=list(acc.values()), n_imagenet_a=1000).to_csv(root / "downstream" / "imagenet_a.csv")
    frame(t1_target_acc=list(acc.values()), n_t1_target_test=1000, mean_target_acc=0.5,
          t1_source_acc=list(acc.values()), n_t1_source_test=200).to_csv(root / "downstream" / "breeds.csv")
    (root / "downstream" / "breeds_splits.json").write_text(json.dumps({"tasks": {"t1": {"superclasses": ["a", "b"]}}}))
    (root / "downstream" / "shape_bias" / "pb").mkdir(parents=True)
    (root / "downstream" / "shape_bias" / "pb" / "base.json").write_text(json.dumps(
        {"n_shape": 30, "n_texture": 20, "n_conflict": 56, "categories": {c: [c] for c in "abcdefgh"}}))
    frame(mean_5shot=list(acc.values()), a_5shot_sd=0.0, b_5shot_sd=0.0).to_csv(root / "downstream" / "fewshot.csv")


def test_effect_table_margins_and_verdicts(tmp_path):
    from metalign.demo.effect import effect_table

    _results(tmp_path, {"base": 0.5, "good": 0.6, "ctrl": 0.45})
    table = effect_table(tmp_path, "pb", "good", ["ctrl"], level=0.99).set_index(["family", "variant", "metric"])
    row = table.loc[("things_ooo", "good", "zero_shot_acc")]
    z = 2.5758293035489
    assert row["margin"] == pytest.approx(z * np.sqrt(0.5 * 0.5 / 1000 + 0.6 * 0.4 / 1000))
    assert row["gain"] == pytest.approx(0.1) and row["expected"] == "gain" and row["verdict"] == "pass"
    assert table.loc[("things_ooo", "ctrl", "zero_shot_acc"), "verdict"] == "pass"  # a loss is no gain
    r2 = table.loc[("things_ooo_r2", "good", "mcfadden_r2 (participant mean)")]
    assert r2["margin"] == pytest.approx(z * np.hypot(0.01, 0.01)) and r2["verdict"] == "pass"
    assert table.loc[("things_ooo_r2", "good", "bms_pxp (meta vs base)"), "verdict"] == "pass"
    assert table.loc[("category_learning", "good", "acc"), "expected"] == "no loss"
    assert table.loc[("category_learning_r2", "good", "bms_pxp (meta vs base)"), "expected"] == "pxp > 0.95"
    assert table.loc[("breeds_t1", "good", "t1_target_acc"), "expected"] == "reported"
    assert table.loc[("breeds_t1", "ctrl", "t1_target_acc"), "expected"] == "none"
    source = table.loc[("labels", "base", "breeds t1 source accuracy")]   # base 0.5 on 2 superclasses: chance
    assert source["base"] == 0.5 and source["meta"] == 0.5 and source["expected"] == "above chance"
    cue = table.loc[("labels", "base", "cue-conflict decisions that follow shape or texture")]
    assert cue["meta"] == pytest.approx(50 / 56) and cue["base"] == pytest.approx(2 / 8)
    assert cue["margin"] == pytest.approx(z * np.sqrt((50 / 56) * (6 / 56) / 56 + 0.25 * 0.75 / 56))
    assert source["verdict"] == "FAIL" and cue["verdict"] == "pass"
    assert (table.drop(index=("labels", "base", "breeds t1 source accuracy"))["verdict"] == "pass").all()

    # a control that gains beyond the noise, and a planted variant that does not, both fail
    flipped = tmp_path / "flipped"
    _results(flipped, {"base": 0.5, "good": 0.51, "ctrl": 0.6})
    table = effect_table(flipped, "pb", "good", ["ctrl"]).set_index(["family", "variant", "metric"])
    assert table.loc[("things_ooo", "good", "zero_shot_acc"), "verdict"] == "FAIL"
    assert table.loc[("things_ooo", "ctrl", "zero_shot_acc"), "verdict"] == "FAIL"
    assert table.loc[("levels_ooo_r2", "ctrl", "bms_pxp (meta vs base)"), "verdict"] == "FAIL"
