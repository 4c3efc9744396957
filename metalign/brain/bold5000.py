"""BOLD5000 Release 2.0 single-trial GLMsingle betas per ROI → a prepared subject (datasets.md §2.2).

The format read here is defined from the Release 2.0 description and the way public code loads it; file names and
the trial order are *unverified* against the KiltHub record (datasets.md marks id and layout unverified):

    <root>/BOLD5000_GLMsingle_ROI_betas/py/CSI<s>_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_<ROI>.npy
        float array (n_trials, n_voxels of that ROI); ROIs LH/RH × EarlyVis, LOC, PPA, OPA, RSC
    <root>/BOLD5000_Stimuli/Stimuli_Presentation_Lists/CSI<s>/CSI<s>_sess<NN>/<…>_run<NN>.txt
        one presented image file name per line; a `rep_` prefix marks a repeated image

Assumption (unverified): the beta rows follow the presentation lists in session, run, line order; the reader
checks only that the counts agree. Voxels of different ROI files are distinct voxels. Trials of images whose name
starts with an excluded prefix (COCO, seen by the meta-learner's training set) are dropped after the noise
ceiling has been computed from all repeated images.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from metalign.brain.stats import noise_ceiling
from metalign.brain.subject import Subject
from metalign.io import DataContractError

BETAS = "BOLD5000_GLMsingle_ROI_betas/py/{subject}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{roi}.npy"
LISTS = "BOLD5000_Stimuli/Stimuli_Presentation_Lists/{subject}"
ROI_FILES = tuple(f"{h}{r}" for r in ("EarlyVis", "LOC", "PPA", "OPA", "RSC") for h in ("LH", "RH"))
REPEAT_PREFIX = "rep_"
_SESSION = re.compile(r"sess(\d+)$")
_RUN = re.compile(r"run(\d+)\.txt$")


def read_presentation_lists(root: str | os.PathLike, subject: str) -> pd.DataFrame:
    """Trials in presentation order: session, run, stimulus (file name without `rep_`), marked_repeat."""
    folder = Path(root) / LISTS.format(subject=subject)
    sessions = sorted((int(m.group(1)), p) for p in folder.glob(f"{subject}_sess*") if (m := _SESSION.search(p.name)))
    if not sessions:
        raise DataContractError(f"no session folders {subject}_sess<NN> in {folder}")
    rows = []
    for session, path in sessions:
        runs = sorted((int(m.group(1)), f) for f in path.glob("*.txt") if (m := _RUN.search(f.name)))
        if not runs:
            raise DataContractError(f"no run lists *_run<NN>.txt in {path}")
        for run, file in runs:
            for name in (line.strip() for line in file.read_text().splitlines()):
                if name:
                    rows.append({"session": session, "run": run, "stimulus": name.removeprefix(REPEAT_PREFIX),
                                 "marked_repeat": name.startswith(REPEAT_PREFIX)})
    return pd.DataFrame(rows)


def _zscore_sessions(betas: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    out = np.empty_like(betas, dtype=np.float32)
    for session in np.unique(sessions):
        rows = sessions == session
        block = betas[rows].astype(np.float64)
        sd = block.std(0)
        out[rows] = (block - block.mean(0)) / np.where(sd > 0, sd, 1.0)
    return out


def load_subject(root: str | os.PathLike, subject: str, nc_threshold: float, rois: Sequence[str] = ROI_FILES,
                 zscore_sessions: bool = True, exclude_prefixes: Sequence[str] = ("COCO_",)) -> Subject:
    """Voxels whose single-trial noise ceiling (percent, from repeated images) exceeds `nc_threshold`."""
    trials = read_presentation_lists(root, subject)
    blocks, voxel_ids, membership = [], [], []
    for k, roi in enumerate(rois):
        path = Path(root) / BETAS.format(subject=subject, roi=roi)
        if not path.exists():
            raise DataContractError(f"BOLD5000 ROI betas not found: {path}")
        betas = np.load(path, allow_pickle=False)
        if betas.ndim != 2 or len(betas) != len(trials):
            raise DataContractError(f"{path}: shape {betas.shape}, expected ({len(trials)} trials, voxels) as in "
                                    f"the presentation lists of {subject}")
        blocks.append(betas.astype(np.float32))
        voxel_ids += [f"{roi}:{j}" for j in range(betas.shape[1])]
        membership.append(np.full(betas.shape[1], k))
    betas = np.concatenate(blocks, axis=1)
    if not np.isfinite(betas).all():
        raise DataContractError(f"{subject}: BOLD5000 betas contain NaN or inf")
    sessions = trials["session"].to_numpy(np.int64)
    if zscore_sessions:
        betas = _zscore_sessions(betas, sessions)
    nc = noise_ceiling(betas, trials["stimulus"].to_numpy(object))
    keep_voxels = nc * 100.0 > nc_threshold
    if not keep_voxels.any():
        raise DataContractError(f"{subject}: no voxel has a noise ceiling above {nc_threshold}%")
    keep_trials = ~trials["stimulus"].str.startswith(tuple(exclude_prefixes)).to_numpy() if exclude_prefixes \
        else np.ones(len(trials), dtype=bool)
    roi_of = np.concatenate(membership)[keep_voxels]
    return Subject(
        dataset="bold5000", subject=subject, betas=np.ascontiguousarray(betas[np.ix_(keep_trials, keep_voxels)]),
        stimulus=trials["stimulus"].to_numpy(object)[keep_trials], session=sessions[keep_trials],
        voxel_id=np.array(voxel_ids, dtype=object)[keep_voxels], nc=nc[keep_voxels], roi_names=list(rois),
        rois=roi_of[:, None] == np.arange(len(rois))[None, :], xyz=None, match="basename",
        attrs={"source": str(root), "nc_threshold_percent": nc_threshold, "zscore_sessions": zscore_sessions,
               "exclude_prefixes": list(exclude_prefixes), "n_trials_total": len(trials),
               "n_trials_excluded": int((~keep_trials).sum()), "n_voxels_total": len(voxel_ids),
               "n_voxels_selected": int(keep_voxels.sum()), "format_verified": False})
