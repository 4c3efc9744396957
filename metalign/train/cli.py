"""`metalign train` (fit a meta-learner) and `metalign encode` (features -> meta representations)."""

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
from metalign.train.loop import train
from metalign.train.model import encoder_from_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser("train", help="train a meta-learner on episodes of SAE functions")
    fit.add_argument("--train-features", type=Path, required=True, help="HDF5 with `features` (N, D) and `ids`")
    fit.add_argument("--train-codes", type=Path, required=True, help="code file of the training split")
    fit.add_argument("--val-features", type=Path, required=True)
    fit.add_argument("--val-codes", type=Path, required=True)
    fit.add_argument("--params", required=True, help="training config: a JSON object, or a path to a JSON file")
    fit.add_argument("--out-ckpt", type=Path, required=True)
    fit.add_argument("--out-metrics", type=Path, required=True)
    fit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    fit.set_defaults(func=_train)

    enc = subparsers.add_parser("encode", help="map backbone features through a checkpoint's embed([0, x])")
    enc.add_argument("--ckpt", type=Path, required=True)
    enc.add_argument("--features", type=Path, required=True)
    enc.add_argument("--out", type=Path, required=True)
    enc.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    enc.set_defaults(func=_encode)


def parse_params(text: str) -> dict[str, Any]:
    """A JSON object given inline or as a file path."""
    path = Path(text)
    source = path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text
    try:
        params = json.loads(source)
    except json.JSONDecodeError as err:
        raise ValueError(f"--params is neither a JSON object nor a JSON file: {err}") from None
    if not isinstance(params, dict):
        raise ValueError(f"--params must be a JSON object, got {type(params).__name__}")
    return params


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def _train(args: argparse.Namespace) -> None:
    train(parse_params(args.params), read_features(args.train_features), read_codes(args.train_codes),
          read_features(args.val_features), read_codes(args.val_codes), args.out_ckpt, args.out_metrics,
          device=resolve_device(args.device))


def _encode(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.ckpt)
    encode = encoder_from_checkpoint(ckpt, str(args.ckpt), device=resolve_device(args.device))
    arrays, ids, source_attrs = read_h5(args.features, ["features"])
    write_h5(args.out, {"features": encode(arrays["features"])}, ids, attrs={
        "representation": "meta: embed([0, x]) of the meta-learner (protocols §8)",
        "checkpoint": str(args.ckpt), "checkpoint_sha256": file_sha256(args.ckpt), "checkpoint_step": ckpt["step"],
        "checkpoint_params": ckpt["params"], "model_config": ckpt["model_config"],
        "train_config": ckpt["train_config"], "source_features": str(args.features),
        "source_attrs": source_attrs, "library_versions": library_versions(),
    })
