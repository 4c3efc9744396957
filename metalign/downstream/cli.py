"""`python -m metalign downstream-*`: one subcommand per evaluation, table and figure (rules/evaluate_downstream.smk).

Every evaluation reads a split as (manifest, feature file, optional `split` value), with `base` = backbone
embeddings and `meta` = a variant's representation of the same images, and writes one JSON summary whose path
(`…/<backbone>/<variant>.json`) is its table key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from metalign.downstream.breeds import BreedsTask, evaluate_breeds, make_tasks, read_hierarchy
from metalign.downstream.data import SplitRef, check_provenance
from metalign.downstream.fewshot import evaluate_fewshot
from metalign.downstream.imagenet_a import evaluate_imagenet_a
from metalign.downstream.probe import ProbeConfig
from metalign.downstream.shape_bias import evaluate_shape_bias
from metalign.downstream.tables import fewshot_table
from metalign.io import DataContractError, library_versions, write_csv, write_json


def _add_split(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    parser.add_argument(f"--{prefix}-manifest", required=True, help=f"manifest of the {what} images")
    parser.add_argument(f"--{prefix}-features", required=True, help=f"features (base or meta) of the {what} images")
    parser.add_argument(f"--{prefix}-split", help="keep only manifest rows with this `split` value")


def _split(args: argparse.Namespace, prefix: str) -> SplitRef:
    key = prefix.replace("-", "_")
    ref = SplitRef(getattr(args, f"{key}_manifest"), getattr(args, f"{key}_features"), getattr(args, f"{key}_split"))
    check_provenance(ref)
    return ref


def _add_common(parser: argparse.ArgumentParser) -> None:
    """Options of the full-data probes (BREEDS, ImageNet-A, shape bias)."""
    parser.add_argument("--l2-normalise", action=argparse.BooleanOptionalAction, default=True,
                        help="scale every feature row to unit length first (default: on)")
    parser.add_argument("--l2-grid", type=float, nargs="+", required=True, help="probe ridge strengths")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="hold-out fraction for the ridge choice")
    parser.add_argument("--probe-seed", type=int, default=0, help="seed of the hold-out split")


def _probe(args: argparse.Namespace) -> ProbeConfig:
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    return ProbeConfig(tuple(args.l2_grid), args.val_fraction, args.probe_seed)


def _json_arg(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: not valid JSON ({err})") from None


def _write(path: str, summary: dict[str, Any], refs: dict[str, SplitRef]) -> None:
    provenance = {name: {"manifest": r.manifest, "features": r.features, "split": r.split} for name, r in refs.items()}
    write_json(path, {**summary, "inputs": provenance, "library_versions": library_versions()})


def cmd_downstream_fewshot(args: argparse.Namespace) -> None:
    refs = {"train": _split(args, "train"), "test": _split(args, "test")}
    classes = args.classes
    if classes is not None and classes.lstrip().startswith("["):
        classes = _json_arg(classes, "--classes")
    summary = evaluate_fewshot(refs["train"], refs["test"], classes, args.shots, args.seeds, args.l2_reg,
                               args.l2_normalise)
    _write(args.out, {"task": args.task, **summary}, refs)


def cmd_downstream_breeds_splits(args: argparse.Namespace) -> None:
    hierarchy = read_hierarchy(args.class_info, args.class_hierarchy, args.node_names, args.root)
    tasks = make_tasks(hierarchy, _json_arg(args.tasks, "--tasks"), args.split, args.seed)
    write_json(args.out, {"split": args.split, "seed": args.seed, "root": args.root,
                          "tasks": {t.name: t.as_dict() for t in tasks}})


def _read_breeds_splits(path: str) -> list[BreedsTask]:
    try:
        return [BreedsTask(**task) for task in json.loads(Path(path).read_text())["tasks"].values()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataContractError(f"cannot read BREEDS splits {path}: {err}") from None


def cmd_downstream_breeds(args: argparse.Namespace) -> None:
    refs = {"train": _split(args, "train"), "test": _split(args, "test")}
    summary = evaluate_breeds(_read_breeds_splits(args.splits), refs["train"], refs["test"], _probe(args),
                              args.l2_normalise)
    _write(args.out, {**summary, "splits": args.splits}, refs)


def cmd_downstream_imagenet_a(args: argparse.Namespace) -> None:
    refs = {"train": _split(args, "train"), "test": _split(args, "test"), "shifted": _split(args, "shifted")}
    summary = evaluate_imagenet_a(refs["train"], refs["test"], refs["shifted"], args.train_per_class, args.seed,
                                  _probe(args), args.l2_normalise)
    _write(args.out, summary, refs)


def cmd_downstream_shape_bias(args: argparse.Namespace) -> None:
    refs = {"train": _split(args, "train"), "stimuli": _split(args, "stimuli")}
    categories = _json_arg(args.categories, "--categories")
    summary, decisions = evaluate_shape_bias(refs["train"], refs["stimuli"], categories, args.decision,
                                             args.train_per_category, args.seed, _probe(args), args.l2_normalise)
    write_csv(args.out_decisions, decisions)
    _write(args.out_summary, {**summary, "categories": categories}, refs)


def cmd_downstream_fewshot_table(args: argparse.Namespace) -> None:
    write_csv(args.out, fewshot_table(args.summaries))


def cmd_figure_downstream(args: argparse.Namespace) -> None:
    from metalign.downstream.figures import gain_figure  # matplotlib only for the job that draws

    tables = {Path(p).stem: pd.read_csv(p) for p in args.tables}
    gain_figure(pd.read_csv(args.alignment), tables, args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("downstream-fewshot", help="few-shot least-squares classification (big_vision)")
    p.add_argument("--task", required=True, help="dataset name recorded in the summary")
    _add_split(p, "train", "training (few-shot pool)")
    _add_split(p, "test", "test")
    p.add_argument("--classes", help="frozen class list: a JSON list, or a file with one class per line")
    p.add_argument("--shots", type=int, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--l2-reg", type=float, required=True, help="ridge strength (big_vision: 2^10)")
    p.add_argument("--l2-normalise", action=argparse.BooleanOptionalAction, default=False,
                   help="scale every feature row to unit length before the standardisation (default: off, as "
                        "big_vision)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_downstream_fewshot)

    p = subparsers.add_parser("downstream-breeds-splits", help="BREEDS source/target subclass splits")
    p.add_argument("--class-info", required=True, help="dataset_class_info.json")
    p.add_argument("--class-hierarchy", required=True, help="class_hierarchy.txt")
    p.add_argument("--node-names", required=True, help="node_names.txt")
    p.add_argument("--root", default="n00001740")
    p.add_argument("--tasks", required=True, help='JSON {"living17": {"level": 5, "ancestor": …, "n_subclasses": 4}}')
    p.add_argument("--split", choices=["rand", "good", "bad"], default="rand")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_downstream_breeds_splits)

    p = subparsers.add_parser("downstream-breeds", help="BREEDS probes: source and target accuracy")
    p.add_argument("--splits", required=True, help="output of downstream-breeds-splits")
    _add_split(p, "train", "ImageNet training")
    _add_split(p, "test", "ImageNet validation")
    _add_common(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_downstream_breeds)

    p = subparsers.add_parser("downstream-imagenet-a", help="ImageNet probe scored on ImageNet-A (200-class mask)")
    _add_split(p, "train", "ImageNet training")
    _add_split(p, "test", "ImageNet validation")
    _add_split(p, "shifted", "ImageNet-A")
    p.add_argument("--train-per-class", type=int, required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class training subset")
    _add_common(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_downstream_imagenet_a)

    p = subparsers.add_parser("downstream-shape-bias", help="shape vs texture decisions on cue-conflict stimuli")
    _add_split(p, "train", "category training")
    _add_split(p, "stimuli", "cue-conflict")
    p.add_argument("--categories", required=True, help='JSON {"airplane": ["n02690373"], …}')
    p.add_argument("--decision", choices=["probe", "centroid"], default="probe")
    p.add_argument("--train-per-category", type=int, help="training images per category (default: all)")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)
    p.add_argument("--out-summary", required=True)
    p.add_argument("--out-decisions", required=True)
    p.set_defaults(func=cmd_downstream_shape_bias)

    p = subparsers.add_parser("downstream-fewshot-table",
                              help="few-shot summaries → one row per backbone × variant, a column per task and shot")
    p.add_argument("--summaries", nargs="+", required=True, help="fewshot/<task>/<backbone>/<variant>.json files")
    p.add_argument("--out", required=True, help="the table (CSV)")
    p.set_defaults(func=cmd_downstream_fewshot_table)

    p = subparsers.add_parser("figure-downstream", help="alignment gain vs downstream change per backbone")
    p.add_argument("--alignment", required=True, help="alignment/things_ooo.csv")
    p.add_argument("--tables", nargs="+", required=True, help="downstream/<name>.csv (fewshot, breeds, …)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_figure_downstream)
