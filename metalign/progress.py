"""Progress that a user can watch in a job's log, not only on a terminal.

tqdm's `disable=None` hides every bar when stderr is not a TTY, which is exactly where Snakemake and SLURM send it:
a 24-hour training job then logs nothing. `progress` keeps the bar on a terminal and, in a log file, writes one plain
line (no carriage returns) at the start, at most every `METALIGN_PROGRESS_SECONDS` seconds (default 60), and at the end.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm

DEFAULT_SECONDS = 60.0


class _LineWriter:
    """A file for tqdm that turns each redraw into its own line, so a log file reads as a time series."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def interval() -> float:
    """Seconds between log lines (environment `METALIGN_PROGRESS_SECONDS`)."""
    return float(os.environ.get("METALIGN_PROGRESS_SECONDS", DEFAULT_SECONDS))


def progress(iterable: Iterable | None = None, *, desc: str, **kwargs: Any) -> tqdm:
    """tqdm over `iterable` (or a manual bar with `total=`) that reports on a terminal and in log files alike."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, desc=desc, file=stream, **kwargs)
    seconds = interval()
    return tqdm(iterable, desc=desc, file=_LineWriter(stream), mininterval=seconds, maxinterval=seconds,
                ascii=True, dynamic_ncols=False, ncols=100, **kwargs)
