"""Extraction: images of one manifest → one HDF5 file of (N, D) float32 outputs, batched, resumable, with provenance.

Outputs: `features` (the backbone entry's `layer`) and one `layer_<k>` per `extra_layers` entry, all from one forward
pass, plus `ids`. Images are plain files or members of webdataset shards (`<shard>.tar/<member>` manifest paths).

Resume: rows are written in manifest order into `<out>.partial.h5`, whose `n_done` attribute is advanced only after
the rows are flushed. A rerun with the same cache key continues from there, so a `kill -9` costs at most one batch,
and the finished file is identical to an uninterrupted run. The partial file is renamed onto `<out>` at the end. A
partial file that is truncated, corrupt or not laid out as this code writes it is discarded and rebuilt from scratch:
its rows are never trusted.
Compute jobs run with the model hubs offline (docs/methods.md P-60): weights come from download rules.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from metalign.embed.backbones import EXTRACTION_CODE_VERSION, Backbone, cache_key, hubs_offline, load_backbone
from metalign.embed.precomputed import extract_precomputed
from metalign.images.manifest import ImageReader, load_verified_manifest
from metalign.io import DataContractError, library_versions, manifest_hash, set_attrs
from metalign.progress import progress

log = logging.getLogger(__name__)
_DISCARDED = "partial file %s is truncated or corrupt (%s): discarded, extracting from scratch"


def decode(data: bytes, source: str) -> Image.Image:
    """Decode an image to RGB; undecodable bytes are an error naming the file."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataContractError(f"cannot decode image {source}: {err}") from None


class ManifestImages(Dataset):
    """Images in manifest order; checked against the manifest's sha256 column when it has one."""

    def __init__(self, manifest: pd.DataFrame, transform: Callable, start: int = 0):
        self.paths = manifest["path"].tolist()[start:]
        self.sha256 = manifest["sha256"].tolist()[start:] if "sha256" in manifest else None
        self.transform = transform
        self.reader = ImageReader()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            data = self.reader.read(path)
        except OSError as err:
            raise DataContractError(f"cannot read image {path}: {err}") from None
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256[index]:
            raise DataContractError(f"image {path} does not match its manifest checksum {self.sha256[index]}")
        return self.transform(decode(data, path))


def _rows_done(handle: h5py.File, ids: list[str], outputs: list[str]) -> int:
    """The partial file's finished row count, once its layout is checked to be the one `extract` writes (raises
    OSError, KeyError or ValueError otherwise)."""
    done = int(handle.attrs["n_done"])
    if not 0 <= done <= len(ids):
        raise ValueError(f"n_done {done} is outside 0..{len(ids)}")
    if [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][:]] != ids:
        raise ValueError("its ids differ from the manifest's")
    present = sorted(name for name in handle if name != "ids")
    if done and present != sorted(outputs):
        raise ValueError(f"{done} rows counted but datasets {present}, not {sorted(outputs)}")
    for name in present:
        data = handle[name]
        if name not in outputs or data.ndim != 2 or len(data) != len(ids):
            raise ValueError(f"dataset {name!r} of shape {data.shape} is not an output of {len(ids)} rows")
        if done:
            _ = data[done - 1]  # the last counted row reads back
    return done


def _open_partial(path: Path, key: str, ids: list[str], outputs: list[str]) -> tuple[h5py.File, int]:
    """Reopen a partial file written under the same cache key, or start a fresh one."""
    if path.exists():
        try:
            handle = h5py.File(path, "a")
        except OSError as err:
            if "unable to lock" in str(err):  # another process writes it: discarding it would give two writers
                raise DataContractError(f"{path} is open in another process; is the same extraction running twice?") \
                    from None
            log.warning(_DISCARDED, path, err)
        else:
            try:
                if handle.attrs.get("cache_key") == key:
                    done = _rows_done(handle, ids, outputs)
                    log.info("resuming %s at row %d of %d", path, done, len(ids))
                    return handle, done
                log.info("partial file %s has another cache key (weights, settings or inputs changed): starting over",
                         path)
            except (OSError, KeyError, ValueError, TypeError) as err:
                log.warning(_DISCARDED, path, err)
            handle.close()
        path.unlink()
    handle = h5py.File(path, "w")
    handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
    handle.attrs["cache_key"] = key
    handle.attrs["n_done"] = 0
    return handle, 0


def _create_preallocated(handle: h5py.File, name: str, shape: tuple[int, int], chunk_rows: int) -> None:
    """A float32 (N, D) dataset whose chunks are all allocated now: later batch writes touch only raw data, never
    the chunk index, so a `kill -9` between two flushes cannot leave metadata half-written."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((chunk_rows, shape[1]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    h5py.h5d.create(handle.id, name.encode(), h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple(shape), dcpl=dcpl)


def _inputs_sha(manifest: pd.DataFrame) -> str:
    """The manifest's rows and, when recorded, the images' checksums: what the extracted rows depend on."""
    digest = hashlib.sha256(manifest_hash(manifest).encode())
    if "sha256" in manifest:
        digest.update("".join(manifest["sha256"]).encode())
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def extract(entry: dict[str, Any], manifest_path: str | Path, out: str | Path, batch_size: int = 64,
            num_workers: int = 0, device: str = "auto", amp: bool = False, max_batches: int | None = None) -> None:
    """Embed every manifest image with the backbone `entry`; `max_batches` stops early (tests of resume)."""
    out = Path(out)
    manifest = load_verified_manifest(manifest_path)
    if entry.get("source") == "precomputed":  # a table, not a model: rows copied by image content
        extract_precomputed(entry, manifest, manifest_path, out)
        return
    ids = manifest["image_id"].tolist()
    dev = resolve_device(device)
    with hubs_offline():
        backbone: Backbone = load_backbone(entry).to(dev)
    key = cache_key(entry, backbone.provenance, _inputs_sha(manifest))
    partial = out.with_name(out.name + ".partial.h5")
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, done = _open_partial(partial, key, ids, backbone.outputs)
    loader = DataLoader(ManifestImages(manifest, backbone.preprocessing.build(), start=done), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=dev.type == "cuda")
    use_amp = amp and dev.type == "cuda"
    with handle, torch.inference_mode(), progress(total=len(ids), initial=done, desc=f"extract {entry['name']}",
                                              unit="img") as bar:
        for batch_index, images in enumerate(loader):
            if max_batches is not None and batch_index >= max_batches:
                return
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = backbone.forward(images.to(dev, non_blocking=True))
            rows = {name: value.float().cpu().numpy() for name, value in outputs.items()}
            for name, array in rows.items():
                if name not in handle:
                    _create_preallocated(handle, name, (len(ids), array.shape[1]), min(batch_size, len(ids)))
                handle[name][done:done + len(array)] = array
            handle.flush()
            done += len(images)
            handle.attrs["n_done"] = done
            handle.flush()
            bar.update(len(images))
        set_attrs(handle, {**_provenance(entry, backbone, manifest_path, manifest, use_amp), "cache_key": key})
    os.replace(partial, out)


def _provenance(entry: dict[str, Any], backbone: Backbone, manifest_path: str | Path, manifest: pd.DataFrame,
                amp: bool) -> dict[str, Any]:
    return {**backbone.provenance, "backbone": entry["name"], "extraction_code_version": EXTRACTION_CODE_VERSION,
            "manifest": str(manifest_path), "manifest_sha256": manifest_hash(manifest),
            "image_checksums": "sha256" in manifest, "dtype": "bfloat16-autocast" if amp else "float32",
            "library_versions": library_versions(), "config_entry": entry}
