"""Manifest layouts: how an image set on disk becomes manifest rows (image_id, path, label, split).

A layout is a registered function `build(root, options) -> list[Row]`; the config names it
(`datasets.<name>.layout`) and passes its options (`datasets.<name>.options`, checked against the layout's own
option schema before any job runs), so adding a dataset in a known layout is a config entry.

Two kinds:
- fixed-split layouts (`things`, `flat`, `class_folders`, `webdataset`) list images; every row gets the one
  `split` value of the config entry;
- own-split layouts (`cub`, `dtd`, `flowers102`, `pets`, `places365`, `stanford_cars`, `cifar`,
  `class_folders_seeded`) read the dataset's official split files (or draw a documented seeded split); the
  `split` column comes from them and the config entry has no `split` key.

Each layout's docstring states its row order; the order is a pure function of the files and options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import jsonschema

from metalign.io import DataContractError


@dataclass(frozen=True)
class Row:
    image_id: str
    path: str
    label: str
    split: str | None = None  # None: the config's fixed split


Builder = Callable[[Path, Mapping[str, Any]], list[Row]]


@dataclass(frozen=True)
class Layout:
    name: str
    build: Builder
    options: Mapping[str, Any] = field(default_factory=dict)  # JSON-schema properties of the options
    required: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()  # the split values an own-split layout writes; empty: fixed split

    @property
    def own_splits(self) -> bool:
        return bool(self.splits)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "properties": dict(self.options),
                "required": list(self.required)}


LAYOUTS: dict[str, Layout] = {}


def register(name: str, options: Mapping[str, Any] | None = None, required: tuple[str, ...] = (),
             splits: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    def add(build: Builder) -> Builder:
        LAYOUTS[name] = Layout(name, build, options or {}, required, splits)
        return build

    return add


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise DataContractError(f"unknown manifest layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[name]


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse unknown, missing or mistyped options; the message names the option."""
    try:
        jsonschema.validate(dict(options), get_layout(name).schema())
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path)
        raise ValueError(f"layout {name!r}{': ' + where if where else ''}: {err.message}") from None


def build_rows(name: str, root: str | Path, options: Mapping[str, Any]) -> list[Row]:
    check_options(name, options)
    root = Path(root)
    if not root.is_dir():
        raise DataContractError(f"image folder not found: {root}")
    return get_layout(name).build(root, options)


from metalign.images.layouts import cifar, folders, matlab, splitfiles  # noqa: E402,F401  (registration)
