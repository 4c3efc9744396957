"""BREEDS subpopulation-shift tasks (Santurkar et al. 2021), built from the BREEDS hierarchy files.

A port of `robustness.tools.breeds_helpers` (MadryLab/robustness) without networkx, reading the three files of
MadryLab/BREEDS-Benchmarks `imagenet_class_hierarchy/`:
- `dataset_class_info.json`: `[[number, wnid, name], …]`, the dataset's classes (the leaves);
- `class_hierarchy.txt`: one `parent child` edge per line;
- `node_names.txt`: `wnid<TAB>name` per line.

Construction (`get_superclasses` + `split_superclass`): keep only edges on paths from a leaf upwards; a node's level
is its *longest* path from the root; superclasses are the (sorted) nodes at `level` below `ancestor` that reach at
least `n_subclasses` leaves; each superclass's subclasses are split into two disjoint halves (source, target) by the
rule `split` ("rand": a `RandomState(seed)` draw of n_subclasses leaves, first half source; "good"/"bad": similar
subclasses across/within domains), with one RandomState shared across superclasses in sorted order, exactly as
upstream. The standard tasks are `make_living17` etc.: `STANDARD_TASKS`, with split "rand" and seed 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from metalign.downstream.data import SplitRef, load_rows, read_features
from metalign.downstream.probe import ProbeConfig
from metalign.io import DataContractError

ROOT_WNID = "n00001740"  # WordNet "entity"
# robustness.tools.breeds_helpers.make_<task>: (level, ancestor, n_subclasses)
STANDARD_TASKS = {
    "entity13": {"level": 3, "ancestor": None, "n_subclasses": 20},
    "entity30": {"level": 4, "ancestor": None, "n_subclasses": 8},
    "living17": {"level": 5, "ancestor": "n00004258", "n_subclasses": 4},
    "nonliving26": {"level": 5, "ancestor": "n00021939", "n_subclasses": 4},
}


@dataclass(frozen=True)
class BreedsTask:
    """Superclasses (sorted wnids) with their names, and each superclass's source and target subclass wnids."""

    name: str
    superclasses: list[str]
    names: list[str]
    source: list[list[str]]
    target: list[list[str]]

    def labels(self, domain: str) -> dict[str, int]:
        """Subclass wnid → superclass number for the `source` or `target` domain."""
        groups = {"source": self.source, "target": self.target}[domain]
        return {wnid: k for k, members in enumerate(groups) for wnid in members}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Hierarchy:
    """The leaf-reachable part of a class hierarchy, with longest-path levels from the root."""

    def __init__(self, leaves: list[str], edges: list[tuple[str, str]], names: Mapping[str, str],
                 root: str = ROOT_WNID):
        self.leaves = list(leaves)
        self.leaf_set = set(leaves)
        self.names = dict(names)
        self.children = self._leaf_ancestry(self.leaf_set, edges)
        if root not in self.children:
            raise DataContractError(f"BREEDS hierarchy: root {root!r} is not an ancestor of any dataset class")
        self.level = self._levels(root)

    @staticmethod
    def _leaf_ancestry(leaves: set[str], edges: list[tuple[str, str]]) -> dict[str, set[str]]:
        """Upstream `_make_parent_graph`: walk upwards from the leaves, keeping the edges met on the way."""
        parents: dict[str, set[str]] = {}
        for parent, child in edges:
            parents.setdefault(child, set()).add(parent)
        children: dict[str, set[str]] = {}
        todo = {n for n in leaves if n in parents}
        while todo:
            nxt = set()
            for node in todo:
                for parent in parents.get(node, ()):
                    children.setdefault(parent, set()).add(node)
                    nxt.add(parent)
            todo = nxt
        return children

    def _levels(self, root: str) -> dict[str, int]:
        """Upstream `_make_level_dict`: the depth of the longest path from the root (a DAG may offer several)."""
        level: dict[str, int] = {}
        todo = [(root, 0)]
        while todo:
            nxt = []
            for node, depth in todo:
                level[node] = max(depth, level.get(node, depth))
                nxt += [(child, depth + 1) for child in self.children.get(node, ())]
            todo = nxt
        return level

    def successors(self, node: str) -> list[str]:
        return sorted(self.children.get(node, ()))

    def leaves_reachable(self, node: str) -> set[str]:
        """ImageNet classes below `node` (the node itself if it is one); the walk stops at leaves, as upstream."""
        found, todo = set(), [node]
        while todo:
            nxt = []
            for current in todo:
                for child in self.children.get(current, ()):
                    if child in self.leaf_set:
                        found.add(child)
                    else:
                        nxt.append(child)
            todo = nxt
        return found | ({node} if node in self.leaf_set else set())

    def descendants(self, node: str) -> set[str]:
        found, todo = {node}, [node]
        while todo:
            todo = [c for n in todo for c in self.children.get(n, ()) if c not in found]
            found.update(todo)
        return found

    def nodes_at_level(self, level: int, ancestor: str | None = None) -> list[str]:
        allowed = self.descendants(ancestor) if ancestor is not None else None
        return sorted(n for n, lv in self.level.items() if lv == level and (allowed is None or n in allowed))

    def node_name(self, node: str) -> str:
        return self.names.get(node, node)


