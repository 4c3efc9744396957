"""`python -m metalign <stage> …`: the single entry point that every Snakemake rule calls."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys

# Each stage's `cli` module registers its commands (handlers are named `cmd_<command>`). Only the module of the
# command being run is imported (a job should not pay for every stage's libraries); `--help` imports them all.
STAGES = {
    "metalign.download.cli": ("download",),
    "metalign.images.cli": ("manifest",),
    "metalign.embed.cli": ("extract", "embeddings-concat"),
    "metalign.functions.cli": ("sae-train", "sae-import", "sae-encode", "functions-neurons", "functions-subset", "functions-shuffle",
                               "functions-summary"),
    "metalign.train.cli": ("train", "encode", "icl-eval", "figure-curves", "figure-icl"),
    "metalign.behaviour.cli": ("evaluate-things", "evaluate-levels", "evaluate-category", "evaluate-reward",
                               "evaluate-geometry", "noise-ceiling", "behaviour-stats", "figure-things",
                               "figure-behaviour", "figure-geometry", "figure-tsne"),
    "metalign.brain.cli": ("brain-prepare-things", "brain-prepare-bold5000", "brain-encode", "brain-table",
                           "figure-brain-rois", "figure-brain-volume"),
    "metalign.downstream.cli": ("downstream-fewshot", "downstream-breeds-splits", "downstream-breeds",
                                "downstream-imagenet-a", "downstream-shape-bias", "downstream-fewshot-table",
                                "figure-downstream"),
    "metalign.results": ("collect-summaries",),
    "metalign.cost": ("cost",),
    "metalign.demo.cli": ("demo-world", "demo-vit", "demo-behaviour", "demo-fmri", "demo-labelled", "demo-planted",
                          "demo-effect"),
}
COMMANDS = {command: module for module, commands in STAGES.items() for command in commands}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalign", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    modules = [COMMANDS[command]] if command in COMMANDS else list(STAGES)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None, freeze_imports: bool = False) -> int:
    """Run one command. `freeze_imports` (a job's own process): move everything imported so far out of the cyclic
    garbage collector's reach (gc.freeze), so that a full collection scans only what the job creates; nilearn alone
    calls gc.collect() for every image it reads, ≈0.1 s each over torch's and the other libraries' objects."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if freeze_imports:
        gc.freeze()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input: one clear line naming the file/key/id, no traceback to dig through.
        print(f"metalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
