"""THINGS odd-one-out: logits, choice model, cross-validation, recovery, noise ceiling, data contracts, CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold

from metalign.behaviour import choice_model as cm
from metalign.behaviour import cli as behaviour_cli
from metalign.behaviour import odd_one_out as ooo
from metalign.io import DataContractError, write_h5

# --------------------------------------------------------------------------------------------- helpers


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)


def _random_triplets(rng: np.random.Generator, n_concepts: int, n: int) -> np.ndarray:
    return np.argsort(rng.random((n, n_concepts)), axis=1)[:, :3]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _simulate(rep: np.ndarray, n_participants: int, n_trials: int, seed: int, bias_sd: float = 0.02):
    """Participants choose by softmax((cosine logits + bias) / T_p) of a planted representation."""
    rng = np.random.default_rng(seed)
    participant = np.repeat(np.arange(n_participants), n_trials)
    rng.shuffle(participant)                                    # interleaved, as in the real file
    ijk = _random_triplets(rng, len(rep), len(participant))
    log_t = rng.uniform(-3.0, -1.5, n_participants)
    bias = np.zeros((n_participants, 3))
    bias[:, [0, 2]] = rng.normal(0.0, bias_sd, (n_participants, 2))
    params = np.column_stack([log_t, bias[:, 0], bias[:, 2]])
    logits = ooo.triplet_logits(rep, *ijk.T)
    prob = _softmax((logits + bias[participant]) / np.exp(log_t)[participant, None])
    choice = np.minimum((rng.random(len(prob))[:, None] > np.cumsum(prob, axis=1)).sum(axis=1), 2)
    triplets = pd.DataFrame({"participant": participant, "i": ijk[:, 0], "j": ijk[:, 1], "k": ijk[:, 2],
                             "choice": choice})
    return triplets, prob, params


def _planted(seed: int = 0, n_concepts: int = 80, dim: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_concepts, dim)) ** 2              # non-negative, SPoSE-like


# --------------------------------------------------------------------------------------------- logits, NLL


@pytest.mark.parametrize("gram_rows", [4096, 0])                # Gram-matrix path and row-gather path
def test_logits_and_zero_shot_match_naive_loop(monkeypatch, gram_rows):
    monkeypatch.setattr(ooo, "_GRAM_MAX_ROWS", gram_rows)
    rng = np.random.default_rng(1)
    rep = rng.normal(size=(25, 7))
    rep[3] = 0.0                                                # zero row: cosine 0
    ijk = _random_triplets(rng, 25, 400)
    choice = rng.integers(0, 3, 400)
    logits = ooo.triplet_logits(rep, *ijk.T)
    naive = np.array([[_cos(rep[j], rep[k]), _cos(rep[i], rep[k]), _cos(rep[i], rep[j])] for i, j, k in ijk])
    np.testing.assert_allclose(logits, naive, rtol=1e-12, atol=1e-12)
    hits = [max(range(3), key=lambda p: (row[p], -p)) == c for row, c in zip(naive, choice)]
    assert ooo.zero_shot_accuracy(logits, choice) == pytest.approx(np.mean(hits), abs=1e-15)


def test_nll_of_given_parameters_matches_naive_loop():
    rng = np.random.default_rng(2)
    logits, choice = rng.uniform(-1, 1, (50, 3)), rng.integers(0, 3, 50)
    params = np.array([-1.3, 0.4, -0.7])
    temp, bias = math.exp(params[0]), (params[1], 0.0, params[2])
    naive = []
    for row, y in zip(logits, choice):
        z = [(row[c] + bias[c]) / temp for c in range(3)]
        naive.append(-(z[y] - math.log(sum(math.exp(v) for v in z))))
    logp = cm.log_probabilities(params, logits)
    np.testing.assert_allclose(-logp[np.arange(50), choice], naive, rtol=1e-12)
    assert cm.mean_nll_and_grad(params, logits, choice)[0] == pytest.approx(np.mean(naive), rel=1e-12)
    # extreme logits: log-softmax stays finite where clipped probabilities would saturate (docs/methods.md P-12)
    big = cm.log_probabilities(np.array([-4.6, 0.0, 0.0]), np.array([[1.0, -1.0, 0.0]]))
    assert np.isfinite(big).all() and big[0, 1] < -100


def _central_difference(fun, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    return np.array([(fun(x + h * e) - fun(x - h * e)) / (2 * h) for e in np.eye(len(x))])


def test_gradient_and_hessian_are_analytic_derivatives():
    rng = np.random.default_rng(3)
    logits, choice = rng.uniform(-1, 1, (80, 3)), rng.integers(0, 3, 80)
    for x in (np.array([0.3, 0.5, -0.2]), np.array([-2.5, 0.05, -0.1])):
        numeric = _central_difference(lambda p: cm.mean_nll_and_grad(p, logits, choice)[0], x)
        np.testing.assert_allclose(cm.mean_nll_and_grad(x, logits, choice)[1], numeric, rtol=1e-6, atol=1e-8)
    # batched terms: two participants x folds, against the single-fit objective on each training set
    participant = np.repeat([0, 1], 40)
    groups = cm.group_trials(participant)
    fold, k = cm.assign_folds(choice, groups, seed=0)
    folds, pooled, _ = cm._designs(logits, choice, fold, participant, k)
    params = rng.normal(0, 0.3, (int(k.sum()), 3))
    f, g, hess = cm._terms(params, folds)
    pooled_params = rng.normal(0, 0.3, (2, 3))
    pooled_terms = cm._terms(pooled_params, pooled)
    first = np.concatenate([[0], np.cumsum(k)[:-1]])
    for p in (0, 1):
        fits = [(f, g, hess, first[p] + fo, params[first[p] + fo], (participant == p) & (fold != fo))
                for fo in range(k[p])]
        fits.append((*pooled_terms, p, pooled_params[p], participant == p))
        for f_, g_, hess_, at, x, train in fits:
            single = lambda v: cm.mean_nll_and_grad(v, logits[train], choice[train])  # noqa: E731
            assert f_[at] == pytest.approx(single(x)[0], rel=1e-12)
            np.testing.assert_allclose(g_[at], single(x)[1], rtol=1e-10, atol=1e-12)
            numeric = np.array([_central_difference(lambda v: single(v)[1][r], x) for r in range(3)])
            np.testing.assert_allclose(hess_[at], numeric, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- cross-validation


def _bounded_participants(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Participants whose optima sit on bounds: one always picks the largest logit (T -> lower bound), one picks
    position 1 regardless of uninformative logits (b1 -> upper bound)."""
    logits = rng.uniform(-1, 1, (120, 3))
    perfect = logits[:60].argmax(axis=1)
    biased = np.r_[np.zeros(50, int), np.ones(5, int), np.full(5, 2)]
    return logits, np.r_[perfect, biased], np.repeat([100, 101], 60)


