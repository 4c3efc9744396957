"""The config schema and the merged `train` block of a variant: the two things every stage's config check needs."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


NON_TRAIN_KEYS = ("function_set", "backbones")  # variant keys that choose what to train on, not how


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path."""


@cache
def _schema_text() -> str:
    return SCHEMA.read_text()


def load_schema() -> dict[str, Any]:
    """The config schema; parsed by libyaml where PyYAML has it (10x faster: every DAG build reads it)."""
    return yaml.load(_schema_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@cache
def _train_validator() -> jsonschema.protocols.Validator:
    """Built once: the workflow merges every variant many times while building the DAG."""
    schema = load_schema()
    train_schema = {**schema["properties"]["train"], "$defs": schema["$defs"]}
    return jsonschema.validators.validator_for(train_schema)(train_schema)


def variant_params(config: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The `train` defaults overridden by the variant's own keys, validated as one `train` block."""
    merged = {**config["train"], **{k: v for k, v in config["variants"][variant].items() if k not in NON_TRAIN_KEYS}}
    err = jsonschema.exceptions.best_match(_train_validator().iter_errors(merged))
    if err is not None:
        where = ".".join(str(p) for p in err.absolute_path)
        raise ConfigError(f"variants.{variant}.{where}: {err.message}")
    return merged


def variant_backbones(config: Mapping[str, Any], variant: str) -> list[str]:
    """The backbones a variant trains on, in config order: its `backbones` list, or every backbone."""
    chosen = config["variants"][variant].get("backbones")
    return [name for name in config["backbones"] if chosen is None or name in chosen]
