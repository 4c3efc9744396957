"""Dataset entries: a manifest layout, its options, and the split(s) its manifest holds; or `concat`, an image set
made of other entries (feature files joined in the listed order, docs/methods.md §3)."""

from __future__ import annotations

from typing import Any, Mapping

from metalign.config.schema import ConfigError
from metalign.images.layouts import LAYOUTS, check_options


def check_dataset(name: str, entry: Mapping[str, Any]) -> None:
    """A dataset's layout options, and its `split` key: given exactly when the layout does not read the splits. A
    `concat` entry's parts are checked by `concat_parts`, which sees every entry."""
    if "concat" in entry:
        return
    if entry["layout"] not in LAYOUTS:
        raise ConfigError(f"datasets.{name}.layout: unknown layout {entry['layout']!r}; known: {sorted(LAYOUTS)}")
    layout = LAYOUTS[entry["layout"]]
    if layout.own_splits and "split" in entry:
        raise ConfigError(f"datasets.{name}.split: layout {layout.name!r} takes each image's split from the dataset's "
                          f"files ({'/'.join(layout.splits)}); remove the key")
    if not layout.own_splits and "split" not in entry:
        raise ConfigError(f"datasets.{name}.split: required for layout {layout.name!r}")
    if layout.name == "things" and "unique_ids" not in entry:
        raise ConfigError(f"datasets.{name}.unique_ids: required for layout 'things'")
    try:
        check_options(layout.name, {**entry.get("options", {}),
                                    **({"unique_ids": entry["unique_ids"]} if "unique_ids" in entry else {})})
    except ValueError as err:
        raise ConfigError(f"datasets.{name}.options: {err}") from None


def dataset_splits(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """The split values a dataset's manifest will hold."""
    if "concat" in entry:
        raise ConfigError(f"the concat dataset of {entry['concat']} has feature files but no manifest of its own; "
                          f"name its parts instead")
    return LAYOUTS[entry["layout"]].splits or (entry["split"],)


def concat_parts(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """The parts of every `concat` dataset, in row order: each must be a defined dataset with a manifest of its own."""
    parts = {name: list(entry["concat"]) for name, entry in datasets.items() if "concat" in entry}
    for name, names in parts.items():
        for part in names:
            if part not in datasets:
                raise ConfigError(f"datasets.{name}.concat: unknown dataset {part!r}; defined: {sorted(datasets)}")
            if part in parts:
                raise ConfigError(f"datasets.{name}.concat: {part!r} is itself a concat dataset; list its parts")
    return parts
