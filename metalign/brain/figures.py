"""Brain figures: ROI points (base vs meta-learned, filled where FDR-significant) and meta − base R² on the subject's
volume (nilearn). `draw_rois` returns the Figure (its artists are what was plotted), `roi_figure` saves it.

nilearn is imported only here, lazily, and is always given the subject's own brain mask as background, so no
template or atlas is ever fetched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from metalign.io import DataContractError  # noqa: E402
from metalign.plotting import BASE, grouped_points, outside_legend, panel_width, style_handles, styles  # noqa: E402
from metalign.results import save_figure  # noqa: E402


def draw_rois(folds: pd.DataFrame, stats: pd.DataFrame, title: str, roi_order: Sequence[str] = ()) -> Figure:
    """One panel per backbone: per ROI, base and each variant as the mean over subjects of the fold mean of
    noise-ceiling-normalised R², whiskers ± 1 SEM over subjects; a variant's point is filled where its difference to
    base is marked (BH-FDR q < .05, `stars`), hollow otherwise. Every variant has its own colour and marker and the
    legend sits outside the axes, so 23 variants × 12 ROIs stay apart."""
    per_subject = folds.groupby(["backbone", "variant", "subject", "roi"])["value"].mean().reset_index()
    summary = per_subject.groupby(["backbone", "variant", "roi"])["value"].agg(["mean", "sem"]).reset_index()
    present = set(stats["roi"]) if len(stats) else set(summary["roi"])
    rois = [r for r in roi_order if r in present] + sorted(present - set(roi_order))
    backbones = sorted(summary["backbone"].unique())
    style = styles(summary["variant"])
    marked = stats.loc[stats["stars"].astype(str) != "", ["backbone", "variant", "roi"]].assign(marked=True)
    summary = summary.merge(marked, on=["backbone", "variant", "roi"], how="left")
    summary["filled"] = (summary["variant"] == BASE) | summary["marked"].eq(True)
    sem = summary["sem"].fillna(0.0)
    points = summary.assign(group=summary["roi"], member=summary["variant"], value=summary["mean"],
                            low=summary["mean"] - sem, high=summary["mean"] + sem)
    size = (panel_width(len(rois), len(style)) + 2.0, 2.6 * len(backbones) + 0.8)
    fig, axes = plt.subplots(len(backbones), 1, figsize=size, squeeze=False, sharex=True, layout="constrained")
    for ax, backbone in zip(axes[:, 0], backbones):
        grouped_points(ax, points[points["backbone"] == backbone], rois, style)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel("R² / noise ceiling", fontsize=8)
        ax.set_title(backbone, fontsize=10)
    explain = [Line2D([], [], color="0.3", marker="o", linestyle="none", label="vs base: q < .05"),
               Line2D([], [], color="0.3", marker="o", mfc="white", linestyle="none", label="vs base: n.s.")]
    outside_legend(fig, style_handles(style) + explain, "representation")
    fig.suptitle(title)
    return fig


def roi_figure(folds: pd.DataFrame, stats: pd.DataFrame, out: str | os.PathLike, title: str,
               roi_order: Sequence[str] = ()) -> None:
    save_figure(draw_rois(folds, stats, title, roi_order), out)


def volume_image(values: np.ndarray, xyz: np.ndarray, mask_path: str | os.PathLike):
    """A NIfTI on the brain mask's grid holding `values` at the voxel indices `xyz` (0 elsewhere)."""
    import nibabel as nib

    mask_path = Path(mask_path)
    if not mask_path.exists():
        raise DataContractError(f"brain mask not found: {mask_path}")
    mask = nib.load(str(mask_path))
    shape = mask.shape[:3]
    xyz = np.asarray(xyz, dtype=np.int64)
    if (xyz < 0).any() or (xyz >= np.array(shape)).any():
        raise DataContractError(f"{mask_path}: voxel coordinates fall outside its grid {shape}")
    data = np.zeros(shape, dtype=np.float32)
    data[tuple(xyz.T)] = values
    return nib.Nifti1Image(data, mask.affine), mask


def volume_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray, str | os.PathLike]], out: str | os.PathLike,
                  title: str, n_cuts: int = 6) -> None:
    """One row per (label, values, xyz, mask) panel: axial cuts of the values over the subject's brain mask."""
    from nilearn import plotting

    limit = max(float(np.nanmax(np.abs(values))) for _, values, _, _ in panels) or 1.0
    images = [volume_image(np.nan_to_num(values), xyz, mask_path) for _, values, xyz, mask_path in panels]  # may raise
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels)), squeeze=False)
    for ax, (label, *_), (image, mask) in zip(axes[:, 0], panels, images):
        display = plotting.plot_stat_map(image, bg_img=mask, axes=ax, display_mode="z", cut_coords=n_cuts,
                                         cmap="RdBu_r", vmin=-limit, vmax=limit, symmetric_cbar=True, threshold=1e-6,
                                         draw_cross=False, annotate=False, black_bg=False, title=label, colorbar=True)
        display.add_contours(mask, levels=[0.5], colors="grey", linewidths=0.8)
    fig.suptitle(title)
    save_figure(fig, out)
