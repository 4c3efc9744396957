"""The demo DAG end to end in a temp dir: outputs, nothing-to-do on rerun, stale-only reruns, report, SLURM dry run,
the evaluator's recovery checks on the demo world, and last the demo-full overlay on top of the built demo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from scipy import stats

from tests.conftest import REPO

pytestmark = pytest.mark.slow

DEMO, DEMO_FULL = REPO / "config" / "demo.yaml", REPO / "config" / "demo-full.yaml"
# Jobs that build the demo world, its features and its function sets: shared by every variant, never redone for one.
UPSTREAM = {"demo_world", "demo_vit", "demo_behaviour", "demo_fmri", "demo_labelled", "manifest", "extract",
            "sae_train", "sae_encode", "noise_ceiling_things", "noise_ceiling_levels", "brain_prepare_things",
            "brain_prepare_bold5000", "downstream_breeds_splits"}


def snakemake(workdir, *args, config: Path | Sequence[Path] = DEMO, cwd=REPO, check=True,
              preload: bool = False) -> subprocess.CompletedProcess:
    """`preload`: jobs forked from a preload server, as `make demo` runs them (metalign/preload.py)."""
    configs = [config] if isinstance(config, Path) else list(config)
    cmd = [sys.executable, "-m", "metalign.preload"] * preload + [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir), *args,
        "--configfile", *map(str, configs)]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600)
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
    snakemake(workdir, "--cores", "2", "all", preload=True)
    return workdir, time.perf_counter() - started


def test_demo_outputs(demo):
    workdir, seconds = demo
    root = workdir / "results" / "demo"
    table = pd.read_csv(root / "alignment" / "things_ooo.csv")
    config = yaml.safe_load(DEMO.read_text())
    from metalign.config.model import has_representation
    from metalign.config.schema import variant_backbones, variant_params

    encoded = [v for v in config["variants"] if has_representation(variant_params(config, v))]
    pairs = {(b, "base") for b in config["backbones"]} | {(b, v) for v in encoded for b in variant_backbones(config, v)}
    assert set(zip(table["backbone"], table["variant"])) == pairs and len(table) == len(pairs)
    assert set(table["representation"]) == {"base", "meta"}
    assert table["zero_shot_acc"].between(0, 1).all() and np.isfinite(table["cv_nll"]).all()
    for figure in root.glob("figures/**/*.png"):  # what they plot is checked in tests/test_figures.py
        with Image.open(figure) as image:
            assert image.width > 200 and image.height > 200 and np.asarray(image.convert("L")).std() > 1, figure
    assert {"things_ooo.png", "learning_curves.png", "icl.png"} <= {p.name for p in root.glob("figures/*.png")}
    # every job was forked from the preload server, none fell back to its own interpreter (metalign/preload.py)
    assert not [log for log in root.glob("logs/**/*.log") if "running in this process" in log.read_text()]
    print(f"demo DAG wall time: {seconds:.0f} s")


def test_second_run_has_nothing_to_do(demo):
    workdir, _ = demo
    started = time.perf_counter()
    result = snakemake(workdir, "-n", "all")
    assert "Nothing to be done" in result.stdout + result.stderr
    print(f"no-op dry run: {time.perf_counter() - started:.1f} s")  # a report: README gives the quiet-machine timing


def test_changed_training_steps_rerun_only_descendants(demo, tmp_path):
    workdir, _ = demo
    config = yaml.safe_load(DEMO.read_text())
    config["train"]["steps"] += 10
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = planned_jobs(snakemake(workdir, "-n", "all", "--quiet", "rules", config=path))
    assert not UPSTREAM & set(jobs), jobs
    from metalign.config.model import has_representation
    from metalign.config.schema import variant_backbones, variant_params

    changed = [v for v in config["variants"] if "steps" not in config["variants"][v]]  # the others set their own
    encoded = [v for v in changed if has_representation(variant_params(config, v))]
    assert jobs["train"] == sum(len(variant_backbones(config, v)) for v in changed)
    # meta jobs only: base results are reused, not recomputed
    assert jobs["things_ooo"] == sum(len(variant_backbones(config, v)) for v in encoded)
    assert jobs["things_ooo_table"] == 1 and jobs["figure_learning_curves"] == 1


def _provenance_triggered(result: subprocess.CompletedProcess, reason: str) -> set[str]:
    """Rules listed under one reason of the dry run's summary, e.g. "params have changed since last execution"."""
    match = re.search(re.escape(reason) + r":\n\s+(.*)\n", result.stdout + result.stderr)
    return set(match.group(1).split(", ")) if match else set()


