"""Levels odd-one-out: the pickle contract, stem resolution by id without index shifts (docs/methods.md P-2), per-type scores, the
sorted-triplet noise ceiling, the CLI, and recovery of the planted embedding on simulated Levels data."""

from __future__ import annotations

import argparse
import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest

from metalign.behaviour import cli as behaviour_cli
from metalign.behaviour import levels as lv
from metalign.behaviour import odd_one_out as ooo
from metalign.demo.learning import levels_path, simulate_levels, synthetic_images
from metalign.io import DataContractError, write_h5

SPEC = {"n_participants": 16, "trials_per_participant": 150, "repeat_fraction": 0.15, "none_fraction": 0.05,
        "catch_trials": 2, "missing_image_trials": 1, "temperature": 0.12}


def _trial(a: str, b: str, c: str, selected: str, kind: str | None = "within_class", exp: str = "exp_trial") -> dict:
    return {"image1Path": a, "image2Path": b, "image3Path": c, "selected_image": selected, "exp_trial_type": exp,
            "triplet_type": kind}


def _write(path, data) -> None:
    path.write_bytes(pickle.dumps(data))


def test_load_levels_filters_and_types(tmp_path):
    data = {
        "p2": [_trial("x/n1_1.JPEG", "x/n1_2.JPEG", "y/n2_1.JPEG", "y/n2_1.JPEG", "class_border"),
               _trial("x/n1_1.JPEG", "x/n1_2.JPEG", "y/n2_1.JPEG", "x/n1_2.JPEG", None),
               _trial("x/n1_1.JPEG", "x/n1_2.JPEG", "y/n2_1.JPEG", "x/n1_2.JPEG", exp="catch_trial")],
        "p1": [_trial("a.jpg", "b.jpg", "c.jpg", "other/d.jpg"),                       # selection not among the three
               _trial("C:\\imgs\\a.jpg", "b.jpg", "c.jpg", "/elsewhere/a.png", "between_class")],
    }
    _write(tmp_path / "levels.pkl", data)
    loaded = lv.load_levels(tmp_path / "levels.pkl")
    assert (loaded.n_raw, loaded.n_not_exp, loaded.n_bad_selection) == (5, 1, 1)
    trials = loaded.trials
    assert trials["trial"].tolist() == [0, 1, 4]                    # flattened pickle order, gaps where dropped
    assert trials["subject_id"].tolist() == ["p2", "p2", "p1"] and trials["participant"].tolist() == [1, 1, 0]
    assert trials["triplet_type"].tolist() == ["class_border", "none", "between_class"]
    assert trials["choice"].tolist() == [2, 1, 0]                    # matched by stem, Windows paths too
    assert trials.loc[2, ["stem1", "stem2", "stem3"]].tolist() == ["a", "b", "c"]


@pytest.mark.parametrize("data, needle", [
    ({"p": [{"image1Path": "a"}]}, r"participant 'p', trial 0 lacks key\(s\) \['image2Path'"),
    ({"p": [_trial("a", "b", "c", "a", "odd_type")]}, r"participant 'p', trial 0 has triplet_type 'odd_type'"),
    ({"p": "not a list"}, "maps to str"),
    ([1, 2], "expected a dict"),
])
def test_load_levels_errors_name_participant_and_trial(tmp_path, data, needle):
    _write(tmp_path / "bad.pkl", data)
    with pytest.raises(DataContractError, match=needle):
        lv.load_levels(tmp_path / "bad.pkl")
    with pytest.raises(DataContractError, match="absent.pkl"):
        lv.load_levels(tmp_path / "absent.pkl")


def _manifest(stems: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"cls/{s}.JPEG" for s in stems], "path": [f"/data/cls/{s}.JPEG" for s in stems],
                         "label": "cls", "split": "levels"})


