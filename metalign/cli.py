"""`python -m metalign <stage> …`: the single entry point that every Snakemake rule calls."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand → the module whose `register(subparsers)` defines it. Only the module of the command being run is
# imported (a job should not pay for importing every stage's libraries); `--help` imports them all.
COMMANDS = {
    "demo-world": "metalign.demo.world",
    "demo-vit": "metalign.demo.models",
    "download": "metalign.download",
    "manifest": "metalign.manifest",
    "extract": "metalign.extract",
    "sae-train": "metalign.functions.cli",
    "sae-encode": "metalign.functions.cli",
    "functions-select": "metalign.functions.cli",
    "sae-import": "metalign.functions.cli",
    "functions-neurons": "metalign.functions.cli",
    "functions-subset": "metalign.functions.cli",
    "functions-summary": "metalign.functions.cli",
    "icl-eval": "metalign.train.icl",
    "figure-icl": "metalign.train.icl",
    "train": "metalign.train.cli",
    "encode": "metalign.train.cli",
    "evaluate-things": "metalign.evaluate.odd_one_out",
    "things-table": "metalign.report.tables",
    "figure-things": "metalign.report.figures",
    "figure-curves": "metalign.report.figures",
    "evaluate-levels": "metalign.evaluate.levels",
    "evaluate-category": "metalign.evaluate.learning",
    "evaluate-reward": "metalign.evaluate.learning",
    "evaluate-geometry": "metalign.evaluate.geometry",
    "behaviour-stats": "metalign.evaluate.stats",
    "noise-ceiling": "metalign.evaluate.stats",
    "figure-behaviour": "metalign.evaluate.figures",
    "figure-geometry": "metalign.evaluate.figures",
    "figure-tsne": "metalign.evaluate.figures",
    "demo-behaviour": "metalign.demo.learning",
    "demo-fmri": "metalign.demo.fmri",
    "brain-prepare-things": "metalign.brain.cli",
    "brain-prepare-bold5000": "metalign.brain.cli",
    "brain-encode": "metalign.brain.cli",
    "brain-table": "metalign.brain.cli",
    "figure-brain-rois": "metalign.brain.cli",
    "figure-brain-volume": "metalign.brain.cli",
    "downstream-fewshot": "metalign.downstream.cli",
    "downstream-breeds-splits": "metalign.downstream.cli",
    "downstream-breeds": "metalign.downstream.cli",
    "downstream-imagenet-a": "metalign.downstream.cli",
    "downstream-shape-bias": "metalign.downstream.cli",
    "downstream-table": "metalign.downstream.cli",
    "figure-downstream": "metalign.downstream.cli",
    "demo-labelled": "metalign.demo.labelled",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalign", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    modules = [COMMANDS[command]] if command in COMMANDS else sorted(set(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input: one clear line naming the file/key/id, no traceback to dig through.
        print(f"metalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
