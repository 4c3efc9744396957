"""Subcommands of the functions stage: train or import an SAE, encode features into codes, select functions on
codes, turn a representation's dimensions into functions, and choose subsets of a function file."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metalign.functions.codes import read_codes, write_codes, write_neurons
from metalign.functions.prisma import load_pretrained_sae
from metalign.functions.sae import encode_topk, load_sae, save_sae, train_sae
from metalign.functions.shuffle import write_shuffled
from metalign.functions.subsets import LEVELS, choose, write_subset
from metalign.io import DataContractError, read_h5, write_csv, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("sae-train", help="train a top-k SAE on backbone features")
    train.add_argument("--features", type=Path, required=True, help="HDF5 with datasets `features` (N, D) and `ids`")
    _add_output_arg(train)
    train.add_argument("--out", type=Path, required=True, help="SAE checkpoint (.pt, weights-only loadable)")
    train.add_argument("--expansion", type=float, default=16, help="d_sae = round(expansion * D)")
    train.add_argument("--k", type=int, default=32)
    train.add_argument("--steps", type=int, default=5000)
    train.add_argument("--batch-size", type=int, default=4096)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--device", default="cpu")
    train.add_argument("--metrics", type=Path, help="optional JSON with explained variance, alive fraction, loss trace")
    train.set_defaults(func=cmd_sae_train)

    imported = subparsers.add_parser("sae-import", help="convert a pretrained ViT-Prisma legacy weights.pt to our SAE format")
    imported.add_argument("--weights", type=Path, required=True, help="legacy single-file SAE (cfg + state_dict)")
    imported.add_argument("--out", type=Path, required=True, help="SAE checkpoint (.pt, weights-only loadable)")
    imported.add_argument("--k", type=int, help="active latents; must equal the k of the file's config (a cross-check)")
    imported.add_argument("--repo", help="where the weights came from (recorded)")
    imported.add_argument("--revision", help="revision of --repo (recorded)")
    imported.set_defaults(func=cmd_sae_import)

    encode = subparsers.add_parser("sae-encode", help="encode features with an SAE and select functions")
    encode.add_argument("--sae", type=Path, required=True)
    encode.add_argument("--features", type=Path, required=True)
    _add_output_arg(encode)
    encode.add_argument("--out", type=Path, required=True, help="code file (HDF5)")
    _add_selection_args(encode)
    encode.add_argument("--batch-size", type=int, default=1024)
    encode.add_argument("--device", default="cpu")
    encode.set_defaults(func=cmd_sae_encode)

    neurons = subparsers.add_parser("functions-neurons",
                                    help="the dimensions of a representation as functions (median split, docs/methods.md §3)")
    neurons.add_argument("--features", type=Path, required=True)
    _add_output_arg(neurons)
    neurons.add_argument("--out", type=Path, required=True)
    _add_selection_args(neurons)
    neurons.set_defaults(func=cmd_functions_neurons)

    subset = subparsers.add_parser("functions-subset", help="a fraction of a function file's functions (links, no copy)")
    subset.add_argument("--parent", type=Path, required=True, help="function file to choose from")
    subset.add_argument("--out", type=Path, required=True)
    subset.add_argument("--fraction", type=float, default=1.0, help="share of the parent's functions to keep")
    how = subset.add_mutually_exclusive_group()
    how.add_argument("--seed", type=int, help="random subset drawn with this seed")
    how.add_argument("--similarity", choices=LEVELS, help="subset with a low, medium or high mean pairwise similarity")
    subset.set_defaults(func=cmd_functions_subset)
    shuffled = subparsers.add_parser("functions-shuffle", help="a function file with its rows permuted across images")
    shuffled.add_argument("--parent", type=Path, required=True, help="function file to permute")
    shuffled.add_argument("--out", type=Path, required=True)
    shuffled.add_argument("--seed", type=int, required=True)
    shuffled.add_argument("--split", required=True, help="the split's name: each split gets its own permutation")
    shuffled.set_defaults(func=cmd_functions_shuffle)

    summary = subparsers.add_parser("functions-summary", help="one CSV row per function file (size, achieved similarity)")
    summary.add_argument("--inputs", type=Path, nargs="+", required=True, help="files functions/<set>/<split>.h5")
    summary.add_argument("--out", type=Path, required=True)
    summary.set_defaults(func=cmd_functions_summary)


def _add_output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="features",
                        help="dataset of the feature file to read: `features` or an extra block output `layer_<k>`")


def _add_selection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-nonzero", type=int, default=120, help="keep latents active on at least this many images")
    parser.add_argument("--sl", type=int, default=120, help="episode length the kept functions must support")


def read_features(path: Path, output: str = "features") -> tuple[np.ndarray, list[str], dict[str, Any]]:
    arrays, ids, attrs = read_h5(path, [output])
    features = arrays[output]
    if features.ndim != 2 or len(features) != len(ids):
        raise DataContractError(f"{path}: `{output}` has shape {features.shape} but there are {len(ids)} ids")
    return features.astype(np.float32, copy=False), ids, {**attrs, "output": output}


def _source(path: Path, ids: list[str], attrs: dict[str, Any]) -> dict[str, Any]:
    """Provenance of an input file: where it was, which rows it had, and its own attributes."""
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    return {"path": str(path), "n_rows": len(ids), "ids_sha256": digest, "attrs": attrs}


def cmd_sae_train(args: argparse.Namespace) -> None:
    features, ids, attrs = read_features(args.features, args.output)
    sae, metrics = train_sae(features, args.expansion, args.k, args.steps, args.batch_size, args.lr, args.seed,
                             device=args.device)
    save_sae(args.out, sae, {"features": _source(args.features, ids, attrs), "metrics": metrics})
    if args.metrics:
        write_json(args.metrics, metrics)


def cmd_sae_import(args: argparse.Namespace) -> None:
    sae, meta = load_pretrained_sae(args.weights, args.k)
    meta["pretrained"] |= {"repo": args.repo, "revision": args.revision}
    save_sae(args.out, sae, meta)


def cmd_sae_encode(args: argparse.Namespace) -> None:
    sae, meta = load_sae(args.sae)
    features, ids, attrs = read_features(args.features, args.output)
    if features.shape[1] != sae.d_in:
        raise DataContractError(f"{args.features} has {features.shape[1]}-d features but SAE {args.sae} expects {sae.d_in}")
    origin = meta.get("pretrained", {})
    if origin.get("layer") is not None and _layer(attrs) is not None and str(origin["layer"]) != str(_layer(attrs)):
        raise DataContractError(f"SAE {args.sae} reads block {origin['layer']} ({origin.get('hook')}), but `{args.output}` "
                                f"of {args.features} is block {_layer(attrs)}; point the function set's source.output "
                                f"at layer_{origin['layer']}")
    indices, values = encode_topk(features, sae.W_enc, sae.b_enc, sae.b_dec, sae.k, args.batch_size, args.device,
                                  sae.input_norm, sae.subtract_b_dec)
    provenance = {"source": _source(args.features, ids, attrs),
                  "sae": {"path": str(args.sae), "config": sae.config, "trained_on": meta.get("features", {}),
                          "pretrained": origin},
                  "layer": origin.get("layer", _layer(attrs)), "hook": origin.get("hook"),
                  "sae_repo": origin.get("repo"), "sae_revision": origin.get("revision")}
    write_codes(args.out, ids, indices, values, sae.d_sae, args.min_nonzero, args.sl, provenance)


def cmd_functions_neurons(args: argparse.Namespace) -> None:
    features, ids, attrs = read_features(args.features, args.output)
    write_neurons(args.out, ids, features, args.min_nonzero, args.sl,
                  {"source": _source(args.features, ids, attrs), "layer": _layer(attrs)})


def _layer(attrs: dict[str, Any]) -> Any:
    """The block a feature output comes from: `layer_<k>` names it, `features` is the backbone's own `layer`."""
    output = attrs["output"]
    return int(output.removeprefix("layer_")) if output.startswith("layer_") else attrs.get("layer")


def cmd_functions_subset(args: argparse.Namespace) -> None:
    if args.fraction == 1.0 and args.seed is None and args.similarity is None:
        write_subset(args.parent, args.out, None, {"method": "all", "fraction": 1.0})
        return
    positions, record = choose(read_codes(args.parent), args.fraction, args.seed, args.similarity)
    write_subset(args.parent, args.out, positions, record)


def cmd_functions_shuffle(args: argparse.Namespace) -> None:
    write_shuffled(args.parent, args.out, args.seed, args.split)


def cmd_functions_summary(args: argparse.Namespace) -> None:
    rows = []
    for path in args.inputs:
        codes = read_codes(path)
        record = codes.attrs.get("subset") or codes.attrs.get("shuffle") or {}
        rows.append({"function_set": path.parent.name, "split": path.stem, "kind": codes.kind,
                     "n_functions": codes.n_functions, "n_columns": codes.attrs.get("n_columns"),
                     "n_rows": codes.n_rows, "mean_nnz": float(codes.nnz.mean()),
                     **{key: record.get(key) for key in ("method", "fraction", "seed", "level", "mean_similarity",
                                                         "parent_mean_similarity")}})
    write_csv(args.out, pd.DataFrame(rows))
