"""Brain figures: ROI bars (base vs meta-learned, FDR stars) and meta − base R² on the subject's volume (nilearn).

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

from metalign.io import DataContractError, atomic_path  # noqa: E402


def _save(fig: plt.Figure, out: str | os.PathLike) -> None:
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def roi_figure(folds: pd.DataFrame, stats: pd.DataFrame, out: str | os.PathLike, title: str,
               roi_order: Sequence[str] = ()) -> None:
    """One panel per backbone: bars per ROI for base and each variant (mean over subjects of the fold mean of
    noise-ceiling-normalised R²; error bars: SEM over subjects), stars = BH-FDR q of variant − base."""
    per_subject = folds.groupby(["backbone", "variant", "subject", "roi"])["value"].mean().reset_index()
    summary = per_subject.groupby(["backbone", "variant", "roi"])["value"].agg(["mean", "sem"]).reset_index()
    present = set(stats["roi"]) if len(stats) else set(summary["roi"])
    rois = [r for r in roi_order if r in present] + sorted(present - set(roi_order))
    backbones = sorted(summary["backbone"].unique())
    variants = ["base"] + sorted(v for v in summary["variant"].unique() if v != "base")
    width = 0.8 / len(variants)
    size = (float(np.clip(0.55 * len(rois) * len(variants) + 2, 6.0, 24.0)), 3.0 * len(backbones))
    fig, axes = plt.subplots(len(backbones), 1, figsize=size, squeeze=False, layout="constrained")
    for ax, backbone in zip(axes[:, 0], backbones):
        for k, variant in enumerate(variants):
            rows = summary[(summary["backbone"] == backbone) & (summary["variant"] == variant)].set_index("roi")
            rows = rows.reindex(rois)
            x = np.arange(len(rois)) - 0.4 + (k + 0.5) * width
            sem = rows["sem"].fillna(0.0).to_numpy()
            ax.bar(x, rows["mean"], width, yerr=sem, label=variant, capsize=2)
            if variant == "base":
                continue
            marks = stats[(stats["backbone"] == backbone) & (stats["variant"] == variant)].set_index("roi")
            for xi, roi, top in zip(x, rois, rows["mean"].to_numpy() + sem):
                mark = marks["stars"].get(roi, "") if len(marks) else ""
                if isinstance(mark, str) and mark and np.isfinite(top):
                    ax.text(xi, max(top, 0.0), mark, ha="center", va="bottom", fontsize=8)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(np.arange(len(rois)), rois, rotation=30)
        ax.set_ylabel("R² / noise ceiling")
        ax.set_title(backbone, fontsize=10)
    axes[0, 0].legend(frameon=False, fontsize=8, ncol=min(len(variants), 5))
    fig.suptitle(title)
    _save(fig, out)


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
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels)), squeeze=False)
    for ax, (label, values, xyz, mask_path) in zip(axes[:, 0], panels):
        image, mask = volume_image(np.nan_to_num(values), xyz, mask_path)
        display = plotting.plot_stat_map(image, bg_img=mask, axes=ax, display_mode="z", cut_coords=n_cuts,
                                         cmap="RdBu_r", vmin=-limit, vmax=limit, symmetric_cbar=True, threshold=1e-6,
                                         draw_cross=False, annotate=False, black_bg=False, title=label, colorbar=True)
        display.add_contours(mask, levels=[0.5], colors="grey", linewidths=0.8)
    fig.suptitle(title)
    _save(fig, out)