def test_batched_newton_matches_per_fit_lbfgsb(monkeypatch):
    triplets, _, _ = _simulate(_planted(), n_participants=6, n_trials=90, seed=4)
    logits = ooo.triplet_logits(_planted(), triplets["i"], triplets["j"], triplets["k"])
    extra_logits, extra_choice, extra_part = _bounded_participants(np.random.default_rng(5))
    logits = np.vstack([logits, extra_logits])
    choice = np.r_[triplets["choice"], extra_choice]
    participant = np.r_[triplets["participant"], extra_part]
    newton = cm.cross_validate(logits, choice, participant, n_jobs=2)
    lbfgsb = cm.cross_validate(logits, choice, participant, solver="lbfgsb")
    assert newton.converged.all() and len(newton.params) == len(lbfgsb.params) == 8 * 5
    single_thread = cm.cross_validate(logits, choice, participant, n_jobs=1)   # other chunking, same fits
    np.testing.assert_array_equal(single_thread.params, newton.params)
    monkeypatch.setattr(cm, "_SEGMENT_TRIALS", 50)                           # other segments, same fits
    np.testing.assert_array_equal(cm.cross_validate(logits, choice, participant, n_jobs=2).params, newton.params)
    # out-of-fold scores are those of log_probabilities under the trial's test-fold fit
    group_of = np.searchsorted(np.unique(participant), participant)
    fit = np.concatenate([[0], np.cumsum(newton.n_folds)[:-1]])[group_of] + newton.fold
    logp = cm.log_probabilities(newton.params[fit], logits)
    np.testing.assert_allclose(newton.nll, -logp[np.arange(len(choice)), choice], rtol=1e-12)
    np.testing.assert_array_equal(newton.correct, logp.argmax(axis=1) == choice)
    np.testing.assert_array_equal(newton.fold, lbfgsb.fold)
    interior = participant < 100                    # interior optima: both optimisers agree on every trial
    np.testing.assert_allclose(newton.nll[interior], lbfgsb.nll[interior], atol=1e-3)
    assert np.mean(np.abs(newton.nll - lbfgsb.nll)) < 1e-3
    # same bounded problem: the Newton fit is at least as good as L-BFGS-B on every training objective
    groups = cm.group_trials(participant)
    first = np.concatenate([[0], np.cumsum(newton.n_folds)[:-1]])
    for g, label in enumerate(groups.labels):
        for fo in range(newton.n_folds[g]):
            train = (participant == label) & (newton.fold != fo)
            value = [cm.mean_nll_and_grad(res.params[first[g] + fo], logits[train], choice[train])[0]
                     for res in (newton, lbfgsb)]
            assert value[0] <= value[1] + 1e-9
    bound_params = newton.params[-10:]
    assert np.all(bound_params[:5, 0] == cm.BOUNDS[0][0])           # T at its lower bound
    assert np.all(bound_params[5:, 1] == cm.BOUNDS[1][1])           # b1 at its upper bound


