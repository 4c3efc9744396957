# Helpers for every rule file (result paths, JSON params) and the wildcard-to-input functions of each stage.
# Rule files hold rules only (snakemake --lint); the config is checked once, in the Snakefile, before this runs.

import json
import os
import re
import sys

from metalign.config.functions import members, resolve_function_sets
from metalign.config.model import has_representation
from metalign.config.schema import variant_backbones, variant_params
from metalign.codehash import code_hash

R = config["results"]
RES = config["resources"]
BACKBONES = list(config["backbones"])
VARIANTS = list(config["variants"])
ENCODED = [
    v for v in VARIANTS if has_representation(variant_params(config, v))
]  # noemb: no encode() (docs/methods.md §8)
REPRESENTATIONS = ["base"] + ENCODED
THREADS = {"extract": 2, "sae_train": 2, "train": 2, "levels_ooo": 2, "brain_encode": 2}
THREADS.update(config.get("threads", {}))  # fewer on a small machine: config/demo.yaml
TRAINED_ON = {v: variant_backbones(config, v) for v in VARIANTS}  # a variant's `backbones` (default: all)
# Jobs call `python3 -m metalign …` with this interpreter first on PATH: the shell commands name no machine path.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def runs(backbone: str, variant: str) -> bool:
    """Whether (backbone, variant) exists: "base" on every backbone, a variant on its `backbones`."""
    return variant == "base" or backbone in TRAINED_ON[variant]


def per_pair(pattern: str, variants=None, backbones=None, **wildcards) -> list[str]:
    """`pattern` over every existing (backbone, variant) pair, backbones outermost; other wildcards as `expand`."""
    pairs = [(b, v) for b in backbones or BACKBONES for v in variants or REPRESENTATIONS if runs(b, v)]
    return [
        path for b, v in pairs for path in expand(pattern.replace("{backbone}", b).replace("{variant}", v), **wildcards)
    ]


def shown_variant(backbone: str, preferred: str):
    """The variant a per-backbone figure compares with base: `preferred` where it runs, else the backbone's first
    (None: the backbone has no representation to show)."""
    if runs(backbone, preferred) and preferred in ENCODED:
        return preferred
    return next((v for v in ENCODED if runs(backbone, v)), None)


def shown_backbones(preferred: str) -> list[str]:
    """Backbones with a representation to compare with base in a per-backbone figure."""
    return [b for b in BACKBONES if shown_variant(b, preferred) is not None]


def as_json(value) -> str:
    """Quote a config value for a shell argument; it is also a rule param, so editing it makes the job stale."""
    quoted = json.dumps(value, sort_keys=True).replace("'", "'\\''")
    return f"'{quoted}'"


def stable(entry: dict) -> dict:
    """A dict param in key order, so that reordering keys in a config file does not make a job stale."""
    return {key: entry[key] for key in sorted(entry)}


def features_path(dataset: str, backbone: str, variant: str) -> str:
    """Backbone features for variant "base", the variant's meta-learned representation otherwise."""
    if variant == "base":
        return f"{R}/embeddings/{dataset}/{backbone}.h5"
    return f"{R}/representations/{dataset}/{backbone}/{variant}.h5"


def features_of(dataset: str):
    """Input function: the features of `dataset` for the job's backbone and variant wildcards."""
    return lambda wc: features_path(dataset, wc.backbone, wc.variant)


def _download_outputs(item: str, spec: dict) -> dict:
    """update(): Snakemake must not delete a verified file before (or after a failed) re-fetch; the download stage
    replaces it only once the new one is verified."""
    single_file = "url" in spec and ("archive" not in spec or "file" in spec["archive"])
    file = {"file": update(f"{RES}/{spec['dest']}")} if single_file else {}
    return {"receipt": update(f"{RES}/downloads/{item}.json"), **file}


def _download_inputs(spec: dict) -> list:
    """Receipts of the items whose files this one reads (e.g. the Levels pickle listing the ImageNet keys to keep)."""
    select = spec.get("select", {})
    return [f"{RES}/downloads/{s['keys_from']['item']}.json" for s in select.values() if "keys_from" in s]


def _dataset(wildcards):
    return config["datasets"][wildcards.dataset]


def _sets(*methods) -> str:
    """Wildcard pattern matching exactly the sets made by `methods` (rules with one output pattern stay unambiguous)."""
    names = [name for name, fset in FSETS.items() if fset.method in methods]
    return "|".join(re.escape(name) for name in names) or "(?!)"


def _fs(wc):
    return FSETS[wc.fset]


def _source_features(wc, split=None):
    return f"{R}/embeddings/{split or wc.split}/{_fs(wc).source_backbone}.h5"


