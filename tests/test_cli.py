"""The CLI dispatch table covers every registered subcommand; `--help` lists them; bad input gives one line; the
shared `collect-summaries` stage."""

from __future__ import annotations

import argparse
import importlib
import json
import re

import numpy as np
import pandas as pd
import pytest

from metalign.cli import COMMANDS, build_parser, main
from metalign.io import DataContractError
from metalign.results import summary_table

EXPECTED_COMMANDS = (
    "download", "manifest", "extract", "embeddings-concat",
    "sae-train", "sae-import", "sae-encode", "functions-neurons", "functions-subset", "functions-shuffle",
    "functions-summary",
    "train", "encode", "icl-eval", "figure-curves", "figure-icl",
    "evaluate-things", "evaluate-levels", "evaluate-category", "evaluate-reward", "evaluate-geometry", "noise-ceiling",
    "behaviour-stats", "figure-things", "figure-behaviour", "figure-geometry", "figure-tsne",
    "brain-prepare-things", "brain-prepare-bold5000", "brain-encode", "brain-table", "figure-brain-rois",
    "figure-brain-volume",
    "downstream-fewshot", "downstream-breeds-splits", "downstream-breeds", "downstream-imagenet-a",
    "downstream-shape-bias", "downstream-fewshot-table", "figure-downstream",
    "collect-summaries", "cost",
    "demo-world", "demo-vit", "demo-behaviour", "demo-fmri", "demo-labelled", "demo-planted", "demo-effect",
)


def test_every_command_is_registered_by_its_module():
    for command, module in COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        importlib.import_module(module).register(sub)
        assert command in sub.choices, f"{module} does not register {command}"


def test_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: metalign")
    listed = re.findall(r"^ {4}(\S+)", out, flags=re.M)  # one entry per command, each with its help text
    assert sorted(listed) == sorted(EXPECTED_COMMANDS)
    assert set(COMMANDS) == set(EXPECTED_COMMANDS)  # the dispatch table dispatches exactly these


def test_bad_input_gives_one_line_error(tmp_path, capsys):
    code = main(["manifest", "--layout", "flat", "--root", str(tmp_path / "nope"), "--split", "x",
                 "--out", str(tmp_path / "m.csv")])
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    assert lines[0].startswith("metalign manifest: error: ") and str(tmp_path / "nope") in lines[0]
    assert "Traceback" not in captured.err and not captured.out
    assert not (tmp_path / "m.csv").exists()


# ------------------------------------------------------------------------------------------------- summaries


def _collect(summaries: list, out) -> None:
    args = build_parser("collect-summaries").parse_args(["collect-summaries", "--summaries", *map(str, summaries),
                                                         "--out", str(out)])
    args.func(args)


def test_collect_summaries_one_row_per_backbone_and_variant(tmp_path):
    written = {
        ("dino", "main"): {"acc": 0.75, "n_trials": 120, "scoring": "loo", "median_log_t": None,
                           "participants": {"p1": {"log_t": 0.1}}, "library_versions": {"numpy": "2"}},
        ("clip", "main"): {"acc": 0.625, "n_trials": 80, "scoring": "in_sample", "median_log_t": 1.5,
                           "per_fold": [0.5, 0.75]},
        ("clip", "base"): {"acc": 0.5, "n_trials": 80, "scoring": "in_sample", "median_log_t": -0.25, "extra": True},
    }
    paths = []
    for (backbone, variant), summary in written.items():
        path = tmp_path / backbone / f"{variant}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(summary))
        paths.append(path)
    table = summary_table(paths)
    # sorted by backbone, then base before meta; nested fields (dicts, lists) are not columns
    assert list(zip(table["backbone"], table["variant"], table["representation"])) == [
        ("clip", "base", "base"), ("clip", "main", "meta"), ("dino", "main", "meta")]
    assert set(table.columns) == {"backbone", "variant", "representation", "acc", "n_trials", "scoring",
                                  "median_log_t", "extra"}
    np.testing.assert_array_equal(table["acc"], [0.5, 0.625, 0.75])
    np.testing.assert_array_equal(table["n_trials"], [80, 80, 120])
    assert list(table["scoring"]) == ["in_sample", "in_sample", "loo"]
    np.testing.assert_array_equal(table["median_log_t"], [-0.25, 1.5, np.nan])
    assert table["extra"].tolist()[0] is True and pd.isna(table["extra"].tolist()[1:]).all()

    _collect(paths, tmp_path / "table.csv")  # the CLI writes the same table
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "table.csv"), table.reset_index(drop=True),
                                  check_dtype=False)


def test_collect_summaries_names_a_corrupt_summary(tmp_path):
    good = tmp_path / "clip" / "main.json"
    good.parent.mkdir()
    good.write_text(json.dumps({"acc": 0.5}))
    corrupt = tmp_path / "clip" / "base.json"
    corrupt.write_text('{"acc": 0.5,')  # a job killed while writing
    with pytest.raises(DataContractError, match=rf"cannot read summary {re.escape(str(corrupt))}: Expecting"):
        _collect([good, corrupt], tmp_path / "table.csv")
    assert not (tmp_path / "table.csv").exists()