def test_folds_follow_sklearn_and_do_not_depend_on_the_representation():
    triplets, _, _ = _simulate(_planted(), n_participants=10, n_trials=50, seed=6)
    choice, participant = triplets["choice"].to_numpy(), triplets["participant"].to_numpy()
    other = np.random.default_rng(7).normal(size=_planted().shape)
    base, base_summary = ooo.evaluate(_planted(), triplets, seed=99)
    meta, meta_summary = ooo.evaluate(other, triplets, seed=99)
    pd.testing.assert_frame_equal(base[["participant", "trial"]], meta[["participant", "trial"]])
    assert not np.allclose(base["nll"], meta["nll"])
    fold = cm.cross_validate(ooo.triplet_logits(other, triplets["i"], triplets["j"], triplets["k"]),
                             choice, participant, seed=99).fold
    for p in range(10):
        rows = np.flatnonzero(participant == p)                      # file order within the participant
        k = min(5, np.bincount(choice[rows], minlength=3).min())
        expected = np.empty(len(rows), int)
        for f, (_, test) in enumerate(StratifiedKFold(k, shuffle=True, random_state=99).split(rows, choice[rows])):
            expected[test] = f
        np.testing.assert_array_equal(fold[rows], expected)
    assert base_summary["n_trials"] == meta_summary["n_trials"] == 500


