"""Layouts whose official split and label files are text: CUB-200-2011, DTD, Oxford-IIIT Pets, Places365."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from metalign.images.layouts import Row, register
from metalign.images.layouts.files import ImageLocation, read_mapping, read_table
from metalign.io import DataContractError


def _lookup(mapping: Mapping[str, str], key: str, source: Path, what: str) -> str:
    if key not in mapping:
        raise DataContractError(f"{source} lists no {what} for {key!r}")
    return mapping[key]


@register("cub", splits=("train", "test"))
def cub(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """CUB-200-2011 (`<root>` = the `CUB_200_2011/` folder): rows in `images.txt` order (image id order);
    image_id = the listed relative path, label = the class name of `classes.txt` (e.g. `001.Black_footed_Albatross`),
    split = `train` where `train_test_split.txt` says 1, else `test` (5,994 / 5,794)."""
    images = read_mapping(root / "images.txt", "CUB images.txt")
    labels = read_mapping(root / "image_class_labels.txt", "CUB image_class_labels.txt")
    is_train = read_mapping(root / "train_test_split.txt", "CUB train_test_split.txt")
    classes = read_mapping(root / "classes.txt", "CUB classes.txt")
    for source, mapping in ((root / "image_class_labels.txt", labels), (root / "train_test_split.txt", is_train)):
        extra = sorted(set(mapping) - set(images))
        if extra:
            raise DataContractError(f"{source}: image id {extra[0]!r} is not in {root / 'images.txt'}")
    location = ImageLocation(root / "images")
    rows = []
    for image_id, rel in images.items():
        label = _lookup(classes, _lookup(labels, image_id, root / "image_class_labels.txt", "class"),
                        root / "classes.txt", "class name")
        flag = _lookup(is_train, image_id, root / "train_test_split.txt", "split")
        if flag not in ("0", "1"):
            raise DataContractError(f"{root / 'train_test_split.txt'}: image id {image_id!r} has flag {flag!r}")
        rows.append(Row(rel, location.path(rel, root / "images.txt", rel), label, "train" if flag == "1" else "test"))
    return rows


@register("dtd", splits=("train", "val", "test"), options={"split_number": {"type": "integer", "minimum": 1,
                                                                            "maximum": 10}})
def dtd(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """DTD (`<root>` = `dtd/`, with `images/` and `labels/`): official split `split_number` (default 1) of ten;
    rows = `labels/train<N>.txt`, then `val<N>.txt`, then `test<N>.txt`, each in file order (1,880 each);
    image_id = the listed `<class>/<file>`, label = `<class>`. big_vision and TFDS use `train` alone as the
    few-shot pool (TFDS `dtd` train = train<N>.txt); val rows are kept with split `val`, unused by default."""
    number = options.get("split_number", 1)
    location = ImageLocation(root / "images")
    rows = []
    for split in ("train", "val", "test"):
        source = root / "labels" / f"{split}{number}.txt"
        for (rel,) in read_table(source, 1, f"DTD split file {split}{number}.txt"):
            rows.append(Row(rel, location.path(rel, source, rel), rel.split("/", 1)[0], split))
    return rows


@register("pets", splits=("train", "test"))
def pets(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """Oxford-IIIT Pets (`<root>` with `images/` and `annotations/`): rows = `annotations/trainval.txt` (split
    `train`, 3,680; TFDS's `train`) then `annotations/test.txt` (`test`, 3,669), in file order; image_id =
    `<name>.jpg`, label = the breed, i.e. the name without its trailing `_<number>` (e.g. `great_pyrenees`)."""
    location = ImageLocation(root / "images")
    rows = []
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        source = root / "annotations" / file
        for name, *_ in read_table(source, 4, f"Pets split file {file}"):
            rows.append(Row(f"{name}.jpg", location.path(f"{name}.jpg", source, name), name.rsplit("_", 1)[0], split))
    return rows


@register("places365", splits=("train", "val"),
          options={"devkit": {"type": "string"}, "train_images": {"type": "string"},
                   "val_images": {"type": "string"}, "train_per_class": {"type": "integer", "minimum": 1}})
def places365(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """Places365-Standard: the devkit (`devkit`, default `devkit/`) lists `places365_train_standard.txt` and
    `places365_val.txt` with class numbers named by `categories_places365.txt`. Rows = train in file order, keeping
    the first `train_per_class` per class (default all 1.8 M; the file is sorted by class, then image number),
    then val in file order (36,500). Train images live under `train_images` (default `data_256`; may be
    `<file>.tar/data_256`, read in place), val under `val_images` (default `val_256`). image_id =
    `train/<listed path>` or `val/<file>`; label = the category, e.g. `/a/airfield`."""
    devkit = root / options.get("devkit", "devkit")
    categories = {number: name for name, number in read_mapping(devkit / "categories_places365.txt",
                                                                "Places365 categories_places365.txt").items()}
    cap = options.get("train_per_class")
    rows = []
    for split, file, folder in (("train", "places365_train_standard.txt", options.get("train_images", "data_256")),
                                ("val", "places365_val.txt", options.get("val_images", "val_256"))):
        source = devkit / file
        table = read_table(source, 2, f"Places365 split file {file}")
        location = ImageLocation(root / folder)
        taken: Counter[str] = Counter()
        for rel, number in table:
            if split == "train" and cap is not None:
                if taken[number] == cap:
                    continue
                taken[number] += 1
            image_id = f"{split}/{rel.lstrip('/')}"
            label = _lookup(categories, number, devkit / "categories_places365.txt", "category")
            rows.append(Row(image_id, location.path(rel, source, image_id), label, split))
    return rows
