"""`manifest`: list an image set once (image_id, path, label, split); that row order is every later array's."""

from __future__ import annotations

import argparse
import json

from metalign.images.layouts import LAYOUTS
from metalign.images.manifest import build_manifest
from metalign.io import DataContractError, write_csv


def cmd_manifest(args: argparse.Namespace) -> None:
    options = json.loads(args.options) if args.options else None
    frame = build_manifest(args.layout, args.root, args.split, args.unique_ids, checksums=args.checksums,
                           options=options)
    if args.expected_count is not None and len(frame) != args.expected_count:
        raise DataContractError(f"{args.root}: found {len(frame)} images, config expects {args.expected_count}")
    write_csv(args.out, frame)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("manifest", help="list an image set: image_id, path, label, split")
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS), help="how the dataset's files are laid out")
    parser.add_argument("--root", required=True, help="image folder (dataset folder for split-file layouts)")
    parser.add_argument("--split", help="split name written into every row (fixed-split layouts only)")
    parser.add_argument("--unique-ids", help="concept order for the things layout")
    parser.add_argument("--options", help='layout options as JSON, e.g. \'{"split_number": 1}\'')
    parser.add_argument("--expected-count", type=int,
                        help="fail unless exactly this many images are found (docs/methods.md P-3)")
    parser.add_argument("--checksums", action="store_true", help="record each image's sha256 (checked at extraction)")
    parser.add_argument("--out", required=True, help="the manifest (CSV)")
    parser.set_defaults(func=cmd_manifest)