def test_code_edit_reruns_exactly_its_importers_and_paths_do_not_matter(demo, tmp_path):
    """The same code from a moved checkout, run by another name of the interpreter, has nothing to do; an edit to a
    science module re-runs exactly the jobs whose command imports it (and what depends on them)."""
    workdir, _ = demo
    copy = tmp_path / "moved checkout"
    for part in ("metalign", "workflow", "config"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    python3 = Path(sys.executable).with_name("python3")
    interpreter = str(python3 if python3.exists() and python3 != Path(sys.executable) else sys.executable)

    def dry_run() -> subprocess.CompletedProcess:
        cmd = [interpreter, "-m", "snakemake", "-s", str(copy / "workflow" / "Snakefile"), "-d", str(workdir), "-n",
               "all", "--quiet", "rules", "--configfile", str(copy / "config" / "demo.yaml")]
        return subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=600, check=True)

    assert "Nothing to be done" in dry_run().stdout + dry_run().stderr
    science = copy / "metalign" / "behaviour" / "learning.py"
    science.write_text(science.read_text() + "\n# a science fix\n")
    result = dry_run()
    jobs = planned_jobs(result)
    assert _provenance_triggered(result, "params have changed since last execution") == {"category_learning",
                                                                                          "reward_learning"}
    config = yaml.safe_load(DEMO.read_text())
    from metalign.config.model import has_representation
    from metalign.config.schema import variant_backbones, variant_params

    encoded = [v for v in config["variants"] if has_representation(variant_params(config, v))]
    scored = len(config["backbones"]) + sum(len(variant_backbones(config, v)) for v in encoded)  # base + meta
    assert jobs["category_learning"] == jobs["reward_learning"] == scored
    assert not (UPSTREAM | {"train", "encode", "things_ooo", "levels_ooo", "brain_encode"}) & set(jobs), jobs


def test_long_rules_write_progress_to_their_logs(demo):
    """Logs are not empty when stderr is a file: training, extraction (hashing images, for a precomputed feature
    table), SAE training and encoding report progress."""
    logs = demo[0] / "results" / "demo" / "logs"
    backbones = yaml.safe_load(DEMO.read_text())["backbones"]
    precomputed = {name for name, spec in backbones.items() if spec["source"] == "precomputed"}
    assert precomputed and precomputed != set(backbones)
    for pattern, needle in (("train/*/*.log", "train:"), ("extract/*/*.log", "extract "),
                            ("functions/*/sae_train.log", "sae train: 100%"), ("brain/*/*/*/*/*.log", "folds: 100%")):
        found = sorted(logs.glob(pattern))
        assert found, pattern
        for log in found:
            expected = "hash images: 100%" if pattern.startswith("extract") and log.stem in precomputed else needle
            assert expected in log.read_text(), (log, log.read_text()[-500:])
    training = sorted(logs.glob("train/*/*.log"))[0].read_text()
    assert re.search(r"step \d+/\d+: val loss", training), training[-500:]


def test_report_has_figures_and_rulegraph(demo):
    workdir, _ = demo
    report = workdir / "results" / "demo" / "report.html"
    snakemake(workdir, "--report", str(report))
    html = report.read_text(errors="ignore")
    assert "things_ooo.png" in html and "learning_curves.png" in html
    assert "rulegraph" in html.lower()


