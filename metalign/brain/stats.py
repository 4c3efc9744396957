"""Statistics of the encoding results (docs/methods.md §9.5): per-voxel R² and noise ceilings, ROI summaries, the exact
sign-flip test over folds, Fisher's combination over subjects and Benjamini–Hochberg FDR over ROIs.

No voxel-level test is reported as inference (voxels are not independent; docs/methods.md P-23), and there is no permutation null
read from files nothing produces (docs/methods.md P-24): every p-value here is computed from the fold values it is given.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import chdtrc  # χ² survival function; scipy.stats costs ~1 s to import

from metalign.io import DataContractError

P_FLOOR = 1e-16              # docs/methods.md §9.5 step 3: log(max(p, 1e-16))
MAX_EXACT_FOLDS = 20         # 2^20 sign vectors: the largest exact test kept in memory comfortably
HEMISPHERE_PREFIXES = (("l", "r"), ("LH", "RH"))  # THINGS-fMRI lFFA/rFFA; BOLD5000 LHPPA/RHPPA
STAR_LEVELS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))


def r2_columns(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """R² per column on held-out data: 1 − SS_res / SS_tot, SS_tot around the held-out mean (NaN if constant)."""
    y = np.asarray(y, dtype=np.float64)
    resid = ((y - pred) ** 2).sum(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - resid / total, np.nan)


def noise_ceiling(betas: np.ndarray, stimulus: Sequence[str], n_average: int = 1) -> np.ndarray:
    """Noise ceiling (fraction of variance, 0..1) of the mean of `n_average` trials, from repeated stimuli.

    The method of the NSD and THINGS-fMRI releases: responses are standardised per voxel, the noise variance is the
    mean over repeated stimuli of the variance across repetitions, the signal variance is 1 − noise (floored at 0),
    ncsnr = sd_signal / sd_noise and NC = ncsnr² / (ncsnr² + 1/n).
    """
    betas = np.asarray(betas, dtype=np.float64)
    codes, uniques = pd.factorize(pd.Series(np.asarray(stimulus, dtype=object)))
    counts = np.bincount(codes, minlength=len(uniques))
    repeated = counts[codes] >= 2
    if counts.max(initial=0) < 2:
        raise DataContractError("noise ceiling needs repeated stimuli; none is shown more than once")
    sd = betas.std(0)
    z = (betas - betas.mean(0)) / np.where(sd > 0, sd, 1.0)
    z, codes = z[repeated], codes[repeated]
    frame = pd.DataFrame(z).groupby(codes)
    noise_var = frame.var(ddof=1).mean(axis=0).to_numpy()
    signal_var = np.clip(1.0 - noise_var, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ncsnr2 = np.where(noise_var > 0, signal_var / noise_var, np.inf)
        return np.where(np.isinf(ncsnr2), 1.0, ncsnr2 / (ncsnr2 + 1.0 / n_average))


def sign_flip_pvalue(diffs: Sequence[float]) -> float:
    """Exact two-sided sign-flip test of mean(d) = 0 over all 2^F sign vectors (docs/methods.md §9.5 step 2).

    p = mean over ε of 1[|mean(ε·d)| ≥ |mean(d)|]; the identity and its negation always count, so p ≥ 2 / 2^F.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all():
        raise ValueError(f"sign-flip test needs a non-empty finite 1-d array, got {d!r}")
    if len(d) > MAX_EXACT_FOLDS:
        raise ValueError(f"exact sign-flip test supports at most {MAX_EXACT_FOLDS} folds, got {len(d)}")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    observed = abs(d.sum())
    tolerance = 1e-12 * np.abs(d).sum()  # the identity must count despite rounding in the dot product
    return float(np.mean(np.abs(signs @ d) >= observed - tolerance))


def fisher_combine(pvalues: Sequence[float]) -> tuple[float, float]:
    """Fisher's method: X² = −2 Σ log max(p, 1e-16) ~ χ²(2k); returns (X², p)."""
    p = np.asarray(pvalues, dtype=np.float64)
    if len(p) == 0 or ((p < 0) | (p > 1) | ~np.isfinite(p)).any():
        raise ValueError(f"Fisher's method needs p-values in [0, 1], got {p!r}")
    chi2 = float(-2.0 * np.log(np.maximum(p, P_FLOOR)).sum())
    return chi2, float(chdtrc(2 * len(p), chi2))


