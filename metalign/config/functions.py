"""Function sets as configuration: each `function_sets` entry names one way to make one cached function file per split.

    method: train       our own top-k SAE on `source` features (`sae`: expansion, k, steps, batch_size, lr, seed)
    method: pretrained  a ViT-Prisma legacy `weights.pt` (`sae`: weights; optional k, repo, revision, and requires:
                        files another rule makes first, e.g. the download receipt)
    method: neurons     the dimensions of `source` features, median split (docs/methods.md §3)
    method: subset      a fraction of `parent`'s training functions, at random (`seed`) or at a `similarity` level;
                        the evaluation split keeps all of the parent's functions (identical validation/ICL episodes)
    method: shuffle     `parent`'s functions with their rows permuted across images (`seed`): each function keeps its
                        values but loses its image, the control with nothing to learn (docs/demo.md)

`source` = {backbone, output}: the backbone's feature file and the dataset in it (`features`, the default, or a block
output `layer_<k>` captured in the same forward pass). train, pretrained and neurons need source, train_split,
eval_split and min_nonzero; a subset or shuffle takes them from its parent chain. `resolve_function_sets` checks all of this
(and that parents exist without cycles) before any job runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

METHODS = ("train", "pretrained", "neurons", "subset", "shuffle")
DERIVED = ("subset", "shuffle")  # methods made from a `parent` set's files
_KEYS = {
    "train": ({"method", "source", "train_split", "eval_split", "min_nonzero", "sae"}, set()),
    "pretrained": ({"method", "source", "train_split", "eval_split", "min_nonzero", "sae"}, set()),
    "neurons": ({"method", "source", "train_split", "eval_split", "min_nonzero"}, set()),
    "subset": ({"method", "parent", "fraction"}, {"seed", "similarity"}),
    "shuffle": ({"method", "parent", "seed"}, set()),
}
_SAE_KEYS = {"train": {"expansion", "k", "steps", "batch_size", "lr", "seed"}, "pretrained": {"weights"}}
_SAE_OPTIONAL = {"train": set(), "pretrained": {"k", "repo", "revision", "requires"}}
LEVELS = ("low", "medium", "high")  # similarity levels of a subset (metalign.functions.subsets)


@dataclass(frozen=True)
class FunctionSet:
    name: str
    method: str
    root: str                 # the non-derived set whose arrays this set's files hold, link to or permute
    source_backbone: str
    source_output: str        # dataset of the source feature file: `features` or an extra block output `layer_<k>`
    train_split: str
    eval_split: str
    entry: Mapping[str, Any]

    @property
    def parent(self) -> str | None:
        return self.entry.get("parent")

    @property
    def splits(self) -> tuple[str, str]:
        return self.train_split, self.eval_split


def _check_entry(name: str, entry: Mapping[str, Any]) -> str:
    where = f"function_sets.{name}"
    method = entry.get("method")
    if method not in METHODS:
        raise ValueError(f"{where}.method: {method!r} is not one of {list(METHODS)}")
    required, optional = _KEYS[method]
    missing, unknown = sorted(required - set(entry)), sorted(set(entry) - required - optional)
    if missing or unknown:
        raise ValueError(f"{where}: method {method!r} needs keys {sorted(required)} (optional {sorted(optional)}); "
                         f"missing {missing}, unknown {unknown}")
    if method in _SAE_KEYS:
        sae = entry["sae"]
        need, allowed = _SAE_KEYS[method], _SAE_KEYS[method] | _SAE_OPTIONAL[method]
        if not need <= set(sae) or set(sae) - allowed:
            raise ValueError(f"{where}.sae: method {method!r} needs {sorted(need)} (optional "
                             f"{sorted(_SAE_OPTIONAL[method])}); got {sorted(sae)}")
    if method == "subset":
        if not 0 < entry["fraction"] <= 1:
            raise ValueError(f"{where}.fraction: must lie in (0, 1], got {entry['fraction']}")
        if ("seed" in entry) == ("similarity" in entry):
            raise ValueError(f"{where}: a subset takes exactly one of seed (random) and similarity ({list(LEVELS)})")
        if entry.get("similarity", "low") not in LEVELS:
            raise ValueError(f"{where}.similarity: {entry['similarity']!r} is not one of {list(LEVELS)}")
    return method


def resolve_function_sets(function_sets: Mapping[str, Mapping[str, Any]]) -> dict[str, FunctionSet]:
    """Every entry checked and resolved to its root set; errors name the key."""
    methods = {name: _check_entry(name, entry) for name, entry in function_sets.items()}
    resolved: dict[str, FunctionSet] = {}
    for name in function_sets:
        chain, current = [name], name
        while methods[current] in DERIVED:
            parent = function_sets[current]["parent"]
            if parent not in function_sets:
                raise ValueError(f"function_sets.{current}.parent: unknown function set {parent!r}; "
                                 f"defined: {sorted(function_sets)}")
            if parent in chain:
                raise ValueError(f"function_sets.{name}: parent chain {' -> '.join(chain + [parent])} is a cycle")
            chain.append(parent)
            current = parent
        root = function_sets[current]
        resolved[name] = FunctionSet(name, methods[name], current, root["source"]["backbone"],
                                     root["source"].get("output", "features"), root["train_split"],
                                     root["eval_split"], function_sets[name])
    return resolved


def members(resolved: Mapping[str, FunctionSet], root: str) -> list[str]:
    """The sets whose files derive from `root` (itself included)."""
    return [name for name, fset in resolved.items() if fset.root == root]
