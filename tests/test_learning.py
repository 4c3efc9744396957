"""Category and reward learning: the fast online learners equal naive scikit-learn refits at every trial, the
choice model, the docs/methods.md P-25 causal variant, file contracts, recovery on simulated sessions and real-data checks."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import BayesianRidge, LogisticRegression
from sklearn.model_selection import GridSearchCV
from threadpoolctl import threadpool_limits

from metalign.demo.learning import simulate_category, simulate_reward, synthetic_images
from metalign.behaviour import cli as behaviour_cli
from metalign.behaviour import learning as lr
from metalign.io import DataContractError, write_h5
from tests.conftest import SHARED

REAL = SHARED / "realdata"
SPOSE = REAL / "demircan_category_learning_task" / "spose_embedding_49d_sorted.txt"
DECISIONS = REAL / "thingsdecisions" / "data" / "behavioural_data_14.csv"


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """The scikit-learn references make thousands of tiny BLAS calls; threads only slow them down."""
    with threadpool_limits(limits=1):
        yield


def _problem(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 0.5
    score = x @ rng.normal(size=d) + rng.normal(0, 2, n)
    return x, (score > np.median(score)).astype(np.int64)


# --------------------------------------------------------------------------------------------- exactness


def test_span_coordinates_preserve_inner_products():
    x = np.random.default_rng(0).normal(size=(12, 40))
    z, basis = lr.span_coordinates(x)
    assert z.shape == (12, 12) and basis.shape == (40, 12)
    np.testing.assert_allclose(z @ z.T, x @ x.T, atol=1e-10)
    np.testing.assert_allclose(basis.T @ basis, np.eye(12), atol=1e-12)


def test_logistic_fit_and_c_choice_match_sklearn():
    x, y = _problem(50, 30, 1)                     # D < n and (below) D > n
    z, _ = lr.span_coordinates(x)
    for c in (1e-3, 0.5, 1e3):
        theta = lr.fit_logistic(np.hstack([z, np.ones((50, 1))]), y.astype(float), c)
        reference = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x, y)
        np.testing.assert_allclose(np.hstack([z, np.ones((50, 1))]) @ theta, reference.decision_function(x),
                                   atol=2e-5 * max(1.0, np.abs(reference.decision_function(x)).max()))
    x, y = _problem(40, 60, 2)
    search = GridSearchCV(LogisticRegression(tol=1e-8, max_iter=100_000), {"C": lr.C_GRID}, cv=5,
                          scoring="accuracy").fit(x, y)
    assert lr.choose_c(lr.span_coordinates(x)[0], y) == search.best_params_["C"]


def test_online_logistic_equals_refit_every_trial():
    x, y = _problem(45, 60, 3)
    z, _ = lr.span_coordinates(x)
    c = 0.3
    ours = np.exp(lr.online_logistic(z, y, c))
    reference = np.full((45, 2), 0.5)
    for t in range(45):
        if len(set(y[:t])) == 2:
            model = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x[:t], y[:t])
            reference[t] = model.predict_proba(x[t:t + 1])[0]
    assert np.abs(ours - reference).max() < 1e-5
    first = np.flatnonzero([len(set(y[:t])) == 2 for t in range(45)])[0]
    assert (ours[:first] == 0.5).all() and (ours[first:] != 0.5).any()
    with warnings.catch_warnings():                # upstream's settings (lbfgs, max_iter 200) stop near the optimum
        warnings.simplefilter("ignore")
        upstream = np.array([LogisticRegression(C=c, max_iter=200).fit(x[:t], y[:t]).predict_proba(x[t:t + 1])[0]
                             for t in range(first, 45)])
    assert np.abs(ours[first:] - upstream).max() < 1e-2


@pytest.mark.parametrize("n_trials, d", [(30, 8), (25, 70)])      # n > D, and D > n (span reduction)
def test_online_bayesian_ridge_equals_refit_every_trial(n_trials, d):
    rng = np.random.default_rng(4)
    left, right = rng.normal(size=(n_trials, d)), rng.normal(size=(n_trials, d))
    w = rng.normal(size=d)
    reward_left = np.round(50 + 10 * left @ w / math.sqrt(d) + rng.normal(0, 3, n_trials))
    reward_right = np.round(50 + 10 * right @ w / math.sqrt(d) + rng.normal(0, 3, n_trials))
    z, basis = lr.span_coordinates(np.vstack([left, right]))
    ours = lr.online_bayesian_ridge(z[:n_trials], z[n_trials:], reward_left, reward_right, basis)
    reference = np.zeros((n_trials, 2))
    for t in range(1, n_trials):
        x = np.empty((2 * t, d))
        x[0::2], x[1::2] = left[:t], right[:t]
        y = np.empty(2 * t)
        y[0::2], y[1::2] = reward_left[:t], reward_right[:t]
        reference[t] = BayesianRidge().fit(x, y).predict(np.stack([left[t], right[t]]))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6 * np.abs(reference).max())
    assert (ours[0] == 0).all()


# --------------------------------------------------------------------------------------------- choice model


def test_temperature_fit_gradient_and_optimum():
    rng = np.random.default_rng(5)
    values = rng.normal(0, 2, size=(200, 2))
    choice = (rng.random(200) < 1 / (1 + np.exp(-(values[:, 1] - values[:, 0]) / 0.7))).astype(int)
    nll, grad = lr.choice_nll(0.3, values, choice)
    step = 1e-6
    numeric = (lr.choice_nll(0.3 + step, values, choice)[0] - lr.choice_nll(0.3 - step, values, choice)[0]) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    log_t = lr.fit_temperature(values, choice)
    grid = np.linspace(*lr.LOG_T_BOUNDS, 2001)
    best = grid[np.argmin([lr.choice_nll(g, values, choice)[0].mean() for g in grid])]
    assert abs(log_t - best) < 0.01 and abs(log_t - math.log(0.7)) < 0.3
    assert lr.fit_temperature(np.zeros((20, 2)), np.zeros(20, int)) == pytest.approx(0.0)   # flat: stays at init


def test_causal_variant_uses_only_past_labels():
    x, y = _problem(40, 10, 6)
    z, _ = lr.span_coordinates(x)
    future = y.copy()
    future[30:] = 1 - future[30:]
    causal, c_path = lr.online_logistic_causal(z, y)
    causal_flipped, _ = lr.online_logistic_causal(z, future)
    np.testing.assert_array_equal(causal[:31], causal_flipped[:31])        # trial t sees labels < t only
    assert set(c_path) <= set(lr.C_GRID)


# --------------------------------------------------------------------------------------------- contracts


def test_read_tables_and_image_join_errors(tmp_path):
    good = pd.DataFrame({"participant": ["s1", "s1"], "image": ["x/stimuli/cat/cat_01b.jpg", "stimuli/dog/d.jpg"],
                         "choice": [0, 1], "true_category_binary": [1, 1]})
    good.to_csv(tmp_path / "cat.csv", index=False)
    assert lr.read_category(tmp_path / "cat.csv")["choice"].tolist() == [0, 1]
    assert lr.image_key("x/stimuli/cat/cat_01b.jpg") == "cat/cat_01b.jpg"
    good.assign(choice=[0, 2]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataContractError, match=r"bad\.csv: column 'choice', data row 1"):
        lr.read_category(tmp_path / "bad.csv")
    good.drop(columns="image").to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataContractError, match=r"short\.csv lacks column\(s\) \['image'\]"):
        lr.read_category(tmp_path / "short.csv")
    with pytest.raises(DataContractError, match=r"feat\.h5: 1 image\(s\) of column 'image'.*dog/d\.jpg"):
        lr.feature_rows(good["image"], ["cat/cat_01b.jpg"], "feat.h5", "image")
    pd.DataFrame({"participant": ["s"], "left_image": ["a"], "right_image": ["b"], "left_reward": ["n/a"],
                  "right_reward": [3], "choice": [1]}).to_csv(tmp_path / "rew.csv", index=False)
    with pytest.raises(DataContractError, match="'left_reward', data row 0"):
        lr.read_reward(tmp_path / "rew.csv")


# --------------------------------------------------------------------------------------------- recovery


def test_recovery_planted_features_match_simulated_participants():
    images = synthetic_images(32, 3, seed=7)
    planted = images.features()
    random = np.random.default_rng(8).normal(size=planted.shape)
    category, cat_truth = simulate_category(images, {"n_participants": 8, "n_trials": 64, "temperature": 0.6}, 9)
    reward, rew_truth = simulate_reward(images, {"n_participants": 8, "n_trials": 40, "temperature": 8.0}, 9)
    _, cat_planted = lr.evaluate_category(category, planted, images.image_ids)
    _, cat_random = lr.evaluate_category(category, random, images.image_ids)
    _, rew_planted = lr.evaluate_reward(reward, planted, images.image_ids)
    _, rew_random = lr.evaluate_reward(reward, random, images.image_ids)
    assert cat_planted["mcfadden_r2"] > cat_random["mcfadden_r2"] + 0.15
    assert rew_planted["mcfadden_r2"] > rew_random["mcfadden_r2"] + 0.3
    # the learner on the true features performs at least as well as the simulated participants it drives
    human_cat = np.mean([p["accuracy"] for p in cat_truth["participants"].values()])
    human_rew = np.mean([p["accuracy"] for p in rew_truth["participants"].values()])
    assert cat_planted["learner_acc"] >= human_cat - 0.02 and rew_planted["learner_acc"] >= human_rew - 0.02
    # the fitted temperature recovers the simulated one (reward: values are on the reward scale)
    assert abs(rew_planted["median_log_t"] - math.log(8.0)) < 0.5


def test_cli_category_and_reward(tmp_path):
    images = synthetic_images(16, 2, seed=10)
    category, _ = simulate_category(images, {"n_participants": 3, "n_trials": 30, "temperature": 0.6}, 11)
    reward, _ = simulate_reward(images, {"n_participants": 3, "n_trials": 20, "temperature": 8.0}, 11)
    category.to_csv(tmp_path / "category_learning.csv", index=False)
    reward.to_csv(tmp_path / "reward_learning.csv", index=False)
    write_h5(tmp_path / "f.h5", {"features": images.features().astype(np.float32)}, images.image_ids, {"s": 1})
    parser = argparse.ArgumentParser()
    behaviour_cli.register(parser.add_subparsers())
    for task in ("category", "reward"):
        extra = ["--c-selection", "causal"] if task == "category" else []
        args = parser.parse_args([f"evaluate-{task}", "--table", str(tmp_path / f"{task}_learning.csv"),
                                  "--features", str(tmp_path / "f.h5"), "--label", "base", *extra,
                                  "--out-trials", str(tmp_path / task / "t.parquet"),
                                  "--out-summary", str(tmp_path / task / "s.json")])
        args.func(args)
        summary = json.loads((tmp_path / task / "s.json").read_text())
        trials = pd.read_parquet(tmp_path / task / "t.parquet")
        assert summary["n_trials"] == len(trials) == len(category if task == "category" else reward)
        assert summary["mcfadden_r2"] == pytest.approx(1 - trials["nll"].mean() / math.log(2))
        assert sorted(trials["trial"]) == list(range(len(trials))) and summary["n_participants"] == 3
    assert json.loads((tmp_path / "category" / "s.json").read_text())["c_selection"] == "causal"


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (DECISIONS.exists() and SPOSE.exists()), reason="THINGSDecisions data not present")
def test_thingsdecisions_reward_choices_with_spose49():
    raw = pd.read_csv(DECISIONS)
    table = pd.DataFrame({"participant": raw["participant_n"].astype(str), "left_image": raw["ImageLeft"],
                          "right_image": raw["ImageRight"], "left_reward": raw["RewardLeft"].astype(float),
                          "right_reward": raw["RewardRight"].astype(float), "choice": raw["rightChoice"]})
    unequal = table["left_reward"] != table["right_reward"]
    higher = (table["choice"] == (table["right_reward"] > table["left_reward"]))[unequal]
    assert higher.mean() == pytest.approx(0.743, abs=0.001)                   # the column mapping (docs/methods.md §9.4)
    ids = [f"{u}.png" for u in pd.read_csv(SPOSE.parent / "unique_id.csv")["id"]]   # images are stimuli/<id>.png
    per_trial, summary = lr.evaluate_reward(table, np.loadtxt(SPOSE), ids)
    assert summary["n_participants"] == 25 and summary["n_trials"] == 3750
    # published Linear learner (leave-one-out): 0.2792; ours fits T in sample on the same features
    assert 0.25 < summary["mcfadden_r2"] < 0.33
    assert summary["learner_acc"] > 0.9


@pytest.mark.skipif(not SPOSE.exists(), reason="category-learning schedules not present")
def test_category_schedules_are_learnable_from_spose49():
    task = SPOSE.parent
    ids = pd.read_csv(task / "unique_id.csv")["id"].tolist()
    embedding = np.loadtxt(SPOSE)
    rows = []
    for number in (2, 3, 400, 800, 1050):
        for trial in json.loads((task / "condition_files" / f"{number}.json").read_text()):
            label = int(trial["true_category"] == "Julty")
            rows.append({"participant": f"p{number}", "image": trial["stimulus"], "choice": label,
                         "true_category_binary": label})
    table = pd.DataFrame(rows)
    keys = sorted(set(table["image"].map(lr.image_key)))
    concept = {c: i for i, c in enumerate(ids)}
    features = embedding[[concept[k.split("/")[0]] for k in keys]]
    per_trial, _ = lr.evaluate_category(table, features, keys)
    late = per_trial[per_trial.groupby("participant").cumcount() >= 90]
    assert late.groupby("participant")["learner_correct"].mean().median() >= 0.9
