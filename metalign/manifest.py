"""Image-set manifests (image_id, path, label, split): the one row order of every array derived from an image set.

Layouts are data (config `datasets.<name>.layout`), so adding a dataset in a known layout is a config entry:
- `things`: `<root>/<concept>/<file>`, concepts in `unique_ids` order (the SPoSE row order), files sorted by name
  within a concept; label = concept. Concepts listed in `unique_ids` but absent on disk are an error.
- `flat`: `<root>/<file>` (COCO `train2017/`), files sorted by name; no label.
- `class_folders`: `<root>/<class>/<file>` (ImageNet-style), classes and files sorted by name; label = class.
- `webdataset`: `<root>/**/*.tar` shards sorted by path, samples in shard order; image_id = sample key, path =
  `<shard>.tar/<member>`, label = the sample's `.cls` field (the ImageNet class index) or empty.

With `checksums`, a `sha256` column records each image's bytes; extraction then refuses an image whose bytes changed
(it hashes the bytes it reads anyway, so the check costs no extra I/O).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from metalign.io import DataContractError, read_manifest, write_csv
from metalign.webdataset_input import ShardReader, list_images, member_path, split_member_path

LAYOUTS = ("things", "flat", "class_folders", "webdataset")

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


def build_manifest(layout: str, root: str | Path, split: str, unique_ids: str | Path | None = None,
                   checksums: bool = False) -> pd.DataFrame:
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
    elif layout == "webdataset":
        for shard in sorted(root.rglob("*.tar")):  # hub repos may keep shards in a subfolder
            rows += [(s.key, member_path(shard, s.member), s.label) for s in list_images(shard)]
    else:
        raise DataContractError(f"unknown manifest layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if not rows:
        raise DataContractError(f"no images found under {root}")
    frame = pd.DataFrame(rows, columns=["image_id", "path", "label"])
    frame["split"] = split
    if checksums:
        reader = ShardReader()
        frame["sha256"] = [hashlib.sha256(read_image_bytes(p, reader)).hexdigest()
                           for p in tqdm(frame["path"], desc=f"sha256 {root}", unit="img", disable=None)]
    return frame


def read_image_bytes(path: str, reader: ShardReader) -> bytes:
    """The bytes of one manifest image: a plain file, or a member of a webdataset shard."""
    if split_member_path(path):
        return reader.read(path)
    return Path(path).read_bytes()


def verify_manifest(frame: pd.DataFrame, source: str | Path) -> None:
    """Refuse a manifest that does not match the files: names the first row whose file (or shard) is missing."""
    for row in frame.itertuples(index=False):
        file = (split_member_path(row.path) or (row.path,))[0]
        if not Path(file).is_file():
            raise DataContractError(f"manifest {source}: image {row.image_id!r} points to missing file {file}")


def load_verified_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest's contract columns, plus `sha256` when it was built with checksums."""
    frame = read_manifest(path)
    verify_manifest(frame, path)
    header = pd.read_csv(path, nrows=0).columns
    if "sha256" in header:
        frame = frame.assign(sha256=pd.read_csv(path, usecols=["sha256"], dtype=str)["sha256"].to_numpy())
    return frame


def _cli(args: argparse.Namespace) -> None:
    frame = build_manifest(args.layout, args.root, args.split, args.unique_ids, checksums=args.checksums)
    if args.expected_count is not None and len(frame) != args.expected_count:
        raise DataContractError(f"{args.root}: found {len(frame)} images, config expects {args.expected_count}")
    write_csv(args.out, frame)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("manifest", help="list an image set: image_id, path, label, split")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--root", required=True, help="image folder")
    parser.add_argument("--split", required=True, help="split name written into every row")
    parser.add_argument("--unique-ids", help="concept order for the things layout")
    parser.add_argument("--expected-count", type=int, help="fail unless exactly this many images are found (P-3)")
    parser.add_argument("--checksums", action="store_true", help="record each image's sha256 (checked at extraction)")
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=_cli)
