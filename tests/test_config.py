"""A bad config stops the run before any job, with a message naming the key."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml
from snakemake.utils import update_config

from metalign.config.backbones import KNOWN, output_dim
from metalign.config.check import check as check_references
from metalign.config.schema import ConfigError, load_schema, variant_params
from tests.conftest import REPO


def _demo() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def _study() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _validate(config: dict) -> None:
    """What the Snakefile runs before any job: the schema, then every cross-field check."""
    jsonschema.validate(config, load_schema())
    check_references(config)


def _dry_run(config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path),
                           "all", "--configfile", str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config_files", [["demo.yaml"], ["config.yaml"], ["demo.yaml", "demo-full.yaml"]])
def test_shipped_configs_are_valid(config_files):
    config: dict = {}
    for name in config_files:  # merged as Snakemake merges several --configfile
        update_config(config, yaml.safe_load((REPO / "config" / name).read_text()))
    _validate(config)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.__setitem__("sede", 1), "sede"),                                        # unknown top-level key
    (lambda c: c["train"].__setitem__("steps", "many"), "many"),                         # wrong type
    (lambda c: c["backbones"]["vit_tiny"].__setitem__("poolling", "cls"), "poolling"),    # unknown nested key
    (lambda c: c["function_sets"]["main"]["source"].__setitem__("backbone", "dino9"), "dino9"),  # unknown backbone
    (lambda c: c["demo"]["vit"].__setitem__("hidden_size", -64), "hidden_size"),          # schema minimum
    (lambda c: c["threads"].__setitem__("train", 0), "train"),                              # threads ≥ 1
    (lambda c: c["threads"].__setitem__("encode", 1), "encode"),                            # not a threaded rule
    (lambda c: c["function_sets"]["main"]["sae"].__setitem__("k", 64), "function_sets.main.sae.k"),  # k ≥ SAE width
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


def _set(path: str, value):
    """A mutation setting the dotted key `path` (a missing last key is created)."""
    *parents, last = path.split(".")

    def mutate(config: dict) -> None:
        for key in parents:
            config = config[key]
        config[last] = value
    return mutate


def _at(*keys: str) -> str:
    """Pattern of a schema error's key path, as jsonschema prints it."""
    return re.escape("".join(f"[{key!r}]" for key in keys))


def _variant(name: str, **keys):
    return lambda c: c["variants"].__setitem__(name, {"function_set": "main", **keys})


@pytest.mark.parametrize("load, mutate, needle", [
    # schema minimums: every size, count and seed
    (_demo, _set("demo.vit.hidden_size", -64), _at("demo", "vit", "hidden_size")),
    (_demo, _set("demo.vit.layers", 0), _at("demo", "vit", "layers")),
    (_demo, _set("demo.vit.heads", 0), _at("demo", "vit", "heads")),
    (_demo, _set("demo.vit.patch_size", 0), _at("demo", "vit", "patch_size")),
    (_demo, lambda c: c["demo"]["vit"].pop("seed"), "'seed' is a required property"),
    (_demo, _set("train.seed", -1), _at("train", "seed")),
    (_demo, _set("function_sets.main.sae.seed", -1), _at("function_sets", "main", "sae", "seed")),
    (_demo, _set("function_sets.main.sae.k", 0), _at("function_sets", "main", "sae", "k")),
    (_demo, _set("function_sets.main.sae.lr", 0), _at("function_sets", "main", "sae", "lr")),
    (_demo, _set("function_sets.main.sae.expansion", -1.0), _at("function_sets", "main", "sae", "expansion")),
    (_demo, _set("train.batch_size", 0), _at("train", "batch_size")),
    (_demo, _set("benchmarks.things_fmri.seed", -3), _at("benchmarks", "things_fmri", "seed")),
    # demo specs
    (_demo, _set("demo.vit.heads", 3), r"demo.vit: .*heads \(3\) must divide hidden_size \(64\)"),
    (_demo, _set("demo.vit.patch_size", 128), r"demo.vit: .*patch_size \(128\) exceeds image_size \(64\)"),
    (_demo, _set("demo.fmri.things.n_test_images", -1), "demo.fmri: .*things.n_test_images"),
    (_demo, _set("demo.fmri.bold5000.voxels_per_roi", 0), "demo.fmri: .*bold5000.voxels_per_roi"),
    (_demo, _set("demo.behaviour.category.n_trials", 0), "demo.behaviour: .*n_trials"),
    # SAE k against its width = expansion × the source output's real dimension
    (_demo, _set("function_sets.main.sae.k", 64), r"function_sets.main.sae.k: 64 .* 0.05 × 1280 .*= 64"),
    (_demo, _set("demo.vit.hidden_size", 8), r"function_sets.midsae.sae.k: 8 .* 1.0 × 8 "),  # demo ViT's width
    (_study, _set("function_sets.firstsae.sae.expansion", 0.05), r"function_sets.firstsae.sae.k: 64 .* × 768 "),
    # hidden: null takes each backbone's width, which the heads must split (variants override train)
    (_demo, _variant("h3", hidden=None, n_heads=3), r"variants.h3.n_heads: .*'vit_tiny'.* 64"),
    (_demo, _variant("h64", hidden=None, n_heads=64), r"variants.h64.n_heads: .* 64"),  # 64 / 64 = 1: odd
    (_demo, _set("demo.vit.hidden_size", 36), r"variants.noemb.n_heads: .*'vit_tiny'.* 36"),  # 36 / 4 = 9: odd
    (_study, _set("variants.noemb.n_heads", 24), r"variants.noemb.n_heads: .*'clip_embed'.* 512"),  # 768 / 24 = 32
    (_demo, lambda c: [c["train"].update(hidden=None, n_heads=3)]  # inherited by every variant
     + [v.pop("hidden", None) for v in c["variants"].values()],
     r"variants.main.n_heads: .*'vit_tiny'.*hidden \(64\) / n_heads \(3\)"),
    (_demo, _variant("wide", backbones=["effnet_lite0"], no_embed=True, hidden=64),
     r"variants.wide.hidden: .*'effnet_lite0' gives 1280"),
    # block indices against the depth: the demo ViT's from demo.vit.layers, the study's from the table
    (_demo, _set("backbones.vit_tiny.layer", 14), r"backbones.vit_tiny.layer: block 14 .* 3 blocks"),
    (_demo, _set("demo.vit.layers", 1), r"backbones.vit_tiny.extra_layers: block\(s\) \[1\]"),
    (_study, _set("backbones.clip.layer", 14), r"backbones.clip.layer: block 14 .*ViT-B-32 has 12 blocks"),
    (_study, _set("backbones.clip.extra_layers", [0, 6, 12]), r"backbones.clip.extra_layers: block\(s\) \[12\]"),
    (_study, _set("function_sets.midsae.source.output", "layer_5"), "function_sets.midsae.source.output"),
    (_demo, _set("demo.vit.image_size", 32), r"backbones.vit_tiny.preprocessing.size: 64 .*\(32\)"),
    (_demo, _set("benchmarks.things_fmri.alphas.log10_min", 9), r"benchmarks.things_fmri.alphas: log10_min \(9\)"),
    (_demo, _set("benchmarks.things_fmri.leaky_alphas.log10_max", -7), r"benchmarks.things_fmri.leaky_alphas: log10_min"),
    (_study, _set("benchmarks.things_ooo.dataset", "coco_eval"), r"benchmarks.things_ooo.dataset: .coco_eval. is a concat"),
])
def test_bad_size_is_rejected(load, mutate, needle):
    config = load()
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ConfigError)) as err:
        _validate(config)
    assert re.search(needle, str(err.value)), str(err.value)


