"""`check(config)`: every check a JSON schema cannot express, run once by the Snakefile before any job.

Names must refer to defined entries, merged variants must be valid training configs, dataset layouts and options,
download items, the downstream block and the demo specs must be usable. A `ConfigError` names the key path.
"""

from __future__ import annotations

from typing import Any, Mapping

from metalign.config.datasets import check_dataset
from metalign.config.demo import (
    validate_behaviour,
    validate_fmri,
    validate_labelled,
    validate_world,
)
from metalign.config.downstream import check_downstream
from metalign.config.functions import resolve_function_sets
from metalign.config.model import SEQUENCE_TYPES, TrainConfig
from metalign.config.schema import ConfigError, variant_params
from metalign.download.items import check_download_references

DEMO_SPECS = {"world": validate_world, "fmri": validate_fmri, "behaviour": validate_behaviour,
              "labelled": validate_labelled}


def check(config: Mapping[str, Any]) -> None:
    """All cross-field checks of a schema-valid config; raises ConfigError naming the first bad key."""
    check_demo(config)
    check_references(config)
    try:
        check_download_references(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_downstream(config)


def check_demo(config: Mapping[str, Any]) -> None:
    for block, validate in DEMO_SPECS.items():
        if block in config.get("demo", {}):
            try:
                validate(config["demo"][block])
            except ValueError as err:
                raise ConfigError(f"demo.{block}: {err}") from None


def check_references(config: Mapping[str, Any]) -> None:
    """Every name a config entry uses must be defined: fail before any job runs, naming the key."""
    datasets, backbones = config["datasets"], config["backbones"]
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