def test_missing_image_excludes_its_trials_without_shifting_others():
    trials = pd.DataFrame({"stem1": ["a", "b", "a"], "stem2": ["b", "gone", "c"], "stem3": ["c", "a", "d"]})
    ids = ["cls/d.JPEG", "cls/c.JPEG", "cls/b.JPEG", "cls/a.JPEG"]           # feature rows in another order
    full = lv.stem_rows(_manifest(["a", "b", "c", "d", "gone"]), ids + ["cls/gone.JPEG"], "m.csv")
    partial = lv.stem_rows(_manifest(["a", "b", "c", "d", "gone"]), ids, "m.csv")   # 'gone' has no feature row
    index_full, ok_full, _ = lv.resolve(trials, full)
    index, ok, missing = lv.resolve(trials, partial)
    assert ok_full.all() and ok.tolist() == [True, False, True] and missing == ["gone"]
    np.testing.assert_array_equal(index[ok], index_full[ok])            # surviving trials keep their rows
    np.testing.assert_array_equal(index[0], [3, 2, 1])                  # a, b, c by id, not by position
    with pytest.raises(DataContractError, match="stem 'a' is not unique"):
        lv.stem_rows(pd.concat([_manifest(["a"]), _manifest(["a"]).assign(image_id="other/a.JPEG")]), ids, "m.csv")


def test_levels_noise_ceiling_sorted_triplet_per_type():
    rows = [  # participant, stems, chosen stem, type
        (0, ("a", "b", "c"), "a", "within_class"), (0, ("c", "a", "b"), "a", "within_class"),    # same set: H = 0
        (0, ("d", "e", "f"), "d", "class_border"), (0, ("f", "e", "d"), "e", "class_border"),    # H = log 2
        (1, ("a", "b", "c"), "b", "within_class"),                                               # other participant
        (0, ("g", "h", "i"), "g", None), (0, ("g", "h", "i"), "h", None), (0, ("i", "h", "g"), "i", None),
    ]
    trials = pd.DataFrame({"participant": [r[0] for r in rows], "stem1": [r[1][0] for r in rows],
                           "stem2": [r[1][1] for r in rows], "stem3": [r[1][2] for r in rows],
                           "choice": [r[1].index(r[2]) for r in rows],
                           "triplet_type": [r[3] or lv.NONE_TYPE for r in rows]})
    result = lv.noise_ceiling_summary(trials)
    h = [0.0, math.log(2), math.log(3)]
    assert result["overall"] == pytest.approx(1 - np.mean(h) / math.log(3))
    assert result["by_type"] == pytest.approx({"within_class": 1.0, "class_border": 1 - math.log(2) / math.log(3),
                                               "none": 0.0})
    assert result["n_repeated_triplets"] == 3


def _frame(data: dict, folder) -> pd.DataFrame:
    _write(folder / "levels.pkl", data)
    return lv.load_levels(folder / "levels.pkl").trials


def test_per_type_scores_match_the_things_scorer(tmp_path):
    images = synthetic_images(24, 3, seed=0)
    data, _ = simulate_levels(images, {**SPEC, "n_participants": 6, "missing_image_trials": 0}, seed=1)
    path_rows = {lv.stem(levels_path(images, i)): i for i in range(len(images.image_ids))}
    frame = _frame(data, tmp_path)
    index, ok, missing = lv.resolve(frame, path_rows)
    assert ok.all() and not missing
    per_trial, summary = lv.evaluate_levels(images.features(), frame, index, seed=7)
    logits = ooo.triplet_logits(images.features(), index[:, 0], index[:, 1], index[:, 2])
    for kind in lv.TRIPLET_TYPES:
        mask = (frame["triplet_type"] == kind).to_numpy()
        assert summary[f"zero_shot_acc__{kind}"] == pytest.approx(ooo.zero_shot_accuracy(logits[mask],
                                                                                          frame["choice"][mask]))
        part = per_trial[per_trial["triplet_type"] == kind]
        assert summary[f"cv_nll__{kind}"] == pytest.approx(part["nll"].mean())
    reference, _ = ooo.evaluate(images.features(), pd.DataFrame({"participant": frame["participant"], "i": index[:, 0],
                                                                 "j": index[:, 1], "k": index[:, 2],
                                                                 "choice": frame["choice"]}), seed=7)
    np.testing.assert_allclose(per_trial["nll"], reference["nll"])
    np.testing.assert_array_equal(per_trial["trial"], frame["trial"].to_numpy()[reference["trial"]])


