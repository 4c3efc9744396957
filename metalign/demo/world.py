"""Seeded demo world in the real dataset formats (THINGS images, SPoSE-style embedding, triplets; COCO-style pool).

Everything downstream (manifests, extraction, SAE, training, odd-one-out evaluation) can run on it end to end, and the
planted embedding is the ideal observer of the simulated triplets, so evaluations have a known answer.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from enum import IntEnum
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from metalign.config.demo import n_repeats, validate_world
from metalign.demo.behaviour import simulate_participants
from metalign.demo.factors import SHAPES, TEXTURES, Concept, dimension_labels, planted_embedding, sample_concepts
from metalign.demo.render import Placement, render
from metalign.demo.streams import stream_rng as _rng
from metalign.io import atomic_path, file_sha256, library_versions, write_json, write_text
from metalign.progress import progress

MARKER = ".demo-world"  # marks a folder this generator owns, so a rerun may clear it
COCO_ASPECT = 4 / 3  # COCO-like landscape pool images exercise the backbones' resize/crop
COCO_MAX_ID = 999_999


class Stream(IntEnum):
    """Independent random streams: changing one count never changes the draws of another part of the world."""

    CONCEPTS = 0
    THINGS_IMAGES = 1
    TRIPLETS = 2
    COCO_IDS = 3
    COCO_IMAGES = 4


# ----------------------------------------------------------------------------------------------- spec


# ----------------------------------------------------------------------------------------------- placements


def _placement(rng: np.random.Generator, shape: str, hue: float, texture: str, radius: float, x: float, y: float,
               rotation: float) -> Placement:
    """Add the nuisance draws shared by both collections (saturation, brightness, texture period and phase)."""
    return Placement(shape=shape, hue=hue % 1.0, texture=texture, radius=radius, x=x, y=y, rotation=rotation,
                     saturation=rng.uniform(0.65, 0.85), value=rng.uniform(0.75, 0.95),
                     period=rng.uniform(0.45, 0.6), phase=rng.uniform())


def _concept_placement(rng: np.random.Generator, concept: Concept) -> Placement:
    """One view of a concept: its factors with small jitter in hue, size, position and rotation."""
    return _placement(rng, concept.shape, concept.hue + rng.normal(0.0, 0.01), concept.texture,
                      concept.size * rng.uniform(0.92, 1.08), 0.5 + rng.uniform(-0.08, 0.08),
                      0.5 + rng.uniform(-0.08, 0.08), rng.uniform(-0.5, 0.5))


def _pool_placement(rng: np.random.Generator) -> Placement:
    """A free draw from the factor space (continuous hue and size) for the unlabelled training pool."""
    return _placement(rng, SHAPES[rng.integers(len(SHAPES))], rng.uniform(), TEXTURES[rng.integers(len(TEXTURES))],
                      rng.uniform(0.12, 0.4), rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.85), rng.uniform(0, 2 * np.pi))


def _object_rows(image_id: str, objects: list[Placement]) -> list[dict[str, Any]]:
    return [{"image_id": image_id, "object": n, **vars(obj)} for n, obj in enumerate(objects)]


def _save_jpeg(image: Image.Image, path: Path) -> None:
    with atomic_path(path, suffix=".jpg") as tmp:
        image.save(tmp, format="JPEG", quality=90)


def _write_tsv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".tsv") as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def _write_objects(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6f")


# ----------------------------------------------------------------------------------------------- parts


def _write_things_images(root: Path, concepts: list[Concept], spec: Mapping[str, Any]) -> int:
    """THINGS layout `<concept>/<concept>_<NN><letter>.jpg`; the letter mimics THINGS' arbitrary suffixes."""
    size, rows = spec["image_size"], []
    for c_index, concept in enumerate(progress(concepts, desc="things images")):
        for n in range(spec["images_per_concept"]):
            rng = _rng(spec["seed"], Stream.THINGS_IMAGES, c_index, n)
            letter = chr(ord("a") + int(rng.integers(26)))
            image_id = f"{concept.unique_id}/{concept.unique_id}_{n + 1:02d}{letter}.jpg"
            objects = [_concept_placement(rng, concept)]
            image = render(rng, objects, size, size, noise=rng.uniform(4, 12), gradient=0.15)
            _save_jpeg(image, root / "images" / image_id)
            rows += _object_rows(image_id, objects)
    _write_objects(root / "objects.csv", rows)
    return len(concepts) * spec["images_per_concept"]


def _format_embedding(embedding: np.ndarray) -> str:
    return "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in embedding)