def test_slurm_profile_dry_run_maps_gpus(demo):
    workdir, _ = demo
    config = yaml.safe_load(DEMO.read_text())
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
    from metalign.behaviour.odd_one_out import load_triplets

    truth = json.loads((things / "ground_truth.json").read_text())
    embedding = np.loadtxt(next(things.glob("spose_embedding_*d_sorted.txt")))
    triplets = load_triplets(things / "triplets.tsv", n_concepts=len(embedding))
    return truth, embedding, triplets


def _binomial_ci(p: float, n: int) -> tuple[float, float]:
    return stats.binom.ppf(0.0005, n, p) / n, stats.binom.ppf(0.9995, n, p) / n


def test_planted_embedding_reaches_participants_accuracy(demo):
    from metalign.behaviour.odd_one_out import evaluate

    truth, embedding, triplets = _load_world(demo[0])
    _, summary = evaluate(embedding, triplets)
    low, high = _binomial_ci(truth["expected_accuracy"], len(triplets))
    assert low <= summary["zero_shot_acc"] <= high


def test_random_embedding_scores_chance(demo):
    from metalign.behaviour.odd_one_out import evaluate

    _, embedding, triplets = _load_world(demo[0])
    random = np.random.default_rng(0).normal(size=embedding.shape)
    _, summary = evaluate(random, triplets)
    low, high = _binomial_ci(1 / 3, len(triplets))
    assert low <= summary["zero_shot_acc"] <= high


def _zero_shot(features: Path, manifest: pd.DataFrame, concepts: list[str], triplets: pd.DataFrame) -> np.ndarray:
    """Per-triplet zero-shot correctness, computed here from the feature file: cosine odd-one-out on the first image
    (in file-name order) of each concept (docs/methods.md §9.1), an implementation independent of the evaluator's."""
    with h5py.File(features, "r") as handle:
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][:]]
        X = handle["features"][:].astype(np.float64)
    row = {image_id: n for n, image_id in enumerate(ids)}
    first = {}
    for image_id in sorted(manifest["image_id"], key=lambda i: (i.split("/")[0], i.split("/")[-1])):
        first.setdefault(image_id.split("/")[0], image_id)
    E = X[[row[first[c]] for c in concepts]]
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    i, j, k = (triplets[f"image{p}"].to_numpy() - 1 for p in (1, 2, 3))
    sims = np.stack([(E[j] * E[k]).sum(1), (E[i] * E[k]).sum(1), (E[i] * E[j]).sum(1)], axis=1)
    return sims.argmax(axis=1) == triplets["choice"].to_numpy() - 1


def test_planted_mechanism_gains_and_its_controls_do_not(demo):
    """docs/demo.md: on the planted backbone, meta − base on THINGS zero-shot exceeds its 99% binomial margin for the
    variant trained on functions of the factors, and does not for the nuisance and shuffled controls. Recomputed here
    from the feature files; then every family's row of the pipeline's planted effect table must pass."""
    root = demo[0] / "results" / "demo"
    config = yaml.safe_load(DEMO.read_text())
    effect = config["demo"]["effect"]
    world = demo[0] / "resources" / "demo" / "world" / "things"
    concepts = (world / "unique_id.txt").read_text().split()
    triplets = pd.read_csv(world / "triplets.tsv", sep="\t")
    manifest = pd.read_csv(root / "manifests" / "things.csv")
    backbone, z = effect["backbone"], stats.norm.ppf(0.5 + effect["level"] / 2)
    base = _zero_shot(root / "embeddings" / "things" / f"{backbone}.h5", manifest, concepts, triplets)
    table = pd.read_csv(root / "alignment" / "things_ooo.csv").set_index(["backbone", "variant"])
    assert table.loc[(backbone, "base"), "zero_shot_acc"] == pytest.approx(base.mean())
    gains = {}
    for variant in [effect["planted"], *effect["controls"]]:
        meta = _zero_shot(root / "representations" / "things" / backbone / f"{variant}.h5", manifest, concepts,
                          triplets)
        assert table.loc[(backbone, variant), "zero_shot_acc"] == pytest.approx(meta.mean())
        margin = z * np.sqrt((base.var() + meta.var()) / len(triplets))
        gains[variant] = (meta.mean() - base.mean(), margin)
    gain, margin = gains.pop(effect["planted"])
    print(f"planted: THINGS zero-shot gain {gain:+.3f} (margin {margin:.3f}); controls: "
          + ", ".join(f"{v} {g:+.3f} ({m:.3f})" for v, (g, m) in gains.items()))
    assert gain > margin
    assert all(g <= m for g, m in gains.values()), gains

    rows = pd.read_csv(root / "alignment" / "planted_effect.csv")
    families = set(rows["family"])
    assert {"things_ooo", "levels_ooo", "things_ooo_r2", "levels_ooo_r2", "category_learning_r2",
            "reward_learning_r2", "things_fmri", "bold5000", "fewshot", "imagenet_a", "icl"} <= families
    failed = rows[rows["verdict"] != "pass"]
    assert failed.empty, failed.to_string()


