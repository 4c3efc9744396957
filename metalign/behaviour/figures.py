"""THINGS odd-one-out, behaviour and geometry figures, drawn only from pipeline outputs (docs/methods.md P-65): McFadden R² (÷ noise ceiling for
odd-one-out) with error bars across participants and PXP annotations, one panel per subset (Levels triplet types);
geometry bars with bootstrap intervals; the t-SNE maps of base and meta (meta Procrustes-aligned to base)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from metalign.behaviour.geometry import procrustes_align, tsne_map
from metalign.results import save_figure  # noqa: E402

SUBSET_ORDER = ("all", "within_class", "between_class", "class_border", "none")
GEOMETRY_PANELS = (("cka", "linear CKA vs human embedding"), ("class_sep_fine", "class separation (fine)"),
                   ("class_sep_coarse", "class separation (coarse)"))


def bars_vs_base(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per (subset, backbone, model): the model's values in its `<variant>_vs_base` comparison (base from
    the first such comparison), the PXP of the variant over base and the y value/error to plot."""
    pairs = stats[stats["comparison"].str.endswith("_vs_base")]
    variant_rows = pairs[pairs["model"] != "base"]
    base_rows = pairs[pairs["model"] == "base"].drop_duplicates(["subset", "backbone"])
    rows = pd.concat([base_rows, variant_rows], ignore_index=True)
    normalised = rows["noise_ceiling"].notna() & (rows["noise_ceiling"] > 0)
    rows["value"] = np.where(normalised, rows["r2_normalised_participant_mean"], rows["r2_participant_mean"])
    rows["error"] = np.where(normalised, rows["r2_normalised_participant_sem"], rows["r2_participant_sem"])
    rows.loc[rows["model"] == "base", "pxp"] = np.nan
    return rows


def behaviour_figure(stats: pd.DataFrame, out: str | Path, title: str) -> None:
    """Grouped bars per subset panel: backbones on x, base then variants; error bars = SEM across participants;
    the PXP of each variant against base above its bar."""
    rows = bars_vs_base(stats)
    subsets = [s for s in SUBSET_ORDER if s in set(rows["subset"])] + sorted(set(rows["subset"]) - set(SUBSET_ORDER))
    backbones = sorted(rows["backbone"].unique())
    models = ["base"] + sorted(set(rows["model"]) - {"base"})
    normalised = bool(rows["noise_ceiling"].notna().any())
    fig, axes = plt.subplots(1, max(1, len(subsets)), figsize=(1.2 + 2.2 * len(backbones) * len(subsets), 3.6),
                             squeeze=False, sharey=True)
    width = 0.8 / len(models)
    for ax, subset in zip(axes[0], subsets):
        part = rows[rows["subset"] == subset]
        for offset, model in enumerate(models):
            values = part[part["model"] == model].set_index("backbone").reindex(backbones)
            x = np.arange(len(backbones)) + offset * width - 0.4 + width / 2
            ax.bar(x, values["value"], width, yerr=values["error"], capsize=2, label=model)
            for xi, value, error, pxp in zip(x, values["value"], values["error"], values["pxp"]):
                if np.isfinite(pxp):
                    ax.annotate(f"pxp {pxp:.2f}", (xi, value + (error if np.isfinite(error) else 0)),
                                textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(np.arange(len(backbones)), backbones, rotation=20)
        n = part["n_participants"].max() if len(part) else 0
        ax.set_title(f"{subset} (n = {n})", fontsize=9)
    axes[0][0].set_ylabel("McFadden R² / noise ceiling" if normalised else "McFadden R²")
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.suptitle(title)
    save_figure(fig, out)


def geometry_figure(table: pd.DataFrame, out: str | Path) -> None:
    """CKA and class separation (fine, coarse) per backbone × representation; error bars ± 1.96 bootstrap SD around
    the estimate (percentile intervals are in the table; resampling duplicates bias small-sample CKA replicates)."""
    backbones = sorted(table["backbone"].unique())
    variants = ["base"] + sorted(set(table["variant"]) - {"base"})
    fig, axes = plt.subplots(1, len(GEOMETRY_PANELS), figsize=(4.2 * len(GEOMETRY_PANELS), 3.4), squeeze=False)
    width = 0.8 / len(variants)
    for ax, (column, label) in zip(axes[0], GEOMETRY_PANELS):
        for offset, variant in enumerate(variants):
            rows = table[table["variant"] == variant].set_index("backbone").reindex(backbones)
            ax.bar(np.arange(len(backbones)) + offset * width - 0.4 + width / 2, rows[column], width,
                   yerr=1.96 * rows[f"{column}_boot_sd"], capsize=2, label=variant)
        ax.set_xticks(np.arange(len(backbones)), backbones, rotation=20)
        ax.set_ylabel(label)
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.suptitle("THINGS representational geometry: base vs meta-learned")
    save_figure(fig, out)


def tsne_figure(base: np.ndarray, meta: np.ndarray, labels: np.ndarray, out: str | Path, title: str,
                seed: int = 1234) -> None:
    """Side-by-side t-SNE maps of the concept representations, meta Procrustes-aligned to base, coloured by label."""
    base_map = tsne_map(base, seed)
    meta_map = procrustes_align(tsne_map(meta, seed), base_map)
    classes = sorted(set(labels))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(1, len(classes))))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, points, name in zip(axes, (base_map, meta_map), ("base", "meta (Procrustes-aligned)")):
        for colour, label in zip(colours, classes):
            mask = labels == label
            ax.scatter(points[mask, 0], points[mask, 1], s=8, color=colour, label=label)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[1].legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    save_figure(fig, out)


# --------------------------------------------------------------------------------------------- CLI


# (column, axis label, chance level) of the THINGS summary table
THINGS_PANELS = (("zero_shot_acc", "zero-shot accuracy", 1 / 3), ("cv_acc", "CV accuracy", 1 / 3),
                 ("mcfadden_r2", "McFadden R² (CV)", 0.0))


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
    save_figure(fig, out)
