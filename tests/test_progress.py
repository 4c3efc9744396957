"""Progress reaches log files: one plain line per report, throttled by time."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import time
from metalign.progress import progress
for _ in progress(range(5), desc="work", unit="item"):
    time.sleep(0.05)
"""


def _log(tmp_path, seconds: str) -> list[str]:
    log = tmp_path / f"job_{seconds}.log"
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-c", SCRIPT], stderr=handle, check=True,
                       env={"METALIGN_PROGRESS_SECONDS": seconds, "PATH": ""})
    text = log.read_text()
    assert "\r" not in text
    return text.splitlines()


def test_progress_writes_lines_to_a_log_file(tmp_path):
    every = _log(tmp_path, "0")
    assert every[0].startswith("work:   0%") and every[-1].startswith("work: 100%") and "5/5" in every[-1]
    assert len(every) >= 5                    # one line per update when the interval is 0
    throttled = _log(tmp_path, "3600")
    assert len(throttled) == 2                # the start and the end only
    assert throttled[-1].startswith("work: 100%")