def read_hierarchy(class_info: str | Path, class_hierarchy: str | Path, node_names: str | Path,
                   root: str = ROOT_WNID) -> Hierarchy:
    """Parse the three BREEDS files; a malformed line is an error naming the file and line."""
    for path in (class_info, class_hierarchy, node_names):
        if not Path(path).exists():
            raise DataContractError(f"BREEDS hierarchy file not found: {path}")
    try:
        leaves = [str(entry[1]) for entry in json.loads(Path(class_info).read_text())]
    except (json.JSONDecodeError, IndexError, TypeError) as err:
        raise DataContractError(f"{class_info}: expected [[number, wnid, name], …] ({err})") from None
    edges, names = [], {}
    for number, line in enumerate(Path(class_hierarchy).read_text().splitlines(), start=1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2:
                raise DataContractError(f"{class_hierarchy}, line {number}: expected 'parent child', got {line!r}")
            edges.append((parts[0], parts[1]))
    for number, line in enumerate(Path(node_names).read_text().splitlines(), start=1):
        if line.strip():
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                raise DataContractError(f"{node_names}, line {number}: expected 'wnid<TAB>name', got {line!r}")
            names[parts[0]] = parts[1]
    return Hierarchy(leaves, edges, names, root)


def split_superclass(hierarchy: Hierarchy, superclass: str, n_subclasses: int, split: str,
                     rng: np.random.RandomState) -> tuple[list[str], list[str]]:
    """Upstream `split_superclass` (balanced): two disjoint halves of the superclass's subclasses."""
    desc = hierarchy.successors(superclass)
    while len(desc) == 1:  # descend to the first node with at least two children
        desc = hierarchy.successors(desc[0])
    desc_map = {d: sorted(hierarchy.leaves_reachable(d)) for d in desc}
    desc_sorted = sorted(desc_map.items(), key=lambda item: -len(item[1]))
    if n_subclasses % 2:
        raise ValueError(f"n_subclasses must be even to split into source and target, got {n_subclasses}")
    half = n_subclasses // 2
    if split == "rand":
        pool = sorted(w for members in desc_map.values() for w in members)
        chosen = [str(w) for w in rng.choice(pool, half * 2, replace=False)]
        source, target = chosen[:half], chosen[half:]
    elif split in ("good", "bad"):
        source, target = _similarity_split(desc_sorted, half, split)
    else:
        raise ValueError(f"unknown BREEDS split {split!r}; known: rand, good, bad")
    if len(source) != len(target) or set(source) & set(target):
        raise DataContractError(f"BREEDS superclass {superclass}: could not split {n_subclasses} subclasses into "
                                "disjoint halves (the hierarchy below it is not a tree)")
    return source, target


def _similarity_split(desc_sorted: list[tuple[str, list[str]]], half: int, split: str) -> tuple[list[str], list[str]]:
    """Upstream's "good" (siblings spread across domains) and "bad" (siblings kept together) partitions."""
    parts: tuple[list[str], list[str]] = ([], [])
    spare: list[str] = []
    for _, members in desc_sorted:
        filled = [len(p) for p in parts]
        if split == "bad":
            if filled[0] <= filled[1] and filled[0] < half:
                spare.extend(members[half - filled[0]:])
                parts[0].extend(members[:half - filled[0]])
            elif filled[1] < half:
                spare.extend(members[half - filled[1]:])
                parts[1].extend(members[:half - filled[1]])
        else:
            cut = (1 if filled[0] < half else 0) if len(members) == 1 else min(len(members) // 2, half - filled[0])
            if filled[0] < half:
                parts[0].extend(members[:cut])
            if filled[1] < half:
                parts[1].extend(members[cut:cut + half - filled[1]])
    if split == "bad":
        filled = [len(p) for p in parts]
        for part, n in zip(parts, filled):
            if n < half:
                part.extend(spare[:half - n])
    return parts


def make_task(hierarchy: Hierarchy, name: str, level: int, n_subclasses: int, ancestor: str | None = None,
              split: str = "rand", seed: int = 2) -> BreedsTask:
    """Upstream `get_superclasses(level, Nsubclasses, split, ancestor, balanced=True, random_seed=seed)`."""
    rng = np.random.RandomState(seed)
    nodes = hierarchy.nodes_at_level(level, ancestor)
    reach = [sorted(hierarchy.leaves_reachable(n)) for n in nodes]
    if not nodes or min(len(r) for r in reach) == 0:
        raise DataContractError(f"BREEDS task {name}: no superclass with dataset classes at level {level}"
                                + (f" below {ancestor}" if ancestor else ""))
    superclasses = [n for n, r in zip(nodes, reach) if len(r) >= n_subclasses]
    if not superclasses:
        raise DataContractError(f"BREEDS task {name}: no superclass at level {level} has {n_subclasses} subclasses")
    source, target = [], []
    for superclass in sorted(superclasses):
        src, tgt = split_superclass(hierarchy, superclass, n_subclasses, split, rng)
        source.append(src)
        target.append(tgt)
    return BreedsTask(name, superclasses, [hierarchy.node_name(s) for s in superclasses], source, target)


def make_tasks(hierarchy: Hierarchy, tasks: Mapping[str, Mapping[str, Any]], split: str, seed: int) -> list[BreedsTask]:
    return [make_task(hierarchy, name, spec["level"], spec["n_subclasses"], spec.get("ancestor"), split, seed)
            for name, spec in tasks.items()]


def evaluate_breeds(tasks: list[BreedsTask], train: SplitRef, test: SplitRef, probe: ProbeConfig,
                    l2_normalise: bool) -> dict[str, Any]:
    """Per task: a superclass probe on the source subclasses' training images, scored on the held-out images of
    the source subclasses (source accuracy) and of the unseen target subclasses (target accuracy)."""
    train_rows, test_rows = load_rows(train), load_rows(test)
    out: dict[str, Any] = {}
    for task in tasks:
        source, target = task.labels("source"), task.labels("target")
        for rows, wanted, split in ((train_rows, source, train), (test_rows, {**source, **target}, test)):
            missing = sorted(set(wanted) - set(rows["label"]))
            if missing:
                raise DataContractError(f"BREEDS task {task.name}: {split.name} has no image of subclass "
                                        f"{missing[0]!r} ({len(missing)} missing)")
        fit_rows = train_rows[train_rows["label"].isin(source)]
        fit = probe.fit(read_features(train.features, fit_rows["image_id"], l2_normalise),
                        fit_rows["label"].map(source).to_numpy(), len(task.superclasses))
        for domain, mapping in (("source", source), ("target", target)):
            rows = test_rows[test_rows["label"].isin(mapping)]
            x = read_features(test.features, rows["image_id"], l2_normalise)
            out[f"{task.name}_{domain}_acc"] = fit.classifier.accuracy(x, rows["label"].map(mapping).to_numpy())
            out[f"n_{task.name}_{domain}_test"] = len(rows)
        out[f"{task.name}_gap"] = out[f"{task.name}_source_acc"] - out[f"{task.name}_target_acc"]
        out[f"n_{task.name}_train"] = len(fit_rows)
        out.update(fit.summary(prefix=f"{task.name}_"))
    for metric in ("source_acc", "target_acc", "gap"):
        out[f"mean_{metric}"] = float(np.mean([out[f"{t.name}_{metric}"] for t in tasks]))
    return out
