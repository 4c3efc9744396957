"""Category and reward learning: the fast online learners equal naive scikit-learn refits at every trial, the
choice model and its options (leave-one-out scoring, hierarchical temperatures, scaled bounds), C selection (the
docs/methods.md P-25 causal variant, log-loss CV, the smallest-C count), file contracts, recovery on simulated
sessions and real-data checks through the readers."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_expit
from sklearn.linear_model import BayesianRidge, LogisticRegression
from sklearn.model_selection import GridSearchCV
from threadpoolctl import threadpool_limits

from metalign.behaviour import cli as behaviour_cli
from metalign.behaviour import learning as lr
from metalign.demo.learning import simulate_category, simulate_reward, synthetic_images
from metalign.io import DataContractError, write_h5
from tests.conftest import SHARED

REAL = SHARED / "realdata"
SPOSE = REAL / "demircan_category_learning_task" / "spose_embedding_49d_sorted.txt"
DECISIONS = REAL / "thingsdecisions" / "data" / "behavioural_data_14.csv"
REWARD_SCHEDULES = REAL / "demircan_reward_learning_task" / "condition_files"


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


def _scored(values: list[np.ndarray], choices: list[np.ndarray], **options: str) -> tuple[pd.DataFrame, dict]:
    """score_sessions on given per-participant values and choices (learner_correct against the choices)."""
    table = pd.DataFrame({"participant": np.repeat([f"p{i:02d}" for i in range(len(values))], [len(v) for v in values]),
                          "choice": np.concatenate(choices)})
    starts = np.cumsum([0] + [len(v) for v in values])
    sessions = [lr.Session(np.arange(a, b), v, {}) for a, b, v in zip(starts, starts[1:], values)]
    return lr.score_sessions(table, sessions, table["choice"].to_numpy(), **options)


def test_loo_scoring_equals_hand_computed_leave_one_out():
    rng = np.random.default_rng(12)
    values = rng.normal(0, 1.5, size=(9, 2))
    choice = (values[:, 1] > values[:, 0]).astype(np.int64)
    choice[[2, 5]] = 1 - choice[[2, 5]]                                   # two choices against the values
    margins = lr.choice_margins(values, choice)
    assert {(np.delete(margins, i) > 0).all() for i in range(9)} == {False}      # no left-out set is separable
    hand = []
    for i in range(9):
        rest_v, rest_c = np.delete(values, i, axis=0), np.delete(choice, i)
        fit = minimize_scalar(lambda lt, v, c: lr.choice_nll(lt, v, c)[0].sum(), args=(rest_v, rest_c),
                              bounds=lr.LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-10})
        hand.append(lr.choice_nll(fit.x, values[i:i + 1], choice[i:i + 1])[0][0])
    loo, loo_summary = _scored([values], [choice], scoring="loo")
    np.testing.assert_allclose(loo["nll"], hand, rtol=0, atol=1e-7)
    in_sample, summary = _scored([values], [choice])                           # the study's default
    assert summary["scoring"] == "in_sample" and loo_summary["scoring"] == "loo"
    assert loo["nll"].mean() > in_sample["nll"].mean() + 0.05                  # out of sample costs likelihood
    assert loo_summary["participants"]["p00"]["log_t"] == summary["participants"]["p00"]["log_t"]


def test_hierarchical_temperatures_shrink_toward_group_mean():
    rng = np.random.default_rng(13)
    values, choices = [], []
    for temperature in (3.0, 6.0, 10.0, 20.0, 40.0, 5.0, 12.0, 8.0):
        v = rng.uniform(0, 100, size=(25, 2))                                # reward units, few trials each
        values.append(v)
        choices.append((rng.random(25) < 1 / (1 + np.exp(-(v[:, 1] - v[:, 0]) / temperature))).astype(np.int64))
    _, individual = _scored(values, choices, t_bounds="scaled")
    per_trial, pooled = _scored(values, choices, temperature="hierarchical")
    mean = pooled["beta_mean"]
    solo = np.array([math.exp(-p["log_t"]) for p in individual["participants"].values()])
    shrunk = np.array([p["beta"] for p in pooled["participants"].values()])
    assert 0 < pooled["beta_sd"] < np.std(solo) and np.std(shrunk) < np.std(solo)
    assert (np.abs(shrunk - mean) < np.abs(solo - mean)).all()                # every β moves toward the group mean
    for v, c, beta in zip(values, choices, shrunk):                         # conditional mode given (μ, τ)
        a = lr.choice_margins(v, c)
        stationarity = (a / (1 + np.exp(beta * a))).sum() - (beta - mean) / pooled["beta_sd"] ** 2
        assert abs(stationarity) < 1e-6 * np.abs(a).sum()
    np.testing.assert_allclose(per_trial["nll"], -log_expit(np.repeat(shrunk, 25) * np.concatenate(
        [lr.choice_margins(v, c) for v, c in zip(values, choices)])), atol=1e-12)
    loo, _ = _scored(values, choices, temperature="hierarchical", scoring="loo")
    assert loo["nll"].mean() > per_trial["nll"].mean()


def test_scaled_t_bound_is_not_binding_for_near_random_participant():
    rng = np.random.default_rng(14)
    values = rng.uniform(0, 100, size=(150, 2))                               # reward units
    choice = (rng.random(150) < 1 / (1 + np.exp(-(values[:, 1] - values[:, 0]) / 400.0))).astype(np.int64)
    per_trial, study = _scored([values], [choice])
    assert study["t_bounds"] == "study" and study["participants"]["p00"]["log_t"] == pytest.approx(4.6)
    assert study["n_log_t_at_bound"] == 1
    scaled_trials, scaled = _scored([values], [choice], t_bounds="scaled")
    lower, upper = lr.log_t_bounds(values, "scaled")
    log_t = scaled["participants"]["p00"]["log_t"]
    rms = math.sqrt(np.mean((values[:, 1] - values[:, 0]) ** 2))
    assert (lower, upper) == pytest.approx((-4.6 + math.log(rms), 4.6 + math.log(rms)))
    assert scaled["n_log_t_at_bound"] == 0 and 4.6 < log_t < upper - 1
    unbounded = minimize_scalar(lambda lt: lr.choice_nll(lt, values, choice)[0].sum(), bounds=(0, 20),
                                method="bounded", options={"xatol": 1e-8}).x
    assert log_t == pytest.approx(unbounded, abs=1e-3)
    assert scaled_trials["nll"].sum() < per_trial["nll"].sum()
    assert lr.log_t_bounds(np.zeros((3, 2)), "scaled") == lr.LOG_T_BOUNDS   # flat values: the study's bounds


def test_smallest_c_is_counted_and_logloss_cv_avoids_it():
    """On a 1-d threshold task every C is perfectly accurate in CV (the tiny-C fit is a class-centroid rule), so the
    study's accuracy CV picks C = 1e-4; that online learner only predicts the majority label seen so far."""
    x = np.linspace(0, 1, 60)[np.random.default_rng(15).permutation(60)][:, None] + 0.5
    y = (x[:, 0] > 1.0).astype(np.int64)
    z, _ = lr.span_coordinates(x)
    assert lr.choose_c(z, y) == lr.C_GRID[0] and lr.choose_c(z, y, scoring="log_loss") > 1.0
    informative = np.random.default_rng(16).normal(size=(60, 3))
    table = pd.DataFrame({"participant": np.repeat(["a", "b"], 60), "image": [f"i{k}" for k in range(120)],
                          "choice": np.concatenate([y, (informative[:, 0] > 0).astype(int)]),
                          "true_category_binary": np.concatenate([y, (informative[:, 0] > 0).astype(int)])})
    features = np.vstack([np.hstack([x, np.zeros((60, 2))]), informative])
    ids = table["image"].tolist()
    per_trial, study = lr.evaluate_category(table, features, ids)
    assert study["c_selection"] == "cv" and study["n_sessions_smallest_c"] == 1
    assert study["participants"]["a"]["C"] == lr.C_GRID[0] != study["participants"]["b"]["C"]
    fixed_trials, fixed = lr.evaluate_category(table, features, ids, c_selection="cv_logloss")
    assert fixed["n_sessions_smallest_c"] == 0
    late = lambda frame: frame[(frame["subject_id"] == "a") & (frame["trial"] >= 40)]["learner_correct"].mean()
    assert late(per_trial) < 0.6 and late(fixed_trials) > 0.95
    with pytest.raises(ValueError, match="c_selection"):
        lr.evaluate_category(table, features, ids, c_selection="floor")


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
        extra = (["--c-selection", "causal"] if task == "category"
                 else ["--scoring", "loo", "--temperature", "hierarchical"])
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
    category_summary = json.loads((tmp_path / "category" / "s.json").read_text())
    assert category_summary["c_selection"] == "causal" and category_summary["scoring"] == "in_sample"
    # reference per participant: the prequential C path (docs/methods.md P-25) over online learners of every grid C,
    # and log T minimising the mean NLL of softmax(values / T) within the study's bounds |log T| <= 4.6
    features = images.features().astype(np.float32).astype(np.float64)  # as stored in f.h5
    row_of = {image_id: i for i, image_id in enumerate(images.image_ids)}
    trials = pd.read_parquet(tmp_path / "category" / "t.parquet").sort_values("trial")
    smallest, at_bound = 0, 0
    for participant, session in category.groupby("participant", sort=True):
        x = features[[row_of[path.split("stimuli/")[1]] for path in session["image"]]]
        y = session["true_category_binary"].to_numpy()
        scored = np.stack([lr.online_logistic(x, y, c)[np.arange(len(y)), y] for c in lr.C_GRID])
        past = np.cumsum(np.concatenate([np.zeros((len(lr.C_GRID), 1)), scored[:, :-1]], axis=1), axis=1)
        c_path = lr.C_GRID[np.argmax(past, axis=0)]  # first maximum: ties go to the smallest C
        recorded = category_summary["participants"][participant]
        np.testing.assert_array_equal(recorded["C"], c_path)
        smallest += int(c_path[-1] == lr.C_GRID[0])
        mine = trials[trials["subject_id"] == participant]
        values = mine[["value0", "value1"]].to_numpy()
        chosen = category["choice"].to_numpy()[mine["trial"]]

        def mean_nll(log_t: float) -> float:
            scaled = values * math.exp(-log_t)
            return float(np.mean(np.logaddexp(scaled[:, 0], scaled[:, 1]) - scaled[np.arange(len(scaled)), chosen]))

        log_t = minimize_scalar(mean_nll, bounds=(-4.6, 4.6), method="bounded", options={"xatol": 1e-9}).x
        assert recorded["log_t"] == pytest.approx(log_t, abs=1e-3)
        at_bound += int(4.6 - abs(log_t) < 1e-3)
    assert category_summary["n_sessions_smallest_c"] == smallest
    assert category_summary["n_log_t_at_bound"] == at_bound

    reward_summary = json.loads((tmp_path / "reward" / "s.json").read_text())
    assert (reward_summary["scoring"], reward_summary["temperature"]) == ("loo", "hierarchical")
    # reference: the Laplace-approximated marginal likelihood of β_p ~ N(μ, τ²), P(choice) = σ(β_p a) (docs/methods.md)
    trials = pd.read_parquet(tmp_path / "reward" / "t.parquet")
    signed = np.where(reward["choice"].to_numpy()[trials["trial"]] == 1, 1.0, -1.0)
    margin = signed * (trials["value1"] - trials["value0"]).to_numpy()
    margins = [margin[(trials["subject_id"] == p).to_numpy()] for p in sorted(set(trials["subject_id"]))]

    def negative_log_marginal(mu: float, tau: float) -> float:
        total = 0.0
        for a in margins:
            reach = tau ** 2 * np.abs(a).sum() * 1.01  # the conditional mode lies within τ²·Σ|a| of μ
            penalised = lambda b: -log_expit(b * a).sum() + 0.5 * (b - mu) ** 2 / tau ** 2  # noqa: E731
            b = minimize_scalar(penalised, bounds=(mu - reach, mu + reach), method="bounded",
                                options={"xatol": 1e-12 * reach}).x
            p = 1 / (1 + np.exp(-b * a))
            total += penalised(b) + 0.5 * math.log1p((a ** 2 * p * (1 - p)).sum() * tau ** 2)
        return total

    everyone = np.concatenate(margins)
    pooled = minimize_scalar(lambda b: -log_expit(b * everyone).sum(), bounds=(-10, 10), method="bounded",
                             options={"xatol": 1e-12}).x
    # one simulated temperature for all: the marginal likelihood grows as τ → 0, where it is the pooled likelihood
    limit = -log_expit(pooled * everyone).sum()
    mean, sd = reward_summary["beta_mean"], reward_summary["beta_sd"]
    assert negative_log_marginal(pooled, 0.1 * pooled) > negative_log_marginal(pooled, 0.01 * pooled) > limit
    assert negative_log_marginal(mean, sd) == pytest.approx(limit, abs=1e-5)
    assert mean == pytest.approx(pooled, rel=1e-4) and 0 < sd < 0.01 * mean
    betas = [p["beta"] for p in reward_summary["participants"].values()]
    np.testing.assert_allclose(betas, mean, rtol=1e-2)


