"""Training stage commands: `train` (fit a meta-learner), `encode` (features → meta representation), `icl-eval`
(in-context-learning curves), `figure-curves` and `figure-icl`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from metalign.functions.codes import read_codes
from metalign.io import file_sha256, library_versions, read_h5, write_h5
from metalign.train.checkpoint import load_checkpoint
from metalign.train.data import read_features
from metalign.train.icl import icl_curves, write_icl
from metalign.train.loop import train
from metalign.train.model import encoder_from_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser("train", help="train a meta-learner on episodes of SAE functions")
    fit.add_argument("--train-features", type=Path, required=True, help="HDF5 with `features` (N, D) and `ids`")
    fit.add_argument("--train-codes", type=Path, required=True, help="code file of the training split")
    fit.add_argument("--val-features", type=Path, required=True, help="evaluation split features (HDF5)")
    fit.add_argument("--val-codes", type=Path, required=True, help="code file of the evaluation split")
    fit.add_argument("--params", required=True, help="training config: a JSON object, or a path to a JSON file")
    fit.add_argument("--out-ckpt", type=Path, required=True, help="the selected checkpoint (.pt)")
    fit.add_argument("--out-metrics", type=Path, required=True, help="training and validation metrics (CSV)")
    fit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    fit.set_defaults(func=cmd_train)

    enc = subparsers.add_parser("encode", help="map backbone features through a checkpoint's embed([0, x])")
    enc.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by `train`")
    enc.add_argument("--features", type=Path, required=True, help="backbone features of an image set (HDF5)")
    enc.add_argument("--out", type=Path, required=True, help="the meta-learned representation (HDF5)")
    enc.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")

    icl = subparsers.add_parser("icl-eval", help="per-position ICL accuracy and MSE on held-out functions")
    icl.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by `train`")
    icl.add_argument("--features", type=Path, required=True, help="evaluation split features (HDF5)")
    icl.add_argument("--codes", type=Path, required=True, help="evaluation split function file")
    icl.add_argument("--out", type=Path, required=True, help="the curves (HDF5)")
    icl.add_argument("--n-per-function", type=int, default=20, help="episodes per held-out function")
    icl.add_argument("--seed", type=int, default=1234, help="seed of the fixed episodes (keep equal across models)")
    icl.add_argument("--batch-size", type=int, default=1024, help="episodes per forward pass")
    icl.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    icl.set_defaults(func=cmd_icl_eval)

    figure = subparsers.add_parser("figure-icl", help="ICL curves of several checkpoints")
    figure.add_argument("--inputs", nargs="+", required=True, help="files written by icl-eval")
    figure.add_argument("--out", required=True, help="the figure (PNG)")
    figure.set_defaults(func=cmd_figure_icl)

    curves = subparsers.add_parser("figure-curves", help="learning curves from training metrics CSVs")
    curves.add_argument("--metrics", nargs="+", required=True, help="<backbone>/<variant>.metrics.csv files")
    curves.add_argument("--out", required=True, help="the figure (PNG)")
    curves.set_defaults(func=cmd_figure_curves)
    enc.set_defaults(func=cmd_encode)


def parse_params(text: str) -> dict[str, Any]:
    """A JSON object given inline or as a file path."""
    path = Path(text)
    from_file = not text.lstrip().startswith("{") and path.is_file()
    where = f"--params file {path}" if from_file else "--params"
    try:
        params = json.loads(path.read_text() if from_file else text)
    except json.JSONDecodeError as err:
        if from_file:
            raise ValueError(f"{where} is not valid JSON: {err}") from None
        shown = "" if text.lstrip().startswith("{") else f" {text!r}"  # a mistyped path: name it
        raise ValueError(f"--params{shown} is neither a JSON object nor a JSON file: {err}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(params).__name__}")
    return params


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def cmd_train(args: argparse.Namespace) -> None:
    train(parse_params(args.params), read_features(args.train_features), read_codes(args.train_codes),
          read_features(args.val_features), read_codes(args.val_codes), args.out_ckpt, args.out_metrics,
          device=resolve_device(args.device))


def cmd_encode(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.ckpt)
    encode = encoder_from_checkpoint(ckpt, str(args.ckpt), device=resolve_device(args.device))
    arrays, ids, source_attrs = read_h5(args.features, ["features"])
    write_h5(args.out, {"features": encode(arrays["features"])}, ids, attrs={
        "representation": "meta: embed([0, x]) of the meta-learner (docs/methods.md §8)",
        "checkpoint": str(args.ckpt), "checkpoint_sha256": file_sha256(args.ckpt), "checkpoint_step": ckpt["step"],
        "checkpoint_params": ckpt["params"], "model_config": ckpt["model_config"],
        "train_config": ckpt["train_config"], "source_features": str(args.features),
        "source_attrs": source_attrs, "library_versions": library_versions(),
    })


def cmd_icl_eval(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.ckpt)
    codes = read_codes(args.codes)
    result = icl_curves(ckpt, read_features(args.features), codes, args.n_per_function, args.seed, args.batch_size,
                        resolve_device(args.device), source=str(args.ckpt))
    write_icl(args.out, result, codes.ids, {
        "checkpoint": str(args.ckpt), "checkpoint_sha256": file_sha256(args.ckpt), "checkpoint_step": ckpt["step"],
        "model_config": ckpt["model_config"], "features": str(args.features), "codes": str(args.codes),
        "n_per_function": args.n_per_function, "seed": args.seed, "sigma_m": ckpt["sigma_m"],
        "curves": "acc: token accuracy; mse_pos: MSE over positive tokens; mse_all: MSE over all tokens (raw units)",
    })


def cmd_figure_icl(args: argparse.Namespace) -> None:
    from metalign.train.figures import icl_figure  # matplotlib only for the jobs that draw

    icl_figure(args.inputs, args.out)


def cmd_figure_curves(args: argparse.Namespace) -> None:
    from metalign.train.figures import curves_figure

    curves_figure(args.metrics, args.out)
