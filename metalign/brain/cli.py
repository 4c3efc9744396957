"""`python -m metalign brain-…`: prepare subjects, encode, tabulate and plot (rules/evaluate_brain.smk)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from metalign.brain import bold5000, encoding, things
from metalign.brain.cv import SCHEMES
from metalign.brain.ridge import resolve_backend
from metalign.brain.subject import read_subject, write_subject
from metalign.brain.tables import alpha_table, fold_table, stats_table
from metalign.io import DataContractError, write_csv

log = logging.getLogger(__name__)


def cmd_brain_prepare_things(args: argparse.Namespace) -> None:
    subject = things.load_subject(args.betas_dir, args.subject, args.nc_threshold)
    write_subject(args.out, subject)
    log.info("%s: %d trials × %d voxels (nc_singletrial > %g)", subject.subject, *subject.betas.shape,
             args.nc_threshold)


def cmd_brain_prepare_bold5000(args: argparse.Namespace) -> None:
    subject = bold5000.load_subject(args.root, args.subject, args.nc_threshold, args.rois, args.zscore_sessions,
                                    args.exclude_prefixes)
    write_subject(args.out, subject)
    log.info("%s: %d trials × %d voxels", subject.subject, *subject.betas.shape)


def cmd_brain_encode(args: argparse.Namespace) -> None:
    subject = read_subject(args.subject_file)
    result = encoding.run(subject, args.features, args.out, args.scheme, json.loads(args.alphas), args.n_inner,
                          args.seed, args.n_folds, resolve_backend(args.backend), args.standardize)
    log.info("%s %s: median R²/NC over voxels and folds %.3f", subject.subject, args.scheme,
             float(np.nanmedian(result.r2_norm)))


def cmd_brain_table(args: argparse.Namespace) -> None:
    rois = json.loads(args.rois)
    folds = fold_table(args.encodings, rois)
    write_csv(args.out_folds, folds)
    write_csv(args.out_stats, stats_table(folds))
    write_csv(args.out_alphas, alpha_table(args.encodings))


def cmd_figure_brain_rois(args: argparse.Namespace) -> None:
    from metalign.brain.figures import roi_figure  # matplotlib only for the figure jobs

    folds, stats = pd.read_csv(args.folds), pd.read_csv(args.stats, keep_default_na=False, na_values=[""])
    stats["stars"] = stats["stars"].fillna("")
    roi_figure(folds[folds["scheme"] == args.scheme], stats[stats["scheme"] == args.scheme], args.out,
               f"{args.title} ({args.scheme})", json.loads(args.rois))


def cmd_figure_brain_volume(args: argparse.Namespace) -> None:
    from metalign.brain.figures import volume_figure

    if not len(args.base) == len(args.meta) == len(args.masks):
        raise DataContractError("--base, --meta and --masks need one file per subject, in the same order")
    panels = []
    for base_path, meta_path, mask in zip(args.base, args.meta, args.masks):
        if Path(base_path).stem != Path(meta_path).stem:
            raise DataContractError(f"subject mismatch: {base_path} vs {meta_path}")
        base, base_ids, _ = encoding.read_encoding(base_path)
        meta, meta_ids, _ = encoding.read_encoding(meta_path)
        if base_ids != meta_ids or "xyz" not in base:
            raise DataContractError(f"{meta_path}: voxels differ from {base_path} or carry no coordinates")
        diff = np.nanmean(meta["r2"] - base["r2"], axis=1)
        panels.append((f"{Path(base_path).stem}: {args.label} − base", diff, base["xyz"], mask))
    volume_figure(panels, args.out, args.title)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("brain-prepare-things", help="select THINGS-fMRI voxels and write a prepared subject")
    p.add_argument("--betas-dir", required=True, type=Path, help="folder with sub-0P_{ResponseData.h5,…}")
    p.add_argument("--subject", required=True, help="01, 02 or 03")
    p.add_argument("--nc-threshold", type=float, default=5.0, help="keep voxels with nc_singletrial > this (%%)")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_brain_prepare_things)

    p = subparsers.add_parser("brain-prepare-bold5000", help="read BOLD5000 ROI betas and write a prepared subject")
    p.add_argument("--root", required=True, type=Path,
                   help="folder holding BOLD5000_Release_2_0/ and BOLD5000_Stimuli/ (docs/bold5000.md)")
    p.add_argument("--subject", required=True, help="CSI1 … CSI4")
    p.add_argument("--nc-threshold", type=float, default=5.0, help="keep voxels whose noise ceiling exceeds this (%%)")
    p.add_argument("--rois", nargs="+", default=list(bold5000.ROI_FILES), help="ROI files to read")
    p.add_argument("--zscore-sessions", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--exclude-prefixes", nargs="*", default=["COCO_"], help="drop trials of images named so")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_brain_prepare_bold5000)

    p = subparsers.add_parser("brain-encode", help="voxelwise ridge encoding of one subject from one representation")
    p.add_argument("--subject-file", required=True, type=Path, help="prepared subject (brain-prepare-*)")
    p.add_argument("--features", required=True, type=Path, help="embeddings or representations HDF5 (features + ids)")
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    p.add_argument("--alphas", required=True, help='α grid as JSON: {"log10_min": -6, "log10_max": 3, "n": 100} '
                   "(the workflow passes cv.scheme_alphas: the study's grid for upstream_leaky)")
    p.add_argument("--n-inner", type=int, default=5,
                   help="inner CV folds for α selection (upstream_leaky: unused, leave-one-out)")
    p.add_argument("--n-folds", type=int, default=None, help="outer folds (scheme image_kfold only)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--backend", default="auto", help="himalaya backend: numpy, torch, torch_cuda or auto")
    p.add_argument("--standardize", action="store_true", help="z-score features with training-fold statistics")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_brain_encode)

    p = subparsers.add_parser("brain-table", help="ROI values per fold, base-vs-meta statistics, α edge report")
    p.add_argument("--encodings", nargs="+", required=True, help="<scheme>/<backbone>/<variant>/<subject>.h5 files")
    p.add_argument("--rois", required=True, help="merged ROI names as a JSON list")
    p.add_argument("--out-folds", required=True, type=Path)
    p.add_argument("--out-stats", required=True, type=Path)
    p.add_argument("--out-alphas", required=True, type=Path)
    p.set_defaults(func=cmd_brain_table)

    p = subparsers.add_parser("figure-brain-rois", help="ROI bar plot with FDR stars")
    p.add_argument("--folds", required=True, type=Path)
    p.add_argument("--stats", required=True, type=Path)
    p.add_argument("--scheme", required=True)
    p.add_argument("--rois", default="[]", help="ROI order as a JSON list")
    p.add_argument("--title", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_figure_brain_rois)

    p = subparsers.add_parser("figure-brain-volume", help="meta − base R² on each subject's volume (nilearn)")
    p.add_argument("--base", nargs="+", required=True, help="base encodings, one per subject")
    p.add_argument("--meta", nargs="+", required=True, help="meta encodings, same subjects and order")
    p.add_argument("--masks", nargs="+", required=True, help="brain mask NIfTI per subject, same order")
    p.add_argument("--label", required=True, help="name of the meta representation")
    p.add_argument("--title", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_figure_brain_volume)
