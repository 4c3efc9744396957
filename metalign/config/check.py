"""`check(config)`: every check a JSON schema cannot express, run once by the Snakefile before any job.

Names must refer to defined entries, merged variants must be valid training configs, dataset layouts and options,
download items, the downstream block and the demo specs must be usable, and sizes must fit the backbones' real widths
and depths (SAE `k`, heads with `hidden: null`, block indices). A `ConfigError` names the key path and the values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from metalign.config.backbones import backbone_shape, is_demo_vit, output_dim
from metalign.config.datasets import check_dataset
from metalign.config.demo import validate_behaviour, validate_fmri, validate_labelled, validate_vit, validate_world
from metalign.config.downstream import check_downstream
from metalign.config.functions import DERIVED, resolve_function_sets
from metalign.config.model import SEQUENCE_TYPES, TrainConfig
from metalign.config.schema import ConfigError, variant_backbones, variant_params
from metalign.download.items import check_download_references

DEMO_SPECS = {"world": validate_world, "vit": validate_vit, "fmri": validate_fmri, "behaviour": validate_behaviour,
              "labelled": validate_labelled}


def check(config: Mapping[str, Any]) -> None:
    """All cross-field checks of a schema-valid config; raises ConfigError naming the first bad key."""
    check_demo(config)
    check_references(config)
    check_sizes(config)
    check_alphas(config)
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
        if fset.method not in DERIVED:
            need(fset.source_backbone, backbones, f"function_sets.{name}.source.backbone", "backbone")
            need(fset.train_split, datasets, f"function_sets.{name}.train_split", "dataset")
            need(fset.eval_split, datasets, f"function_sets.{name}.eval_split", "dataset")
    for name, variant in config["variants"].items():
        need(variant["function_set"], config["function_sets"], f"variants.{name}.function_set", "function set")
        for backbone in variant.get("backbones", []):
            need(backbone, backbones, f"variants.{name}.backbones", "backbone")
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
        if "concat" in datasets[bench["dataset"]]:
            raise ConfigError(f"benchmarks.{name}.dataset: {bench['dataset']!r} is a concat dataset (feature files, no "
                              f"manifest); a benchmark needs a dataset with a manifest")
    fmri = config["benchmarks"].get("things_fmri")
    if fmri:
        need(fmri["figure_variant"], config["variants"], "benchmarks.things_fmri.figure_variant", "variant")
    reference = config.get("statistics", {}).get("reference")
    if reference is not None:
        need(reference, config["variants"], "statistics.reference", "variant")
    for group, members in config.get("statistics", {}).get("groups", {}).items():
        for member in members:
            need(member, config["variants"], f"statistics.groups.{group}", "variant")


def check_sizes(config: Mapping[str, Any]) -> None:
    """Sizes that must fit a backbone's real width or depth (metalign.config.backbones); each job would otherwise fail
    only after Snakemake has deleted its old outputs. Backbones of unknown size are skipped."""
    check_blocks(config)
    for name, entry in config["function_sets"].items():
        if entry["method"] not in DERIVED:
            check_source(config, name, entry)
    for name in config["variants"]:
        check_variant_widths(config, name)


def check_blocks(config: Mapping[str, Any]) -> None:
    """`layer` and `extra_layers` index the model's blocks; the demo ViT takes images of exactly its own size."""
    for name, entry in config["backbones"].items():
        shape = backbone_shape(config, name)
        if shape is None:
            continue
        key = f"backbones.{name}"
        if "blocks" not in entry:  # a custom block list has a depth of its own
            layer = entry.get("layer", "final")
            if isinstance(layer, int) and layer >= shape.depth:  # not "final" or a module name
                raise ConfigError(f"{key}.layer: block {layer} does not exist; {entry['id']} has {shape.depth} blocks "
                                  f"(0..{shape.depth - 1})")
            beyond = [k for k in entry.get("extra_layers", []) if k >= shape.depth]
            if beyond:
                raise ConfigError(f"{key}.extra_layers: block(s) {beyond} do not exist; {entry['id']} has "
                                  f"{shape.depth} blocks (0..{shape.depth - 1})")
        size = entry.get("preprocessing", {}).get("size")
        if is_demo_vit(config, name) and size is not None and size != config["demo"]["vit"]["image_size"]:
            raise ConfigError(f"{key}.preprocessing.size: {size} differs from demo.vit.image_size "
                              f"({config['demo']['vit']['image_size']}), the only size the demo ViT accepts")


def check_source(config: Mapping[str, Any], name: str, entry: Mapping[str, Any]) -> None:
    """A set's source output must be one its backbone extracts, and a trained SAE must have more latents than `k`."""
    backbone, output = entry["source"]["backbone"], entry["source"].get("output", "features")
    source_entry = config["backbones"][backbone]
    if source_entry["source"] == "precomputed":
        if output != "features" and output not in source_entry.get("extra_outputs", []):
            raise ConfigError(f"function_sets.{name}.source.output: backbone {backbone!r} has no output {output!r}; "
                              f"its extra_outputs are {source_entry.get('extra_outputs', [])}")
        return
    extra = source_entry.get("extra_layers", [])
    if output != "features" and output not in [f"layer_{k}" for k in extra]:
        raise ConfigError(f"function_sets.{name}.source.output: backbone {backbone!r} has no output {output!r}; its "
                          f"extra_layers {extra} give {[f'layer_{k}' for k in extra]}")
    dim = output_dim(config, backbone, output)
    if entry["method"] != "train" or dim is None:
        return
    sae = entry["sae"]
    width = round(sae["expansion"] * dim)  # as metalign.functions.sae.train_sae
    if width <= sae["k"]:
        raise ConfigError(f"function_sets.{name}.sae.k: {sae['k']} active latents need a wider SAE than expansion "
                          f"{sae['expansion']} × {dim} (backbone {backbone!r}, {output}) = {width} latents")


def check_variant_widths(config: Mapping[str, Any], name: str) -> None:
    """A variant trains on each of its backbones: `hidden: null` takes each backbone's width, which the heads must split
    into even head widths, and `no_embed` feeds the features straight into the core (hidden = that width)."""
    params = TrainConfig.from_dict(variant_params(config, name))
    for backbone in variant_backbones(config, name):
        dim = output_dim(config, backbone)
        if dim is None:
            continue
        if params.no_embed and params.hidden not in (None, dim):
            raise ConfigError(f"variants.{name}.hidden: no_embed needs hidden = the features' width (null), but "
                              f"backbone {backbone!r} gives {dim} and hidden is {params.hidden}")
        if params.hidden is None:
            try:
                replace(params, hidden=dim)
            except ValueError as err:
                raise ConfigError(f"variants.{name}.n_heads: with hidden: null the width is the feature dimension "
                                  f"of backbone {backbone!r}, {dim}; {err}") from None


def check_alphas(config: Mapping[str, Any]) -> None:
    """A ridge grid (the leak-free `alphas`, the study scheme's `leaky_alphas`) runs from log10_min to log10_max."""
    for name, bench in config["benchmarks"].items():
        for key in ("alphas", "leaky_alphas"):
            grid = bench.get(key)
            if grid and grid["log10_min"] > grid["log10_max"]:
                raise ConfigError(f"benchmarks.{name}.{key}: log10_min ({grid['log10_min']}) exceeds log10_max "
                                  f"({grid['log10_max']})")
