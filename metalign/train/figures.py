"""Training figures: learning curves (validation score and accuracy against step) and in-context-learning curves
(accuracy and MSE against position in the episode), one line per backbone/variant."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import h5py  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from metalign.io import read_attrs  # noqa: E402
from metalign.results import save_figure  # noqa: E402
from metalign.train.icl import CURVES  # noqa: E402


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
    save_figure(fig, out)


def icl_figure(paths: list[str | Path], out: str | Path) -> None:
    """Accuracy, positive-token MSE and all-token MSE against position, one line per backbone/variant."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for path in map(Path, paths):
        with h5py.File(path, "r") as handle:
            curves = {name: handle[name][:] for name in CURVES}
            n_episodes = read_attrs(handle)["n_episodes"]
        label = f"{path.parent.name}/{path.stem} (n={n_episodes})"
        for ax, name in zip(axes, CURVES):
            ax.plot(np.arange(1, len(curves[name]) + 1), curves[name], label=label)
    for ax, ylabel in zip(axes, ("accuracy", "MSE, positive tokens", "MSE, all tokens")):
        ax.set_xlabel("position in episode")
        ax.set_ylabel(ylabel)
    axes[0].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(frameon=False, fontsize=7)
    fig.suptitle("In-context learning of held-out functions (fixed evaluation episodes)")
    save_figure(fig, out)
