"""Group statistics: random-effects BMS against the THINGSDecisions anchors and known cases, numerical stability at
THINGS scale, Wilcoxon / pseudo-R² across participants, comparison plans, Holm correction, CLIs and the figure."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats
from scipy.special import digamma, gammainc, gammaln, logsumexp

from metalign.behaviour import cli as behaviour_cli
from metalign.behaviour import figures
from metalign.behaviour import stats as st
from metalign.io import write_h5
from tests.conftest import SHARED

DECISIONS = SHARED / "realdata" / "thingsdecisions" / "results"


def _decisions(name: str) -> np.ndarray:
    loo = pd.read_csv(DECISIONS / f"loo_{name}.csv")
    return loo.groupby("p").sum().to_numpy()            # (25 participants, 4 models) summed LOO log-likelihoods


# --------------------------------------------------------------------------------------------- BMS


@pytest.mark.skipif(not DECISIONS.exists(), reason="THINGSDecisions results not present")
def test_bms_reproduces_thingsdecisions_frequencies_and_pxp():
    evidence = _decisions("original")
    published = pd.read_csv(DECISIONS / "frequency_original.csv")
    compat = st.bms(evidence, max_iter=st.COMPAT_ITERATIONS)
    np.testing.assert_allclose(compat.frequency, published["mean"], atol=1e-4)
    np.testing.assert_allclose(compat.pxp, published["pxp"], atol=2e-5)
    assert compat.n_iter == 32 and not compat.converged
    assert compat.f1 - compat.f0 == pytest.approx(7.70, abs=0.01)                   # docs/methods.md §10
    converged = st.bms(evidence)
    assert converged.converged and 45 <= converged.n_iter <= 52                       # published: 49 iterations (docs/methods.md §10)
    assert converged.frequency[0] == pytest.approx(0.9699, abs=1e-4)
    assert converged.frequency[1] == pytest.approx(0.0104, abs=1e-4)
    resnet = st.bms(_decisions("resnet"), max_iter=st.COMPAT_ITERATIONS)
    assert resnet.frequency[0] == pytest.approx(0.9709, abs=1e-4) and resnet.pxp[0] > 0.999999
    assert resnet.f1 - resnet.f0 == pytest.approx(28.5, abs=0.05)


def _f1_groupbmc(evidence: np.ndarray, alpha: np.ndarray, alpha0: np.ndarray) -> float:
    """Free energy written as in Rigoux et al. 2014 (A20): expected log joint + entropies, an independent form."""
    u = evidence + digamma(alpha)
    g = np.exp(u - logsumexp(u, axis=1, keepdims=True))
    e_log_r = digamma(alpha) - digamma(alpha.sum())
    joint = (g * (evidence + e_log_r)).sum() + ((alpha0 - 1) * e_log_r).sum() + gammaln(alpha0.sum()) \
        - gammaln(alpha0).sum()
    entropy_g = -(g * np.log(g)).sum()
    entropy_r = gammaln(alpha).sum() - gammaln(alpha.sum()) - ((alpha - 1) * e_log_r).sum()
    return float(joint + entropy_g + entropy_r)


def test_bms_free_energies_and_known_cases():
    rng = np.random.default_rng(0)
    evidence = rng.normal(-50, 3, size=(40, 3))
    result = st.bms(evidence)
    assert result.f1 == pytest.approx(_f1_groupbmc(evidence, result.alpha, np.full(3, 1 / 3)), rel=1e-10)
    assert result.f0 == pytest.approx(float(np.sum(np.log(np.exp(evidence).mean(axis=1)))), rel=1e-12)
    assert result.bor == pytest.approx(1 / (1 + math.exp(result.f1 - result.f0)), rel=1e-10)
    np.testing.assert_allclose(result.pxp, result.ep * (1 - result.bor) + result.bor / 3)
    # identical evidence: equal frequencies, EP ½, BOR favours the null
    tie = st.bms(np.full((30, 2), -10.0))
    np.testing.assert_allclose(tie.frequency, 0.5)
    np.testing.assert_allclose(tie.ep, 0.5)
    assert tie.bor > 0.5 and tie.pxp == pytest.approx([0.5, 0.5])
    # every participant decisively prefers model 0: α → (N + ½, ½)
    decisive = st.bms(np.column_stack([np.zeros(30), np.full(30, -200.0)]))
    np.testing.assert_allclose(decisive.alpha, [30.5, 0.5], atol=1e-9)
    assert decisive.ep[0] == pytest.approx(1 - stats.beta(30.5, 0.5).cdf(0.5), rel=1e-9)


def test_exceedance_probabilities_exact_and_monte_carlo():
    alpha = np.array([4.0, 3.0, 2.5])

    def exact(i: int) -> float:   # P(r_i largest) = ∫ Gamma(α_i) pdf(x) Π_j≠i P(Gamma(α_j) < x) dx
        density = lambda x: np.exp((alpha[i] - 1) * np.log(x) - x - gammaln(alpha[i]))  # noqa: E731
        return integrate.quad(lambda x: density(x) * np.prod([gammainc(a, x) for j, a in enumerate(alpha)
                                                               if j != i]), 0, np.inf)[0]

    mc = st.exceedance_probabilities(alpha, n_samples=400_000, seed=3)
    np.testing.assert_allclose(mc, [exact(i) for i in range(3)], atol=3e-3)
    np.testing.assert_array_equal(mc, st.exceedance_probabilities(alpha, n_samples=400_000, seed=3))   # seeded
    two = st.exceedance_probabilities(np.array([12.0, 7.0]))
    assert two[0] == pytest.approx(1 - stats.beta(12, 7).cdf(0.5), rel=1e-12) and two.sum() == pytest.approx(1)


def test_bms_stable_at_things_scale():
    """12k participants with NLL sums of hundreds: F1 − F0 ≫ 709 where exp(F1 − F0) would overflow (docs/methods.md P-10)."""
    rng = np.random.default_rng(1)
    n = 12_340
    base = -rng.uniform(300, 450, n)
    evidence = np.column_stack([base + rng.normal(2.0, 3.0, n), base])
    result = st.bms(evidence)
    assert result.f1 - result.f0 > 709 and result.bor == 0.0 and np.isfinite(result.pxp).all()
    assert result.converged and result.frequency[0] > 0.6 and result.pxp[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- pairing, comparisons


def _trials(participants: int, trials: int, shift: float, seed: int, drop: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"participant": np.repeat(np.arange(participants), trials),
                          "trial": np.arange(participants * trials),
                          "nll": rng.uniform(0.4, 1.2, participants * trials) + shift,
                          "correct": rng.random(participants * trials) < 0.5,
                          "triplet_type": np.tile(["within_class", "class_border"], participants * trials // 2)})
    if drop is not None:
        frame.loc[drop, "nll"] = np.nan
    return frame


def test_paired_trials_join_by_key_and_drop_non_finite():
    a = _trials(4, 10, 0.0, 1, drop=3)
    b = _trials(4, 10, 0.1, 2).sample(frac=1.0, random_state=0)               # other row order
    paired = st.paired_trials({"meta": a, "base": b}, "triplet_type")
    assert len(paired) == 39 and 3 not in set(paired["trial"])
    row = paired.set_index("trial").loc[17]
    assert row["nll_base"] == b.set_index("trial").loc[17, "nll"] and row["nll_meta"] == a.loc[17, "nll"]
    with pytest.raises(ValueError, match="lacks column"):
        st.paired_trials({"meta": a.drop(columns="correct"), "base": b})


def test_compare_wilcoxon_and_participant_level_r2():
    a, b = _trials(12, 30, 0.0, 3), _trials(12, 30, 0.05, 4)
    paired = st.paired_trials({"meta": a, "base": b})
    rows = {r["model"]: r for r in st.compare(paired, ["meta", "base"], 3, noise_ceiling=0.5)}
    sums = paired.groupby("participant")[["nll_meta", "nll_base"]].sum()
    expected = stats.wilcoxon(sums["nll_meta"], sums["nll_base"])
    assert rows["meta"]["wilcoxon_p"] == pytest.approx(expected.pvalue)
    per_participant = 1 - sums["nll_meta"] / (30 * math.log(3))
    assert rows["meta"]["r2_participant_mean"] == pytest.approx(per_participant.mean())
    assert rows["meta"]["r2_participant_sem"] == pytest.approx(stats.sem(per_participant))   # participants, not trials
    assert rows["meta"]["r2_normalised_participant_mean"] == pytest.approx(per_participant.mean() / 0.5)
    assert rows["meta"]["r2"] == pytest.approx(1 - paired["nll_meta"].sum() / (len(paired) * math.log(3)))
    assert rows["meta"]["frequency"] + rows["base"]["frequency"] == pytest.approx(1)
    assert rows["meta"]["frequency"] > rows["base"]["frequency"]                             # meta has lower NLL
    assert rows["meta"]["n_participants"] == 12 and rows["meta"]["n_trials"] == 360


def test_comparison_plan_and_holm():
    plan = dict(st.comparison_plan(["base", "main", "wd", "mlp"], "main", {"ablation": ["main", "wd", "mlp"],
                                                                           "absent": ["main", "raw"]}))
    assert plan == {"main_vs_base": ["main", "base"], "mlp_vs_base": ["mlp", "base"], "wd_vs_base": ["wd", "base"],
                    "mlp_vs_main": ["mlp", "main"], "wd_vs_main": ["wd", "main"], "ablation": ["main", "wd", "mlp"]}
    with pytest.raises(ValueError, match="two distinct"):
        st.comparison_plan(["base", "main"], groups={"bad": ["main", "main"]})
    p = np.array([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(st.holm_adjust(p), [0.04, 0.09, 0.09, 0.5])


def test_benchmark_statistics_subsets_need_three_participants():
    tables = {("bb", "base"): _trials(5, 20, 0.0, 5), ("bb", "main"): _trials(5, 20, -0.1, 6),
              ("bb", "wd"): _trials(5, 20, -0.05, 7)}
    # only two participants have class_border trials
    for table in tables.values():
        table.loc[(table["participant"] >= 2) & (table["triplet_type"] == "class_border"), "triplet_type"] = \
            "within_class"
    frame = st.benchmark_statistics(tables, 3, {"all": 0.8, "within_class": 0.6}, "triplet_type",
                                    groups={"three": ["base", "main", "wd"]})
    assert set(frame["subset"]) == {"all", "within_class"}
    assert set(frame["comparison"]) == {"main_vs_base", "wd_vs_base", "wd_vs_main", "three"}
    assert (frame["n_tests"] == 6).all()                           # 3 pairwise comparisons × 2 subsets
    three = frame[(frame["comparison"] == "three") & (frame["subset"] == "all")]
    assert len(three) == 3 and three["frequency"].sum() == pytest.approx(1) and three["wilcoxon_p"].isna().all()
    within = frame[frame["subset"] == "within_class"]
    assert (within["noise_ceiling"] == 0.6).all()


# --------------------------------------------------------------------------------------------- CLIs and figure


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    behaviour_cli.register(sub)
    return parser


def test_cli_stats_noise_ceiling_and_figure(tmp_path):
    triplets = pd.DataFrame({"subject_id": ["a"] * 4 + ["b"] * 2, "image1": [1, 1, 2, 2, 1, 1],
                             "image2": [2, 2, 3, 3, 2, 2], "image3": [3, 3, 4, 4, 3, 3], "choice": [1, 1, 1, 2, 3, 3]})
    triplets.to_csv(tmp_path / "triplets.tsv", sep="\t", index=False)
    parser = _parser()
    args = parser.parse_args(["noise-ceiling", "--things-triplets", str(tmp_path / "triplets.tsv"),
                              "--out", str(tmp_path / "nc.json")])
    args.func(args)
    ceiling = json.loads((tmp_path / "nc.json").read_text())
    assert ceiling["overall"] == pytest.approx(1 - (0 + math.log(2) + 0) / 3 / math.log(3))
    assert ceiling["n_repeated_triplets"] == 3
    # evaluate-things reads the cached ceiling instead of recomputing it (docs/methods.md P-51)
    concepts = [f"c{i}" for i in range(4)]
    (tmp_path / "unique_id.txt").write_text("\n".join(concepts) + "\n")
    pd.DataFrame({"image_id": [f"{c}/{c}_01.jpg" for c in concepts], "path": [f"/t/{c}/{c}_01.jpg" for c in concepts],
                  "label": concepts, "split": "things"}).to_csv(tmp_path / "manifest.csv", index=False)
    write_h5(tmp_path / "f.h5", {"features": np.eye(4, dtype=np.float32)}, [f"{c}/{c}_01.jpg" for c in concepts], {})
    (tmp_path / "fake_nc.json").write_text(json.dumps({"overall": 0.25}))
    args = parser.parse_args(["evaluate-things", "--triplets", str(tmp_path / "triplets.tsv"), "--unique-ids",
                              str(tmp_path / "unique_id.txt"), "--manifest", str(tmp_path / "manifest.csv"),
                              "--features", str(tmp_path / "f.h5"), "--label", "base", "--noise-ceiling",
                              str(tmp_path / "fake_nc.json"), "--out-trials", str(tmp_path / "o.parquet"),
                              "--out-summary", str(tmp_path / "o.json")])
    args.func(args)
    assert json.loads((tmp_path / "o.json").read_text())["noise_ceiling"] == 0.25
    for seed, (backbone, (variant, shift)) in enumerate(itertools.product(("b1", "b2"), (("base", 0.0),
                                                                                       ("main", -0.1)))):
        path = tmp_path / "t" / backbone / f"{variant}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        _trials(6, 20, shift, seed).to_parquet(path)
    args = parser.parse_args(["behaviour-stats", "--benchmark", "things_ooo", "--trials",
                              *map(str, sorted((tmp_path / "t").rglob("*.parquet"))), "--n-choices", "3",
                              "--noise-ceiling", str(tmp_path / "nc.json"), "--out", str(tmp_path / "s.csv")])
    args.func(args)
    table = pd.read_csv(tmp_path / "s.csv")
    assert set(table["backbone"]) == {"b1", "b2"} and (table["benchmark"] == "things_ooo").all()
    assert set(table["comparison"]) == {"main_vs_base"} and set(table["model"]) == {"main", "base"}
    assert table["noise_ceiling"].iloc[0] == pytest.approx(ceiling["overall"])
    bars = figures.bars_vs_base(table)
    assert bars.loc[bars["model"] == "base", "pxp"].isna().all()
    assert bars.loc[bars["model"] == "main", "pxp"].notna().all()
    from tests.test_figures import filled, gid_lines, keep_saved_figures, plotted

    args = parser.parse_args(["figure-behaviour", "--stats", str(tmp_path / "s.csv"), "--title", "t", "--out",
                              str(tmp_path / "f.png")])
    with pytest.MonkeyPatch.context() as patch:  # keep the Figure the CLI saves (still written) to read its points
        saved = keep_saved_figures(patch, figures)
        args.func(args)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    # one panel ("all"): per backbone and model the participant-mean R² with its 95% t interval, from the CSV
    (ax,) = [ax for ax in saved[0].axes if ax.containers]
    assert ax.get_title() == "all (n = 6 participants)"
    points = plotted(ax)
    assert set(points) == set(zip(table["backbone"], table["model"])) and len(points) == 4
    for row in table.itertuples():
        half = stats.t.ppf(0.975, row.n_participants - 1) * row.r2_participant_sem
        assert points[(row.backbone, row.model)] == pytest.approx(
            (row.r2_participant_mean, row.r2_participant_mean - half, row.r2_participant_mean + half), rel=1e-12)
    assert [line.get_ydata()[0] for line in gid_lines(ax, "noise-ceiling")] == pytest.approx([ceiling["overall"]])
    assert filled(ax) == {(row.backbone, row.model) for row in table.itertuples()
                          if row.model == "base" or row.pxp >= 0.95}
