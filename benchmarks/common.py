"""The one output format of every benchmark."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


LINES: list[str] = []  # every line printed in this run, for results/bench/report.html


def report(name: str, ours: float, baseline: float, goal: str, unit: str = "s", higher_is_better: bool = False) -> str:
    """Print `bench <name>: ours=… baseline=… ratio=…x goal=…`; ratio > 1 means ours is better."""
    ratio = (ours / baseline) if higher_is_better else (baseline / ours)
    line = f"bench {name}: ours={ours:.4g}{unit} baseline={baseline:.4g}{unit} ratio={ratio:.3g}x goal={goal}"
    print(line, flush=True)
    LINES.append(line)
    return line


def unmet(met: bool) -> str:
    """The marker a goal line carries when its goal is not reached (empty when it is)."""
    return "" if met else " (goal not met)"


@contextmanager
def timer() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    yield box
    box.append(time.perf_counter() - start)
