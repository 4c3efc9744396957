"""Latent factor space of the demo world and the planted concept embedding derived from it.

Concepts are unique (size, colour, texture, shape) combinations with continuous hue and size jittered inside their
named bin, so that cosine similarities of the planted embedding rarely tie and argmax choices are well defined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "arrow")
# Graded shape attributes (roundness, pointiness) give the planted space similarity structure beyond identity.
SHAPE_ATTRIBUTES = {
    "circle": (1.0, 0.0), "square": (0.0, 0.2), "triangle": (0.0, 0.8), "star": (0.0, 1.0),
    "diamond": (0.0, 0.6), "hexagon": (0.6, 0.1), "cross": (0.0, 0.3), "arrow": (0.0, 0.6),
}
COLOURS = {"red": 0.0, "orange": 0.08, "yellow": 0.15, "green": 0.33, "cyan": 0.5, "blue": 0.62, "purple": 0.75,
           "pink": 0.88}
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": (0.20, 0.27), "large": (0.33, 0.40)}  # object radius as a fraction of the image side
SIZE_RANGE = (0.20, 0.40)
HUE_JITTER = 0.015  # concept hue within its colour bin
HUE_BASIS = 6  # von Mises bumps around the hue circle: neighbouring hues stay similar
HUE_KAPPA = 2.0
WEIGHTS = {"shape": 1.0, "shape_attribute": 0.5, "colour": 0.9, "texture": 0.7, "patterned": 0.3, "size": 0.5}


@dataclass(frozen=True)
class Concept:
    """One concept: named discrete bins plus the continuous values that rendering and the embedding use."""

    unique_id: str
    shape: str
    colour: str
    hue: float
    texture: str
    size_label: str
    size: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def n_combinations() -> int:
    return len(SIZES) * len(COLOURS) * len(TEXTURES) * len(SHAPES)


def sample_concepts(n: int, rng: np.random.Generator) -> list[Concept]:
    """`n` distinct factor combinations, alphabetical by uniqueID (the SPoSE row order)."""
    if not 3 <= n <= n_combinations():
        raise ValueError(f"n_concepts must be in [3, {n_combinations()}], got {n}")
    grid = [(s, c, t, sh) for s in SIZES for c in COLOURS for t in TEXTURES for sh in SHAPES]
    concepts = []
    for index in rng.choice(len(grid), size=n, replace=False):
        size_label, colour, texture, shape = grid[index]
        hue = (COLOURS[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
        size = rng.uniform(*SIZES[size_label])
        concepts.append(Concept(f"{size_label}_{colour}_{texture}_{shape}", shape, colour, round(float(hue), 6),
                                texture, size_label, round(float(size), 6)))
    return sorted(concepts, key=lambda c: c.unique_id)


def dimension_labels() -> list[str]:
    return ([f"shape:{s}" for s in SHAPES] + ["shape:round", "shape:pointy"]
            + [f"hue:{k}/{HUE_BASIS}" for k in range(HUE_BASIS)]
            + [f"texture:{t}" for t in TEXTURES] + ["texture:patterned", "size:small", "size:large"])


def factor_vector(shape: str | None, hue: float | None, texture: str | None, size: float | None) -> np.ndarray:
    """Non-negative feature vector of one object, one block per factor, scaled by the factor's weight; an unknown
    factor (None) leaves its block at zero."""
    blocks = []
    if shape is None:
        blocks += [np.zeros(len(SHAPES)), np.zeros(2)]
    else:
        blocks += [np.eye(len(SHAPES))[SHAPES.index(shape)] * WEIGHTS["shape"],
                   np.asarray(SHAPE_ATTRIBUTES[shape]) * WEIGHTS["shape_attribute"]]
    centres = np.arange(HUE_BASIS) / HUE_BASIS
    blocks.append(np.zeros(HUE_BASIS) if hue is None else
                  np.exp(HUE_KAPPA * (np.cos(2 * np.pi * (hue - centres)) - 1)) * WEIGHTS["colour"])
    if texture is None:
        blocks += [np.zeros(len(TEXTURES)), np.zeros(1)]
    else:
        blocks += [np.eye(len(TEXTURES))[TEXTURES.index(texture)] * WEIGHTS["texture"],
                   np.asarray([texture != "plain"], dtype=float) * WEIGHTS["patterned"]]
    if size is None:
        blocks.append(np.zeros(2))
    else:
        largeness = np.clip((size - SIZE_RANGE[0]) / (SIZE_RANGE[1] - SIZE_RANGE[0]), 0.0, 1.0)
        blocks.append(np.asarray([1 - largeness, largeness]) * WEIGHTS["size"])
    return np.concatenate(blocks)


def concept_features(concept: Concept) -> np.ndarray:
    """The planted embedding row of one concept."""
    return factor_vector(concept.shape, concept.hue, concept.texture, concept.size)


def planted_embedding(concepts: list[Concept]) -> np.ndarray:
    """(n_concepts, d) non-negative matrix playing SPoSE's role; rows follow `concepts`."""
    return np.stack([concept_features(c) for c in concepts])
