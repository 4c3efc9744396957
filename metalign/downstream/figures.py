"""Alignment gain against downstream change: does making a representation more human-aligned cost or help?

x: THINGS odd-one-out zero-shot accuracy, meta − base of the same backbone (alignment/things_ooo.csv);
y: the downstream metric, meta − base of the same backbone; one point per backbone × variant, coloured by variant and
shaped by backbone. `draw_gain` returns the Figure (its artists are what was plotted), `gain_figure` saves it.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from metalign.io import DataContractError, atomic_path  # noqa: E402
from metalign.plotting import MARKERS, outside_legend, styles  # noqa: E402

ALIGNMENT_METRIC = "zero_shot_acc"
# table (file stem) → (column pattern, axis label)
PANELS = {
    "fewshot": [(r"^mean_(\d+)shot$", "{0}-shot accuracy\n(mean of few-shot datasets)")],
    "breeds": [(r"^mean_target_acc$", "BREEDS target accuracy\n(mean of tasks)"),
               (r"^mean_gap$", "BREEDS source − target gap\n(mean of tasks)")],
    "imagenet_a": [(r"^imagenet_a_top1$", "ImageNet-A top-1")],
    "shape_bias": [(r"^shape_bias$", "shape bias")],
}


def meta_minus_base(table: pd.DataFrame, column: str, source: str) -> pd.DataFrame:
    """backbone, variant, delta for every meta row: its value minus the base row's of the same backbone."""
    base = table[table["representation"] == "base"].set_index("backbone")[column]
    if base.index.duplicated().any():
        raise DataContractError(f"{source}: more than one base row for a backbone")
    meta = table[table["representation"] == "meta"]
    return pd.DataFrame({"backbone": meta["backbone"].to_numpy(), "variant": meta["variant"].to_numpy(),
                         "delta": meta[column].to_numpy() - base.reindex(meta["backbone"]).to_numpy()})


def _panels(tables: dict[str, pd.DataFrame]) -> list[tuple[str, str, str]]:
    found = []
    for stem, table in tables.items():
        for pattern, label in PANELS.get(stem, []):
            for column in table.columns:
                match = re.match(pattern, column)
                if match:
                    found.append((stem, column, label.format(*match.groups())))
    return found


def draw_gain(alignment: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> Figure:
    """One panel per downstream metric: a point per backbone × variant at (Δ alignment, Δ metric); colour = variant
    (each its own), marker = backbone, one legend outside the panels (no per-point labels, which at 7 × 22 points
    cover each other and the data). Each backbone's points are one scatter with gid = the backbone."""
    panels = _panels(tables)
    if not panels:
        raise DataContractError(f"no downstream metric to plot in tables {sorted(tables)}")
    gain = meta_minus_base(alignment, ALIGNMENT_METRIC, "alignment table").set_index(["backbone", "variant"])
    n_cols = min(4, len(panels))
    n_rows = int(np.ceil(len(panels) / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols + 2.4, 3.2 * n_rows), squeeze=False,
                             layout="constrained")
    backbones = sorted(alignment["backbone"].unique())
    colours = {name: colour for name, (colour, _) in styles(alignment.loc[alignment["representation"] == "meta",
                                                                          "variant"]).items()}
    markers = {backbone: MARKERS[i % len(MARKERS)] for i, backbone in enumerate(backbones)}
    for ax, (stem, column, label) in zip(axes.flat, panels):
        change = meta_minus_base(tables[stem], column, stem).set_index(["backbone", "variant"])
        joined = gain.merge(change, left_index=True, right_index=True, suffixes=("_x", "_y")).reset_index()
        for backbone, part in joined.groupby("backbone", sort=True):
            ax.scatter(part["delta_x"], part["delta_y"], c=[colours[v] for v in part["variant"]],
                       marker=markers[backbone], s=28, edgecolors="none", gid=backbone)
        ax.margins(0.1)
        ax.axhline(0, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("Δ THINGS zero-shot acc. (meta − base)")
        ax.set_ylabel(f"Δ {label}")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colour, marker="o", linestyle="none", label=name) for name, colour in colours.items()]
    handles += [Line2D([], [], color="0.3", marker=marker, linestyle="none", label=f"backbone {backbone}")
                for backbone, marker in markers.items()]
    outside_legend(fig, handles, "variant (colour), backbone (marker)")
    fig.suptitle("Alignment gain vs downstream change per backbone")
    return fig


def gain_figure(alignment: pd.DataFrame, tables: dict[str, pd.DataFrame], out: str | Path) -> None:
    fig = draw_gain(alignment, tables)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
