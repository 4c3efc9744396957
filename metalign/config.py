"""Config checks that a JSON schema cannot express: names that must refer to other entries, and merged variants."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from metalign.functions.sets import resolve_function_sets
from metalign.layouts import LAYOUTS, check_options
from metalign.train.config import SEQUENCE_TYPES, TrainConfig

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path."""


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def variant_params(config: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The `train` defaults overridden by the variant's own keys, validated as one `train` block."""
    merged = {**config["train"], **{k: v for k, v in config["variants"][variant].items() if k != "function_set"}}
    train_schema = load_schema()["properties"]["train"]
    train_schema = {**train_schema, "$defs": load_schema()["$defs"]}
    try:
        jsonschema.validate(merged, train_schema)
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path)
        raise ConfigError(f"variants.{variant}.{where}: {err.message}") from None
    return merged


def check_dataset(name: str, entry: Mapping[str, Any]) -> None:
    """A dataset's layout options, and its `split` key: given exactly when the layout does not read the splits."""
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
    return LAYOUTS[entry["layout"]].splits or (entry["split"],)


def check_references(config: Mapping[str, Any]) -> None:
    """Every name a config entry uses must be defined: fail before any job runs, naming the key."""
    datasets, backbones = config["datasets"], config["backbones"]
    if "demo" in config:
        from metalign.demo.world import validate_spec

        try:
            validate_spec(config["demo"]["world"])
        except ValueError as err:
            raise ConfigError(f"demo.world: {err}") from None
        if "fmri" in config["demo"]:
            from metalign.demo.fmri import validate_spec as validate_fmri

            try:
                validate_fmri(config["demo"]["fmri"])
            except ValueError as err:
                raise ConfigError(f"demo.fmri: {err}") from None
        if "behaviour" in config["demo"]:
            from metalign.demo.learning import validate_spec as validate_behaviour

            try:
                validate_behaviour(config["demo"]["behaviour"])
            except ValueError as err:
                raise ConfigError(f"demo.behaviour: {err}") from None

    def need(name: str, pool: Mapping[str, Any], key: str, kind: str) -> None:
        if name not in pool:
            raise ConfigError(f"{key}: unknown {kind} {name!r}; defined: {sorted(pool)}")

    for name, entry in datasets.items():
        check_dataset(name, entry)
    try:
        function_sets = resolve_function_sets(config["function_sets"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for name, fset in function_sets.items():
        if fset.method != "subset":
            need(fset.source_backbone, backbones, f"function_sets.{name}.source.backbone", "backbone")
            need(fset.train_split, datasets, f"function_sets.{name}.train_split", "dataset")
            need(fset.eval_split, datasets, f"function_sets.{name}.eval_split", "dataset")
    for name, variant in config["variants"].items():
        need(variant["function_set"], config["function_sets"], f"variants.{name}.function_set", "function set")
        try:
            TrainConfig.from_dict(variant_params(config, name))
        except ValueError as err:
            raise ConfigError(f"variants.{name}: {err}") from None
    for name in config.get("icl", {}).get("variants", []):
        need(name, config["variants"], "icl.variants", "variant")
        if variant_params(config, name).get("model_type", "transformer") not in SEQUENCE_TYPES:
            raise ConfigError(f"icl.variants: {name!r} is not a sequence model, so it has no ICL curve")
    for name, bench in config["benchmarks"].items():
        need(bench["dataset"], datasets, f"benchmarks.{name}.dataset", "dataset")
    fmri = config["benchmarks"].get("things_fmri")
    if fmri:
        need(fmri["figure_variant"], config["variants"], "benchmarks.things_fmri.figure_variant", "variant")
    reference = config.get("statistics", {}).get("reference")
    if reference is not None:
        need(reference, config["variants"], "statistics.reference", "variant")
    for group, members in config.get("statistics", {}).get("groups", {}).items():
        for member in members:
            need(member, config["variants"], f"statistics.groups.{group}", "variant")
