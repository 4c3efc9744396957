# Downstream and robustness (protocols.md §9.9, §9.10): few-shot classification, BREEDS, ImageNet-A and cue-conflict
# shape bias, for the backbone ("base") and every variant ("meta") on identical splits; then one table per
# evaluation (results/downstream/*.csv) and the alignment-gain figure. Each evaluation runs only if configured.

from metalign.downstream.config import check_downstream  # noqa: E402

check_downstream(config)
DS = config.get("downstream", {})
DS_NORM = "--l2-normalise" if DS.get("l2_normalise", True) else "--no-l2-normalise"
DS_REPRESENTATIONS = ["base"] + ENCODED


def _ds_features(dataset, backbone, variant):
    if variant == "base":
        return f"{R}/embeddings/{dataset}/{backbone}.h5"
    return f"{R}/representations/{dataset}/{backbone}/{variant}.h5"


def _ds_inputs(refs, wc):
    """Manifest and feature file of every split role (train, test, …) of one evaluation."""
    out = {}
    for role, ref in refs.items():
        out[f"{role}_manifest"] = f"{R}/manifests/{ref['dataset']}.csv"
        out[f"{role}_features"] = _ds_features(ref["dataset"], wc.backbone, wc.variant)
    return out


def _ds_split_flags(refs, wc):
    flags = []
    for role, ref in refs.items():
        flags.append(f"--{role}-manifest {R}/manifests/{ref['dataset']}.csv"
                     f" --{role}-features {_ds_features(ref['dataset'], wc.backbone, wc.variant)}")
        if ref.get("split"):
            flags.append(f"--{role}-split {ref['split']}")
    return " ".join(flags)


def _ds_probe_flags():
    probe = DS["probe"]
    return (f"--l2-grid {' '.join(str(v) for v in probe['l2_grid'])} --val-fraction {probe['val_fraction']}"
            f" --probe-seed {probe['seed']} {DS_NORM}")


def _ds_roles(section, roles):
    return {role: DS[section][role] for role in roles}


DS_TABLES = []

if "fewshot" in DS:
    FEWSHOT = DS["fewshot"]
    DS_TABLES.append(f"{R}/downstream/fewshot.csv")

    def _fewshot_refs(wc):
        return {role: FEWSHOT["tasks"][wc.task][role] for role in ("train", "test")}

    def _fewshot_inputs(wc):
        classes = FEWSHOT["tasks"][wc.task].get("classes")
        extra = {"classes": classes} if isinstance(classes, str) else {}
        return {**_ds_inputs(_fewshot_refs(wc), wc), **extra}

    def _fewshot_classes(wc):
        classes = FEWSHOT["tasks"][wc.task].get("classes")
        if classes is None:
            return ""
        return f"--classes {classes if isinstance(classes, str) else as_json(classes)}"

    rule downstream_fewshot:
        input:
            unpack(_fewshot_inputs),
        output:
            f"{R}/downstream/fewshot/{{task}}/{{backbone}}/{{variant}}.json",
        params:
            splits=lambda wc: _ds_split_flags(_fewshot_refs(wc), wc),
            classes=_fewshot_classes,
            shots=" ".join(str(k) for k in FEWSHOT["shots"]),
            seeds=" ".join(str(s) for s in FEWSHOT["seeds"]),
            l2_reg=FEWSHOT["l2_reg"],
            norm=DS_NORM,
        wildcard_constraints:
            task="|".join(FEWSHOT["tasks"]),
        log:
            f"{R}/logs/downstream/fewshot/{{task}}/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} downstream-fewshot --task {wildcards.task} {params.splits} {params.classes} --shots {params.shots}"
            " --seeds {params.seeds} --l2-reg {params.l2_reg} {params.norm} --out {output} 2> {log}"

    rule downstream_fewshot_table:
        input:
            expand(f"{R}/downstream/fewshot/{{task}}/{{backbone}}/{{variant}}.json", task=list(FEWSHOT["tasks"]),
                   backbone=BACKBONES, variant=DS_REPRESENTATIONS),
        output:
            f"{R}/downstream/fewshot.csv",
        log:
            f"{R}/logs/downstream/fewshot_table.log",
        shell:
            "{PY} downstream-table --kind fewshot --summaries {input} --out {output} 2> {log}"