def test_folds_match_sklearn_for_varied_participants():
    """Participants of many sizes, skewed or missing positions and K < 5, interleaved in the file."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(2, 120, 40)
    participant = rng.permutation(np.repeat(np.arange(40) * 7, sizes))
    share = rng.dirichlet(np.full(3, 0.7), 40)
    choice = np.array([rng.choice(3, p=share[p // 7]) for p in participant])
    fold, n_folds = cm.assign_folds(choice, cm.group_trials(participant), seed=5)
    for g, p in enumerate(np.unique(participant)):
        rows = np.flatnonzero(participant == p)
        counts = np.bincount(choice[rows], minlength=3)
        if (counts > 0).sum() < 2 or counts[counts > 0].min() < 2:
            assert n_folds[g] == 0 and (fold[rows] == -1).all()
            continue
        k = min(5, counts[counts > 0].min())
        expected = np.empty(len(rows), int)
        for f, (_, test) in enumerate(StratifiedKFold(k, shuffle=True, random_state=5).split(rows, choice[rows])):
            expected[test] = f
        assert n_folds[g] == k
        np.testing.assert_array_equal(fold[rows], expected)


def test_inclusion_rule_and_number_of_folds():
    choice = np.r_[[0] * 10, [0] * 6 + [1] * 1 + [2] * 5, [0] * 4 + [1] * 3 + [2] * 3, [0] * 8 + [2] * 8]
    participant = np.repeat([0, 1, 2, 3], [10, 12, 10, 16])
    groups = cm.group_trials(participant)
    fold, n_folds = cm.assign_folds(choice, groups, seed=1234)
    # one position only -> dropped; a position chosen once -> dropped; K = min(5, smallest count)
    np.testing.assert_array_equal(n_folds, [0, 0, 3, 5])
    assert np.all(fold[participant < 2] == -1)
    logits = np.random.default_rng(8).uniform(-1, 1, (len(choice), 3))
    result = cm.cross_validate(logits, choice, participant)
    assert np.isnan(result.nll[participant < 2]).all() and np.isfinite(result.nll[participant >= 2]).all()
    triplets = pd.DataFrame({"participant": participant, "i": 0, "j": 1, "k": 2, "choice": choice})
    _, summary = ooo.evaluate(np.eye(3), triplets)
    assert (summary["n_participants"], summary["n_dropped_participants"], summary["n_trials"]) == (2, 2, 26)


# --------------------------------------------------------------------------------------------- recovery


def _binomial_tolerance(p: np.ndarray) -> float:
    """3.5 standard errors of a mean of independent Bernoulli(p_t) outcomes."""
    return 3.5 * math.sqrt(np.sum(p * (1 - p))) / len(p)


def test_recovery_of_planted_embedding():
    rep = _planted()
    triplets, prob, params = _simulate(rep, n_participants=40, n_trials=300, seed=9)
    per_trial, summary = ooo.evaluate(rep, triplets)
    logits = ooo.triplet_logits(rep, triplets["i"], triplets["j"], triplets["k"])
    p_hit = prob[np.arange(len(prob)), logits.argmax(axis=1)]
    assert abs(summary["zero_shot_acc"] - p_hit.mean()) < _binomial_tolerance(p_hit)
    choice = triplets["choice"].to_numpy()
    true_nll = -np.log(prob[np.arange(len(prob)), choice]).mean()
    assert summary["cv_nll"] == pytest.approx(true_nll, abs=0.015)          # 3 parameters per ~240 trials
    assert summary["cv_nll"] > true_nll - 0.01
    assert summary["mcfadden_r2"] == pytest.approx(1 - summary["cv_nll"] / math.log(3))
    assert summary["n_participants"] == 40 and summary["n_dropped_participants"] == 0
    # fitted temperatures (on all trials of each participant) track the planted ones
    result = cm.cross_validate(logits, choice, triplets["participant"].to_numpy())
    fitted_log_t = result.params[:, 0].reshape(40, 5).mean(axis=1)
    assert np.corrcoef(fitted_log_t, params[:, 0])[0, 1] > 0.9
    assert np.median(np.abs(fitted_log_t - params[:, 0])) < 0.15

    unrelated = np.random.default_rng(10).normal(size=rep.shape) ** 2
    _, chance = ooo.evaluate(unrelated, triplets)
    third = np.full(len(triplets), 1 / 3)
    assert abs(chance["zero_shot_acc"] - 1 / 3) < _binomial_tolerance(third)
    assert chance["cv_nll"] > summary["cv_nll"] + 0.1 and abs(chance["mcfadden_r2"]) < 0.02


# --------------------------------------------------------------------------------------------- noise ceiling


def test_noise_ceiling_hand_computed():
    rows = [  # participant, i, j, k, choice
        (0, 1, 2, 3, 0), (0, 1, 2, 3, 0),                            # repeated, same choice: H = 0
        (1, 4, 5, 6, 0), (1, 4, 5, 6, 1), (1, 4, 5, 6, 2),           # H = log 3
        (1, 6, 5, 4, 1),                                             # other order: not a repeat
        (2, 1, 2, 3, 1),                                             # other participant: not a repeat
        (0, 7, 8, 9, 0), (0, 7, 8, 9, 2), (0, 7, 8, 9, 0), (0, 7, 8, 9, 2),  # H = log 2
    ]
    triplets = pd.DataFrame(rows, columns=["participant", "i", "j", "k", "choice"])
    expected = 1 - (0 + math.log(3) + math.log(2)) / 3 / math.log(3)
    assert ooo.noise_ceiling(triplets) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(ooo.noise_ceiling(triplets.drop_duplicates(["participant", "i", "j", "k"])))


# --------------------------------------------------------------------------------------------- data contracts


def _write_tsv(path, frame: pd.DataFrame) -> None:
    frame.to_csv(path, sep="\t", index=False)


def _triplet_table() -> pd.DataFrame:
    return pd.DataFrame({"subject_id": ["s9", "s9", "s2", "s2", "s9"], "image1": [1, 2, 3, 4, 5],
                         "image2": [2, 3, 4, 5, 1], "image3": [3, 4, 5, 1, 2], "choice": [1, 2, 3, 1, 2],
                         "RT": [900, 850, 700, 1200, 640]})


def test_load_triplets_converts_to_zero_based(tmp_path):
    path = tmp_path / "triplets.csv"
    _write_tsv(path, _triplet_table())
    frame = ooo.load_triplets(path, n_concepts=5)
    np.testing.assert_array_equal(frame["participant"], [1, 1, 0, 0, 1])   # sorted subject ids: s2, s9
    np.testing.assert_array_equal(frame[["i", "j", "k"]], _triplet_table()[["image1", "image2", "image3"]] - 1)
    np.testing.assert_array_equal(frame["choice"], [0, 1, 2, 0, 1])
    assert list(frame["subject_id"]) == ["s9", "s9", "s2", "s2", "s9"]


@pytest.mark.parametrize("column, row, value, needle", [
    ("image2", 3, 6, "image2"),          # beyond n_concepts
    ("image1", 1, 0, "image1"),          # 0 is not a 1-based index
    ("choice", 2, 4, "choice"),          # position beyond 3
    ("image3", 4, 2.5, "image3"),        # not an integer
])
def test_load_triplets_names_file_column_and_first_bad_row(tmp_path, column, row, value, needle):
    table = _triplet_table().astype({column: float})
    table.loc[row:, column] = value                      # the first of several bad rows is named
    path = tmp_path / "bad.csv"
    _write_tsv(path, table)
    with pytest.raises(DataContractError, match=rf"bad\.csv.*'{needle}'.*data row {row} \(line {row + 2}\)"):
        ooo.load_triplets(path, n_concepts=5)


def test_load_triplets_missing_column_and_file(tmp_path):
    path = tmp_path / "renamed.csv"
    _write_tsv(path, _triplet_table().rename(columns={"choice": "odd"}))
    with pytest.raises(DataContractError, match=r"renamed\.csv.*\['choice'\]"):
        ooo.load_triplets(path)
    comma = tmp_path / "comma.csv"
    _triplet_table().to_csv(comma, index=False)                              # not tab-separated
    with pytest.raises(DataContractError, match="comma.csv"):
        ooo.load_triplets(comma)
    with pytest.raises(DataContractError, match="absent.csv"):
        ooo.load_triplets(tmp_path / "absent.csv")


def _manifest() -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": ["b2", "a1", "b1", "c1", "a2", "a3"],
        "path": ["THINGS/bee/bee_02s.jpg", "THINGS/ant/ant_10s.jpg", "THINGS/bee/bee_01b.jpg",
                 "THINGS/cat/cat_01b.jpg", "THINGS/ant/ant_01b.jpg", "THINGS/ant/ant_02s.jpg"],
        "label": ["bee", "ant", "bee", "cat", "ant", "ant"], "split": "all"})


def test_concept_matrix_takes_first_file_per_concept_by_id():
    ids = ["c1", "a3", "b2", "a2", "b1", "a1"]                               # feature rows in another order
    features = np.arange(len(ids))[:, None] * np.ones((1, 4))
    rep, chosen = ooo.concept_matrix(features, ids, _manifest(), ["cat", "ant", "bee"])
    assert chosen == ["c1", "a2", "b1"]
    np.testing.assert_array_equal(rep[:, 0], [ids.index("c1"), ids.index("a2"), ids.index("b1")])
    with pytest.raises(DataContractError, match="'dog'"):
        ooo.concept_matrix(features, ids, _manifest(), ["cat", "dog", "ant"])
    with pytest.raises(DataContractError, match="reps.h5.*'b1'"):
        ooo.concept_matrix(features[:4], ids[:4], _manifest(), ["ant", "bee"], source="reps.h5")


# --------------------------------------------------------------------------------------------- CLI


def test_cli_writes_trials_and_summary(tmp_path):
    rep = _planted(n_concepts=30)
    concepts = [f"concept{c:02d}" for c in range(30)]
    (tmp_path / "unique_id.txt").write_text("\n".join(concepts) + "\n")
    manifest = pd.DataFrame({"image_id": [f"{c}_{n}" for c in concepts for n in (2, 1)],
                             "path": [f"THINGS/{c}/{c}_{n}.jpg" for c in concepts for n in (2, 1)],
                             "label": [c for c in concepts for _ in (2, 1)], "split": "all"})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    features = np.repeat(rep, 2, axis=0)
    features[0::2] = -features[0::2]                     # the non-chosen (second) images carry different features
    write_h5(tmp_path / "reps.h5", {"features": features.astype(np.float32)}, manifest["image_id"].tolist(),
             {"source": "test"})
    triplets, _, _ = _simulate(rep, n_participants=8, n_trials=60, seed=11)
    repeats = triplets.iloc[:40]                          # the same participant and items again: ceiling data
    table = pd.concat([triplets, repeats])
    _write_tsv(tmp_path / "triplets.csv", pd.DataFrame({
        "subject_id": "p" + table["participant"].astype(str), "image1": table["i"] + 1,
        "image2": table["j"] + 1, "image3": table["k"] + 1, "choice": table["choice"] + 1}))

    parser = argparse.ArgumentParser()
    behaviour_cli.register(parser.add_subparsers())
    args = parser.parse_args([
        "evaluate-things", "--triplets", str(tmp_path / "triplets.csv"), "--unique-ids",
        str(tmp_path / "unique_id.txt"), "--manifest", str(tmp_path / "manifest.csv"), "--features",
        str(tmp_path / "reps.h5"), "--label", "base", "--seed", "7", "--out-trials", str(tmp_path / "out/t.parquet"),
        "--out-summary", str(tmp_path / "out/s.json")])
    args.func(args)

    summary = json.loads((tmp_path / "out/s.json").read_text())
    trials = pd.read_parquet(tmp_path / "out/t.parquet")
    assert summary["label"] == "base" and summary["seed"] == 7
    assert summary["concept_image_ids"]["concept00"] == "concept00_1"
    assert summary["noise_ceiling"] == pytest.approx(ooo.noise_ceiling(ooo.load_triplets(tmp_path / "triplets.csv")))
    assert summary["mcfadden_r2_normalised"] == pytest.approx(summary["mcfadden_r2"] / summary["noise_ceiling"])
    assert len(trials) == summary["n_trials"] and trials["nll"].mean() == pytest.approx(summary["cv_nll"])
    assert summary["zero_shot_acc"] == pytest.approx(ooo.zero_shot_accuracy(
        ooo.triplet_logits(rep.astype(np.float32), table["i"], table["j"], table["k"]), table["choice"]))
    assert set(summary["inputs"]) == {"triplets", "unique_ids", "manifest", "features"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.json", "t.parquet"]   # no temporaries left
