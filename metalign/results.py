"""The shared runner of every evaluation stage: read a representation, write per-trial and summary results with
provenance, save figures, and collect per-job summaries into one table.

An evaluator module holds only science (features + spec → per-trial frame + summary dict); its stage's `cli.py`
reads inputs and writes outputs through these helpers, so provenance and atomic writes are defined once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from metalign.io import DataContractError, atomic_path, file_sha256, library_versions, read_h5, write_csv, write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """The `features` array of a representation file (backbone embedding or meta-learned), its ids and attributes."""
    arrays, ids, attrs = read_h5(path, ["features"])
    return arrays["features"], ids, attrs


def file_inputs(**paths: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Provenance of input files: path and sha256 of each, by role."""
    return {name: {"path": str(path), "sha256": file_sha256(path)} for name, path in paths.items()}


def or_nan(value: float | None) -> float:
    """JSON null → NaN."""
    return math.nan if value is None else float(value)


def finite_json(obj: Any) -> Any:
    """NaN/inf → None so that the summary stays valid JSON."""
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results(summary_path: str | os.PathLike, summary: Mapping[str, Any], inputs: Mapping[str, Any],
                  features_attrs: Mapping[str, Any] | None = None, trials: pd.DataFrame | None = None,
                  trials_path: str | os.PathLike | None = None) -> None:
    """Write the per-trial table (parquet) and then the summary (JSON) with its inputs, the representation's
    attributes and the library versions; both atomically, the summary last (it is what tables collect)."""
    if (trials is None) != (trials_path is None):
        raise ValueError("write_results: give both the per-trial table and its path, or neither")
    record = {**summary, "inputs": dict(inputs), "library_versions": library_versions()}
    if features_attrs is not None:
        record["features_attrs"] = dict(features_attrs)
    if trials is not None:
        with atomic_path(trials_path, suffix=".parquet") as tmp:
            trials.to_parquet(tmp, index=False)
    write_json(summary_path, finite_json(record))


def save_figure(fig: "Figure", out: str | os.PathLike) -> None:
    """Save a figure as PNG atomically (a failed job leaves no half-written figure) and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


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


def cmd_collect_summaries(args: argparse.Namespace) -> None:
    write_csv(args.out, summary_table(args.summaries))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("collect-summaries",
                                   help="one CSV row per <backbone>/<variant>.json summary (its scalar fields)")
    parser.add_argument("--summaries", nargs="+", required=True, help="<backbone>/<variant>.json files")
    parser.add_argument("--out", required=True, help="the table (CSV)")
    parser.set_defaults(func=cmd_collect_summaries)
