"""Functions stage: top-k SAE codes of an image set and the latents ("functions") that episodes are drawn from.

Modules: `sae` (encoder, trainer, checkpoints), `select` (statistics and selection from (N, k) codes),
`codes` (the code-file format), `cli` (subcommands sae-train, sae-encode, functions-select).
"""

from metalign.functions.cli import register

__all__ = ["register"]
