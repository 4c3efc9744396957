"""The targets in docs/reproduce.md are the study's own result files, to the 4 decimals printed."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO

EVALS = REPO.parent / "shared" / "realdata" / "metalign_zeroshot" / "data" / "evals"
DOC = REPO / "docs" / "reproduce.md"


def _tables(section: str) -> list[list[list[str]]]:
    """Markdown tables of one `## N.` section of the doc, as rows of cells (header row first)."""
    text = DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(\s*-+\s*\|)+", line):
                rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def _published(folder: str, variant: str, backbone: str) -> dict:
    return json.loads((EVALS / folder / f"{variant}_{backbone}_zeroshot.json").read_text())


@pytest.mark.skipif(not EVALS.exists(), reason="published result files not present")
@pytest.mark.parametrize("section, folder", [("1.", "thingso1o"), ("2.", "levelso1o")])
def test_zero_shot_targets_equal_the_published_files(section, folder):
    header, *rows = _tables(section)[0]
    backbones = header[1:]
    checked = 0
    for variant, *values in rows:
        for backbone, value in zip(backbones, values):
            published = _published(folder, "main" if variant == "base" else variant, backbone)
            assert float(value) == pytest.approx(published["base_acc" if variant == "base" else "metalign_acc"],
                                                 abs=5e-5), (variant, backbone)
            checked += 1
    assert checked == 44


@pytest.mark.skipif(not EVALS.exists(), reason="published result files not present")
def test_levels_by_type_targets_equal_the_published_files():
    header, *rows = _tables("2.")[1]
    for backbone, *cells in rows:
        published = _published("levelso1o", "main", backbone)
        for kind, cell in zip(header[1:], cells):
            base, meta = (float(v) for v in cell.split("→"))
            assert base == pytest.approx(published[kind]["base_acc"], abs=5e-5)
            assert meta == pytest.approx(published[kind]["metalign_acc"], abs=5e-5)
