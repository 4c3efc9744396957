"""`metalign cost`: the dry-run parsers, and the disk and GPU-hour arithmetic against hand computations."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from metalign import cost

ROOT = Path(__file__).resolve().parents[1]

DRY_RUN = """\
Building DAG of jobs...
Job stats:
job        count
-------  -------
extract        2
encode         1
all            1
total          4

[Sun Dec  6 03:20:11 2026]
rule extract:
    input: results/manifests/a.csv
    output: results/embeddings/a/vb.h5
    jobid: 3
    wildcards: dataset=a, backbone=vb
    resources: tmpdir=/tmp

[Sun Dec  6 03:20:11 2026]
localrule all:
    input: results/embeddings/a/vb.h5
    jobid: 0
Job stats:
job        count
-------  -------
extract        2
encode         1
all            1
total          4

Reasons:
    (check individual jobs above for details)
"""

TRAIN = {"seed": 1, "sl": 10, "batch_size": 4, "steps": 100, "lr": 0.001, "eval_every": 10,
         "n_eval_episodes_per_function": 2}
CONFIG = {
    "datasets": {"a": {"expected_count": 10}, "b": {}},
    "backbones": {"vb": {"source": "timm", "id": "vit_base_patch16_224.x", "pooling": "pooled", "extra_layers": [3]}},
    "train": TRAIN,
    "variants": {"v": {"function_set": "main", "hidden": 128}, "w": {"function_set": "main", "hidden": None,
                                                                    "no_embed": True}},
    "extract": {"amp": False},
}
ASSUMPTIONS = {
    "cards": {"A100": {"fp32": 10, "bf16": 100}},
    "images": {"b": {"count": 5, "source": "hand"}},
    "extract": {"gflops_per_image": {"vb": 20}, "utilisation": 0.5},
    "train": {"params": 1e6, "params_dim": 768, "n_functions": 50, "utilisation": 0.1},
    "per_job_hours": {"brain_encode": {"by": "bench", "hours": {"x": {"A100": 1.5}}},
                      "icl_eval": {"hours": {"A100": 0.25}}},
}
JOBS = {
    "extract": [{"dataset": "a", "backbone": "vb"}, {"dataset": "b", "backbone": "vb"}],
    "encode": [{"dataset": "a", "backbone": "vb", "variant": "v"}],
    "train": [{"backbone": "vb", "variant": "v"}],
    "brain_encode": [{"bench": "x"}, {"bench": "x"}, {"bench": "y"}],
    "icl_eval": [{"backbone": "vb", "variant": "w"}],
}


def test_parse_job_stats_reads_the_last_table() -> None:
    assert cost.parse_job_stats(DRY_RUN) == {"extract": 2, "encode": 1, "all": 1, "total": 4}


def test_parse_job_stats_without_a_table_is_an_error() -> None:
    with pytest.raises(ValueError, match="Job stats"):
        cost.parse_job_stats("Building DAG of jobs...\nNothing to be done.\n")


def test_parse_job_wildcards() -> None:
    assert cost.parse_job_wildcards(DRY_RUN) == {"extract": [{"dataset": "a", "backbone": "vb"}], "all": []}


def test_disk_matches_a_hand_computation() -> None:
    out = cost.disk(CONFIG, ASSUMPTIONS, JOBS)
    # ViT-B/16 pooled (768) + the layer-3 CLS (768) per image, float32; representation = hidden 128.
    assert out["a"]["embeddings_gb"] == pytest.approx(10 * 1536 * 4 / 1e9)
    assert out["b"]["embeddings_gb"] == pytest.approx(5 * 1536 * 4 / 1e9)
    assert out["a"]["representations_gb"] == pytest.approx(10 * 128 * 4 / 1e9)
    assert (out["a"]["source"], out["b"]["source"]) == ("config expected_count", "hand")


def test_gpu_hours_match_a_hand_computation() -> None:
    hours = cost.gpu_hours(CONFIG, ASSUMPTIONS, JOBS)
    # extract: 15 images × 20 GFLOP / (10 TFLOPS fp32 × 0.5)
    assert hours["extract"]["A100"] == (pytest.approx(15 * 20e9 / 5e12 / 3600), 0)
    # train: 100 steps × (6 × 1e6 × 4·10 tokens + 2 × 1e6 × 2·50·10 eval tokens / 10) / (100 TFLOPS × 0.1)
    assert hours["train"]["A100"] == (pytest.approx(100 * (6e6 * 40 + 2e6 * 1000 / 10) / 1e13 / 3600), 0)
    assert hours["brain_encode"]["A100"] == (3.0, 1)  # bench y has no hours: counted, not costed
    assert hours["icl_eval"]["A100"] == (0.25, 0)


def test_cli_total_matches_snakemake_on_the_demo() -> None:
    printed = subprocess.run([sys.executable, "-m", "metalign", "cost", "--config", "config/demo.yaml", "--format", "csv"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = {(r["section"], r["item"], r["quantity"]): r["value"] for r in csv.DictReader(io.StringIO(printed))}
    with tempfile.TemporaryDirectory() as workdir:
        quiet = subprocess.run([sys.executable, "-m", "snakemake", "-n", "all", "--quiet", "rules", "-s",
                                "workflow/Snakefile", "--configfile", "config/demo.yaml", "-d", workdir],
                               cwd=ROOT, capture_output=True, text=True, check=True)
    total = re.search(r"^total\s+(\d+)\s*$", quiet.stdout + quiet.stderr, re.MULTILINE)
    assert total and rows[("jobs", "total", "count")] == total.group(1)
    assert int(rows[("jobs", "extract", "count")]) > 0
