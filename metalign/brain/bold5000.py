"""BOLD5000 Release 2.0 single-trial GLMsingle betas per ROI → a prepared subject (docs/bold5000.md, docs/datasets.md §2.2).

Layout under `root`: two downloads side by side (sources and the public code each fact comes from: docs/bold5000.md).

    BOLD5000_Release_2_0/        subset of figshare article 14456124 (Release 2.0)
        BOLD5000_GLMsingle_ROI_betas/py/CSI<s>_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_<ROI>.npy
                                 (n_trials, n_voxels of the ROI): TYPED betas (HRF fit + GLMdenoise + ridge, percent
                                 signal change), all sessions in trial order; LOC/RSC files may be named LHLO, RHLO,
                                 RHRRSC (the OpenNeuro mask names), read as aliases
        CSI<s>_imgnames.txt      one image file name per trial, the release's own trial order
    BOLD5000_Stimuli/            the stimulus zip
        Stimuli_Presentation_Lists/CSI<s>/CSI<s>_sess<NN>/CSI_sess<NN>_run<NN>.txt
                                 one image file name per line (37 per run); `rep_` marks the 113 repeated images

Trial order: sessions, runs, lines; CSI1–3 have 15 sessions (5,254 trials), CSI4 9 (3,108). The reader checks it on
the files: the lists must name, trial by trial, the images of `CSI<s>_imgnames.txt`, and every ROI file must have that
many rows; a mismatch names the file. Voxels that are non-finite or constant are dropped first. Voxels of different ROI
files are distinct. Trials of images whose name starts with an excluded prefix (COCO, seen by the meta-learner's
training set) are dropped after the noise ceiling has been computed from all repeated images.
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

RELEASE = "BOLD5000_Release_2_0"
BETAS = RELEASE + "/BOLD5000_GLMsingle_ROI_betas/py/{subject}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_{roi}.npy"
IMAGE_NAMES = RELEASE + "/{subject}_imgnames.txt"
LISTS = "BOLD5000_Stimuli/Stimuli_Presentation_Lists/{subject}"
RUN_LIST = "{subject}_sess{session:02d}/CSI_sess{session:02d}_run{run:02d}.txt"   # under LISTS
ROI_FILES = tuple(f"{h}{r}" for r in ("EarlyVis", "LOC", "PPA", "OPA", "RSC") for h in ("LH", "RH"))
ROI_ALIASES = {"LHLOC": ("LHLO",), "RHLOC": ("RHLO",), "RHRSC": ("RHRRSC",)}   # names in the OpenNeuro masks
REPEAT_PREFIX = "rep_"
_SESSION = re.compile(r"sess(\d+)$")
_RUN = re.compile(r"run(\d+)\.txt$")


def read_presentation_lists(root: str | os.PathLike, subject: str) -> pd.DataFrame:
    """Trials in presentation order: session, run, stimulus (file name without `rep_`), marked_repeat."""
    folder = Path(root) / LISTS.format(subject=subject)
    sessions = sorted((int(m.group(1)), p) for p in folder.glob(f"{subject}_sess*")
                      if p.is_dir() and (m := _SESSION.search(p.name)))
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


def check_trial_order(root: str | os.PathLike, subject: str, stimuli: Sequence[str]) -> None:
    """The release's own trial order (`CSI<s>_imgnames.txt`) must name the same image as the lists, trial by trial."""
    path = Path(root) / IMAGE_NAMES.format(subject=subject)
    if not path.exists():
        raise DataContractError(f"BOLD5000 image-name list not found: {path}")
    names = [line.strip().removeprefix(REPEAT_PREFIX) for line in path.read_text().splitlines() if line.strip()]
    if names != list(stimuli):
        k = next((i for i, (a, b) in enumerate(zip(names, stimuli)) if a != b), min(len(names), len(stimuli)))
        found = names[k] if k < len(names) else "<end>"
        listed = stimuli[k] if k < len(stimuli) else "<end>"
        raise DataContractError(
            f"{path}: {len(names)} trials, the presentation lists of {subject} {len(stimuli)}; first difference at "
            f"trial {k}: {found!r} vs {listed!r}")


def roi_path(root: str | os.PathLike, subject: str, roi: str) -> Path:
    """The ROI's betas file, under its own name or a known alias."""
    candidates = [Path(root) / BETAS.format(subject=subject, roi=name) for name in (roi, *ROI_ALIASES.get(roi, ()))]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise DataContractError(f"BOLD5000 ROI betas not found: {', '.join(map(str, candidates))}")
    return found


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
    stimuli = trials["stimulus"].to_numpy(object)
    check_trial_order(root, subject, list(stimuli))
    blocks, voxel_ids, membership, files = [], [], [], []
    for k, roi in enumerate(rois):
        path = roi_path(root, subject, roi)
        betas = np.load(path, allow_pickle=False)
        if betas.ndim != 2 or len(betas) != len(trials):
            raise DataContractError(f"{path}: shape {betas.shape}, expected ({len(trials)} trials, voxels) as in "
                                    f"the presentation lists of {subject}")
        blocks.append(betas.astype(np.float32))
        voxel_ids += [f"{roi}:{j}" for j in range(betas.shape[1])]
        membership.append(np.full(betas.shape[1], k))
        files.append(path.name)
    betas = np.concatenate(blocks, axis=1)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(betas).all(0) & (np.nanstd(betas, 0) > 0)
    if not valid.any():
        raise DataContractError(f"{subject}: every BOLD5000 voxel is non-finite or constant over trials")
    betas, voxel_ids, membership = betas[:, valid], np.array(voxel_ids, dtype=object)[valid], \
        np.concatenate(membership)[valid]
    sessions = trials["session"].to_numpy(np.int64)
    if zscore_sessions:
        betas = _zscore_sessions(betas, sessions)
    nc = noise_ceiling(betas, stimuli)
    keep_voxels = nc * 100.0 > nc_threshold
    if not keep_voxels.any():
        raise DataContractError(f"{subject}: no voxel has a noise ceiling above {nc_threshold}%")
    keep_trials = ~trials["stimulus"].str.startswith(tuple(exclude_prefixes)).to_numpy() if exclude_prefixes \
        else np.ones(len(trials), dtype=bool)
    return Subject(
        dataset="bold5000", subject=subject, betas=np.ascontiguousarray(betas[np.ix_(keep_trials, keep_voxels)]),
        stimulus=stimuli[keep_trials], session=sessions[keep_trials], voxel_id=voxel_ids[keep_voxels],
        nc=nc[keep_voxels], roi_names=list(rois),
        rois=membership[keep_voxels][:, None] == np.arange(len(rois))[None, :], xyz=None, match="basename",
        attrs={"source": str(root), "betas_files": files, "nc_threshold_percent": nc_threshold,
               "zscore_sessions": zscore_sessions, "exclude_prefixes": list(exclude_prefixes),
               "n_trials_total": len(trials), "n_trials_excluded": int((~keep_trials).sum()),
               "n_voxels_total": int(valid.size), "n_voxels_invalid": int((~valid).sum()),
               "n_voxels_selected": int(keep_voxels.sum())})
