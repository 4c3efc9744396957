"""`python -m metalign <stage> …`: the single entry point that every Snakemake rule calls."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each stage module exposes `register(subparsers)`; adding a stage is one line here.
STAGE_MODULES = (
    "metalign.demo.world",
    "metalign.demo.models",
    "metalign.manifest",
    "metalign.extract",
    "metalign.functions.cli",
    "metalign.train.cli",
    "metalign.evaluate.odd_one_out",
    "metalign.report.tables",
    "metalign.report.figures",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalign", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in STAGE_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input: one clear line naming the file/key/id, no traceback to dig through.
        print(f"metalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
