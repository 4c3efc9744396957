"""Data contracts between stages: atomic writes, manifests and HDF5 files that carry ids and provenance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np
import pandas as pd

MANIFEST_COLUMNS = ("image_id", "path", "label", "split")
_TRACKED_LIBRARIES = ("metalign", "numpy", "torch", "torchvision", "timm", "transformers", "open_clip_torch", "h5py", "pillow")


_UMASK = os.umask(0)
os.umask(_UMASK)


class DataContractError(ValueError):
    """An input broke the contract between two stages; the message names the file and the offending key or id."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A failure never leaves a partial output that Snakemake (or a resume) would trust.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should be as readable as any other file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour changes numbers (pooling and transforms drift across releases)."""
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- manifests


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read an image-set manifest: the only row order of every array derived from that image set."""
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"manifest not found: {path}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DataContractError(f"manifest {path} lacks column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
    duplicated = frame["image_id"][frame["image_id"].duplicated()]
    if len(duplicated):
        raise DataContractError(f"manifest {path} repeats image_id {duplicated.iloc[0]!r}")
    return frame[list(MANIFEST_COLUMNS)]


def manifest_hash(frame: pd.DataFrame) -> str:
    """Hash of ids, paths and labels in row order: a change anywhere makes derived files stale."""
    payload = frame[list(MANIFEST_COLUMNS)].to_csv(index=False).encode()
    return hashlib.sha256(payload).hexdigest()


# ----------------------------------------------------------------------------------------------- HDF5


def write_h5(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], ids: list[str] | np.ndarray,
             attrs: Mapping[str, Any]) -> None:
    """Write contiguous arrays (rows = `ids`) plus provenance attributes, atomically."""
    ids = np.asarray(ids, dtype=object)
    for name, array in arrays.items():
        if len(array) != len(ids):
            raise DataContractError(f"{path}: dataset {name!r} has {len(array)} rows but there are {len(ids)} ids")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("ids", data=ids.astype(str).astype(object), dtype=h5py.string_dtype())
            for name, array in arrays.items():
                handle.create_dataset(name, data=array, chunks=_row_chunks(array) if array.ndim else None)
            set_attrs(handle, attrs)


def set_attrs(handle: h5py.File, attrs: Mapping[str, Any]) -> None:
    """Store attributes; nested values are JSON so that any provenance survives the round trip."""
    for key, value in attrs.items():
        if isinstance(value, (dict, list, tuple)):
            handle.attrs[key] = json.dumps(value, sort_keys=True, default=_json_default)
        elif value is None:
            handle.attrs[key] = "null"
        else:
            handle.attrs[key] = value


def read_attrs(handle: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in handle.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value[:1] in "[{" or value == "null":
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def _row_chunks(array: np.ndarray) -> tuple[int, ...]:
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    rows = int(max(1, min(len(array), (1 << 20) // row_bytes)))
    return (rows, *array.shape[1:])


def unreadable_h5(path: str | os.PathLike, err: Exception) -> DataContractError:
    """The error for an HDF5 file that h5py cannot read: which file, and how to rebuild it."""
    return DataContractError(f"cannot read HDF5 file {path}: {err}. It is truncated or corrupt (an interrupted "
                             f"write or copy?); delete it, or rerun the rule that makes it "
                             f"(`snakemake --forcerun <rule>`)")


def open_h5(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> h5py.File:
    """`h5py.File` for the readers: a missing, truncated or corrupt file is a DataContractError naming the file, not an
    h5py traceback."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise DataContractError(f"HDF5 file not found: {path}")
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as err:
        raise unreadable_h5(path, err) from None


def read_h5(path: str | os.PathLike, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], list[str], dict[str, Any]]:
    """Read arrays, ids and attributes of one file written by `write_h5` (or the resumable extractor)."""
    with open_h5(path) as handle:
        keys = names or [k for k in handle if k != "ids"]
        missing = [k for k in [*keys, "ids"] if k not in handle]
        if missing:
            raise DataContractError(f"{path} lacks dataset(s) {missing}; it has {sorted(handle)} (made by another "
                                    f"config or code version? rebuild it)")
        try:  # a file that opens can still fail on a damaged chunk
            arrays = {k: handle[k][:] for k in keys}
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][:]]
            return arrays, ids, read_attrs(handle)
        except OSError as err:
            raise unreadable_h5(path, err) from None


def align_rows(ids: list[str], wanted: list[str], source: str) -> np.ndarray:
    """Row positions of `wanted` ids in `ids`; every join between stages goes by id, never by position."""
    index = {image_id: row for row, image_id in enumerate(ids)}
    try:
        return np.fromiter((index[i] for i in wanted), dtype=np.int64, count=len(wanted))
    except KeyError as err:
        raise DataContractError(f"{source}: image id {err.args[0]!r} is missing") from None