# --------------------------------------------------------------------------------------------- real data


def _cli_summary(tmp_path, command: str, table, features, *options: str) -> dict:
    """Run `command` like a user and return its summary JSON."""
    parser = argparse.ArgumentParser()
    behaviour_cli.register(parser.add_subparsers())
    out = tmp_path / "_".join([command, *options]).replace("-", "")
    args = parser.parse_args([command, "--table", str(table), "--features", str(features), "--label", "spose",
                              *options, "--out-trials", str(out / "t.parquet"), "--out-summary", str(out / "s.json")])
    args.func(args)
    return json.loads((out / "s.json").read_text())


@pytest.mark.skipif(not (DECISIONS.exists() and SPOSE.exists()), reason="THINGSDecisions data not present")
def test_thingsdecisions_reward_choices_with_spose49(tmp_path):
    """THINGSDecisions (25 × 150 real choices) converted to the documented reward_learning.csv and evaluated through
    the reader and the CLI: the study's choice model, and the published one (hierarchical, leave-one-trial-out)."""
    raw = pd.read_csv(DECISIONS)
    pd.DataFrame({"participant": raw["participant_n"], "left_image": raw["ImageLeft"], "right_image": raw["ImageRight"],
                  "left_reward": raw["RewardLeft"], "right_reward": raw["RewardRight"],
                  "choice": raw["rightChoice"]}).to_csv(tmp_path / "reward_learning.csv", index=False)
    table = lr.read_reward(tmp_path / "reward_learning.csv")
    unequal = table["left_reward"] != table["right_reward"]
    higher = (table["choice"] == (table["right_reward"] > table["left_reward"]))[unequal]
    assert higher.mean() == pytest.approx(0.743, abs=0.001)                   # the column mapping (docs/methods.md §9.4)
    ids = [f"{u}.png" for u in pd.read_csv(SPOSE.parent / "unique_id.csv")["id"]]   # images are stimuli/<id>.png
    write_h5(tmp_path / "spose.h5", {"features": np.loadtxt(SPOSE)}, ids, {"source": "SPoSE 49-d"})
    study = _cli_summary(tmp_path, "evaluate-reward", tmp_path / "reward_learning.csv", tmp_path / "spose.h5")
    assert study["n_participants"] == 25 and study["n_trials"] == 3750 and study["learner_acc"] > 0.9
    assert study["scoring"] == "in_sample" and 0.28 < study["mcfadden_r2"] < 0.30
    assert study["n_log_t_at_bound"] == 1                     # a near-random participant sits at log T = 4.6
    published = _cli_summary(tmp_path, "evaluate-reward", tmp_path / "reward_learning.csv", tmp_path / "spose.h5",
                             "--scoring", "loo", "--temperature", "hierarchical")
    # published Linear learner, glmer random slopes, leave-one-trial-out: pseudo-R² 0.2792 (results/r2_original.csv)
    assert published["mcfadden_r2"] == pytest.approx(0.2792, abs=0.005)
    assert published["mcfadden_r2"] < study["mcfadden_r2"]


