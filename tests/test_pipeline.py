"""The demo DAG end to end in a temp dir: outputs, nothing-to-do on rerun, stale-only reruns, report, SLURM dry run,
and the evaluator's recovery checks on the demo world."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def snakemake(workdir, *args, config=None, cwd=REPO, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args,
           "--configfile", str(config or REPO / "config" / "demo.yaml")]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from the dry run's job-stats table."""
    counts = {}
    for line in (result.stdout + result.stderr).splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    started = time.perf_counter()
    snakemake(workdir, "--cores", "2", "all")
    return workdir, time.perf_counter() - started


def test_demo_outputs(demo):
    workdir, seconds = demo
    root = workdir / "results" / "demo"
    table = pd.read_csv(root / "alignment" / "things_ooo.csv")
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    from metalign.config import variant_params
    from metalign.train.config import has_representation

    encoded = [v for v in config["variants"] if has_representation(variant_params(config, v))]
    assert len(table) == len(config["backbones"]) * (1 + len(encoded))
    assert set(table["representation"]) == {"base", "meta"}
    assert table["zero_shot_acc"].between(0, 1).all() and np.isfinite(table["cv_nll"]).all()
    assert (root / "figures" / "things_ooo.png").stat().st_size > 1000
    assert (root / "figures" / "learning_curves.png").stat().st_size > 1000
    print(f"demo DAG wall time: {seconds:.0f} s")


def test_second_run_has_nothing_to_do(demo):
    workdir, _ = demo
    started = time.perf_counter()
    result = snakemake(workdir, "-n", "all")
    assert "Nothing to be done" in result.stdout + result.stderr
    assert time.perf_counter() - started < 10


def test_changed_training_steps_rerun_only_descendants(demo, tmp_path):
    workdir, _ = demo
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["train"]["steps"] += 10
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = planned_jobs(snakemake(workdir, "-n", "--quiet", "rules", "all", config=path))
    n_backbones = len(config["backbones"])
    upstream = {"demo_world", "demo_vit", "demo_behaviour", "demo_fmri", "demo_labelled", "manifest", "extract",
                "sae_train", "sae_encode", "noise_ceiling_things", "noise_ceiling_levels", "brain_prepare_things",
                "brain_prepare_bold5000", "downstream_breeds_splits"}
    assert not upstream & set(jobs), jobs
    from metalign.config import variant_params
    from metalign.train.config import has_representation

    changed = [v for v in config["variants"] if "steps" not in config["variants"][v]]  # the others set their own
    encoded = [v for v in changed if has_representation(variant_params(config, v))]
    assert jobs["train"] == len(changed) * n_backbones
    assert jobs["things_ooo"] == len(encoded) * n_backbones  # meta jobs only: base results are reused, not recomputed
    assert jobs["things_ooo_table"] == 1 and jobs["figure_learning_curves"] == 1


def test_report_has_figures_and_rulegraph(demo):
    workdir, _ = demo
    report = workdir / "results" / "demo" / "report.html"
    snakemake(workdir, "--report", str(report))
    html = report.read_text(errors="ignore")
    assert "things_ooo.png" in html and "learning_curves.png" in html
    assert "rulegraph" in html.lower()


def test_slurm_profile_dry_run_maps_gpus(demo):
    workdir, _ = demo
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["train"]["steps"] += 1
    path = workdir / "slurm_check.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake(workdir, "-n", "--profile", "slurm", "all", config=path)
    text = result.stdout + result.stderr
    assert "rule train" in text
    train_block = text[text.index("rule train"):].split("\n\n")[0]
    assert re.search(r"gpu=1", train_block), train_block


def _load_world(workdir):
    things = workdir / "resources" / "demo" / "world" / "things"
    from metalign.evaluate.odd_one_out import load_triplets

    truth = json.loads((things / "ground_truth.json").read_text())
    embedding = np.loadtxt(next(things.glob("spose_embedding_*d_sorted.txt")))
    triplets = load_triplets(things / "triplets.tsv", n_concepts=len(embedding))
    return truth, embedding, triplets


def _binomial_ci(p: float, n: int) -> tuple[float, float]:
    return stats.binom.ppf(0.0005, n, p) / n, stats.binom.ppf(0.9995, n, p) / n


def test_planted_embedding_reaches_participants_accuracy(demo):
    from metalign.evaluate.odd_one_out import evaluate

    truth, embedding, triplets = _load_world(demo[0])
    _, summary = evaluate(embedding, triplets)
    low, high = _binomial_ci(truth["expected_accuracy"], len(triplets))
    assert low <= summary["zero_shot_acc"] <= high


def test_random_embedding_scores_chance(demo):
    from metalign.evaluate.odd_one_out import evaluate

    _, embedding, triplets = _load_world(demo[0])
    random = np.random.default_rng(0).normal(size=embedding.shape)
    _, summary = evaluate(random, triplets)
    low, high = _binomial_ci(1 / 3, len(triplets))
    assert low <= summary["zero_shot_acc"] <= high
