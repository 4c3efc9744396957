"""CIFAR-100 from its python pickles, without unpacking 60,000 files.

A manifest row points at one row of a pickle: `path = "<pickle file>#<row>"` (e.g. `…/cifar-100-python/train#17`);
no image file name ends in `#<digits>`, so the convention cannot shadow a real file. `ArrayImageReader` serves such
a path as an uncompressed binary PPM of the stored pixels: lossless, byte-identical across library versions (so a
manifest `sha256` stays valid), and decoded by PIL like any image file. The 32×32 images are then upsampled by each
backbone's own preprocessing (its resize, recorded in the extraction provenance as `transform`), as for any image.
The pickles are read from the verified download (md5-pinned), so unpickling them runs no untrusted code.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from metalign.images.layouts import Row, register
from metalign.images.layouts.files import need_file
from metalign.io import DataContractError

SIDE = 32
ROW_PATH = re.compile(r"^(?P<file>.+)#(?P<row>\d+)$")


def split_row_path(path: str) -> tuple[str, int] | None:
    """(pickle file, row) for an array image path, None for anything else."""
    match = ROW_PATH.match(path)
    return (match["file"], int(match["row"])) if match else None


def load_batch(path: Path) -> dict[str, Any]:
    """One CIFAR python pickle (`train`, `test` or `meta`), keys as text."""
    with open(need_file(path, "CIFAR pickle"), "rb") as handle:
        try:
            return pickle.load(handle, encoding="latin1")
        except (pickle.UnpicklingError, EOFError) as err:
            raise DataContractError(f"{path}: not a CIFAR python pickle ({err})") from None


def _pixels(batch: Mapping[str, Any], path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or data.dtype != np.uint8:
        raise DataContractError(f"{path}: `data` must be (N, {3 * SIDE * SIDE}) uint8, got {data.shape} {data.dtype}")
    return data


def to_ppm(row: np.ndarray) -> bytes:
    """One CIFAR row (1024 R, then 1024 G, then 1024 B values, row-major) as a binary PPM."""
    rgb = row.reshape(3, SIDE, SIDE).transpose(1, 2, 0)
    return f"P6\n{SIDE} {SIDE}\n255\n".encode() + rgb.tobytes()


@register("cifar", splits=("train", "test"), options={"label": {"enum": ["fine", "coarse"]}})
def cifar(root: Path, options: Mapping[str, Any]) -> list[Row]:
    """CIFAR-100 (`<root>` = `cifar-100-python/`): rows = the `train` pickle (50,000), then `test` (10,000), in
    pickle order; image_id = `<split>/<stored filename>`, path = `<pickle>#<row>`, label = the `fine` (default) or
    `coarse` class name from `meta`."""
    kind = options.get("label", "fine")
    meta = load_batch(root / "meta")
    names = meta.get(f"{kind}_label_names")
    if names is None:
        raise DataContractError(f"{root / 'meta'}: no {kind}_label_names")
    rows = []
    for split in ("train", "test"):
        path = root / split
        batch = load_batch(path)
        count = len(_pixels(batch, path))
        filenames, labels = batch.get("filenames"), batch.get(f"{kind}_labels")
        if filenames is None or labels is None or len(filenames) != count or len(labels) != count:
            raise DataContractError(f"{path}: needs `filenames` and `{kind}_labels`, one per row of `data`")
        for i, (name, label) in enumerate(zip(filenames, labels)):
            if not 0 <= label < len(names):
                raise DataContractError(f"{path}: image {name!r} has label {label}, {root / 'meta'} names {len(names)}")
            rows.append(Row(f"{split}/{name}", f"{path}#{i}", names[label], split))
    return rows


class ArrayImageReader:
    """Serves `<pickle>#<row>` paths; each pickle is loaded once per process (DataLoader workers included)."""

    def __init__(self) -> None:
        self._pid = -1
        self._arrays: dict[str, np.ndarray] = {}

    def read(self, path: str) -> bytes:
        file, row = split_row_path(path) or (path, -1)
        if self._pid != os.getpid():
            self._pid, self._arrays = os.getpid(), {}
        if file not in self._arrays:
            self._arrays[file] = _pixels(load_batch(Path(file)), Path(file))
        pixels = self._arrays[file]
        if not 0 <= row < len(pixels):
            raise DataContractError(f"{file}: no row {row} (has {len(pixels)})")
        return to_ppm(pixels[row])

    def __getstate__(self) -> dict:
        return {"_pid": -1, "_arrays": {}}