if "breeds" in DS:
    BREEDS = DS["breeds"]
    BREEDS_REFS = _ds_roles("breeds", ("train", "test"))
    DS_TABLES.append(f"{R}/downstream/breeds.csv")

    rule downstream_breeds_splits:
        input:
            BREEDS.get("requires", []),  # the hierarchy files arrive inside a downloaded (or generated) folder
        output:
            f"{R}/downstream/breeds_splits.json",
        params:
            class_info=BREEDS["hierarchy"]["class_info"],
            class_hierarchy=BREEDS["hierarchy"]["class_hierarchy"],
            node_names=BREEDS["hierarchy"]["node_names"],
            tasks=as_json(BREEDS["tasks"]),
            split=BREEDS.get("split", "rand"),
            seed=BREEDS.get("seed", 2),
            root=BREEDS.get("root", "n00001740"),
        log:
            f"{R}/logs/downstream/breeds_splits.log",
        shell:
            "{PY} downstream-breeds-splits --class-info {params.class_info} --class-hierarchy {params.class_hierarchy}"
            " --node-names {params.node_names} --root {params.root} --tasks {params.tasks} --split {params.split}"
            " --seed {params.seed} --out {output} 2> {log}"

    rule downstream_breeds:
        input:
            unpack(lambda wc: _ds_inputs(BREEDS_REFS, wc)),
            splits=f"{R}/downstream/breeds_splits.json",
        output:
            f"{R}/downstream/breeds/{{backbone}}/{{variant}}.json",
        params:
            splits=lambda wc: _ds_split_flags(BREEDS_REFS, wc),
            probe=_ds_probe_flags(),
        log:
            f"{R}/logs/downstream/breeds/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} downstream-breeds --splits {input.splits} {params.splits} {params.probe} --out {output} 2> {log}"


if "imagenet_a" in DS:
    IMAGENET_A = DS["imagenet_a"]
    IMAGENET_A_REFS = _ds_roles("imagenet_a", ("train", "test", "shifted"))
    DS_TABLES.append(f"{R}/downstream/imagenet_a.csv")

    rule downstream_imagenet_a:
        input:
            unpack(lambda wc: _ds_inputs(IMAGENET_A_REFS, wc)),
        output:
            f"{R}/downstream/imagenet_a/{{backbone}}/{{variant}}.json",
        params:
            splits=lambda wc: _ds_split_flags(IMAGENET_A_REFS, wc),
            probe=_ds_probe_flags(),
            per_class=IMAGENET_A["train_per_class"],
            seed=IMAGENET_A["seed"],
        log:
            f"{R}/logs/downstream/imagenet_a/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} downstream-imagenet-a {params.splits} --train-per-class {params.per_class} --seed {params.seed}"
            " {params.probe} --out {output} 2> {log}"


if "shape_bias" in DS:
    SHAPE_BIAS = DS["shape_bias"]
    SHAPE_BIAS_REFS = _ds_roles("shape_bias", ("train", "stimuli"))
    DS_TABLES.append(f"{R}/downstream/shape_bias.csv")

    rule downstream_shape_bias:
        input:
            unpack(lambda wc: _ds_inputs(SHAPE_BIAS_REFS, wc)),
        output:
            summary=f"{R}/downstream/shape_bias/{{backbone}}/{{variant}}.json",
            decisions=f"{R}/downstream/shape_bias/{{backbone}}/{{variant}}.decisions.csv",
        params:
            splits=lambda wc: _ds_split_flags(SHAPE_BIAS_REFS, wc),
            probe=_ds_probe_flags(),
            categories=as_json(SHAPE_BIAS["categories"]),
            decision=SHAPE_BIAS["decision"],
            per_category=f"--train-per-category {SHAPE_BIAS['train_per_category']}"
            if SHAPE_BIAS.get("train_per_category") else "",
            seed=SHAPE_BIAS["seed"],
        log:
            f"{R}/logs/downstream/shape_bias/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} downstream-shape-bias {params.splits} --categories {params.categories} --decision {params.decision}"
            " {params.per_category} --seed {params.seed} {params.probe} --out-summary {output.summary}"
            " --out-decisions {output.decisions} 2> {log}"


rule downstream_table:
    input:
        lambda wc: expand(f"{R}/downstream/{wc.table}/{{backbone}}/{{variant}}.json", backbone=BACKBONES,
                          variant=DS_REPRESENTATIONS),
    output:
        f"{R}/downstream/{{table}}.csv",
    wildcard_constraints:
        table="breeds|imagenet_a|shape_bias",
    log:
        f"{R}/logs/downstream/{{table}}_table.log",
    shell:
        "{PY} downstream-table --kind summary --summaries {input} --out {output} 2> {log}"


if DS_TABLES:

    rule figure_downstream:
        input:
            alignment=f"{R}/alignment/things_ooo.csv",
            tables=DS_TABLES,
        output:
            report(f"{R}/figures/downstream_gain.png", caption="../workflow/report/downstream_gain.rst",
                   category="Downstream"),
        log:
            f"{R}/logs/figures/downstream_gain.log",
        shell:
            "{PY} figure-downstream --alignment {input.alignment} --tables {input.tables} --out {output} 2> {log}"


rule downstream_all:
    input:
        DS_TABLES,
        [f"{R}/figures/downstream_gain.png"] if DS_TABLES else [],


if "demo" in config and "labelled" in config["demo"]:

    rule demo_labelled:
        input:
            f"{RES}/world/world.json",
        output:
            summary=f"{RES}/labelled/labelled.json",
            hierarchy=multiext(f"{RES}/labelled/breeds/", "dataset_class_info.json", "class_hierarchy.txt",
                               "node_names.txt"),
        params:
            spec=as_json(config["demo"]["labelled"]),
            out=f"{RES}/labelled",
        log:
            f"{R}/logs/demo_labelled.log",
        shell:
            "{PY} demo-labelled --world {input} --spec {params.spec} --out {params.out} 2> {log}"
