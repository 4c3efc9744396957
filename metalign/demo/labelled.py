"""Labelled demo image sets in the real downstream datasets' layouts, rendered from the demo world's factor space.

Every downstream evaluation (few-shot, BREEDS, ImageNet-A, cue-conflict shape bias) runs on these in `make demo`:
- `imagenet/{train,val}/<wnid>/…JPEG`: an ImageNet-shaped set (layout after the usual val re-sorting) of 8 shapes
  × 4 "breeds" (colour × texture variants of the shape), synthetic wnids `n9…`;
- `breeds/{dataset_class_info.json,class_hierarchy.txt,node_names.txt}`: a mini BREEDS hierarchy in the
  BREEDS-Benchmarks formats: entity → blunt/pointed shapes → shape → pair of breeds → breed (an ImageNet class);
- `imagenet-a/<wnid>/*.jpg`: harder, cluttered views of every other class (ImageNet-A's 200-of-1000 subset);
- `cue-conflict/<shape>/<shape><i>-<texture><j>.png`: shape of one category with the colour and texture of another
  (a category = a shape and the look of its first breed, so the training images confound the two cues);
- `NCT-CRC-HE-100K/<CLASS>/<CLASS>-<ID>.tif` and `CRC-VAL-HE-7K/…`: a colon-histology-shaped few-shot task of 9
  full-frame tissue textures (train and test in separate trees, as in the real dataset);
- `dtd/{images/<texture>/<texture>_<nnnn>.jpg, labels/{train,val,test}1.txt}`: a DTD-shaped texture set with its
  split files (official split 1 of the real dataset), `dtd_per_split` images per class in each split, random hue;
- `factors.csv`: the factors behind every image (the planted ground truth), `labelled.json`: a summary.
The image size is the world's (`world.json`), so both backbones see every demo image set alike.
"""

from __future__ import annotations

import json
import shutil
import string
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from metalign.config.demo import validate_labelled
from metalign.demo.factors import COLOURS, SHAPE_ATTRIBUTES, SHAPES, TEXTURES
from metalign.demo.render import Placement, render
from metalign.demo.streams import stream_rng as _rng
from metalign.downstream.breeds import ROOT_WNID
from metalign.io import atomic_path, library_versions, write_csv, write_json, write_text
from metalign.progress import progress

MARKER = ".demo-labelled"
BREEDS_PER_SHAPE = 4
POINTED = 0.5  # shapes at least this pointy form the "pointed" group of the mini hierarchy
# Colon-like tissue classes (NCT-CRC-HE-100K names): texture, hue, number and radius of dark "nuclei"
TISSUES = {
    "ADI": ("plain", 0.95, 3, 0.14), "BACK": ("plain", 0.10, 0, 0.0), "DEB": ("dotted", 0.02, 6, 0.05),
    "LYM": ("dotted", 0.70, 14, 0.04), "MUC": ("striped", 0.60, 2, 0.08), "MUS": ("striped", 0.95, 4, 0.05),
    "NORM": ("checkered", 0.85, 8, 0.06), "STR": ("striped", 0.88, 6, 0.04), "TUM": ("checkered", 0.75, 12, 0.05),
}


class Stream(IntEnum):
    """Independent random streams, so that changing one count never changes another set's draws."""

    TRAIN = 0
    VAL = 1
    VAL_NUMBERS = 2
    SHIFTED = 3
    CONFLICT = 4
    COLON_TRAIN = 5
    COLON_TEST = 6
    COLON_NAMES = 7
    DTD = 8
    DTD_SPLITS = 9


@dataclass(frozen=True)
class DemoClass:
    """One ImageNet-like class: a shape (its superclass) in one breed's colour and texture."""

    wnid: str
    shape: str
    breed: int
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def demo_classes() -> list[DemoClass]:
    """8 shapes × 4 breeds; breed 0 of each shape has a colour no other breed 0 has (its category's look)."""
    colours = list(COLOURS)
    return [DemoClass(f"n9{k * BREEDS_PER_SHAPE + b:07d}", shape, b, colours[(k + 2 * b) % len(colours)],
                      TEXTURES[(k + b) % len(TEXTURES)])
            for k, shape in enumerate(SHAPES) for b in range(BREEDS_PER_SHAPE)]


def shifted_classes(classes: list[DemoClass]) -> list[DemoClass]:
    """ImageNet-A covers a subset of the classes: here every other one."""
    return classes[::2]


def categories(classes: list[DemoClass]) -> dict[str, list[str]]:
    """Cue-conflict categories (the shapes) → their training classes (breed 0), as model-vs-human maps its 16
    categories to ImageNet wnids."""
    return {c.shape: [c.wnid] for c in classes if c.breed == 0}


