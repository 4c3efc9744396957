"""Image-set manifests (image_id, path, label, split): the one row order of every array derived from an image set.

Layouts are data (config `datasets.<name>.layout`), so adding a dataset in a known layout is a config entry:
- `things`: `<root>/<concept>/<file>`, concepts in `unique_ids` order (the SPoSE row order), files sorted by name
  within a concept; label = concept. Concepts listed in `unique_ids` but absent on disk are an error.
- `flat`: `<root>/<file>` (COCO `train2017/`), files sorted by name; no label.
- `class_folders`: `<root>/<class>/<file>` (ImageNet-style), classes and files sorted by name; label = class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from metalign.io import DataContractError, read_manifest, write_csv

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_unique_ids(path: str | Path) -> list[str]:
    """THINGS `unique_id.txt` (one id per line) or a CSV with an `id` header, as shipped by some mirrors."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if lines and lines[0] == "id":
        lines = lines[1:]
    if len(set(lines)) != len(lines):
        raise DataContractError(f"{path}: duplicated concept ids")
    return lines


def build_manifest(layout: str, root: str | Path, split: str, unique_ids: str | Path | None = None) -> pd.DataFrame:
    root = Path(root)
    if not root.is_dir():
        raise DataContractError(f"image folder not found: {root}")
    rows: list[tuple[str, str, str]] = []
    if layout == "things":
        if unique_ids is None:
            raise DataContractError("layout 'things' needs the unique_ids file")
        for concept in read_unique_ids(unique_ids):
            folder = root / concept
            if not folder.is_dir():
                raise DataContractError(f"{root}: concept folder {concept!r} listed in {unique_ids} is missing")
            rows += [(f"{concept}/{p.name}", str(p), concept) for p in _images_in(folder)]
    elif layout == "flat":
        rows = [(p.name, str(p), "") for p in _images_in(root)]
    elif layout == "class_folders":
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            rows += [(f"{folder.name}/{p.name}", str(p), folder.name) for p in _images_in(folder)]
    else:
        raise DataContractError(f"unknown manifest layout {layout!r}; known: things, flat, class_folders")
    if not rows:
        raise DataContractError(f"no images found under {root}")
    frame = pd.DataFrame(rows, columns=["image_id", "path", "label"])
    frame["split"] = split
    return frame


def verify_manifest(frame: pd.DataFrame, source: str | Path) -> None:
    """Refuse a manifest that does not match the files: names the first row whose file is missing."""
    for row in frame.itertuples(index=False):
        if not Path(row.path).is_file():
            raise DataContractError(f"manifest {source}: image {row.image_id!r} points to missing file {row.path}")


def load_verified_manifest(path: str | Path) -> pd.DataFrame:
    frame = read_manifest(path)
    verify_manifest(frame, path)
    return frame


def _cli(args: argparse.Namespace) -> None:
    frame = build_manifest(args.layout, args.root, args.split, args.unique_ids)
    if args.expected_count is not None and len(frame) != args.expected_count:
        raise DataContractError(f"{args.root}: found {len(frame)} images, config expects {args.expected_count}")
    write_csv(args.out, frame)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("manifest", help="list an image set: image_id, path, label, split")
    parser.add_argument("--layout", required=True, choices=["things", "flat", "class_folders"])
    parser.add_argument("--root", required=True, help="image folder")
    parser.add_argument("--split", required=True, help="split name written into every row")
    parser.add_argument("--unique-ids", help="concept order for the things layout")
    parser.add_argument("--expected-count", type=int, help="fail unless exactly this many images are found (P-3)")
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=_cli)