def _max_sl(fset: str) -> int:
    """Episode length that the selection must support: the longest of the variants on this set's root or any set
    derived from it (docs/methods.md P-16)."""
    derived = set(members(FSETS, FSETS[fset].root))
    lengths = [variant_params(config, v)["sl"] for v in VARIANTS if config["variants"][v]["function_set"] in derived]
    return max(lengths, default=config["train"].get("sl", 120))


def _subset_args(wc) -> str:
    """Training split: the configured choice; evaluation split: all of the parent's functions (same episodes)."""
    entry = _fs(wc).entry
    if wc.split != _fs(wc).train_split:
        return ""
    how = f"--seed {entry['seed']}" if "seed" in entry else f"--similarity {entry['similarity']}"
    return f"--fraction {entry['fraction']} {how}"


def _variant_set(wc):
    return FSETS[config["variants"][wc.variant]["function_set"]]


def _split_paths(wc):
    fset = _variant_set(wc)
    return {
        "train_features": f"{R}/embeddings/{fset.train_split}/{wc.backbone}.h5",
        "train_codes": f"{R}/functions/{fset.name}/{fset.train_split}.h5",
        "val_features": f"{R}/embeddings/{fset.eval_split}/{wc.backbone}.h5",
        "val_codes": f"{R}/functions/{fset.name}/{fset.eval_split}.h5",
    }


def _gpus(wc) -> int:
    return int(variant_params(config, wc.variant).get("gpus", 1))


def _launcher(wc) -> str:
    """One process, or one per GPU through torchrun (ranks draw different episodes; docs/methods.md P-15)."""
    n = _gpus(wc)
    if n == 1:
        return "python3 -m metalign"
    return f"python3 -m torch.distributed.run --standalone --nproc_per_node {n} -m metalign"


def _brain_subjects(bench: str) -> list[str]:
    """File stems of the prepared subjects: sub-01 … (THINGS-fMRI), CSI1 … (BOLD5000)."""
    return [f"sub-{s}" if bench == "things_fmri" else s for s in BRAIN[bench]["subjects"]]


def _brain_encodings(bench: str, schemes=None, backbones=None, variants=None) -> list[str]:
    """Encoding files, subjects innermost (the order figure-brain-volume pairs them in)."""
    cfg = BRAIN[bench]
    return [
        path
        for scheme in schemes or cfg["schemes"]
        for path in per_pair(
            f"{R}/brain/{bench}/{scheme}/{{backbone}}/{{variant}}/{{subject}}.h5",
            variants,
            backbones,
            subject=_brain_subjects(bench),
        )
    ]


def _brain_targets() -> list[str]:
    out = []
    for bench, cfg in BRAIN.items():
        out += [f"{R}/brain/{bench}_{kind}.csv" for kind in ("folds", "stats", "alphas")]
        out += [f"{R}/figures/brain/{bench}_rois_{scheme}.png" for scheme in cfg["schemes"]]
    if "things_fmri" in BRAIN:
        out += expand(
            f"{R}/figures/brain/things_fmri_volume_{{backbone}}.png",
            backbone=shown_backbones(BRAIN["things_fmri"]["figure_variant"]),
        )
    return out


def _ds_inputs(refs, wc):
    """Manifest and feature file of every split role (train, test, …) of one evaluation."""
    out = {}
    for role, ref in refs.items():
        out[f"{role}_manifest"] = f"{R}/manifests/{ref['dataset']}.csv"
        out[f"{role}_features"] = features_path(ref["dataset"], wc.backbone, wc.variant)
    return out


def _ds_split_flags(refs, wc):
    flags = []
    for role, ref in refs.items():
        flags.append(
            f"--{role}-manifest {R}/manifests/{ref['dataset']}.csv"
            f" --{role}-features {features_path(ref['dataset'], wc.backbone, wc.variant)}"
        )
        if ref.get("split"):
            flags.append(f"--{role}-split {ref['split']}")
    return " ".join(flags)


def _ds_probe_flags():
    probe = DS["probe"]
    return (
        f"--l2-grid {' '.join(str(v) for v in probe['l2_grid'])} --val-fraction {probe['val_fraction']}"
        f" --probe-seed {probe['seed']} {DS_NORM}"
    )


def _ds_roles(section, roles):
    return {role: DS[section][role] for role in roles}


def _fewshot_refs(wc):
    return {role: config["downstream"]["fewshot"]["tasks"][wc.task][role] for role in ("train", "test")}


def _fewshot_inputs(wc):
    classes = config["downstream"]["fewshot"]["tasks"][wc.task].get("classes")
    extra = {"classes": classes} if isinstance(classes, str) else {}
    return {**_ds_inputs(_fewshot_refs(wc), wc), **extra}


def _fewshot_classes(wc):
    classes = config["downstream"]["fewshot"]["tasks"][wc.task].get("classes")
    if classes is None:
        return ""
    return f"--classes {classes if isinstance(classes, str) else as_json(classes)}"