# ----------------------------------------------------------------------------------------------- objects


def _object(rng: np.random.Generator, shape: str, hue: float, texture: str, radius: float, x: float, y: float,
            rotation: float, period: float | None = None) -> Placement:
    return Placement(shape=shape, hue=hue % 1.0, texture=texture, radius=radius, x=x, y=y, rotation=rotation,
                     saturation=rng.uniform(0.65, 0.85), value=rng.uniform(0.75, 0.95),
                     period=rng.uniform(0.45, 0.6) if period is None else period, phase=rng.uniform())


def _class_view(rng: np.random.Generator, shape: str, colour: str, texture: str, hard: bool = False) -> Placement:
    """A centred view of a class; `hard` views (ImageNet-A) are smaller, off-centre and freely rotated."""
    hue = COLOURS[colour] + rng.normal(0.0, 0.01)
    if hard:
        return _object(rng, shape, hue, texture, rng.uniform(0.16, 0.24), rng.uniform(0.3, 0.7),
                       rng.uniform(0.3, 0.7), rng.uniform(0, 2 * np.pi))
    return _object(rng, shape, hue, texture, rng.uniform(0.26, 0.36), 0.5 + rng.uniform(-0.08, 0.08),
                   0.5 + rng.uniform(-0.08, 0.08), rng.uniform(-0.5, 0.5))


def _distractor(rng: np.random.Generator) -> Placement:
    return _object(rng, SHAPES[rng.integers(len(SHAPES))], rng.uniform(), TEXTURES[rng.integers(len(TEXTURES))],
                   rng.uniform(0.1, 0.18), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0, 2 * np.pi))


def _tissue(rng: np.random.Generator, tissue: str, size: int) -> Image.Image:
    """A full-frame texture (a rotated square larger than the frame) with a few dark round "nuclei"."""
    texture, hue, n_nuclei, radius = TISSUES[tissue]
    hue += rng.normal(0.0, 0.015)
    objects = [_object(rng, "square", hue, texture, 1.6, 0.5, 0.5, rng.uniform(0, 2 * np.pi),
                       period=rng.uniform(0.05, 0.07))]
    objects += [_object(rng, "circle", hue + 0.05, "plain", radius * rng.uniform(0.8, 1.2), rng.uniform(),
                        rng.uniform(), 0.0) for _ in range(n_nuclei)]
    return render(rng, objects, size, size, noise=rng.uniform(4, 10), gradient=0.1)


