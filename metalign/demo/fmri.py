"""Simulated fMRI subjects for the demo world, written in the released file formats.

THINGS-fMRI (docs/datasets.md §2.1): per subject `betas_csv/sub-0P_ResponseData.h5` (pandas fixed frame, `voxel_id` +
one column per trial), `sub-0P_VoxelMetadata.csv`, `sub-0P_StimulusMetadata.csv` and
`brainmasks/sub-0P_space-T1w_brainmask.nii.gz`. BOLD5000 (the Release 2.0 layout read by `metalign.brain.bold5000`,
docs/bold5000.md): per-ROI `.npy` betas over all sessions, `CSI<s>_imgnames.txt` and per-run presentation lists, with
COCO-named images that the evaluation must drop.

The stimuli are the demo world's THINGS images. A voxel's response to an image is
    amplitude_v · (planted concept embedding of the image's concept · w_v)      (planted signal, unit variance)
  + amplitude_v · image_sd · η(image, v)     (image-specific, repeats whenever the image is shown again)
  + session_sd · δ(session, v) + trial_sd · ε(trial, v)
so an encoding model given the planted features can recover the signal, and a CV scheme that lets an image's
repetitions sit in training and test can also fit η: the leak that the leakage-free schemes remove (docs/methods.md P-20).
ROI voxels carry the signal (amplitude U(0.6, 1.2)), others little (U(0, 0.3)), so the noise-ceiling selection has
something to select. The noise ceilings in the metadata are the simulation's true ones, from the generating
variances (not from the evaluator's estimator, so that the demo tests can check that estimator):
    S_v = variance over the test images of amplitude_v · (signal + image-specific part),   N = session_sd² + trial_sd²
    NC_v(n) = S_v / (S_v + N / n)                                      (n = 1: nc_singletrial; n = sessions: nc_testset)
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from metalign.brain.bold5000 import BETAS, IMAGE_NAMES, LISTS, REPEAT_PREFIX, ROI_FILES, RUN_LIST
from metalign.brain.hdf import write_frame
from metalign.brain.things import RESPONSE_KEY
from metalign.config.demo import validate_fmri
from metalign.demo.streams import stream_rng as _rng
from metalign.io import atomic_path, library_versions, write_json, write_text

# Real THINGS-fMRI ROI columns, in the release's order (single columns, then left/right pairs).
THINGS_ROIS = ("V1", "V2", "V3", "hV4", "VO1", "VO2", "LO1 (prf)", "LO2 (prf)", "TO1", "TO2", "V3b", "V3a",
               "lEBA", "rEBA", "lFFA", "rFFA", "lOFA", "rOFA", "lSTS", "rSTS", "lPPA", "rPPA", "lRSC", "rRSC",
               "lTOS", "rTOS", "lLOC", "rLOC")
AMPLITUDE_IN_ROI = (0.6, 1.2)
AMPLITUDE_OUTSIDE = (0.0, 0.3)
DIMS_PER_ROI = 6          # each ROI prefers a few planted dimensions
ROI_RADIUS = 0.28         # in units of the half-axes of the brain ellipsoid
VOXEL_MM = 2.0



class Stream(IntEnum):
    """Independent random streams per subject: changing one part never changes another's draws."""

    DESIGN = 0
    VOXELS = 1
    RESPONSES = 2
    COCO = 3


# ----------------------------------------------------------------------------------------------- the world


def read_world(world: str | Path) -> tuple[list[str], np.ndarray]:
    """THINGS image ids `<concept>/<file>` (sorted) and the planted feature row of each (its concept's)."""
    things = Path(world) / "things"
    concepts = [line.strip() for line in (things / "unique_id.txt").read_text().splitlines() if line.strip()]
    embedding_files = sorted(things.glob("spose_embedding_*d_sorted.txt"))
    if len(embedding_files) != 1:
        raise ValueError(f"expected one spose_embedding_*d_sorted.txt in {things}, found {embedding_files}")
    embedding = np.loadtxt(embedding_files[0], ndmin=2)
    row = {c: i for i, c in enumerate(concepts)}
    images = sorted(p.relative_to(things / "images").as_posix() for p in (things / "images").glob("*/*.jpg"))
    if not images:
        raise ValueError(f"no THINGS images under {things / 'images'}")
    return images, embedding[[row[i.split("/")[0]] for i in images]]


