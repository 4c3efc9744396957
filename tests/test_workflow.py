"""The workflow files themselves: formatted by snakefmt, and free of the lints that point at real defects."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_workflow_files_are_snakefmt_formatted():
    pytest.importorskip("snakefmt")
    result = _run("snakefmt", "--check", "--diff", "workflow")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_has_no_structural_warnings():
    """Rule files hold rules only, params name no path prefix, shell commands use only their rule's values. The
    remaining lints (conda directive per rule, PATH) are justified in the README."""
    result = _run("snakemake", "--lint", "--configfile", "config/demo.yaml")
    text = result.stdout + result.stderr
    titles = {line.strip() for line in text.splitlines() if line.strip().startswith("* ")}
    justified = ("* Specify a conda environment or container for each rule.",
                 "* Environment variable PATH used but not asserted with envvars directive")
    assert titles and all(title.startswith(justified) for title in titles), sorted(titles)


def _jobs(text: str) -> list[dict[str, str]]:
    """Each planned job of a dry run: its rule, whether it sits in a group job, and its resources."""
    jobs = []
    for block in re.split(r"\n(?=\s*\[[A-Z][a-z]{2} [A-Z][a-z]{2} )", text):
        rule = re.search(r"^(\s*)(?:local)?rule (\w+):", block, re.M)
        resources = re.search(r"^\s*resources: (.*)$", block, re.M)
        if rule and resources:
            values = dict(item.split("=", 1) for item in resources.group(1).split(", ") if "=" in item)
            jobs.append({"rule": rule.group(2), "grouped": bool(rule.group(1)), **values})
    return jobs


def test_full_study_slurm_dry_run_routes_every_gpu_job(tmp_path):
    """Every job of the full study: GPU jobs on the GPU partition, the rest on the CPU one, memory and runtime set,
    and the thousands of small jobs packed into group submissions."""
    result = _run("snakemake", "all", "-n", "--profile", "slurm", "-d", str(tmp_path), "--configfile",
                  str(ROOT / "config" / "config.yaml"))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    jobs = _jobs(text)
    total = int(re.search(r"^total\s+(\d+)$", text, re.M).group(1))
    assert len(jobs) == total > 5000
    gpu = [j for j in jobs if int(j.get("gpu", 0)) > 0]
    assert {j["rule"] for j in gpu} >= {"extract", "train", "icl_eval", "brain_encode"}
    misrouted = [j["rule"] for j in jobs if (j["slurm_partition"] == "gpu") != (int(j.get("gpu", 0)) > 0)]
    assert not misrouted, sorted(set(misrouted))
    assert all(int(j["mem_mb"]) >= 8000 and int(j["runtime"]) > 0 for j in jobs)
    groups = len(re.findall(r"Group job \w+", text))
    local = {"downloads", "all"} | {j["rule"] for j in jobs if j["rule"].startswith("download_")}
    submissions = groups + sum(1 for j in jobs if not j["grouped"] and j["rule"] not in local)
    print(f"full study: {total} jobs, {submissions} SLURM submissions ({groups} group jobs)")
    assert 0 < groups and submissions < total / 5


def test_resources_grow_with_the_attempt():
    """The profile's memory and runtime are expressions of `attempt` (a retried job asks for more)."""
    import yaml

    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    for entry in [profile["default-resources"], *profile["set-resources"].values()]:
        for key in ("mem_mb", "runtime"):
            if key in entry:
                assert eval(entry[key], {"attempt": 2}) == 2 * eval(entry[key], {"attempt": 1}), entry