# ----------------------------------------------------------------------------------------------- writers


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    with atomic_path(path, suffix=path.suffix) as tmp:
        image.save(tmp, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


Job = tuple[Path, Callable[[], Image.Image], dict[str, Any]]  # (file, renderer, its factors.csv row)


def _render_all(jobs: list[Job], desc: str, fmt: str) -> list[dict[str, Any]]:
    rows = []
    for path, draw, row in progress(jobs, desc=desc):
        _save(draw(), path, fmt)
        rows.append(row)
    return rows


def _class_job(root: Path, set_name: str, cls: DemoClass, name: str, rng: np.random.Generator, size: int,
               hard: bool) -> Job:
    def draw() -> Image.Image:
        objects = [_class_view(rng, cls.shape, cls.colour, cls.texture, hard)]
        if hard:  # clutter goes under the object of interest
            objects = [_distractor(rng) for _ in range(2)] + objects
        return render(rng, objects, size, size, noise=rng.uniform(10, 24) if hard else rng.uniform(4, 12),
                      gradient=0.5 if hard else 0.2)
    image_id = f"{cls.wnid}/{name}"
    return (root / image_id, draw, {"set": set_name, "image_id": image_id, "label": cls.wnid, "shape": cls.shape,
                                    "colour": cls.colour, "texture": cls.texture})


def _imagenet(out: Path, classes: list[DemoClass], spec: Mapping[str, int], size: int) -> list[dict[str, Any]]:
    """ImageNet layout: `train/<wnid>/<wnid>_<n>.JPEG`, `val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG` (numbers
    shuffled across classes, as in the real validation set)."""
    n_val = spec["val_per_class"]
    numbers = _rng(spec["seed"], Stream.VAL_NUMBERS).permutation(len(classes) * n_val) + 1
    jobs = []
    for c, cls in enumerate(classes):
        jobs += [_class_job(out / "train", "imagenet/train", cls, f"{cls.wnid}_{n}.JPEG",
                            _rng(spec["seed"], Stream.TRAIN, c, n), size, hard=False)
                 for n in range(1, spec["train_per_class"] + 1)]
        jobs += [_class_job(out / "val", "imagenet/val", cls, f"ILSVRC2012_val_{numbers[c * n_val + n]:08d}.JPEG",
                            _rng(spec["seed"], Stream.VAL, c, n), size, hard=False) for n in range(n_val)]
    return _render_all(jobs, "imagenet", "JPEG")


def _imagenet_a(out: Path, classes: list[DemoClass], spec: Mapping[str, int], size: int) -> list[dict[str, Any]]:
    jobs = [_class_job(out, out.name, cls, f"{n:06d}.jpg", _rng(spec["seed"], Stream.SHIFTED, c, n), size, hard=True)
            for c, cls in enumerate(shifted_classes(classes)) for n in range(spec["shifted_per_class"])]
    return _render_all(jobs, "imagenet-a", "JPEG")


def _cue_conflict(out: Path, classes: list[DemoClass], spec: Mapping[str, int], size: int) -> list[dict[str, Any]]:
    """Every (shape, texture) category pair, same-category pairs included (the analysis excludes them)."""
    look = {c.shape: c for c in classes if c.breed == 0}
    per_pair = spec["conflicts_per_pair"]
    jobs = []
    for s, shape in enumerate(look):
        for t, texture in enumerate(look):
            for m in range(per_pair):
                rng = _rng(spec["seed"], Stream.CONFLICT, s, t, m)
                donor = look[texture]
                name = f"{shape}{t * per_pair + m + 1}-{texture}{s * per_pair + m + 1}.png"

                def draw(rng=rng, shape=shape, donor=donor) -> Image.Image:
                    return render(rng, [_class_view(rng, shape, donor.colour, donor.texture)], size, size,
                                  noise=rng.uniform(4, 12), gradient=0.2)
                jobs.append((out / shape / name, draw,
                             {"set": out.name, "image_id": f"{shape}/{name}", "label": shape, "shape": shape,
                              "colour": donor.colour, "texture": donor.texture, "texture_category": texture}))
    return _render_all(jobs, "cue-conflict", "PNG")


def _colon(out: Path, stream: Stream, n_per_class: int, prefix: str, spec: Mapping[str, int],
           size: int) -> list[dict[str, Any]]:
    """NCT-CRC-HE layout `<CLASS>/<CLASS>-<prefix><8 letters>.tif`."""
    names = _rng(spec["seed"], Stream.COLON_NAMES, int(stream))
    jobs, used = [], set()
    for c, tissue in enumerate(TISSUES):
        for n in range(n_per_class):
            name = f"{tissue}-{prefix}{''.join(names.choice(list(string.ascii_uppercase), 8))}.tif"
            while name in used:
                name = f"{tissue}-{prefix}{''.join(names.choice(list(string.ascii_uppercase), 8))}.tif"
            used.add(name)
            rng = _rng(spec["seed"], stream, c, n)
            jobs.append((out / tissue / name, lambda rng=rng, t=tissue: _tissue(rng, t, size),
                         {"set": out.name, "image_id": f"{tissue}/{name}", "label": tissue,
                          "texture": TISSUES[tissue][0]}))
    return _render_all(jobs, out.name, "TIFF")


def _dtd(out: Path, spec: Mapping[str, int], size: int) -> list[dict[str, Any]]:
    """DTD layout: `images/<texture>/<texture>_<nnnn>.jpg` and split files `labels/{train,val,test}1.txt` listing
    `<texture>/<file>` sorted by name; each class's images are dealt to the three splits by a seeded shuffle."""
    n, splits = spec["dtd_per_split"], ("train", "val", "test")
    jobs, listed = [], {split: [] for split in splits}
    for c, texture in enumerate(TEXTURES):
        split_of = np.empty(3 * n, dtype=int)
        split_of[_rng(spec["seed"], Stream.DTD_SPLITS, c).permutation(3 * n)] = np.arange(3 * n) // n
        for i in range(3 * n):
            image_id = f"{texture}/{texture}_{i + 1:04d}.jpg"
            listed[splits[split_of[i]]].append(image_id)
            rng = _rng(spec["seed"], Stream.DTD, c, i)
            jobs.append((out / "images" / image_id, lambda rng=rng, t=texture: _texture(rng, t, size),
                         {"set": out.name, "image_id": image_id, "label": texture, "texture": texture}))
    rows = _render_all(jobs, out.name, "JPEG")
    for split, ids in listed.items():
        write_text(out / "labels" / f"{split}1.txt", "".join(f"{i}\n" for i in sorted(ids)))
    return rows


def _texture(rng: np.random.Generator, texture: str, size: int) -> Image.Image:
    """A full-frame texture of random hue: only the pattern tells the class."""
    plane = _object(rng, "square", rng.uniform(), texture, 1.6, 0.5, 0.5, rng.uniform(0, 2 * np.pi),
                    period=rng.uniform(0.08, 0.12))
    return render(rng, [plane], size, size, noise=rng.uniform(4, 10), gradient=0.1)


def _hierarchy(out: Path, classes: list[DemoClass]) -> dict[str, str]:
    """BREEDS-Benchmarks files for entity → blunt/pointed → shape → breed pair → breed; returns node names."""
    names = {ROOT_WNID: "entity", "n80000000": "blunt shape", "n80000001": "pointed shape"}
    edges = [(ROOT_WNID, "n80000000"), (ROOT_WNID, "n80000001")]
    for k, shape in enumerate(SHAPES):
        node = f"n7{k:07d}"
        names[node] = shape
        edges.append((f"n8000000{int(SHAPE_ATTRIBUTES[shape][1] >= POINTED)}", node))
        for pair in range(BREEDS_PER_SHAPE // 2):
            pair_node = f"n6{k * BREEDS_PER_SHAPE // 2 + pair:07d}"
            names[pair_node] = f"{shape}, breeds {2 * pair} and {2 * pair + 1}"
            edges.append((node, pair_node))
            edges += [(pair_node, c.wnid) for c in classes if c.shape == shape and c.breed // 2 == pair]
    names.update({c.wnid: c.name for c in classes})
    write_text(out / "dataset_class_info.json", json.dumps([[i, c.wnid, c.name] for i, c in enumerate(classes)]))
    write_text(out / "class_hierarchy.txt", "".join(f"{p} {c}\n" for p, c in edges))
    write_text(out / "node_names.txt", "".join(f"{w}\t{n}\n" for w, n in names.items()))
    return names


PARTS = ("imagenet", "imagenet-a", "cue-conflict", "NCT-CRC-HE-100K", "CRC-VAL-HE-7K", "dtd", "breeds")


def _claim(out_dir: Path) -> None:
    """Clear a previous labelled demo (labelled.json first); never touch a folder this generator does not own."""
    holds_files = out_dir.exists() and any(p.is_file() for p in out_dir.rglob("*"))
    if holds_files and not (out_dir / MARKER).exists():
        raise ValueError(f"{out_dir} is not empty and holds no {MARKER} marker; refusing to overwrite it")
    (out_dir / "labelled.json").unlink(missing_ok=True)
    for part in PARTS:
        shutil.rmtree(out_dir / part, ignore_errors=True)
    write_text(out_dir / MARKER, "generated by `metalign demo-labelled`; the folder may be cleared by a rerun\n")


def _counts(rows: list[dict[str, Any]]) -> Iterator[tuple[str, int]]:
    return iter(pd.Series([r["set"] for r in rows]).value_counts().sort_index().items())


def generate_labelled(out_dir: Path, spec: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Write every labelled demo set under `out_dir` and return the summary (also `labelled.json`, written last)."""
    spec = validate_labelled(spec)
    out_dir = Path(out_dir)
    _claim(out_dir)
    classes = demo_classes()
    rows = _imagenet(out_dir / "imagenet", classes, spec, image_size)
    rows += _imagenet_a(out_dir / "imagenet-a", classes, spec, image_size)
    rows += _cue_conflict(out_dir / "cue-conflict", classes, spec, image_size)
    rows += _colon(out_dir / "NCT-CRC-HE-100K", Stream.COLON_TRAIN, spec["colon_train_per_class"], "", spec,
                   image_size)
    rows += _colon(out_dir / "CRC-VAL-HE-7K", Stream.COLON_TEST, spec["colon_test_per_class"], "TCGA-", spec,
                   image_size)
    rows += _dtd(out_dir / "dtd", spec, image_size)
    _hierarchy(out_dir / "breeds", classes)
    write_csv(out_dir / "factors.csv", pd.DataFrame(rows))
    summary = {
        "spec": spec, "image_size": image_size, "counts": dict(_counts(rows)),
        "classes": [{"wnid": c.wnid, "name": c.name, "breed": c.breed} for c in classes],
        "shifted_classes": [c.wnid for c in shifted_classes(classes)],
        "categories": categories(classes), "tissues": list(TISSUES),
        "library_versions": library_versions(),
    }
    write_json(out_dir / "labelled.json", summary)
    return summary
