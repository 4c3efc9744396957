"""Summary tables: one row per backbone × variant, assembled from the per-job JSON summaries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from metalign.io import DataContractError, write_csv


def _key(path: Path) -> tuple[str, str]:
    """`…/<backbone>/<variant>.json`: the layout of the DAG is the key, so no row can be mislabelled."""
    return path.parent.name, path.stem


def summary_table(paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in map(Path, paths):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataContractError(f"cannot read summary {path}: {err}") from None
        backbone, variant = _key(path)
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
        rows.append({"backbone": backbone, "variant": variant,
                     "representation": "base" if variant == "base" else "meta", **scalars})
    return pd.DataFrame(rows).sort_values(["backbone", "representation", "variant"], kind="stable")


def _cli(args: argparse.Namespace) -> None:
    write_csv(args.out, summary_table(args.summaries))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("things-table", help="collect THINGS odd-one-out summaries into one CSV")
    parser.add_argument("--summaries", nargs="+", required=True, help="<backbone>/<variant>.json files")
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=_cli)