def _unit_signal(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """features @ weights scaled to unit variance over the images, per voxel."""
    signal = features @ weights
    signal -= signal.mean(0)
    return signal / np.where(signal.std(0) > 0, signal.std(0), 1.0)


def _responses(rng: np.random.Generator, signal: np.ndarray, amplitude: np.ndarray, image_of_trial: np.ndarray,
               session_of_trial: np.ndarray, spec: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Trial responses (trials × voxels) and each image's noise-free response (images × voxels)."""
    n_images, n_voxels = signal.shape
    image_part = rng.standard_normal((n_images, n_voxels)) * spec["image_sd"]
    sessions, session_code = np.unique(session_of_trial, return_inverse=True)
    session_part = rng.standard_normal((len(sessions), n_voxels)) * spec["session_sd"]
    trial_part = rng.standard_normal((len(image_of_trial), n_voxels)) * spec["trial_sd"]
    stimulus = amplitude * (signal + image_part)
    return (stimulus[image_of_trial] + session_part[session_code] + trial_part).astype(np.float32), stimulus


def true_noise_ceiling(stimulus: np.ndarray, spec: Mapping[str, float], n_average: int = 1) -> np.ndarray:
    """NC (0..1) of the mean of `n_average` repetitions, from the generating variances: S / (S + N / n)."""
    signal_var = stimulus.var(axis=0, ddof=1)
    return signal_var / (signal_var + (spec["session_sd"] ** 2 + spec["trial_sd"] ** 2) / n_average)


def _runs(n_trials: int, n_runs: int) -> np.ndarray:
    return np.arange(n_trials) * n_runs // n_trials + 1


# ----------------------------------------------------------------------------------------------- THINGS-fMRI


def _volume(shape: list[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Brain mask (ellipsoid), voxel indices in C order, and binary ROI columns from blobs placed per ROI."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    mask = (grid ** 2).sum(-1) <= 0.85
    xyz = np.argwhere(mask)
    pos = grid[mask]
    rois = {}
    for name in THINGS_ROIS:
        centre = np.array([rng.uniform(0.2, 0.6), rng.uniform(-0.7, 0.3), rng.uniform(-0.4, 0.4)])
        hemisphere = name[0] if name[0] in "lr" and name[1:2].isupper() else ""
        if hemisphere == "l":
            centre[0] = -centre[0]
        elif not hemisphere:  # retinotopic areas: posterior, near the midline
            centre[:2] = rng.uniform(-0.15, 0.15), rng.uniform(-0.8, -0.4)
        rois[name] = (np.linalg.norm(pos - centre, axis=1) <= ROI_RADIUS).astype(np.int64)
    return mask, xyz, pd.DataFrame(rois)


def _things_design(images: list[str], spec: Mapping[str, Any], rng: np.random.Generator) -> pd.DataFrame:
    """Train images once each, spread over sessions; test images in every session; shuffled within session."""
    order = rng.permutation(len(images))
    test, train = order[:spec["n_test_images"]], order[spec["n_test_images"]:]
    rows = []
    for s, chunk in enumerate(np.array_split(train, spec["n_sessions"]), start=1):
        trials = [(i, "train") for i in chunk] + [(i, "test") for i in test]
        trials = [trials[k] for k in rng.permutation(len(trials))]
        runs = _runs(len(trials), spec["runs_per_session"])
        for (image, kind), run in zip(trials, runs):
            rows.append({"image": image, "trial_type": kind, "session": s, "run": int(run)})
    frame = pd.DataFrame(rows)
    frame["trial_id"] = frame.groupby(["session", "run"]).cumcount()
    return frame


def _split_half(betas: np.ndarray, design: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Correlation of odd- and even-session mean test responses per voxel, and its Spearman–Brown correction."""
    test = design["trial_type"].to_numpy() == "test"
    halves = []
    for parity in (1, 0):
        rows = test & (design["session"].to_numpy() % 2 == parity)
        halves.append(pd.DataFrame(betas[rows]).groupby(design["image"].to_numpy()[rows]).mean().to_numpy())
    a, b = (h - h.mean(0) for h in halves)
    r = (a * b).sum(0) / np.sqrt((a ** 2).sum(0) * (b ** 2).sum(0))
    return r, 2 * r / (1 + r)


def write_things_subject(out: Path, p: int, images: list[str], features: np.ndarray, spec: Mapping[str, Any],
                         seed: int) -> dict[str, Any]:
    import nibabel as nib

    mask, xyz, rois = _volume(spec["volume"], _rng(seed, Stream.VOXELS, p))
    rng = _rng(seed, Stream.VOXELS, p, 1)
    in_roi = rois.to_numpy().any(1)
    amplitude = np.where(in_roi, rng.uniform(*AMPLITUDE_IN_ROI, len(xyz)), rng.uniform(*AMPLITUDE_OUTSIDE, len(xyz)))
    weights = rng.standard_normal((features.shape[1], len(xyz))) * 0.2
    for name in rois.columns:
        dims = rng.choice(features.shape[1], size=min(DIMS_PER_ROI, features.shape[1]), replace=False)
        members = rois[name].to_numpy(bool)
        weights[np.ix_(dims, members)] += rng.standard_normal((len(dims), int(members.sum())))
    design = _things_design(images, spec, _rng(seed, Stream.DESIGN, p))
    image_of_trial = design["image"].to_numpy()
    betas, stimulus = _responses(_rng(seed, Stream.RESPONSES, p), _unit_signal(features, weights), amplitude,
                                 image_of_trial, design["session"].to_numpy(), spec)
    test = design["trial_type"].to_numpy() == "test"
    test_stimulus = stimulus[np.unique(image_of_trial[test])]
    split_r, split_sb = _split_half(betas, design)
    voxels = pd.DataFrame({
        "voxel_id": np.arange(len(xyz)), "subject_id": p, "voxel_x": xyz[:, 0], "voxel_y": xyz[:, 1],
        "voxel_z": xyz[:, 2],
        "nc_singletrial": 100 * true_noise_ceiling(test_stimulus, spec),
        "nc_testset": 100 * true_noise_ceiling(test_stimulus, spec, n_average=spec["n_sessions"]),
        "splithalf_uncorrected": split_r, "splithalf_corrected": split_sb,
        "prf-eccentricity": 0.0, "prf-polarangle": 0.0, "prf-rsquared": 0.0, "prf-size": 0.0})
    voxels = pd.concat([voxels, rois], axis=1)
    stimuli = pd.DataFrame({
        "trial_type": design["trial_type"], "session": design["session"], "run": design["run"], "subject_id": p,
        "trial_id": design["trial_id"], "stimulus": [images[i].split("/")[1] for i in image_of_trial],
        "concept": [images[i].split("/")[0] for i in image_of_trial]})
    responses = pd.DataFrame(betas.T, columns=[str(i) for i in range(len(design))])
    responses.insert(0, "voxel_id", voxels["voxel_id"].to_numpy(np.int64))
    betas_dir = out / "betas_csv"
    write_frame(betas_dir / f"sub-{p:02d}_ResponseData.h5", responses, RESPONSE_KEY)
    for name, frame in (("VoxelMetadata", voxels), ("StimulusMetadata", stimuli)):
        with atomic_path(betas_dir / f"sub-{p:02d}_{name}.csv", suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    affine = np.diag([VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = -VOXEL_MM * (np.array(spec["volume"]) - 1) / 2
    with atomic_path(out / "brainmasks" / f"sub-{p:02d}_space-T1w_brainmask.nii.gz", suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(tmp))
    return {"subject": f"sub-{p:02d}", "n_trials": len(design), "n_voxels": len(xyz),
            "n_roi_voxels": int(in_roi.sum()), "n_voxels_nc_above_5": int((voxels["nc_singletrial"] > 5).sum()),
            "test_images": sorted({images[i] for i in image_of_trial[test]})}


# ----------------------------------------------------------------------------------------------- BOLD5000


def write_bold5000_subject(out: Path, s: int, images: list[str], features: np.ndarray, spec: Mapping[str, Any],
                           seed: int) -> dict[str, Any]:
    """CSI<s>: the demo THINGS images (by file name) and fake COCO images; some images repeated every session."""
    subject = f"CSI{s}"
    coco = [f"COCO_train2014_{100000 + k:012d}.jpg" for k in range(spec["n_coco"])]
    names = [i.split("/")[1] for i in images] + coco
    coco_features = _rng(seed, Stream.COCO, s).standard_normal((spec["n_coco"], features.shape[1])) * features.std(0)
    all_features = np.vstack([features, coco_features])
    rng = _rng(seed, Stream.DESIGN, 100 + s)
    order = rng.permutation(len(names))
    repeated, once = order[:spec["n_repeated"]], order[spec["n_repeated"]:]
    trials = []
    for session, chunk in enumerate(np.array_split(once, spec["n_sessions"]), start=1):
        block = [(i, False) for i in chunk] + [(i, True) for i in repeated]
        block = [block[k] for k in rng.permutation(len(block))]
        runs = _runs(len(block), spec["runs_per_session"])
        trials += [(session, int(run), image, rep) for (image, rep), run in zip(block, runs)]
    design = pd.DataFrame(trials, columns=["session", "run", "image", "repeated"])
    n_voxels = spec["voxels_per_roi"] * len(ROI_FILES)
    vrng = _rng(seed, Stream.VOXELS, 100 + s)
    amplitude = np.where(vrng.random(n_voxels) < 0.7, vrng.uniform(*AMPLITUDE_IN_ROI, n_voxels),
                         vrng.uniform(*AMPLITUDE_OUTSIDE, n_voxels))
    weights = vrng.standard_normal((features.shape[1], n_voxels))
    betas, _ = _responses(_rng(seed, Stream.RESPONSES, 100 + s), _unit_signal(all_features, weights), amplitude,
                          design["image"].to_numpy(), design["session"].to_numpy(), spec)
    for k, roi in enumerate(ROI_FILES):
        path = out / BETAS.format(subject=subject, roi=roi)
        with atomic_path(path, suffix=".npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, betas[:, k * spec["voxels_per_roi"]:(k + 1) * spec["voxels_per_roi"]])
    write_text(out / IMAGE_NAMES.format(subject=subject), "".join(names[i] + "\n" for i in design["image"]))
    lists = out / LISTS.format(subject=subject)
    for (session, run), block in design.groupby(["session", "run"], sort=True):
        lines = [(REPEAT_PREFIX if rep else "") + names[i] for i, rep in zip(block["image"], block["repeated"])]
        write_text(lists / RUN_LIST.format(subject=subject, session=session, run=run), "\n".join(lines) + "\n")
    return {"subject": subject, "n_trials": len(design), "n_voxels": n_voxels,
            "n_coco_trials": int(sum(names[i].startswith("COCO_") for i in design["image"]))}


# ----------------------------------------------------------------------------------------------- entry points


def generate(world: str | Path, out: str | Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write every simulated subject under `out`; `out/fmri.json` (the summary) is written last."""
    spec = validate_fmri(spec)
    out = Path(out)
    images, features = read_world(world)
    if spec["things"]["n_test_images"] >= len(images):
        raise ValueError(f"n_test_images ({spec['things']['n_test_images']}) must be below the {len(images)} images")
    things = [write_things_subject(out / "things_fmri", p, images, features, spec["things"], spec["seed"])
              for p in range(1, spec["things"]["n_subjects"] + 1)]
    bold = [write_bold5000_subject(out / "bold5000", s, images, features, spec["bold5000"], spec["seed"])
            for s in range(1, spec["bold5000"]["n_subjects"] + 1)]
    summary = {"spec": spec, "world": str(world), "things_fmri": things, "bold5000": bold,
               "library_versions": library_versions()}
    write_json(out / "fmri.json", summary)
    return summary
