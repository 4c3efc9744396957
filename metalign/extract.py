"""Extraction: images of one manifest → one (N, D) float32 HDF5 file, batched, resumable, with provenance.

Resume: rows are written in manifest order into `<out>.partial.h5`, whose `n_done` attribute is advanced only after
the rows are flushed. A rerun with the same cache key continues from there, so a `kill -9` costs at most one batch,
and the finished file is identical to an uninterrupted run. The partial file is renamed onto `<out>` at the end.
"""

from __future__ import annotations

import argparse
import json
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
from tqdm import tqdm

from metalign.backbones import Backbone, cache_key, load_backbone
from metalign.io import DataContractError, library_versions, manifest_hash, set_attrs
from metalign.manifest import load_verified_manifest

log = logging.getLogger(__name__)


class ManifestImages(Dataset):
    """Images in manifest order; a file that cannot be decoded is an error naming that file."""

    def __init__(self, manifest: pd.DataFrame, transform: Callable, start: int = 0):
        self.paths = manifest["path"].tolist()[start:]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataContractError(f"cannot decode image {path}: {err}") from None


def _open_partial(path: Path, key: str, n_rows: int, ids: list[str]) -> tuple[h5py.File, int]:
    """Reopen a partial file written under the same cache key, or start a fresh one."""
    if path.exists():
        try:
            handle = h5py.File(path, "a")
            if handle.attrs.get("cache_key") == key and "features" in handle:
                done = int(handle.attrs["n_done"])
                log.info("resuming %s at row %d of %d", path, done, n_rows)
                return handle, done
            handle.close()
        except OSError:
            log.warning("partial file %s is unreadable; starting over", path)
        path.unlink()
    handle = h5py.File(path, "w")
    handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
    handle.attrs["cache_key"] = key
    handle.attrs["n_done"] = 0
    return handle, 0


def extract(entry: dict[str, Any], manifest_path: str | Path, out: str | Path, batch_size: int = 64,
            num_workers: int = 0, device: str = "auto", amp: bool = False, max_batches: int | None = None) -> None:
    """Embed every manifest image with the backbone `entry`; `max_batches` stops early (tests of resume)."""
    out = Path(out)
    manifest = load_verified_manifest(manifest_path)
    ids = manifest["image_id"].tolist()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    backbone: Backbone = load_backbone(entry).to(dev)
    key = cache_key(entry, backbone.provenance, manifest_hash(manifest))
    partial = out.with_name(out.name + ".partial.h5")
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, done = _open_partial(partial, key, len(ids), ids)
    loader = DataLoader(ManifestImages(manifest, backbone.preprocessing.build(), start=done), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=dev.type == "cuda")
    use_amp = amp and dev.type == "cuda"
    with handle, torch.inference_mode(), tqdm(total=len(ids), initial=done, desc=f"extract {entry['name']}",
                                              unit="img", disable=None) as bar:
        for batch_index, images in enumerate(loader):
            if max_batches is not None and batch_index >= max_batches:
                return
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                feats = backbone.forward(images.to(dev, non_blocking=True))
            feats = feats.float().cpu().numpy()
            if "features" not in handle:
                handle.create_dataset("features", shape=(len(ids), feats.shape[1]), dtype="float32",
                                      chunks=(min(batch_size, len(ids)), feats.shape[1]))
            handle["features"][done:done + len(feats)] = feats
            handle.flush()
            done += len(feats)
            handle.attrs["n_done"] = done
            handle.flush()
            bar.update(len(feats))
        set_attrs(handle, {**_provenance(entry, backbone, manifest_path, manifest, use_amp), "cache_key": key})
    os.replace(partial, out)


def _provenance(entry: dict[str, Any], backbone: Backbone, manifest_path: str | Path, manifest: pd.DataFrame,
                amp: bool) -> dict[str, Any]:
    return {**backbone.provenance, "backbone": entry["name"], "manifest": str(manifest_path),
            "manifest_sha256": manifest_hash(manifest), "dtype": "bfloat16-autocast" if amp else "float32",
            "library_versions": library_versions(), "config_entry": entry}


def _cli(args: argparse.Namespace) -> None:
    entry = json.loads(args.backbone)
    extract(entry, args.manifest, args.out, batch_size=args.batch_size, num_workers=args.workers,
            device=args.device, amp=args.amp)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("extract", help="embed a manifest's images with one backbone → HDF5")
    parser.add_argument("--backbone", required=True, help="the backbone's registry entry as JSON (with its name)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (validate first: protocols §1.3)")
    parser.set_defaults(func=_cli)