def _concept_rows(keys: list[str]) -> list[int]:
    """The SPoSE-49d row of each THINGS image key `<concept>/<file>` (the embedding's rows follow unique_id.csv)."""
    concept = {c: i for i, c in enumerate(pd.read_csv(SPOSE.parent / "unique_id.csv")["id"])}
    return [concept[k.split("/")[0]] for k in keys]


@pytest.mark.skipif(not SPOSE.exists(), reason="category-learning schedules not present")
def test_category_schedules_are_learnable_from_spose49(tmp_path):
    """Real schedules (the human responses are not public: choices = true labels) in the documented
    category_learning.csv, through the reader. Schedule 1 is one where the study's CV picks C = 1e-4."""
    task = SPOSE.parent
    rows = []
    for number in (1, 2, 3, 400, 800, 1050):
        for trial in json.loads((task / "condition_files" / f"{number}.json").read_text()):
            label = int(trial["true_category"] == "Julty")
            rows.append({"participant": f"p{number}", "image": trial["stimulus"], "choice": label,
                         "true_category_binary": label})
    pd.DataFrame(rows).to_csv(tmp_path / "category_learning.csv", index=False)
    table = lr.read_category(tmp_path / "category_learning.csv")
    keys = sorted(set(table["image"].map(lr.image_key)))
    features = np.loadtxt(SPOSE)[_concept_rows(keys)]

    def late(per_trial: pd.DataFrame) -> pd.Series:
        late_trials = per_trial[per_trial.groupby("participant").cumcount() >= 90]
        return late_trials.groupby("subject_id")["learner_correct"].mean()

    study_trials, study = lr.evaluate_category(table, features, keys)
    assert study["n_sessions_smallest_c"] == 1 and study["participants"]["p1"]["C"] == lr.C_GRID[0]
    assert late(study_trials)["p1"] < 0.6 and late(study_trials).drop("p1").min() >= 0.9
    fixed_trials, fixed = lr.evaluate_category(table, features, keys, c_selection="cv_logloss")
    assert fixed["n_sessions_smallest_c"] == 0 and late(fixed_trials).min() >= 0.8


