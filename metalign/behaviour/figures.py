"""THINGS odd-one-out, behaviour and geometry figures, drawn only from pipeline outputs (docs/methods.md P-65).

Every representation keeps one colour and marker (`metalign.plotting`), backbones are groups on x, and each value is
a point with its 95% interval, so 7 backbones × 23 representations stay readable; the legend sits outside the axes.
Each `draw_*` returns the Figure (its artists are what was plotted), each `*_figure` saves it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from metalign.behaviour.geometry import procrustes_align, tsne_map  # noqa: E402
from metalign.plotting import (  # noqa: E402
    Z95,
    distinct_colours,
    grouped_points,
    outside_legend,
    panel_width,
    style_handles,
    styles,
    t_interval,
    wilson_interval,
)
from metalign.results import save_figure  # noqa: E402

SUBSET_ORDER = ("all", "within_class", "between_class", "class_border", "none")
GEOMETRY_PANELS = (("cka", "linear CKA vs\nhuman embedding"), ("class_sep_fine", "class separation\n(fine)"),
                   ("class_sep_coarse", "class separation\n(coarse)"))
# (column, axis label, chance level, the count column of its Wilson interval) of the THINGS summary table
THINGS_PANELS = (("zero_shot_acc", "zero-shot accuracy\n(all triplets)", 1 / 3, "n_triplets"),
                 ("cv_acc", "CV accuracy\n(choice model)", 1 / 3, "n_trials"))
R2_LABEL = "McFadden R²\n(mean across participants)"
PXP_CREDIBLE = 0.95      # a variant's point is filled where its PXP against base reaches this
PANEL_HEIGHT = 2.4       # inches per row of panels
LEGEND_INCHES = 2.2


def _rows_figure(n_rows: int, n_groups: int, n_members: int) -> tuple[Figure, np.ndarray]:
    """A column of panels sharing the backbone axis, sized so that every point has its own slot."""
    fig, axes = plt.subplots(n_rows, 1, figsize=(panel_width(n_groups, n_members) + LEGEND_INCHES,
                                                 PANEL_HEIGHT * n_rows + 0.8),
                             squeeze=False, sharex=True, layout="constrained")
    return fig, axes[:, 0]


def _ceiling(ax: Axes, ceilings: pd.Series) -> list[Line2D]:
    """The noise ceiling(s) as dashed lines, plus a right axis in units of the ceiling when there is one; returns
    the legend entry (none when no ceiling is known)."""
    values = np.unique(ceilings[np.isfinite(ceilings) & (ceilings > 0)].to_numpy(dtype=float))
    for value in values:
        ax.axhline(value, color="0.35", linestyle="--", linewidth=1.0, gid="noise-ceiling")
    if len(values) == 1:
        ceiling = float(values[0])
        ax.secondary_yaxis("right", functions=(lambda y: y / ceiling, lambda y: y * ceiling)).set_ylabel(
            "÷ noise ceiling", fontsize=8)
    return [Line2D([], [], color="0.35", linestyle="--", label="noise ceiling")] if len(values) else []


def bars_vs_base(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per (subset, backbone, model) of the `<variant>_vs_base` comparisons (base from the first): the
    participant-mean McFadden R² (`value`) with its 95% t interval across participants (`low`, `high`), the PXP of
    the variant over base (NaN for base) and whether the point is drawn filled (base, or PXP ≥ PXP_CREDIBLE)."""
    pairs = stats[stats["comparison"].str.endswith("_vs_base")]
    variant_rows = pairs[pairs["model"] != "base"]
    base_rows = pairs[pairs["model"] == "base"].drop_duplicates(["subset", "backbone"])
    rows = pd.concat([base_rows, variant_rows], ignore_index=True)
    rows["value"] = rows["r2_participant_mean"]
    rows["low"], rows["high"] = t_interval(rows["r2_participant_mean"], rows["r2_participant_sem"],
                                           rows["n_participants"])
    rows.loc[rows["model"] == "base", "pxp"] = np.nan
    rows["filled"] = (rows["model"] == "base") | (rows["pxp"] >= PXP_CREDIBLE)
    return rows


def _points(rows: pd.DataFrame, member: str, value: str) -> pd.DataFrame:
    """The `grouped_points` frame of summary rows: backbones as groups, `member` as the representation."""
    return rows.rename(columns={"backbone": "group", member: "member", value: "value"})


