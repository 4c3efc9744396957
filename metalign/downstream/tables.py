"""Downstream tables in the alignment tables' layout: one row per backbone × variant (representation base/meta)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from metalign.io import DataContractError
from metalign.results import summary_table

KEYS = ["backbone", "variant", "representation"]
SHOT_COLUMN = re.compile(r"^acc_(\d+)shot(_sd)?$")


def fewshot_table(paths: list[str | Path]) -> pd.DataFrame:
    """Columns `<task>_<k>shot` (mean over seeds) and `…_sd` (sd over seeds), plus `mean_<k>shot` over tasks."""
    long = summary_table(paths)
    if "task" not in long.columns:
        raise DataContractError("few-shot summaries lack the 'task' key")
    shot_columns = [c for c in long.columns if SHOT_COLUMN.match(c)]
    melted = long.melt(id_vars=KEYS + ["task"], value_vars=shot_columns, var_name="metric")
    melted["column"] = melted["task"] + "_" + melted["metric"].str.removeprefix("acc_")
    wide = melted.pivot_table(index=KEYS, columns="column", values="value", aggfunc="first")
    shots = sorted({int(SHOT_COLUMN.match(c)[1]) for c in shot_columns})
    means = pd.DataFrame({f"mean_{k}shot": long.pivot_table(index=KEYS, columns="task", values=f"acc_{k}shot")
                         .mean(axis=1) for k in shots})
    task_columns = [f"{t}_{k}shot{sd}" for t in sorted(long["task"].unique()) for k in shots for sd in ("", "_sd")]
    table = means.join(wide[[c for c in task_columns if c in wide.columns]]).reset_index()
    return table.sort_values(["backbone", "representation", "variant"], kind="stable").reset_index(drop=True)