def test_recovery_planted_beats_random_in_every_type(tmp_path):
    images = synthetic_images(32, 3, seed=2)
    data, truth = simulate_levels(images, SPEC, seed=3)
    frame = _frame(data, tmp_path)
    rows = {lv.stem(i): r for r, i in enumerate(images.image_ids)}
    index, ok, missing = lv.resolve(frame, rows)
    assert len(missing) == SPEC["n_participants"] and (~ok).sum() == SPEC["n_participants"]   # the planted gaps
    planted_trials, planted = lv.evaluate_levels(images.features(), frame[ok].reset_index(drop=True), index[ok])
    random = np.random.default_rng(4).normal(size=images.features().shape)
    _, chance = lv.evaluate_levels(random, frame[ok].reset_index(drop=True), index[ok])
    for kind in lv.TRIPLET_TYPES:
        n = planted[f"n_triplets__{kind}"]
        expected = truth["expected_accuracy"][kind]
        assert abs(planted[f"zero_shot_acc__{kind}"] - expected) < 3.5 * math.sqrt(expected * (1 - expected) / n)
        assert planted[f"mcfadden_r2__{kind}"] > chance[f"mcfadden_r2__{kind}"] + 0.1
        assert abs(chance[f"zero_shot_acc__{kind}"] - 1 / 3) < 3.5 * math.sqrt(2 / 9 / n)
    assert planted["mcfadden_r2"] > 0.25 > 0.02 > chance["mcfadden_r2"]
    ceiling = lv.noise_ceiling_summary(frame[ok])
    assert 0 < planted["mcfadden_r2"] / ceiling["overall"] < 1.1


def test_cli_reports_missing_images_and_writes_outputs(tmp_path):
    images = synthetic_images(20, 2, seed=5)
    data, _ = simulate_levels(images, {**SPEC, "n_participants": 5, "trials_per_participant": 60}, seed=6)
    _write(tmp_path / "levels.pkl", data)
    manifest = pd.DataFrame({"image_id": images.image_ids, "path": [f"/things/{i}" for i in images.image_ids],
                             "label": [i.split("/")[0] for i in images.image_ids], "split": "things"})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    order = np.random.default_rng(0).permutation(len(images.image_ids))   # feature rows in another order
    write_h5(tmp_path / "f.h5", {"features": images.features()[order].astype(np.float32)},
             [images.image_ids[i] for i in order], {"source": "test"})
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    behaviour_cli.register(sub)
    args = parser.parse_args(["noise-ceiling", "--levels", str(tmp_path / "levels.pkl"), "--out",
                              str(tmp_path / "nc.json")])
    args.func(args)
    args = parser.parse_args(["evaluate-levels", "--levels", str(tmp_path / "levels.pkl"), "--manifest",
                              str(tmp_path / "manifest.csv"), "--features", str(tmp_path / "f.h5"), "--label", "base",
                              "--noise-ceiling", str(tmp_path / "nc.json"), "--out-trials",
                              str(tmp_path / "o/t.parquet"), "--out-summary", str(tmp_path / "o/s.json")])
    args.func(args)
    summary = json.loads((tmp_path / "o/s.json").read_text())
    trials = pd.read_parquet(tmp_path / "o/t.parquet")
    assert summary["n_excluded_missing_image"] == 5 and summary["n_missing_images"] == 5
    assert summary["missing_image_examples"][0] == "n00000000_0000"
    assert summary["n_excluded_not_exp_trial"] == 10 and summary["n_raw_trials"] == 5 * (60 + 2 + 1)
    assert summary["n_trials"] == len(trials) and set(trials.columns) >= {"participant", "trial", "nll", "correct",
                                                                        "triplet_type", "subject_id"}
    ceiling = json.loads((tmp_path / "nc.json").read_text())
    assert summary["noise_ceiling__class_border"] == pytest.approx(ceiling["by_type"]["class_border"])
    assert summary["mcfadden_r2_normalised"] == pytest.approx(summary["mcfadden_r2"] / ceiling["overall"])
