"""Seeded random streams of the demo world: one generator per (seed, stream, index…), so changing one count or part
never changes the draws of another (each module numbers its own streams in an IntEnum)."""

from __future__ import annotations

import numpy as np


def stream_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(stream), *index])
