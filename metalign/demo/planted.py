"""The planted backbone of the demo world: features in which the human-relevant factors are present but dominated
by nuisance variance (docs/demo.md).

Every demo image gets x = Q [f ; n]:
- f (23): the factor vector of the image's objects (metalign.demo.factors.factor_vector, summed over objects); for a
  THINGS image it is exactly its concept's row of the planted embedding that the simulated participants, fMRI voxels
  and learners use;
- n (`nuisance_dim`): i.i.d. N(0, nuisance_sd²) per image, drawn from a generator seeded by the image's sha256, so
  images of one concept differ and nothing about the factors can be read from it;
- Q: a seeded random rotation, so neither part sits on the axes.
Cosine similarity of x is then mostly the nuisance overlap: the zero-shot odd-one-out accuracy of x is far below that of
f (both are computed here on the world's own triplets and recorded as the expected effect). Functions made from f
(an SAE on the `factors` output) reward a meta-learner that finds the factor subspace; functions made from n, or
from f with their rows shuffled across images, do not.

The table (`features.h5`) is what a `source: precomputed` backbone reads (metalign.embed.precomputed): `sha256` of
every image file, `features` = x, and the parts `factors` = f and `nuisance` = n as extra outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
import pandas as pd

from metalign.demo.behaviour import odd_one_out_logits
from metalign.demo.factors import COLOURS, SIZE_RANGE, factor_vector
from metalign.io import atomic_path, library_versions, set_attrs, write_json

LABELLED_ROOTS = {"dtd": "dtd/images"}  # labelled sets whose images are not under <set>/ (factors.csv `set`)
LABELLED_SIZE = float(np.mean(SIZE_RANGE))  # labelled views are drawn at a medium size; factors.csv keeps no radius


def _object_factors(row: Mapping[str, Any]) -> np.ndarray:
    return factor_vector(row["shape"], float(row["hue"]), row["texture"], float(row["radius"]))


def world_images(world: Path) -> list[tuple[Path, np.ndarray]]:
    """(file, factor vector) of every THINGS and COCO image of the demo world, objects summed per image."""
    things = pd.read_csv(world / "things" / "objects.csv")
    coco = pd.read_csv(world / "coco" / "objects.csv")
    truth = json.loads((world / "things" / "ground_truth.json").read_text())
    concepts = {c["unique_id"]: c for c in truth["concepts"]}
    out = []
    for image_id in things["image_id"].unique():  # a THINGS image carries its concept's exact planted row
        c = concepts[image_id.split("/")[0]]
        out.append((world / "things" / "images" / image_id, factor_vector(c["shape"], c["hue"], c["texture"],
                                                                           c["size"])))
    for (split, image_id), objects in coco.groupby(["split", "image_id"], sort=True):
        out.append((world / "coco" / split / image_id, sum(_object_factors(r) for _, r in objects.iterrows())))
    return out


def labelled_images(labelled: Path) -> list[tuple[Path, np.ndarray]]:
    """(file, factor vector) of every labelled demo image; factors a set does not fix (a tissue's shape) stay zero."""
    rows = pd.read_csv(labelled / "factors.csv", dtype=str, keep_default_na=False)
    out = []
    for row in rows.itertuples(index=False):
        shape = row.shape or None
        hue = COLOURS[row.colour] if row.colour else None
        root = labelled / LABELLED_ROOTS.get(row.set, row.set)
        out.append((root / row.image_id, factor_vector(shape, hue, row.texture or None,
                                                       LABELLED_SIZE if shape else None)))
    return out


def rotation(dim: int, seed: int) -> np.ndarray:
    """A seeded random orthogonal matrix (QR of a Gaussian, signs fixed so the draw is unique)."""
    q, r = np.linalg.qr(np.random.default_rng([seed, dim]).normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def nuisance(sha256: str, dim: int, sd: float, seed: int) -> np.ndarray:
    """The image's nuisance vector: drawn from its content hash, so it is the same wherever the image is listed."""
    return np.random.default_rng([seed, int(sha256[:16], 16)]).normal(0.0, sd, dim)


def zero_shot_accuracy(embedding: np.ndarray, triplets: pd.DataFrame) -> float:
    """Share of the world's triplets (1-based concept rows and choice) whose choice is the odd one out by cosine
    similarity of `embedding` rows."""
    items = triplets[["image1", "image2", "image3"]].to_numpy() - 1
    logits = odd_one_out_logits(embedding, items)
    return float(np.mean(logits.argmax(axis=1) == triplets["choice"].to_numpy() - 1))


def expected_effect(world: Path, features: dict[str, np.ndarray], table_rows: dict[str, int],
                    checksum: dict[Path, str]) -> dict[str, float]:
    """Zero-shot THINGS accuracy of the planted features and of their factor part, on the first image of each
    concept (the evaluator's choice, docs/methods.md §9.1): the headroom a meta-learner can gain at most."""
    things = world / "things"
    unique_ids = (things / "unique_id.txt").read_text().split()
    firsts = {}
    for path in sorted((things / "images").rglob("*.jpg"), key=lambda p: (p.parent.name, p.name)):
        firsts.setdefault(path.parent.name, path)
    rows = [table_rows[checksum[firsts[u]]] for u in unique_ids]
    triplets = pd.read_csv(things / "triplets.tsv", sep="\t")
    return {f"zero_shot_{name}": zero_shot_accuracy(features[name][rows], triplets)
            for name in ("features", "factors", "nuisance")}


def generate(world: Path, labelled: Path | None, out: Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write `out/features.h5` (the precomputed table) and `out/planted.json` (spec, expected effect)."""
    images = world_images(world) + (labelled_images(labelled) if labelled else [])
    checksum = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path, _ in images}
    keys = list(dict.fromkeys(checksum[path] for path, _ in images))  # identical files share one row
    table_rows = {key: n for n, key in enumerate(keys)}
    factors = np.zeros((len(keys), len(images[0][1])))
    for path, f in images:
        factors[table_rows[checksum[path]]] = f
    noise = np.stack([nuisance(key, spec["nuisance_dim"], spec["nuisance_sd"], spec["seed"]) for key in keys])
    q = rotation(factors.shape[1] + noise.shape[1], spec["seed"])
    parts = {"factors": factors, "nuisance": noise, "features": np.hstack([factors, noise]) @ q.T}
    with atomic_path(out / "features.h5", suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("sha256", data=np.asarray([k.encode() for k in keys]))
        for name, array in parts.items():
            handle.create_dataset(name, data=array.astype(np.float32))
        set_attrs(handle, {"spec": dict(spec), "library_versions": library_versions()})
    rounded = {name: array.astype(np.float32) for name, array in parts.items()}
    summary = {"spec": dict(spec), "n_images": len(keys), "dims": {k: int(v.shape[1]) for k, v in parts.items()},
               "expected": expected_effect(world, rounded, table_rows, checksum),
               "library_versions": library_versions()}
    write_json(out / "planted.json", summary)
    return summary