def test_brain_encoding_recovers_the_planted_voxel_tuning(demo):
    """The demo's THINGS-fMRI voxels inside an ROI are driven by the planted factors (amplitude U(0.6, 1.2)); the
    voxels outside every ROI that pass the noise-ceiling selection are the control population (amplitude U(0, 0.3)).
    For every subject, with the planted backbone's base features and its planted variant (both carry the factors,
    docs/demo.md §2), the driven voxels' held-out R² must beat the control voxels' and their R²/NC must be above 0,
    each by a 99% z-margin from the voxels' own spread (Welch). The nuisance variant's representation has lost the
    factors: its driven voxels' R²/NC must not be above 0 beyond that margin."""
    root = demo[0] / "results" / "demo"
    effect = yaml.safe_load(DEMO.read_text())["demo"]["effect"]
    z = stats.norm.ppf(0.5 + effect["level"] / 2)
    folder = root / "brain" / "things_fmri" / "heldout_session" / effect["backbone"]
    carriers = {"base", effect["planted"]}
    files = sorted(folder.glob("*/sub-*.h5"))
    assert carriers | {"nuisance"} <= {f.parent.name for f in files}, files
    for path in files:
        with h5py.File(path, "r") as handle:
            r2, r2_norm = handle["r2"][:].mean(axis=1), handle["r2_norm"][:].mean(axis=1)
            driven = handle["rois"][:].any(axis=1).astype(bool)
        control = ~driven
        assert driven.sum() > 30 and control.sum() > 30, path
        tuned = r2_norm[driven]
        tuned_margin = z * tuned.std(ddof=1) / np.sqrt(len(tuned))
        if path.parent.name in carriers:
            gap = r2[driven].mean() - r2[control].mean()
            gap_se = np.hypot(*(r2[m].std(ddof=1) / np.sqrt(m.sum()) for m in (driven, control)))
            assert gap > z * gap_se, (path, gap, gap_se)
            assert tuned.mean() > tuned_margin, (path, tuned.mean(), tuned_margin)
        elif path.parent.name == "nuisance":
            assert tuned.mean() <= tuned_margin, (path, tuned.mean(), tuned_margin)


def _checkpoint(root: Path, backbone: str, variant: str) -> dict:
    return torch.load(root / "checkpoints" / backbone / f"{variant}.pt", map_location="cpu", weights_only=True)


