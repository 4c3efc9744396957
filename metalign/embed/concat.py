"""Feature files of an image set made of other image sets (a `datasets` entry with `concat`), without re-extraction.

Row order (docs/methods.md §3): the parts in the order the entry lists them, each in its own manifest's order; for the
study's `coco_eval` that is COCO val2017 then test2017, each sorted by file name (upstream's sorted(val) + sorted(test)).
Every output dataset (`features`, `layer_<k>`) is concatenated, the parts must come from the same backbone, code and
libraries, and their ids must be their manifests' rows; an id present in two parts is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metalign.io import DataContractError, manifest_hash, read_h5, read_manifest, write_h5

# Attributes that describe one part's rows rather than the backbone that embedded them.
PER_PART = ("cache_key", "manifest", "manifest_sha256", "image_checksums")


def concat_embeddings(parts: list[Path], manifests: list[Path], out: Path, expected_count: int | None = None) -> None:
    """Write `out` = the parts' rows one after another; provenance records each part and the combined manifest hash."""
    if len(parts) != len(manifests) or len(parts) < 2:
        raise ValueError(f"need one manifest per part and at least two parts; got {len(parts)} parts, "
                         f"{len(manifests)} manifests")
    frames, arrays, shared, record = [], [], None, []
    for path, manifest in zip(parts, manifests):
        frame = read_manifest(manifest)
        data, ids, attrs = read_h5(path)
        if ids != frame["image_id"].tolist():
            raise DataContractError(f"{path}: its rows are not the rows of {manifest}; re-extract it")
        if attrs.get("manifest_sha256", manifest_hash(frame)) != manifest_hash(frame):
            raise DataContractError(f"{path} was extracted from another version of {manifest}; re-extract it")
        backbone = {key: value for key, value in attrs.items() if key not in PER_PART}
        if shared is None:
            shared, widths = backbone, {name: array.shape[1:] for name, array in data.items()}
        elif backbone != shared:
            differ = sorted(key for key in set(backbone) | set(shared) if backbone.get(key) != shared.get(key))
            raise DataContractError(f"{path} was not extracted like {parts[0]} (attributes {differ} differ); "
                                    f"re-extract the parts with the same backbone and code")
        if {name: array.shape[1:] for name, array in data.items()} != widths:
            raise DataContractError(f"{path} has datasets {sorted(data)} of widths other than {parts[0]}'s")
        frames.append(frame)
        arrays.append(data)
        record.append({"features": str(path), "manifest": str(manifest), "n_rows": len(ids),
                       **{key: attrs.get(key) for key in ("cache_key", "manifest_sha256")}})
    combined = pd.concat(frames, ignore_index=True)
    repeated = combined["image_id"][combined["image_id"].duplicated()]
    if len(repeated):
        raise DataContractError(f"image id {repeated.iloc[0]!r} occurs in more than one of {list(map(str, manifests))}")
    if expected_count is not None and len(combined) != expected_count:
        raise DataContractError(f"the parts hold {len(combined)} images, the config expects {expected_count}")
    attrs: dict[str, Any] = {**shared, "concat": record, "manifest_sha256": manifest_hash(combined)}
    write_h5(out, {name: np.concatenate([data[name] for data in arrays]) for name in widths},
             combined["image_id"].tolist(), attrs)
