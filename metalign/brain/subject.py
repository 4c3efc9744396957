"""One prepared fMRI subject: the selected voxels' single-trial responses and everything the encoding needs.

The readers of the released files (`things`, `bold5000`) select voxels once and write this compact file; every
encoding job (backbone × representation × CV scheme) then reads a few MB instead of the release (docs/methods.md P-50).

HDF5 layout (rows = trials, `ids` = trial ids):
    betas      (n_trials, n_voxels) float32   single-trial responses of the selected voxels
    stimulus   (n_trials,) str                 key of the trial's image in the feature files (see attr `match`)
    session    (n_trials,) int64               scanning session
    voxels/voxel_id (n_voxels,) str            id in the release (THINGS: `voxel_id`; BOLD5000: `<ROI file>:<column>`)
    voxels/nc       (n_voxels,) float64        single-trial noise ceiling as a fraction (R² scale, 0..1)
    voxels/rois     (n_voxels, n_rois) uint8   ROI membership; attr `roi_names`
    voxels/xyz      (n_voxels, 3) int64        volume indices (THINGS only)
attrs: dataset, subject, match (`id` or `basename`), source, selection and library versions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from metalign.io import DataContractError, atomic_path, library_versions, read_attrs, set_attrs

MATCH_RULES = ("id", "basename")


@dataclass
class Subject:
    dataset: str
    subject: str
    betas: np.ndarray
    stimulus: np.ndarray
    session: np.ndarray
    voxel_id: np.ndarray
    nc: np.ndarray
    roi_names: list[str]
    rois: np.ndarray
    xyz: np.ndarray | None = None
    match: str = "id"
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_trials, n_voxels = self.betas.shape
        checks = {"stimulus": (len(self.stimulus), n_trials), "session": (len(self.session), n_trials),
                  "voxel_id": (len(self.voxel_id), n_voxels), "nc": (len(self.nc), n_voxels),
                  "rois": (self.rois.shape, (n_voxels, len(self.roi_names)))}
        if self.xyz is not None:
            checks["xyz"] = (self.xyz.shape, (n_voxels, 3))
        for name, (got, wanted) in checks.items():
            if got != wanted:
                raise DataContractError(f"subject {self.subject}: {name} has shape {got}, expected {wanted}")
        if self.match not in MATCH_RULES:
            raise DataContractError(f"subject {self.subject}: match must be one of {MATCH_RULES}, got {self.match!r}")
        if not np.isfinite(self.betas).all():
            raise DataContractError(f"subject {self.subject}: responses contain NaN or inf")

    @property
    def trial_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.betas))]


def write_subject(path: str | os.PathLike, subject: Subject) -> None:
    strings = h5py.string_dtype()
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("ids", data=np.array(subject.trial_ids, dtype=object), dtype=strings)
            handle.create_dataset("betas", data=subject.betas.astype(np.float32))
            handle.create_dataset("stimulus", data=subject.stimulus.astype(str).astype(object), dtype=strings)
            handle.create_dataset("session", data=subject.session.astype(np.int64))
            voxels = handle.create_group("voxels")
            voxels.create_dataset("voxel_id", data=subject.voxel_id.astype(str).astype(object), dtype=strings)
            voxels.create_dataset("nc", data=subject.nc.astype(np.float64))
            voxels.create_dataset("rois", data=subject.rois.astype(np.uint8))
            if subject.xyz is not None:
                voxels.create_dataset("xyz", data=subject.xyz.astype(np.int64))
            set_attrs(voxels, {"roi_names": list(subject.roi_names)})
            set_attrs(handle, {**subject.attrs, "dataset": subject.dataset, "subject": subject.subject,
                               "match": subject.match, "library_versions": library_versions()})


def _strings(node: h5py.Dataset) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in node[:]], dtype=object)


def read_subject(path: str | os.PathLike) -> Subject:
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"prepared subject file not found: {path}")
    with h5py.File(path, "r") as handle:
        missing = [k for k in ("ids", "betas", "stimulus", "session", "voxels") if k not in handle]
        if missing:
            raise DataContractError(f"{path} lacks {missing}: not a prepared subject file (brain-prepare-*)")
        attrs = read_attrs(handle)
        voxels = handle["voxels"]
        return Subject(dataset=attrs.pop("dataset"), subject=str(attrs.pop("subject")), betas=handle["betas"][:],
                       stimulus=_strings(handle["stimulus"]), session=handle["session"][:],
                       voxel_id=_strings(voxels["voxel_id"]), nc=voxels["nc"][:],
                       roi_names=list(read_attrs(voxels)["roi_names"]), rois=voxels["rois"][:].astype(bool),
                       xyz=voxels["xyz"][:] if "xyz" in voxels else None, match=attrs.pop("match"), attrs=attrs)
