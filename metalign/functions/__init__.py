"""Functions stage: the targets ("functions") that episodes are drawn from, one cached file per set and split.

Modules: `sae` (top-k encoder, trainer, checkpoints), `prisma` (pretrained ViT-Prisma legacy SAEs), `select`
(statistics and selection from (N, k) codes), `codes` (the function-file format: sparse codes or neurons),
`subsets` (random and similarity-stratified subsets), `cli` (commands). Function sets as config: `metalign.config.functions`.
"""