def test_unknown_backbone_sizes_are_skipped():
    """A model missing from the size table, or a module named as `layer`, is not an error: the job itself checks it."""
    config = _demo()
    config["backbones"]["other"] = {"source": "timm", "id": "convnext_tiny", "layer": 40, "pooling": "cls"}
    config["function_sets"]["other"] = {"method": "train", "source": {"backbone": "other"}, "train_split": "coco_train",
                                        "eval_split": "coco_val", "min_nonzero": 32,
                                        "sae": {"expansion": 0.01, "k": 500, "steps": 1, "batch_size": 1, "lr": 0.1,
                                                "seed": 0}}
    _validate(config)
    config["backbones"]["vit_tiny"]["layer"] = "encoder.layer.2.output"
    assert output_dim(config, "vit_tiny") is None
    config["variants"]["h3"] = {"function_set": "main", "hidden": None, "n_heads": 3}
    config["backbones"]["effnet_lite0"]["model_kwargs"] = {"width_multiplier": 2.0}  # no longer the table's shape
    check_references(config)


def test_size_table_matches_the_libraries():
    """Every width and depth in the table, read off the libraries' own model definitions (no weights, meta device)."""
    torch, timm, open_clip = (pytest.importorskip(m) for m in ("torch", "timm", "open_clip"))
    from metalign.embed.backbones import find_blocks

    for (source, arch), shape in KNOWN.items():
        if source == "open_clip":
            cfg = open_clip.get_model_config(arch)
            assert (cfg["vision_cfg"]["width"], cfg["vision_cfg"]["layers"], cfg["embed_dim"]) == \
                (shape.width, shape.depth, shape.embedding), arch
            continue
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
        assert (getattr(model, "embed_dim", None), len(find_blocks(model, "timm")), model.num_features) == \
            (shape.width, shape.depth, shape.pooled), arch


@pytest.mark.parametrize("overlay, needle", [
    ({"demo": {"vit": {"hidden_size": -64}}}, "hidden_size"),
    ({"variants": {"h3": {"function_set": "main", "hidden": None, "n_heads": 3}}}, "variants.h3.n_heads"),
])
def test_bad_overlay_stops_the_dry_run_before_any_job(overlay, needle, tmp_path):
    """The demo config plus a bad overlay: Snakemake stops while reading the config, before it plans a job, so no
    job's outputs can be deleted for a changed param."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(overlay))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "all", "--configfile", "config/demo.yaml",
                             str(path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert needle in output
    assert "Job stats" not in output and "rule " not in output