def test_demo_full_overlay_on_the_built_demo(demo, tmp_path):
    """The demo-full overlay on top of the built demo (last in this module: it adds rows to the demo's tables). Only
    the overlay's function sets, trainings and their dependents are planned; every variant of the study's grid ends up
    with a checkpoint of its own architecture, an encode()d THINGS representation at its hidden size, and THINGS and
    Levels odd-one-out rows next to `base`; the report builds. The targets are the report and the odd-one-out tables
    (`make demo-full` also runs every other benchmark on each variant: too long for CI)."""
    from metalign.config.functions import resolve_function_sets
    from metalign.config.model import has_representation
    from metalign.config.schema import variant_backbones, variant_params
    from metalign.functions.subsets import n_kept

    workdir, _ = demo
    base, overlay = yaml.safe_load(DEMO.read_text()), yaml.safe_load(DEMO_FULL.read_text())
    clash = {key: set(overlay[key]) & set(base[key]) for key in overlay}
    assert not any(clash.values()), f"the overlay redefines demo entries: {clash}"
    config = {**base, **{key: {**base[key], **overlay[key]} for key in overlay}}
    study = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert set(study["variants"]) <= set(config["variants"]), "a variant of the study's grid is not in the demo"
    configs, variants = (DEMO, DEMO_FULL), list(overlay["variants"])
    backbones = variant_backbones(config, variants[0])
    assert all(variant_backbones(config, v) == backbones for v in variants)
    encoded = [v for v in variants if has_representation(variant_params(config, v))]
    sets = resolve_function_sets(config["function_sets"])
    tables = ["things_ooo", "levels_ooo"]
    targets = ["report_all", *(f"{base['results']}/alignment/{table}.csv" for table in tables)]

    jobs = planned_jobs(snakemake(workdir, "-n", *targets, "--quiet", "rules", config=configs))
    assert not (UPSTREAM - {"sae_train", "sae_encode"}) & set(jobs), jobs
    assert jobs.get("sae_train", 0) == sum(sets[name].method == "train" for name in overlay["function_sets"])
    made = sum(jobs.get(rule, 0) for rule in ("sae_encode", "functions_subset", "functions_neurons"))
    assert made == sum(len(sets[name].splits) for name in overlay["function_sets"])
    assert jobs["train"] == len(variants) * len(backbones)  # the demo's own variants are not retrained
    datasets = {base["benchmarks"][table]["dataset"] for table in tables}
    assert jobs["encode"] == len(encoded) * len(backbones) * len(datasets)
    for table in tables:  # nor re-scored, nor is base
        assert jobs[table] == len(encoded) * len(backbones), table

    started = time.perf_counter()
    snakemake(workdir, "--cores", "2", *targets, config=configs, preload=True)
    print(f"demo-full overlay wall time: {time.perf_counter() - started:.0f} s")

    root = workdir / base["results"]
    scores = {table: pd.read_csv(root / "alignment" / f"{table}.csv") for table in tables}
    for backbone in backbones:
        with h5py.File(root / "embeddings" / "things" / f"{backbone}.h5", "r") as handle:
            ids, d_in = handle["ids"][:], handle["features"].shape[1]
        kept = {}
        for variant in variants:
            params = variant_params(config, variant)
            ckpt = _checkpoint(root, backbone, variant)
            assert {key: ckpt["train_config"][key] for key in params} == params, variant
            assert ckpt["last_step"] == params["steps"], variant  # early stopping starts at min_step
            model = ckpt["model_config"]
            assert model["hidden"] == (params["hidden"] or d_in), variant
            assert [model[key] for key in ("n_layers", "n_heads", "use_mlp")] == \
                [params[key] for key in ("n_layers", "n_heads", "use_mlp")], variant
            kept[variant] = set(ckpt["kept_latent_ids"].tolist())
            if variant in encoded:
                with h5py.File(root / "representations" / "things" / backbone / f"{variant}.h5", "r") as handle:
                    assert handle["features"].shape == (len(ids), model["hidden"])
                    assert np.isfinite(handle["features"][:]).all() and np.array_equal(handle["ids"][:], ids)
        main = set(_checkpoint(root, backbone, "main")["kept_latent_ids"].tolist())
        for variant in variants:  # subsets train on their share of main's functions
            entry = config["function_sets"][config["variants"][variant]["function_set"]]
            if entry["method"] == "subset":
                assert kept[variant] <= main and len(kept[variant]) == n_kept(len(main), entry["fraction"]), variant
        for table, frame in scores.items():
            rows = frame[frame["backbone"] == backbone]
            assert set(rows["variant"]) >= {"base", *encoded}, table

    report = tmp_path / "report.html"
    snakemake(workdir, "--report", str(report), "report_all", config=configs)
    html = report.read_text(errors="ignore")
    assert "learning_curves.png" in html and "things_ooo.png" in html
