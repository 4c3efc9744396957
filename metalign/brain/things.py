"""THINGS-fMRI single-trial betas (docs/datasets.md §2.1; figshare `betas_csv`) → a prepared subject.

Per subject P: `sub-0P_ResponseData.h5` (pandas fixed frame `ResponseData`: `voxel_id` + one column per trial, the
trial columns in the row order of the stimulus table), `sub-0P_VoxelMetadata.csv` (`voxel_id`, `voxel_x/y/z`,
`nc_singletrial` in percent, binary ROI columns such as V1, lFFA, rFFA) and `sub-0P_StimulusMetadata.csv`
(`trial_type`, `session`, `run`, `trial_id`, `stimulus`, `concept`; catch trials are not in the table release).
Voxels are selected on the metadata first and only their rows are read (docs/methods.md P-21 and P-50).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from metalign.brain.hdf import read_rows_by_id
from metalign.brain.subject import Subject
from metalign.io import DataContractError

RESPONSE_KEY = "ResponseData"
VOXEL_COLUMNS = ("voxel_id", "voxel_x", "voxel_y", "voxel_z", "nc_singletrial")
STIMULUS_COLUMNS = ("session", "stimulus", "concept")
# Voxel-metadata columns that are not ROI memberships (reliability, pRF fits, coordinates).
NON_ROI_COLUMNS = {"voxel_id", "subject_id", "voxel_x", "voxel_y", "voxel_z", "nc_singletrial", "nc_testset",
                   "splithalf_uncorrected", "splithalf_corrected", "prf-eccentricity", "prf-polarangle",
                   "prf-rsquared", "prf-size"}


def subject_files(betas_dir: str | os.PathLike, subject: str) -> dict[str, Path]:
    """The three release files of subject `subject` ("01", "02", "03")."""
    root = Path(betas_dir)
    return {"responses": root / f"sub-{subject}_ResponseData.h5",
            "voxels": root / f"sub-{subject}_VoxelMetadata.csv",
            "stimuli": root / f"sub-{subject}_StimulusMetadata.csv"}


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.exists():
        raise DataContractError(f"THINGS-fMRI file not found: {path}")
    frame = pd.read_csv(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataContractError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)[:12]}…")
    return frame


def roi_columns_of(voxels: pd.DataFrame) -> list[str]:
    """Binary membership columns: every column outside the known non-ROI set whose values are all 0/1."""
    return [c for c in voxels.columns if c not in NON_ROI_COLUMNS and voxels[c].isin([0, 1]).all()]


def load_subject(betas_dir: str | os.PathLike, subject: str, nc_threshold: float) -> Subject:
    """Voxels with `nc_singletrial` > `nc_threshold` (percent) and all their trials."""
    files = subject_files(betas_dir, subject)
    voxels = _read_csv(files["voxels"], VOXEL_COLUMNS)
    stimuli = _read_csv(files["stimuli"], STIMULUS_COLUMNS)
    repeated = voxels["voxel_id"][voxels["voxel_id"].duplicated()]
    if len(repeated):
        raise DataContractError(f"{files['voxels']} repeats voxel_id {repeated.iloc[0]}")
    chosen = voxels[voxels["nc_singletrial"] > nc_threshold]
    if chosen.empty:
        raise DataContractError(f"{files['voxels']}: no voxel has nc_singletrial > {nc_threshold}")
    values, columns = read_rows_by_id(files["responses"], "voxel_id", chosen["voxel_id"].to_numpy(), RESPONSE_KEY)
    expected = [str(i) for i in range(len(stimuli))]
    if columns != expected:
        raise DataContractError(f"{files['responses']}: trial columns must be 0..{len(stimuli) - 1} in the row order "
                                f"of {files['stimuli'].name} ({len(stimuli)} trials); found {len(columns)} columns "
                                f"starting {columns[:3]}")
    rois = roi_columns_of(voxels)
    return Subject(
        dataset="things_fmri", subject=f"sub-{subject}", betas=np.ascontiguousarray(values.T),
        stimulus=(stimuli["concept"].astype(str) + "/" + stimuli["stimulus"].astype(str)).to_numpy(dtype=object),
        session=stimuli["session"].to_numpy(dtype=np.int64), voxel_id=chosen["voxel_id"].astype(str).to_numpy(),
        nc=chosen["nc_singletrial"].to_numpy(dtype=np.float64) / 100.0, roi_names=rois,
        rois=chosen[rois].to_numpy(dtype=bool), xyz=chosen[["voxel_x", "voxel_y", "voxel_z"]].to_numpy(np.int64),
        match="id",
        attrs={"source": {k: str(v) for k, v in files.items()}, "nc_threshold_percent": nc_threshold,
               "n_voxels_total": len(voxels), "n_voxels_selected": len(chosen),
               "trial_types": stimuli["trial_type"].value_counts().to_dict() if "trial_type" in stimuli else {}})
