"""Training figures: learning curves (validation score and accuracy against step) and in-context-learning curves
(accuracy and MSE against position in the episode). One row of panels per backbone, one line per variant in the
variant's own colour and marker (`metalign.plotting`), so 23 variants × 7 backbones stay apart; the legend sits
outside the axes. Each `draw_*` returns the Figure (its lines are what was plotted), each `*_figure` saves it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import h5py  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from metalign.io import read_attrs  # noqa: E402
from metalign.plotting import Style, outside_legend, styles  # noqa: E402
from metalign.results import save_figure  # noqa: E402
from metalign.train.icl import CURVES  # noqa: E402

N_MARKS = 8              # markers per line: enough to tell variants apart, few enough not to hide the curve
PANEL_SIZE = (4.0, 2.3)  # inches
LEGEND_INCHES = 1.8


def _grid(n_rows: int, n_cols: int) -> tuple[Figure, np.ndarray]:
    """Rows = backbones sharing the x axis; each panel keeps its own y range (MSEs differ by orders of magnitude
    between backbones, and a shared range would flatten the smaller curves)."""
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(PANEL_SIZE[0] * n_cols + LEGEND_INCHES,
                                                      PANEL_SIZE[1] * n_rows + 0.6),
                             squeeze=False, sharex=True, layout="constrained")
    return fig, axes


def _line(ax: Axes, x: np.ndarray, y: np.ndarray, backbone: str, variant: str, style: Style) -> None:
    colour, marker = style[variant]
    ax.plot(x, y, color=colour, marker=marker, markevery=max(1, len(x) // N_MARKS), ms=3, linewidth=1.2,
            label=variant, gid=f"{backbone}/{variant}")


def _legend(fig: Figure, style: Style, extra: list[Line2D]) -> None:
    handles = [Line2D([], [], color=colour, marker=marker, ms=3, label=name) for name, (colour, marker) in style.items()]
    outside_legend(fig, handles + extra, "variant")


def _key(path: Path, suffix: str) -> tuple[str, str]:
    """`…/<backbone>/<variant><suffix>`: the DAG's layout names every curve."""
    return path.parent.name, path.name.removesuffix(suffix)


def draw_curves(paths: list[str | Path]) -> Figure:
    """Validation selection score and token accuracy against step; one row per backbone, one line per variant."""
    metrics = {_key(p, ".metrics.csv"): pd.read_csv(p) for p in map(Path, paths)}
    backbones = sorted({b for b, _ in metrics})
    style = styles(v for _, v in metrics)
    fig, axes = _grid(len(backbones), 2)
    for (backbone, variant), frame in metrics.items():
        val = frame[frame["split"] == "val"]
        row = axes[backbones.index(backbone)]
        _line(row[0], val["step"].to_numpy(), val["score"].to_numpy(), backbone, variant, style)
        _line(row[1], val["step"].to_numpy(), val["acc"].to_numpy(), backbone, variant, style)
    for backbone, (score_ax, acc_ax) in zip(backbones, axes):
        score_ax.set_ylabel(f"{backbone}\nselection score S (val)", fontsize=8)
        acc_ax.set_ylabel("token accuracy (val)", fontsize=8)
        acc_ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    _legend(fig, style, [Line2D([], [], color="grey", linestyle="--", label="chance accuracy")])
    fig.suptitle("Meta-learner training: validation curves per backbone")
    return fig


def curves_figure(paths: list[str | Path], out: str | Path) -> None:
    save_figure(draw_curves(paths), out)


def draw_icl(paths: list[str | Path]) -> Figure:
    """Accuracy, positive-token MSE and all-token MSE against position; one row per backbone (titled with its
    episode count), one line per variant."""
    curves, episodes = {}, {}
    for path in map(Path, paths):
        key = _key(path, ".h5")
        with h5py.File(path, "r") as handle:
            curves[key] = {name: handle[name][:] for name in CURVES}
            episodes[key] = int(read_attrs(handle)["n_episodes"])
    backbones = sorted({b for b, _ in curves})
    style = styles(v for _, v in curves)
    fig, axes = _grid(len(backbones), len(CURVES))
    for (backbone, variant), values in curves.items():
        for ax, name in zip(axes[backbones.index(backbone)], CURVES):
            _line(ax, np.arange(1, len(values[name]) + 1), values[name], backbone, variant, style)
    for backbone, row in zip(backbones, axes):
        counts = sorted({n for (b, _), n in episodes.items() if b == backbone})
        row[0].set_title(f"{backbone} (n = {'/'.join(map(str, counts))} episodes)", fontsize=9, loc="left")
        row[0].axhline(0.5, color="grey", linestyle="--", linewidth=1)
        for ax, ylabel in zip(row, ("accuracy", "MSE, positive tokens", "MSE, all tokens")):
            ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("position in episode")
    _legend(fig, style, [Line2D([], [], color="grey", linestyle="--", label="chance accuracy")])
    fig.suptitle("In-context learning of held-out functions (fixed evaluation episodes)")
    return fig


def icl_figure(paths: list[str | Path], out: str | Path) -> None:
    save_figure(draw_icl(paths), out)
