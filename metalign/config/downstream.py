"""Cross-reference checks of the `downstream:` config block that a JSON schema cannot express.

Run by `metalign.config.check` before any job: every split must name a defined dataset and one of its splits
(required where the dataset's layout reads several from its split files), few-shot shot counts must be distinct, and the
BREEDS/shape-bias settings must be usable.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from metalign.config.datasets import dataset_splits
from metalign.config.schema import ConfigError

SECTIONS = {"fewshot": ("train", "test"), "breeds": ("train", "test"), "imagenet_a": ("train", "test", "shifted"),
            "shape_bias": ("train", "stimuli")}


def split_refs(config: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(key path, split entry) of every split the downstream block names."""
    block = config.get("downstream", {})
    refs = []
    for name, task in block.get("fewshot", {}).get("tasks", {}).items():
        refs += [(f"downstream.fewshot.tasks.{name}.{role}", task[role]) for role in SECTIONS["fewshot"]]
    for section in ("breeds", "imagenet_a", "shape_bias"):
        if section in block:
            refs += [(f"downstream.{section}.{role}", block[section][role]) for role in SECTIONS[section]]
    return refs


def check_downstream(config: Mapping[str, Any]) -> None:
    check_probe(config)
    block = config.get("downstream")
    if not block:
        return
    for key, ref in split_refs(config):
        if ref["dataset"] not in config["datasets"]:
            raise ConfigError(f"{key}.dataset: unknown dataset {ref['dataset']!r}; "
                              f"defined: {sorted(config['datasets'])}")
        check_split(key, ref, config["datasets"][ref["dataset"]])
    fewshot = block.get("fewshot")
    if fewshot and len(set(fewshot["shots"])) != len(fewshot["shots"]):
        raise ConfigError(f"downstream.fewshot.shots: repeated shot count in {fewshot['shots']}")
    for name, spec in block.get("breeds", {}).get("tasks", {}).items():
        if spec["n_subclasses"] % 2:
            raise ConfigError(f"downstream.breeds.tasks.{name}.n_subclasses: must be even (source and target halves)")
    try:
        category_of(block.get("shape_bias", {}).get("categories", {}))
    except ValueError as err:
        raise ConfigError(f"downstream.shape_bias.categories: {err}") from None


def check_split(key: str, ref: Mapping[str, Any], dataset: Mapping[str, Any]) -> None:
    """The split must be one the manifest holds; a dataset whose layout reads split files has several, so a
    reference to it must name one (all rows would put test images into the training pool)."""
    splits = dataset_splits(dataset)
    if "split" in ref and ref["split"] not in splits:
        raise ConfigError(f"{key}.split: {ref['split']!r} is not a split of dataset {ref['dataset']!r} "
                          f"(it has {', '.join(splits)})")
    if "split" not in ref and len(splits) > 1:
        raise ConfigError(f"{key}.split: required, dataset {ref['dataset']!r} holds splits {', '.join(splits)}")


def check_probe(config: Mapping[str, Any]) -> None:
    """Probe settings are needed by every full-data probe."""
    block = config.get("downstream", {})
    users = [s for s in ("breeds", "imagenet_a", "shape_bias") if s in block]
    if users and "probe" not in block:
        raise ConfigError(f"downstream.probe: required by downstream.{users[0]}")


def category_of(categories: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Training class → category; a class listed under two categories is an error."""
    owner: dict[str, str] = {}
    for category, members in categories.items():
        for member in members:
            if member in owner:
                raise ValueError(f"shape-bias categories: class {member!r} is listed under both "
                                 f"{owner[member]!r} and {category!r}")
            owner[member] = category
    return owner
