"""`python -m metalign cost`: job counts, disk and GPU-hours of a study, derived from its config (docs/cost.md).

Job counts and the exact (dataset, backbone, variant) of every extract/encode/train job come from Snakemake's own dry
run, so the estimate follows the workflow rather than a second copy of its logic. Per-unit figures (image counts the
config lacks, FLOPs per image, card peaks, hours per job) live in config/cost.yaml with their sources; this module only
multiplies.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from metalign.config.backbones import output_dim
from metalign.config.schema import variant_params

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_VALUE = 4  # float32 features and representations
GB = 1e9
FLOPS_PER_PARAM_TOKEN = {"forward": 2, "train": 6}  # the usual dense-model rule: 2 forward, 6 forward + backward

_JOB_HEADER = re.compile(r"^(?:local)?rule (\S+):$")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")


def dry_run(config_path: str | Path, target: str = "all") -> str:
    """Snakemake's dry-run listing of `target` for a config, run in an empty directory so that every job is counted."""
    with tempfile.TemporaryDirectory(prefix="metalign-cost-") as workdir:
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", target, "-s", str(ROOT / "workflow" / "Snakefile"),
             "--configfile", str(Path(config_path).resolve()), "-d", workdir],
            cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise ValueError(f"snakemake dry run failed for {config_path}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def parse_job_stats(text: str) -> dict[str, int]:
    """Rule → job count from the last "Job stats" table of a dry run (`total` included)."""
    start = text.rfind("Job stats:")
    if start < 0:
        raise ValueError("no 'Job stats:' table in the Snakemake output")
    counts: dict[str, int] = {}
    for line in text[start:].splitlines()[3:]:  # title, header, dashes
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    if "total" not in counts:
        raise ValueError("the 'Job stats:' table has no total row")
    return counts


def parse_job_wildcards(text: str) -> dict[str, list[dict[str, str]]]:
    """Rule → the wildcards of each of its jobs, from the per-job blocks of a (non-quiet) dry run."""
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in text.splitlines():
        if header := _JOB_HEADER.match(line):
            rule = header.group(1)
            jobs.setdefault(rule, [])
        elif rule and (wildcards := _WILDCARDS.match(line)):
            jobs[rule].append(dict(item.split("=", 1) for item in wildcards.group(1).split(", ")))
    return jobs


def image_counts(config: Mapping[str, Any], assumptions: Mapping[str, Any]) -> dict[str, tuple[int | None, str]]:
    """Images per dataset and where the number comes from: the config's checked `expected_count`, else cost.yaml."""
    listed = assumptions.get("images", {})
    counts = {}
    for name, entry in config["datasets"].items():
        if "expected_count" in entry:
            counts[name] = (int(entry["expected_count"]), "config expected_count")
        elif name in listed:
            counts[name] = (int(listed[name]["count"]), listed[name]["source"])
        else:
            counts[name] = (None, "unknown: add it to cost.yaml images")
    return counts


def embedding_dim(config: Mapping[str, Any], backbone: str) -> int | None:
    """Values per image of an embedding file: the features plus each `extra_layers` output (one pass writes all)."""
    dims = [output_dim(config, backbone)] + [output_dim(config, backbone, f"layer_{k}")
                                             for k in config["backbones"][backbone].get("extra_layers", [])]
    return None if None in dims else sum(dims)


def representation_dim(config: Mapping[str, Any], backbone: str, variant: str) -> int | None:
    """Width of a variant's encode() output: its `hidden`, or the backbone's feature dimension when hidden is null."""
    hidden = variant_params(config, variant).get("hidden")
    return int(hidden) if hidden is not None else output_dim(config, backbone)


def disk(config: Mapping[str, Any], assumptions: Mapping[str, Any],
         jobs: Mapping[str, list[dict[str, str]]]) -> dict[str, dict[str, Any]]:
    """GB per dataset of embeddings (one file per extract job) and representations (one per encode job).
    A file whose images or width is unknown is counted in `unsized` instead."""
    images = image_counts(config, assumptions)
    out = {name: {"images": count, "source": source, "embeddings_gb": 0.0, "representations_gb": 0.0, "unsized": 0}
           for name, (count, source) in images.items()}
    files = [("embeddings_gb", job["dataset"], embedding_dim(config, job["backbone"])) for job in jobs.get("extract", [])]
    files += [("representations_gb", job["dataset"], representation_dim(config, job["backbone"], job["variant"]))
              for job in jobs.get("encode", [])]
    for kind, dataset, dim in files:
        row = out[dataset]
        if row["images"] is None or dim is None:
            row["unsized"] += 1
        else:
            row[kind] += row["images"] * dim * BYTES_PER_VALUE / GB
    return out


def download_sizes(config: Mapping[str, Any], assumptions: Mapping[str, Any]) -> tuple[float, list[str]]:
    """Total GB of the config's download items sized in cost.yaml, and the items it does not size."""
    sizes = assumptions.get("downloads_gb", {})
    items = list(config.get("downloads", {}).get("items", {}))
    return sum(float(sizes[i]["gb"]) for i in items if i in sizes), [i for i in items if i not in sizes]


def peak_flops(assumptions: Mapping[str, Any], card: str, precision: str) -> float:
    return float(assumptions["cards"][card][precision]) * 1e12


def extract_hours(config: Mapping[str, Any], assumptions: Mapping[str, Any], jobs: Mapping[str, list[dict[str, str]]],
                  card: str) -> tuple[float, int]:
    """GPU-hours of all extract jobs (images × GFLOPs / (peak × utilisation)) and how many jobs were not costed."""
    spec = assumptions["extract"]
    precision = "bf16" if config.get("extract", {}).get("amp") else "fp32"
    rate = peak_flops(assumptions, card, precision) * float(spec["utilisation"])
    images = image_counts(config, assumptions)
    seconds, missing = 0.0, 0
    for job in jobs.get("extract", []):
        count, gflops = images[job["dataset"]][0], spec["gflops_per_image"].get(job["backbone"])
        if count is None or gflops is None:
            missing += 1
        else:
            seconds += count * float(gflops) * 1e9 / rate
    return seconds / 3600, missing


def train_step_flops(params: Mapping[str, Any], n_params: float, n_functions: int) -> float:
    """FLOPs per optimiser step, the periodic validation pass spread over its `eval_every` steps."""
    tokens = params["batch_size"] * params["sl"]
    eval_tokens = params["n_eval_episodes_per_function"] * n_functions * params["sl"]
    return (FLOPS_PER_PARAM_TOKEN["train"] * n_params * tokens
            + FLOPS_PER_PARAM_TOKEN["forward"] * n_params * eval_tokens / params["eval_every"])


def train_hours(config: Mapping[str, Any], assumptions: Mapping[str, Any], jobs: Mapping[str, list[dict[str, str]]],
                card: str) -> tuple[float, int]:
    """GPU-hours of all train jobs at their maximum `steps` (early stopping only shortens them): an upper bound."""
    spec = assumptions["train"]
    rate = peak_flops(assumptions, card, "bf16") * float(spec["utilisation"])
    seconds, missing = 0.0, 0
    for job in jobs.get("train", []):
        params, dim = variant_params(config, job["variant"]), output_dim(config, job["backbone"])
        if dim is None:
            missing += 1
            continue
        n_params = float(spec["params"]) * (dim / float(spec["params_dim"])) ** 2
        seconds += params["steps"] * train_step_flops(params, n_params, int(spec["n_functions"])) / rate
    return seconds / 3600, missing


def per_job_hours(assumptions: Mapping[str, Any], jobs: Mapping[str, list[dict[str, str]]],
                  card: str) -> dict[str, tuple[float, int]]:
    """Rule → (GPU-hours, jobs not costed) for the rules that cost.yaml prices per job."""
    out = {}
    for rule, spec in assumptions.get("per_job_hours", {}).items():
        hours, missing = 0.0, 0
        for job in jobs.get(rule, []):
            table = spec["hours"].get(job[spec["by"]]) if "by" in spec else spec["hours"]
            if table is None:
                missing += 1
            else:
                hours += float(table[card])
        out[rule] = (hours, missing)
    return out


def gpu_hours(config: Mapping[str, Any], assumptions: Mapping[str, Any],
              jobs: Mapping[str, list[dict[str, str]]]) -> dict[str, dict[str, tuple[float, int]]]:
    """Stage → card → (GPU-hours, jobs not costed)."""
    cards = list(assumptions["cards"])
    stages = {"extract": {c: extract_hours(config, assumptions, jobs, c) for c in cards},
              "train": {c: train_hours(config, assumptions, jobs, c) for c in cards}}
    by_card = {c: per_job_hours(assumptions, jobs, c) for c in cards}
    for rule in assumptions.get("per_job_hours", {}):
        stages[rule] = {c: by_card[c][rule] for c in cards}
    return stages


def report(config_path: str | Path, assumptions_path: str | Path) -> dict[str, Any]:
    """Everything the command prints, as data."""
    config = yaml.safe_load(Path(config_path).read_text())
    assumptions = yaml.safe_load(Path(assumptions_path).read_text())
    text = dry_run(config_path)
    jobs = parse_job_wildcards(text)
    downloads_gb, unsized = download_sizes(config, assumptions)
    return {"config": str(config_path), "assumptions": str(assumptions_path), "date": datetime.date.today().isoformat(),
            "job_counts": parse_job_stats(text), "disk": disk(config, assumptions, jobs), "downloads_gb": downloads_gb,
            "unsized_downloads": unsized, "gpu_hours": gpu_hours(config, assumptions, jobs),
            "cards": list(assumptions["cards"])}


def _rows(data: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(section, item, quantity, value) rows: the CSV form, and the one source of both outputs' numbers."""
    rows = [("jobs", rule, "count", str(n)) for rule, n in data["job_counts"].items()]
    for name, row in data["disk"].items():
        rows += [("disk", name, "images", "" if row["images"] is None else str(row["images"])),
                 ("disk", name, "embeddings_gb", f"{row['embeddings_gb']:.3f}"),
                 ("disk", name, "representations_gb", f"{row['representations_gb']:.3f}"),
                 ("disk", name, "unsized_files", str(row["unsized"]))]
    rows.append(("disk", "downloads", "raw_gb", f"{data['downloads_gb']:.1f}"))
    for stage, by_card in data["gpu_hours"].items():
        for card, (hours, missing) in by_card.items():
            rows += [("gpu_hours", stage, card, f"{hours:.2f}"), ("gpu_hours", stage, f"{card}_uncosted_jobs", str(missing))]
    return rows


def to_csv(data: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "item", "quantity", "value"])
    writer.writerows(_rows(data))
    return buffer.getvalue()


def to_markdown(data: Mapping[str, Any]) -> str:
    cards = data["cards"]
    disk_rows = data["disk"].values()
    emb, rep = sum(r["embeddings_gb"] for r in disk_rows), sum(r["representations_gb"] for r in disk_rows)
    lines = [f"Cost of `{data['config']}` with assumptions `{data['assumptions']}` ({data['date']}).", "",
             f"**Totals:** {data['job_counts']['total']:,} jobs; disk {emb + rep + data['downloads_gb']:.1f} GB "
             f"(embeddings {emb:.1f}, representations {rep:.1f}, raw downloads {data['downloads_gb']:.1f}); GPU-hours "
             + ", ".join(f"{c} {sum(v[c][0] for v in data['gpu_hours'].values()):.1f}" for c in cards) + ".", "",
             "### Jobs per rule (Snakemake dry run)", "", "| rule | jobs |", "|---|---:|"]
    lines += [f"| {rule} | {n:,} |" for rule, n in data["job_counts"].items()]
    lines += ["", "### Disk per dataset (float32, GB = 10^9 B)", "",
              "| dataset | images | image count from | embeddings GB | representations GB | unsized files |",
              "|---|---:|---|---:|---:|---:|"]
    for name, row in data["disk"].items():
        images = "?" if row["images"] is None else f"{row['images']:,}"
        lines.append(f"| {name} | {images} | {row['source']} | {row['embeddings_gb']:.2f} | "
                     f"{row['representations_gb']:.2f} | {row['unsized']} |")
    lines += [f"| **total** | | | **{emb:.2f}** | **{rep:.2f}** | |", "",
              (f"Raw downloads: {data['downloads_gb']:.1f} GB over the sized items; not sized in cost.yaml: "
               f"{', '.join(data['unsized_downloads']) or 'none'}."), "",
              "### GPU-hours per stage", "",
              ("| stage | " + " | ".join(cards) + " | jobs not costed |"), ("|---|" + "---:|" * len(cards) + "---:|")]
    for stage, by_card in data["gpu_hours"].items():
        lines.append(f"| {stage} | " + " | ".join(f"{by_card[c][0]:.2f}" for c in cards) + f" | {by_card[cards[0]][1]} |")
    return "\n".join(lines) + "\n"


def cmd_cost(args: argparse.Namespace) -> None:
    data = report(args.config, args.assumptions)
    sys.stdout.write(to_csv(data) if args.format == "csv" else to_markdown(data))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cost", help="job counts, disk and GPU-hours of a study config (docs/cost.md)")
    parser.add_argument("--config", default="config/config.yaml", help="the study config")
    parser.add_argument("--assumptions", default="config/cost.yaml", help="per-unit figures with their sources")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.set_defaults(func=cmd_cost)
