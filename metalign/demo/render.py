"""Procedural rendering of factor-defined objects with PIL, supersampled for anti-aliasing."""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from metalign.demo.factors import SHAPES

SUPERSAMPLE = 2


def _regular(n: int, phase: float = 0.0, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    r = np.resize(np.asarray(radii), n)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


# Unit-radius outlines (x right, y down); rotation and scale are applied per object.
OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(48),
    "square": _regular(4, np.pi / 4),
    "triangle": _regular(3, -np.pi / 2),
    "star": _regular(10, -np.pi / 2, radii=(1.0, 0.45)),
    "diamond": _regular(4) * np.asarray([1.0, 0.6]),
    "hexagon": _regular(6),
    "cross": np.asarray([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                         (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], dtype=float),
    "arrow": np.asarray([(-1, -0.3), (0.2, -0.3), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3)], dtype=float),
}
assert set(OUTLINES) == set(SHAPES)


@dataclass(frozen=True)
class Placement:
    """One object instance: factors plus the per-image nuisance values (position, rotation, colour jitter)."""

    shape: str
    hue: float
    texture: str
    radius: float  # fraction of the image height
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height
    rotation: float  # radians
    saturation: float
    value: float
    period: float  # texture period, fraction of the radius
    phase: float  # texture phase, fraction of the period


def hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255.0


@functools.lru_cache(maxsize=4)
def _grid(h: int, w: int) -> np.ndarray:
    """np.mgrid[0:h, 0:w], built once per canvas size (read-only)."""
    grid = np.mgrid[0:h, 0:w]
    grid.flags.writeable = False
    return grid


def background(rng: np.random.Generator, width: int, height: int, noise: float, gradient: float) -> np.ndarray:
    """Low-saturation backdrop with a random linear gradient and pixel noise (float RGB, supersampled size)."""
    w, h = width * SUPERSAMPLE, height * SUPERSAMPLE
    base = hsv(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.35, 0.9))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(h, w) / max(w, h)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * gradient * rng.uniform(-1, 1)
    canvas = base + ramp * 255.0
    return canvas + rng.normal(0.0, noise, size=(h, w, 1))


def _texture_mask(u: np.ndarray, v: np.ndarray, texture: str, period: float, phase: float) -> np.ndarray:
    """Where the secondary colour goes, in object coordinates (so patterns rotate with the object)."""
    if texture == "plain":
        return np.zeros(u.shape, dtype=bool)
    a, b = u / period + phase, v / period + phase
    if texture == "striped":
        return np.floor(2 * a) % 2 == 1
    if texture == "dotted":
        return (a - np.round(a)) ** 2 + (b - np.round(b)) ** 2 < 0.28 ** 2
    if texture == "checkered":
        return (np.floor(2 * a) + np.floor(2 * b)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


def draw_object(canvas: np.ndarray, obj: Placement) -> None:
    """Paint one object onto a supersampled float canvas in place."""
    h, w = canvas.shape[:2]
    cx, cy, r = obj.x * w, obj.y * h, obj.radius * h
    cos, sin = np.cos(obj.rotation), np.sin(obj.rotation)
    outline = OUTLINES[obj.shape] @ np.asarray([[cos, sin], [-sin, cos]]) * r + (cx, cy)
    mask_image = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask_image).polygon([tuple(p) for p in outline], fill=255)
    mask = np.asarray(mask_image) > 127
    yy, xx = np.nonzero(mask)                   # the object's pixels, in the row-major order of canvas[mask]
    dx, dy = xx - cx, yy - cy
    u, v = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r
    primary = hsv(obj.hue, obj.saturation, obj.value)
    secondary = primary * 0.35 + 255.0 * 0.65  # pale tint of the same hue keeps the colour factor readable
    pattern = _texture_mask(u, v, obj.texture, obj.period, obj.phase)
    canvas[mask] = np.where(pattern[:, None], secondary, primary)


def finish(canvas: np.ndarray) -> Image.Image:
    """Clip, quantise and downsample the supersampled canvas to the output image."""
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    h, w = canvas.shape[:2]
    return image.resize((w // SUPERSAMPLE, h // SUPERSAMPLE), Image.Resampling.BOX)


def render(rng: np.random.Generator, objects: list[Placement], width: int, height: int, noise: float,
           gradient: float) -> Image.Image:
    canvas = background(rng, width, height, noise, gradient)
    for obj in objects:
        draw_object(canvas, obj)
    return finish(canvas)
