"""A bad config stops the run before any job, with a message naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from metalign.config.check import check as check_references
from metalign.config.schema import ConfigError, variant_params
from tests.conftest import REPO


def _demo() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def _dry_run(config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path),
                           "all", "--configfile", str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config_file", ["demo.yaml", "config.yaml"])
def test_shipped_configs_are_valid(config_file):
    config = yaml.safe_load((REPO / "config" / config_file).read_text())
    import jsonschema
    from metalign.config.schema import load_schema

    jsonschema.validate(config, load_schema())
    check_references(config)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.__setitem__("sede", 1), "sede"),                                        # unknown top-level key
    (lambda c: c["train"].__setitem__("steps", "many"), "many"),                         # wrong type
    (lambda c: c["backbones"]["vit_tiny"].__setitem__("poolling", "cls"), "poolling"),    # unknown nested key
    (lambda c: c["function_sets"]["main"]["source"].__setitem__("backbone", "dino9"), "dino9"),  # unknown backbone
])
def test_bad_config_fails_before_any_job(mutate, needle, tmp_path):
    config = copy.deepcopy(_demo())
    mutate(config)
    result = _dry_run(config, tmp_path)
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_reference_errors_name_the_key():
    config = _demo()
    config["variants"]["main"]["function_set"] = "nope"
    with pytest.raises(ConfigError, match=r"variants\.main\.function_set.*'nope'"):
        check_references(config)
    config = _demo()
    config["variants"]["main"]["n_heads"] = 5
    with pytest.raises(ConfigError, match=r"variants\.main: .*n_heads \(5\)"):
        check_references(config)


def test_variant_overrides_are_typed():
    config = _demo()
    config["variants"]["wide"] = {"function_set": "main", "hidden": 128}
    assert variant_params(config, "wide")["hidden"] == 128
    assert variant_params(config, "wide")["steps"] == config["train"]["steps"]
    config["variants"]["wide"]["hidden"] = "big"
    with pytest.raises(ConfigError, match=r"variants\.wide\.hidden"):
        variant_params(config, "wide")