def draw_behaviour(stats: pd.DataFrame, title: str) -> Figure:
    """One panel per subset (Levels triplet types after "all"): per backbone, the participant-mean McFadden R² of
    base and each variant with 95% t intervals across participants; hollow = PXP against base below
    PXP_CREDIBLE; dashed = the subset's noise ceiling, with a right axis in units of it."""
    rows = bars_vs_base(stats)
    subsets = [s for s in SUBSET_ORDER if s in set(rows["subset"])] + sorted(set(rows["subset"]) - set(SUBSET_ORDER))
    backbones = sorted(rows["backbone"].unique())
    style = styles(rows["model"])
    fig, axes = _rows_figure(len(subsets), len(backbones), len(style))
    extra: list[Line2D] = []
    for ax, subset in zip(axes, subsets):
        part = rows[rows["subset"] == subset]
        grouped_points(ax, _points(part, "model", "value"), backbones, style)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        extra = _ceiling(ax, part["noise_ceiling"]) or extra
        ax.set_title(f"{subset} (n = {part['n_participants'].max()} participants)", fontsize=9)
        ax.set_ylabel(R2_LABEL, fontsize=8)
    explain = [Line2D([], [], color="0.3", marker="o", linestyle="none", label=f"PXP vs base ≥ {PXP_CREDIBLE}"),
               Line2D([], [], color="0.3", marker="o", mfc="white", linestyle="none",
                      label=f"PXP vs base < {PXP_CREDIBLE}")]
    outside_legend(fig, style_handles(style) + extra + explain, "representation")
    fig.suptitle(title)
    return fig


def behaviour_figure(stats: pd.DataFrame, out: str | Path, title: str) -> None:
    save_figure(draw_behaviour(stats, title), out)


def draw_geometry(table: pd.DataFrame) -> Figure:
    """CKA and class separation (fine, coarse) per backbone × representation; whiskers ± 1.96 bootstrap SD around
    the estimate (percentile intervals are in the table; resampling duplicates bias small-sample CKA replicates)."""
    backbones = sorted(table["backbone"].unique())
    style = styles(table["variant"])
    fig, axes = _rows_figure(len(GEOMETRY_PANELS), len(backbones), len(style))
    for ax, (column, label) in zip(axes, GEOMETRY_PANELS):
        half = Z95 * table[f"{column}_boot_sd"]
        grouped_points(ax, _points(table.assign(low=table[column] - half, high=table[column] + half), "variant",
                                   column), backbones, style)
        ax.set_ylabel(label, fontsize=8)
    outside_legend(fig, style_handles(style), "representation")
    fig.suptitle("THINGS representational geometry: base vs meta-learned (± 1.96 bootstrap SD)")
    return fig


def geometry_figure(table: pd.DataFrame, out: str | Path) -> None:
    save_figure(draw_geometry(table), out)


def draw_tsne(base_map: np.ndarray, meta_map: np.ndarray, labels: np.ndarray, title: str) -> Figure:
    """Side-by-side 2-D maps coloured by label, one distinct colour per label, the legend outside the maps."""
    classes = sorted(set(labels))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    for ax, points, name in zip(axes, (base_map, meta_map), ("base", "meta (Procrustes-aligned)")):
        for colour, label in zip(distinct_colours(len(classes)), classes):
            mask = labels == label
            ax.scatter(points[mask, 0], points[mask, 1], s=8, color=colour, label=label)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    outside_legend(fig, axes[0].get_legend_handles_labels()[0])
    fig.suptitle(title)
    return fig


def tsne_figure(base: np.ndarray, meta: np.ndarray, labels: np.ndarray, out: str | Path, title: str,
                seed: int = 1234) -> None:
    """t-SNE maps of the concept representations, meta Procrustes-aligned to base, coloured by label."""
    base_map = tsne_map(base, seed)
    save_figure(draw_tsne(base_map, procrustes_align(tsne_map(meta, seed), base_map), labels, title), out)


def draw_things(table: pd.DataFrame, stats: pd.DataFrame | None = None) -> Figure:
    """Per backbone, base and every variant: zero-shot and CV accuracy with 95% Wilson intervals over their trials
    (the summary's counts) and chance dashed; with the benchmark's statistics table also the participant-mean
    McFadden R² with 95% t intervals across participants and the noise ceiling dashed."""
    panels = [p for p in THINGS_PANELS if p[0] in table.columns]
    backbones = sorted(table["backbone"].unique())
    style = styles(table["variant"])
    fig, axes = _rows_figure(len(panels) + (stats is not None), len(backbones), len(style))
    for ax, (column, label, chance, count) in zip(axes, panels):
        low, high = wilson_interval(table[column], table[count])
        grouped_points(ax, _points(table.assign(low=low, high=high), "variant", column), backbones, style)
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel(label, fontsize=8)
    extra = [Line2D([], [], color="grey", linestyle="--", label="chance")]
    if stats is not None:
        rows = bars_vs_base(stats)
        rows = rows[rows["subset"] == "all"].drop(columns="filled")
        grouped_points(axes[-1], _points(rows, "model", "value"), backbones, style)
        axes[-1].axhline(0.0, color="grey", linewidth=0.8)
        extra += _ceiling(axes[-1], rows["noise_ceiling"])
        axes[-1].set_ylabel(R2_LABEL, fontsize=8)
    outside_legend(fig, style_handles(style) + extra, "representation")
    fig.suptitle("THINGS odd-one-out: backbone (base) vs meta-learned representations (95% intervals)")
    return fig


def things_figure(table: pd.DataFrame, out: str | Path, stats: pd.DataFrame | None = None) -> None:
    save_figure(draw_things(table, stats), out)