def bh_fdr(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN entries stay NaN and do not count towards m."""
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


def stars(q: float, mean_a: float, mean_b: float) -> str:
    """Significance marks at q < .05/.01/.001; none when both model means are below 0 (docs/methods.md §9.5 step 4)."""
    if not np.isfinite(q) or (mean_a < 0 and mean_b < 0):
        return ""
    return next((mark for level, mark in STAR_LEVELS if q < level), "")


def roi_columns(available: Sequence[str], wanted: Sequence[str]) -> dict[str, list[str]]:
    """Merged ROI → the membership columns it averages: the name itself, or its left/right pair."""
    present = set(available)
    out: dict[str, list[str]] = {}
    for roi in wanted:
        if roi in present:
            out[roi] = [roi]
            continue
        for left, right in HEMISPHERE_PREFIXES:
            pair = [c for c in (left + roi, right + roi) if c in present]
            if pair:
                out[roi] = pair
                break
    return out


def roi_fold_values(values: np.ndarray, roi_names: Sequence[str], membership: np.ndarray,
                    wanted: Sequence[str]) -> pd.DataFrame:
    """ROI value per fold: the mean over the ROI's voxels of `values` (n_voxels, n_folds); a left/right pair is
    merged by the unweighted mean of the two ROI means. ROIs without voxels are left out."""
    rows = []
    for roi, columns in roi_columns(roi_names, wanted).items():
        means, n_voxels = [], 0
        for column in columns:
            mask = membership[:, list(roi_names).index(column)].astype(bool)
            if mask.any():
                means.append(np.nanmean(values[mask], axis=0))
                n_voxels += int(mask.sum())
        if not means:
            continue
        merged = np.mean(means, axis=0)
        rows += [{"roi": roi, "fold": fold, "value": float(v), "n_voxels": n_voxels} for fold, v in enumerate(merged)]
    return pd.DataFrame(rows, columns=["roi", "fold", "value", "n_voxels"])


def compare_rois(folds: pd.DataFrame, reference: str, subjects: Sequence[str]) -> pd.DataFrame:
    """Variant − reference per ROI: sign-flip p per subject over folds, Fisher over subjects, BH over ROIs.

    `folds` has columns representation, subject, roi, fold, value for exactly one scheme × backbone; every
    non-reference representation is compared with the reference on the same folds. ROIs must be present for every
    subject (docs/methods.md §9.5); others are dropped.
    """
    rows = []
    wide = folds.pivot_table(index=["subject", "roi", "fold"], columns="representation", values="value")
    rois = sorted(set.intersection(*(set(folds.loc[folds["subject"] == s, "roi"]) for s in subjects)))
    for variant in [c for c in wide.columns if c != reference]:
        block = []
        for roi in rois:
            row: dict[str, object] = {"variant": variant, "reference": reference, "roi": roi}
            pvals, base_means, meta_means = [], [], []
            for subject in subjects:
                pair = wide.loc[(subject, roi)][[reference, variant]]
                if pair.isna().any().any():
                    raise DataContractError(f"subject {subject}, ROI {roi}: folds of {variant!r} and "
                                            f"{reference!r} differ")
                diff = (pair[variant] - pair[reference]).to_numpy()
                pvals.append(sign_flip_pvalue(diff))
                row[f"p_{subject}"] = pvals[-1]
                base_means.append(pair[reference].mean())
                meta_means.append(pair[variant].mean())
            row["chi2"], row["p_fisher"] = fisher_combine(pvals)
            row.update(df=2 * len(subjects), n_subjects=len(subjects), n_folds=len(pair),
                       reference_mean=float(np.mean(base_means)), variant_mean=float(np.mean(meta_means)))
            row["diff"] = row["variant_mean"] - row["reference_mean"]
            block.append(row)
        q = bh_fdr([r["p_fisher"] for r in block])
        for row, qv in zip(block, q):
            row["q_fdr"] = float(qv)
            row["stars"] = stars(qv, row["reference_mean"], row["variant_mean"])
        rows += block
    return pd.DataFrame(rows)


def alpha_edges(alpha_index: np.ndarray, n_alphas: int) -> Mapping[str, float]:
    """How often the selected α sits on an edge of the grid (docs/methods.md P-22): a sign that the grid is too narrow."""
    alpha_index = np.asarray(alpha_index)
    return {"frac_low_edge": float(np.mean(alpha_index == 0)),
            "frac_high_edge": float(np.mean(alpha_index == n_alphas - 1))}