@pytest.mark.skipif(not (REWARD_SCHEDULES.exists() and SPOSE.exists()), reason="reward-learning schedules not present")
def test_reward_schedules_are_learnable_from_spose49_and_not_from_noise(tmp_path):
    """Real reward-learning schedules (one per reward dimension 0, 1, 2, twice; the human choices are not public:
    choice = the better arm) in the documented reward_learning.csv, through the reader. Each schedule's rewards are a
    rescaling of one SPoSE-49d dimension of the arm's concept, so the Bayesian-ridge learner on SPoSE-49d finds the
    better arm in late trials, while on random 49-d features per concept it stays near chance."""
    rows = []
    for number in (1, 2, 3, 80, 160, 240):
        schedule = pd.read_json(REWARD_SCHEDULES / f"{number}.json")
        rows += [{"participant": f"p{number}", "left_image": t.arm_0_image, "right_image": t.arm_1_image,
                  "left_reward": t.arm_0_reward, "right_reward": t.arm_1_reward,
                  "choice": int(t.arm_1_reward > t.arm_0_reward)} for t in schedule.itertuples()]
    pd.DataFrame(rows).to_csv(tmp_path / "reward_learning.csv", index=False)
    table = lr.read_reward(tmp_path / "reward_learning.csv")
    keys = sorted(set(table["left_image"].map(lr.image_key)) | set(table["right_image"].map(lr.image_key)))
    rows_of_keys, spose = _concept_rows(keys), np.loadtxt(SPOSE)

    def late(features: np.ndarray) -> tuple[pd.Series, dict]:
        per_trial, summary = lr.evaluate_reward(table, features[rows_of_keys], keys)
        late_trials = per_trial[per_trial.groupby("participant").cumcount() >= 40]   # the last 20 of 60 trials
        return late_trials.groupby("subject_id")["learner_correct"].mean(), summary

    learnt, summary = late(spose)
    assert len(table) == 360 and learnt.min() >= 0.9 and summary["learner_acc"] > 0.9   # measured: 0.95-1, 0.953
    noise, control = late(np.random.default_rng(0).standard_normal(spose.shape))
    assert noise.max() <= 0.75 and control["learner_acc"] < 0.6                       # measured: 0.4-0.65, 0.519
    assert summary["mcfadden_r2"] > 0.7 > 0.05 > control["mcfadden_r2"]