def _write_things_behaviour(root: Path, concepts: list[Concept], spec: Mapping[str, Any]) -> dict[str, Any]:
    """unique_id.txt, the planted embedding and the simulated triplets, scored against the embedding as written."""
    write_text(root / "unique_id.txt", "".join(f"{c.unique_id}\n" for c in concepts))
    text = _format_embedding(planted_embedding(concepts))
    # Simulate from the rounded values as written, so the file is exactly the ideal observer.
    embedding = np.loadtxt(io.StringIO(text), ndmin=2)
    embedding_name = f"spose_embedding_{embedding.shape[1]}d_sorted.txt"
    write_text(root / embedding_name, text)
    rngs = (_rng(spec["seed"], Stream.TRIPLETS, p) for p in range(spec["n_participants"]))
    triplets, stats = simulate_participants(embedding, rngs, spec["triplets_per_participant"], spec["repeat_fraction"],
                                            spec["temperature"])
    _write_tsv(root / "triplets.tsv", triplets)
    truth = {
        "temperature": spec["temperature"],
        "embedding_dim": int(embedding.shape[1]),
        "embedding_file": embedding_name,
        "dimension_labels": dimension_labels(),
        "n_triplets": len(triplets),
        "n_repeats_per_participant": n_repeats(spec["triplets_per_participant"], spec["repeat_fraction"]),
        **stats,
        "concepts": [c.as_dict() for c in concepts],
    }
    write_json(root / "ground_truth.json", truth)
    return truth


def _write_coco(root: Path, spec: Mapping[str, Any]) -> dict[str, int]:
    """COCO layout `{train,val}2017/<12-digit id>.jpg`; each image's draws are keyed by its id."""
    n_train, n_val = spec["coco_train"], spec["coco_val"]
    ids = _rng(spec["seed"], Stream.COCO_IDS).choice(COCO_MAX_ID, size=n_train + n_val, replace=False) + 1
    height = spec["image_size"]
    width = int(round(height * COCO_ASPECT))
    rows = []
    for split, split_ids in (("train2017", np.sort(ids[:n_train])), ("val2017", np.sort(ids[n_train:]))):
        for image_id in progress(split_ids.tolist(), desc=f"coco {split}"):
            rng = _rng(spec["seed"], Stream.COCO_IMAGES, image_id)
            objects = [_pool_placement(rng) for _ in range(1 + int(rng.random() < 0.5))]
            name = f"{image_id:012d}.jpg"
            _save_jpeg(render(rng, objects, width, height, noise=rng.uniform(4, 16), gradient=0.4), root / split / name)
            rows += [{"split": split, **row} for row in _object_rows(name, objects)]
    _write_objects(root / "objects.csv", rows)
    return {"train": n_train, "val": n_val}


def _content_digest(out_dir: Path, parts: tuple[str, ...]) -> str:
    """One sha256 over (relative path, file sha256) of every generated file: equal digests mean identical worlds."""
    digest = hashlib.sha256()
    for part in parts:
        for path in sorted(p for p in (out_dir / part).rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(out_dir).as_posix()}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _claim(out_dir: Path, parts: tuple[str, ...]) -> None:
    """Remove a previous demo world (world.json first, so a crash never leaves it stale); never touch foreign data."""
    # Empty folders don't count: Snakemake creates the outputs' parent folders before the job runs.
    holds_files = out_dir.exists() and any(p.is_file() for p in out_dir.rglob("*"))
    if holds_files and not (out_dir / MARKER).exists():
        raise ValueError(f"{out_dir} is not empty and holds no {MARKER} marker; "
                         "refusing to overwrite it with a demo world")
    (out_dir / "world.json").unlink(missing_ok=True)
    for part in parts:
        shutil.rmtree(out_dir / part, ignore_errors=True)
    write_text(out_dir / MARKER, "generated by `metalign demo-world`; the folder may be cleared by a rerun\n")


# ----------------------------------------------------------------------------------------------- entry points


def generate_world(out_dir: Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Generate the demo world under `out_dir` and return its summary (also `out_dir/world.json`, written last)."""
    spec = validate_world(spec)
    out_dir = Path(out_dir)
    parts = ("things", "coco")
    _claim(out_dir, parts)
    concepts = sample_concepts(spec["n_concepts"], _rng(spec["seed"], Stream.CONCEPTS))
    n_things = _write_things_images(out_dir / "things", concepts, spec)
    truth = _write_things_behaviour(out_dir / "things", concepts, spec)
    coco = _write_coco(out_dir / "coco", spec)
    summary = {
        "spec": spec,
        "things": {"images": "things/images", "unique_id": "things/unique_id.txt",
                   "embedding": f"things/{truth['embedding_file']}", "triplets": "things/triplets.tsv",
                   "ground_truth": "things/ground_truth.json", "objects": "things/objects.csv",
                   "n_concepts": len(concepts), "n_images": n_things, "n_triplets": truth["n_triplets"],
                   "embedding_dim": truth["embedding_dim"]},
        "coco": {"train": "coco/train2017", "val": "coco/val2017", "objects": "coco/objects.csv",
                 "n_train": coco["train"], "n_val": coco["val"]},
        "expected_accuracy": truth["expected_accuracy"],
        "expected_nll": truth["expected_nll"],
        "content_sha256": _content_digest(out_dir, parts),
        "library_versions": library_versions(),
    }
    write_json(out_dir / "world.json", summary)
    return summary
