"""Folder layouts: the image set is its files; the split is the config's (or, for `class_folders_seeded`, a
seeded per-class draw for datasets that publish no split, e.g. Caltech101 and UC Merced)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from metalign.images.layouts import Row, register
from metalign.images.layouts.files import images_in
from metalign.images.webdataset import list_images, member_path
from metalign.io import DataContractError


def read_unique_ids(path: str | Path) -> list[str]:
    """THINGS `unique_id.txt` (one id per line) or a CSV with an `id` header, as shipped by some mirrors."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if lines and lines[0] == "id":
        lines = lines[1:]
    if len(set(lines)) != len(lines):
        raise DataContractError(f"{path}: duplicated concept ids")
    return lines


@register("things", options={"unique_ids": {"type": "string"}}, required=("unique_ids",))
def things(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """`<root>/<concept>/<file>`, concepts in `unique_ids` order (the SPoSE row order), files sorted by name;
    label = concept. A concept listed but absent on disk is an error."""
    rows = []
    for concept in read_unique_ids(options["unique_ids"]):
        folder = root / concept
        if not folder.is_dir():
            raise DataContractError(f"{root}: concept folder {concept!r} listed in {options['unique_ids']} is missing")
        rows += [Row(f"{concept}/{p.name}", str(p), concept) for p in images_in(folder)]
    return rows


@register("flat")
def flat(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """`<root>/<file>` (COCO `train2017/`), files sorted by name; no label."""
    return [Row(p.name, str(p), "") for p in images_in(root)]


def _class_folders(root: Path, exclude: frozenset[str] = frozenset()) -> list[tuple[str, list[Path]]]:
    return [(folder.name, images_in(folder)) for folder in sorted(p for p in root.iterdir() if p.is_dir())
            if folder.name not in exclude]


@register("class_folders")
def class_folders(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """`<root>/<class>/<file>` (ImageNet-style), classes and files sorted by name; label = class."""
    return [Row(f"{name}/{p.name}", str(p), name) for name, files in _class_folders(root) for p in files]


@register("webdataset")
def webdataset(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """`<root>/**/*.tar` shards sorted by path, samples in shard order; image_id = sample key, path =
    `<shard>.tar/<member>`, label = the sample's `.cls` field (the ImageNet class index) or empty."""
    return [Row(s.key, member_path(shard, s.member), s.label)
            for shard in sorted(root.rglob("*.tar"))  # hub repos may keep shards in a subfolder
            for s in list_images(shard)]


@register("class_folders_seeded", splits=("train", "test"),
          options={"train_per_class": {"type": "integer", "minimum": 1}, "seed": {"type": "integer"},
                   "exclude": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
          required=("train_per_class", "seed"))
def class_folders_seeded(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """`class_folders` rows and order, minus the `exclude`d classes (e.g. Caltech101's `BACKGROUND_Google`);
    split = `train` for `train_per_class` images per class, `test` for the rest (the Caltech101 protocol:
    30 per class). The draw: `rng = np.random.default_rng(seed)`; for each kept class in sorted order, the
    files at `rng.permutation(n)[:train_per_class]` are train. A class with no test image left is an error."""
    exclude = frozenset(options.get("exclude", []))
    classes = _class_folders(root, exclude)
    unknown = sorted(exclude - {p.name for p in root.iterdir() if p.is_dir()})
    if unknown:
        raise DataContractError(f"{root}: excluded class {unknown[0]!r} is not a class folder")
    k, rng = options["train_per_class"], np.random.default_rng(options["seed"])
    rows = []
    for name, files in classes:
        if len(files) <= k:
            raise DataContractError(f"{root / name}: {len(files)} images, need more than train_per_class={k}")
        train = set(rng.permutation(len(files))[:k].tolist())
        rows += [Row(f"{name}/{p.name}", str(p), name, "train" if i in train else "test") for i, p in enumerate(files)]
    return rows
