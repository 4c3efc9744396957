"""Layouts whose official split and label files are MATLAB `.mat` files: Flowers102 and Stanford Cars."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.io

from metalign.images.layouts import Row, register
from metalign.images.layouts.files import ImageLocation, need_file
from metalign.io import DataContractError


def load_mat(path: Path, what: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named variables of a .mat file, squeezed to 1-D; a missing variable is an error naming it."""
    data = scipy.io.loadmat(need_file(path, what), squeeze_me=True)
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataContractError(f"{path}: no variable {missing[0]!r} (has {sorted(k for k in data if k[0] != '_')})")
    return {k: np.atleast_1d(data[k]) for k in keys}


@register("flowers102", splits=("train", "val", "test"),
          options={"images": {"type": "string"}, "labels": {"type": "string"}, "setid": {"type": "string"}})
def flowers102(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """Oxford Flowers102: `setid.mat` (`trnid`, `valid`, `tstid`: 1-based image numbers; 1,020 / 1,020 / 6,149)
    and `imagelabels.mat` (`labels`: the class number 1–102 of image i). Rows in image-number order over the three
    sets; image_id = `image_<05d>.jpg` under `images` (default `jpg/`), label = the class number as text
    (the official files name no classes), split = train / val / test. big_vision's pool is `train` alone."""
    labels_path, setid_path = root / options.get("labels", "imagelabels.mat"), root / options.get("setid", "setid.mat")
    labels = load_mat(labels_path, "Flowers102 imagelabels.mat", ("labels",))["labels"]
    sets = load_mat(setid_path, "Flowers102 setid.mat", ("trnid", "valid", "tstid"))
    split_of: dict[int, str] = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for number in sets[key].astype(int).tolist():
            if number in split_of:
                raise DataContractError(f"{setid_path}: image {number} is in both {split_of[number]} and {split}")
            if not 1 <= number <= len(labels):
                raise DataContractError(f"{setid_path}: image {number} ({key}) has no label in {labels_path}")
            split_of[number] = split
    location = ImageLocation(root / options.get("images", "jpg"))
    rows = []
    for number in sorted(split_of):
        name = f"image_{number:05d}.jpg"
        rows.append(Row(name, location.path(name, setid_path, name), str(int(labels[number - 1])), split_of[number]))
    return rows


def _annotations(path: Path, what: str) -> list[tuple[str, int]]:
    """(fname, class number) of every element of the struct array `annotations`, in file order."""
    annotations = load_mat(path, what, ("annotations",))["annotations"]
    if annotations.dtype.names is None or not {"fname", "class"} <= set(annotations.dtype.names):
        raise DataContractError(f"{path}: `annotations` lacks the fields fname and class")
    return [(str(a["fname"]), int(a["class"])) for a in annotations]


@register("stanford_cars", splits=("train", "test"),
          options={key: {"type": "string"} for key in ("train_images", "test_images", "train_annotations",
                                                        "test_annotations", "meta")})
def stanford_cars(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """Stanford Cars, original devkit layout (torchvision's): `cars_train/`, `cars_test/`,
    `devkit/cars_train_annos.mat`, `cars_test_annos_withlabels.mat` (struct arrays with `fname` and 1-based
    `class`), `devkit/cars_meta.mat` (`class_names`). Rows = train annotations, then test, in file order
    (8,144 / 8,041); image_id = `cars_train/<fname>` or `cars_test/<fname>`, label = the class name."""
    meta = root / options.get("meta", "devkit/cars_meta.mat")
    names = [str(n) for n in load_mat(meta, "Stanford Cars cars_meta.mat", ("class_names",))["class_names"]]
    rows = []
    for split, images, annotations in (
            ("train", options.get("train_images", "cars_train"),
             options.get("train_annotations", "devkit/cars_train_annos.mat")),
            ("test", options.get("test_images", "cars_test"),
             options.get("test_annotations", "cars_test_annos_withlabels.mat"))):
        source = root / annotations
        location = ImageLocation(root / images)
        for fname, number in _annotations(source, f"Stanford Cars {split} annotations"):
            image_id = f"{Path(images).name}/{fname}"
            if not 1 <= number <= len(names):
                raise DataContractError(f"{source}: image {image_id!r} has class {number}, not in {meta}")
            rows.append(Row(image_id, location.path(fname, source, image_id), names[number - 1], split))
    return rows
