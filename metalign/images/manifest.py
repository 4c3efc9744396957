"""Image-set manifests (image_id, path, label, split): the one row order of every array derived from an image set.

Layouts are data (config `datasets.<name>.layout` + `options`), so adding a dataset in a known layout is a config
entry; metalign.images.layouts lists them, each with its row order. Fixed-split layouts (`things`, `flat`,
`class_folders`, `webdataset`) write the config's one `split` value into every row; own-split layouts (`cub`,
`dtd`, `flowers102`, `pets`, `places365`, `stanford_cars`, `cifar`, `class_folders_seeded`) take it from the
dataset's official split files. An image id may occur once.

A path is a plain file, a member of an uncompressed tar (`<file>.tar/<member>`, metalign.images.webdataset) or a
row of a CIFAR pickle (`<pickle>#<row>`, metalign.images.layouts.cifar); `ImageReader` reads all three.

With `checksums`, a `sha256` column records each image's bytes; extraction then refuses an image whose bytes changed
(it hashes the bytes it reads anyway, so the check costs no extra I/O).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from metalign.images.layouts import build_rows, get_layout
from metalign.images.layouts.cifar import ArrayImageReader, split_row_path
from metalign.images.webdataset import ShardReader, split_member_path
from metalign.io import DataContractError, read_manifest
from metalign.progress import progress


def build_manifest(layout: str, root: str | Path, split: str | None = None, unique_ids: str | Path | None = None,
                   checksums: bool = False, options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The manifest of one image set; `split` is required by fixed-split layouts and refused by the others."""
    spec = get_layout(layout)
    if spec.own_splits and split is not None:
        raise DataContractError(f"layout {layout!r} takes the split of every image from the dataset's files; "
                                f"drop the split value {split!r}")
    if not spec.own_splits and split is None:
        raise DataContractError(f"layout {layout!r} needs a split value for its rows")
    options = {**(options or {}), **({"unique_ids": str(unique_ids)} if unique_ids is not None else {})}
    rows = build_rows(layout, root, options)
    if not rows:
        raise DataContractError(f"no images found under {root}")
    frame = pd.DataFrame([(r.image_id, r.path, r.label, r.split if spec.own_splits else split) for r in rows],
                         columns=["image_id", "path", "label", "split"])
    repeated = frame["image_id"][frame["image_id"].duplicated()]
    if len(repeated):
        raise DataContractError(f"{root}: image id {repeated.iloc[0]!r} occurs twice (layout {layout!r})")
    if checksums:
        reader = ImageReader()
        frame["sha256"] = [hashlib.sha256(reader.read(p)).hexdigest()
                           for p in progress(frame["path"], desc=f"sha256 {root}", unit="img")]
    return frame


class ImageReader:
    """The bytes of one manifest image: a plain file, a tar member, or a CIFAR pickle row (served as PPM)."""

    def __init__(self) -> None:
        self.shards = ShardReader()
        self.arrays = ArrayImageReader()

    def read(self, path: str) -> bytes:
        if split_member_path(path):
            return self.shards.read(path)
        if split_row_path(path):
            return self.arrays.read(path)
        return Path(path).read_bytes()


def image_file(path: str) -> str:
    """The file on disk that holds a manifest image (the image itself, its tar shard or its pickle)."""
    return (split_member_path(path) or split_row_path(path) or (path,))[0]


def verify_manifest(frame: pd.DataFrame, source: str | Path) -> None:
    """Refuse a manifest that does not match the files: names the first row whose file (or shard) is missing."""
    for row in frame.itertuples(index=False):
        file = image_file(row.path)
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
