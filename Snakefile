"""metalign: backbone embeddings → SAE functions → meta-learner → alignment benchmarks → report.

    snakemake --cores 2 all                                  # the full study (config/config.yaml)
    snakemake --cores 2 --configfile config/demo.yaml all    # the embedded demo world (make demo)
"""

import json
import re
import sys

from snakemake.utils import min_version, validate

min_version("8.0")

if not config:  # a --configfile on the command line replaces the study config instead of merging into it
    configfile: "config/config.yaml"

validate(config, "workflow/schemas/config.schema.yaml")

sys.path.insert(0, workflow.basedir)
from metalign.config import check_references, variant_params  # noqa: E402
from metalign.train.config import has_representation  # noqa: E402

check_references(config)

from metalign.download import check_download_references  # noqa: E402

check_download_references(config)

R = config["results"]
RES = config["resources"]
PY = f"{sys.executable} -m metalign"

wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    backbone="[A-Za-z0-9_.-]+",
    variant="[A-Za-z0-9_.-]+",
    fset="[A-Za-z0-9_.-]+",
    split="[A-Za-z0-9_.-]+",


def as_json(value) -> str:
    """Quote a config value for a shell argument; it is also a rule param, so editing it makes the job stale."""
    return "'" + json.dumps(value, sort_keys=True).replace("'", "'\\''") + "'"


def stable(entry: dict) -> dict:
    """A dict param in key order, so that reordering keys in a config file does not make a job stale."""
    return {key: entry[key] for key in sorted(entry)}


BACKBONES = list(config["backbones"])
VARIANTS = list(config["variants"])
ENCODED = [v for v in VARIANTS if has_representation(variant_params(config, v))]  # noemb has no encode() (§8)

if "demo" in config:
    include: "rules/demo.smk"
include: "rules/download.smk"
include: "rules/extract.smk"
include: "rules/functions_sets.smk"
include: "rules/train.smk"
include: "rules/evaluate_things.smk"
include: "rules/evaluate_behaviour.smk"
include: "rules/report.smk"
include: "rules/evaluate_brain.smk"
include: "rules/evaluate_downstream.smk"


rule all:
    input:
        rules.report_all.input,
        f"{R}/figures/icl.png",
        f"{R}/functions/summary.csv",
        rules.behaviour_all.input,
        rules.brain_all.input,
        rules.downstream_all.input,
        rules.downloads.input,
        expand(f"{R}/embeddings/{{dataset}}/{{backbone}}.h5", dataset=list(config["datasets"]), backbone=BACKBONES),
