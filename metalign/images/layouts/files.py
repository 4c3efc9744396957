"""Shared readers for split-file layouts: whitespace tables and image locations (a folder or a tar member prefix)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from metalign.images.webdataset import split_member_path
from metalign.io import DataContractError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataContractError(f"{what} not found: {path}")
    return path


def read_table(path: Path, columns: int, what: str) -> list[list[str]]:
    """Rows of a whitespace-separated text file with exactly `columns` fields; blank and `#` lines skipped."""
    rows = []
    for number, line in enumerate(need_file(path, what).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != columns:
            raise DataContractError(f"{path}:{number}: expected {columns} fields, got {line.strip()!r}")
        rows.append(fields)
    return rows


def read_mapping(path: Path, what: str) -> dict[str, str]:
    """A two-column `<id> <value>` file as a dict; a repeated id is an error naming it."""
    mapping: dict[str, str] = {}
    for key, value in read_table(path, 2, what):
        if key in mapping:
            raise DataContractError(f"{path}: id {key!r} is listed twice")
        mapping[key] = value
    return mapping


class ImageLocation:
    """Where a split file's relative image names live: a folder, or `<archive>.tar/<prefix>` read in place
    (the webdataset path convention of metalign.images.webdataset), so a 10⁶-image tar need not be unpacked."""

    def __init__(self, location: Path):
        self.location = location
        member = split_member_path(f"{location}/")
        self._members: set[str] | None = None
        if member:
            shard, self._prefix = member
            need_file(Path(shard), "image archive")
            with tarfile.open(shard, mode="r:") as tar:
                self._members = {m.name for m in tar if m.isfile()}
        elif not location.is_dir():
            raise DataContractError(f"image folder not found: {location}")

    def path(self, name: str, source: Path, image_id: str) -> str:
        """The manifest path of `name`; an image that a split file lists but that is absent is an error."""
        name = name.lstrip("/")
        exists = (f"{self._prefix}{name}" in self._members if self._members is not None
                  else (self.location / name).is_file())
        if not exists:
            raise DataContractError(f"{source}: image {image_id!r} has no file {self.location / name}")
        return str(self.location / name)
