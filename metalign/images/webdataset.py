"""Webdataset tar shards as an image source: samples grouped by key, members read by offset.

A manifest row of a shard image has `path = "<shard>.tar/<member name>"`, as if the shard were a folder: the manifest
stays the one row order of the image set, `Path(path).stem` is still the image's file stem (what Levels joins on), and
extraction keeps its map-style, ordered, resumable DataLoader: a worker seeks to the member's offset instead of
unpacking the shard. Only uncompressed tars can be read this way (webdataset shards are).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from metalign.io import DataContractError

SEP = ".tar/"  # plain image files never live under a folder named *.tar in any manifest layout
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def split_name(name: str) -> tuple[str, str]:
    """Webdataset convention: the key is the path up to the first dot of the file name, the rest is the field."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(tar: tarfile.TarFile) -> Iterator[dict[str, bytes | str]]:
    """Consecutive members with one key form a sample {"__key__": key, ext: bytes}; works on streams ("r|")."""
    sample: dict[str, bytes | str] = {}
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_name(member.name)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        handle = tar.extractfile(member)
        sample.setdefault("__key__", key)
        sample[ext] = handle.read() if handle else b""
    if sample:
        yield sample


@dataclass(frozen=True)
class ShardImage:
    key: str
    member: str
    label: str


def list_images(shard: str | Path) -> list[ShardImage]:
    """Every sample with an image, in shard order; label = its `.cls` field when present (ImageNet class index)."""
    images: list[ShardImage] = []
    current: dict[str, str] = {}
    labels: dict[str, str] = {}

    def flush() -> None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in current), None)
        if ext:
            images.append(ShardImage(current["__key__"], current[ext], labels.get(current["__key__"], "")))

    with _open_indexable(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if current and current["__key__"] != key:
                flush()
                current = {}
            current.setdefault("__key__", key)
            current[ext] = member.name
            if ext == "cls":
                labels[key] = tar.extractfile(member).read().decode().strip()
    if current:
        flush()
    return images


def _open_indexable(shard: str | Path) -> tarfile.TarFile:
    try:
        return tarfile.open(shard, mode="r:")
    except tarfile.ReadError as err:
        raise DataContractError(f"{shard}: not an uncompressed tar shard ({err})") from None


def member_path(shard: str | Path, member: str) -> str:
    if not str(shard).endswith(".tar"):
        raise DataContractError(f"{shard}: webdataset shards must be named *.tar")
    return f"{shard}/{member}"


def split_member_path(path: str) -> tuple[str, str] | None:
    """(shard, member) for a shard image path, None for a plain file."""
    shard, sep, member = path.partition(SEP)
    return (shard + ".tar", member) if sep else None


class ShardReader:
    """Reads members by offset; the per-shard index and open handles live in the process that reads (DataLoader
    workers are forked or spawned after construction, so nothing is opened in `__init__`)."""

    def __init__(self) -> None:
        self._pid = -1
        self._index: dict[str, dict[str, tuple[int, int]]] = {}
        self._handles: dict[str, IO[bytes]] = {}

    def read(self, path: str) -> bytes:
        shard, member = split_member_path(path) or (path, "")
        if self._pid != os.getpid():
            self._pid, self._index, self._handles = os.getpid(), {}, {}
        if shard not in self._index:
            with _open_indexable(shard) as tar:
                self._index[shard] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
            self._handles[shard] = open(shard, "rb")
        if member not in self._index[shard]:
            raise DataContractError(f"{shard}: no member {member!r}")
        offset, size = self._index[shard][member]
        handle = self._handles[shard]
        handle.seek(offset)
        return handle.read(size)

    def __getstate__(self) -> dict:
        return {"_pid": -1, "_index": {}, "_handles": {}}
