"""Downstream and robustness evaluations of frozen representations (docs/methods.md §9.9, §9.10).

Few-shot classification (big_vision `fewshot_lsr`), BREEDS subpopulation shift, ImageNet-A and cue-conflict shape
bias, each run identically on the backbone's features ("base") and on a meta-learned representation ("meta").
"""
