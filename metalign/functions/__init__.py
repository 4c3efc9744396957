"""Functions stage: the targets ("functions") that episodes are drawn from, one cached file per set and split.

Modules: `sae` (top-k encoder, trainer, checkpoints), `prisma` (pretrained ViT-Prisma legacy SAEs), `select`
(statistics and selection from (N, k) codes), `codes` (the function-file format: sparse codes or neurons),
`subsets` (random and similarity-stratified subsets), `sets` (function sets as config; light, no torch), `cli`
(subcommands). `register` loads the CLI lazily so that config validation imports no torch.
"""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from metalign.functions.cli import register as register_cli

    register_cli(subparsers)
