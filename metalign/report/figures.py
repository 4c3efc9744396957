"""Figures for the report: alignment of base vs meta per backbone, and the meta-learners' learning curves."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from metalign.io import atomic_path  # noqa: E402

# (column, axis label, chance level) of the THINGS summary table
THINGS_PANELS = (("zero_shot_acc", "zero-shot accuracy", 1 / 3), ("cv_acc", "CV accuracy", 1 / 3),
                 ("mcfadden_r2", "McFadden R² (CV)", 0.0))


def _save(fig: plt.Figure, out: str | Path) -> None:
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def things_figure(table: pd.DataFrame, out: str | Path) -> None:
    """One panel per metric: grouped bars, backbones on x, base and each variant side by side."""
    panels = [p for p in THINGS_PANELS if p[0] in table.columns]
    backbones = sorted(table["backbone"].unique())
    variants = ["base"] + sorted(v for v in table["variant"].unique() if v != "base")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    width = 0.8 / len(variants)
    for ax, (column, label, chance) in zip(axes[0], panels):
        for offset, variant in enumerate(variants):
            rows = table[table["variant"] == variant].set_index("backbone").reindex(backbones)
            ax.bar(np.arange(len(backbones)) + offset * width - 0.4 + width / 2, rows[column], width, label=variant)
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(backbones)), backbones, rotation=20)
        ax.set_ylabel(label)
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.suptitle("THINGS odd-one-out: backbone (base) vs meta-learned representation")
    _save(fig, out)


def curves_figure(paths: list[str | Path], out: str | Path) -> None:
    """Validation selection score and accuracy against step, one line per backbone/variant."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for path in map(Path, paths):
        metrics = pd.read_csv(path)
        val = metrics[metrics["split"] == "val"]
        label = f"{path.parent.name}/{path.name.removesuffix('.metrics.csv')}"
        axes[0].plot(val["step"], val["score"], marker="o", markersize=3, label=label)
        axes[1].plot(val["step"], val["acc"], marker="o", markersize=3, label=label)
    axes[0].set_ylabel("selection score S (val)")
    axes[1].set_ylabel("token accuracy (val)")
    axes[1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(frameon=False, fontsize=8)
    _save(fig, out)


def register(subparsers: argparse._SubParsersAction) -> None:
    things = subparsers.add_parser("figure-things", help="THINGS odd-one-out bars from the summary table")
    things.add_argument("--table", required=True)
    things.add_argument("--out", required=True)
    things.set_defaults(func=lambda a: things_figure(pd.read_csv(a.table), a.out))
    curves = subparsers.add_parser("figure-curves", help="learning curves from training metrics CSVs")
    curves.add_argument("--metrics", nargs="+", required=True)
    curves.add_argument("--out", required=True)
    curves.set_defaults(func=lambda a: curves_figure(a.metrics, a.out))
