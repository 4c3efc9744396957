DS = config.get("downstream", {})
DS_NORM = "--l2-normalise" if DS.get("l2_normalise", True) else "--no-l2-normalise"


DS_TABLES = []

if "fewshot" in DS:
    FEWSHOT = DS["fewshot"]
    DS_TABLES.append(f"{R}/downstream/fewshot.csv")

    rule downstream_fewshot:
        input:
            unpack(_fewshot_inputs),
        output:
            f"{R}/downstream/fewshot/{{task}}/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/downstream/fewshot/{{task}}/{{backbone}}/{{variant}}.log",
        wildcard_constraints:
            task="|".join(FEWSHOT["tasks"]),
        params:
            code=code_hash("downstream-fewshot"),
            splits=lambda wc: _ds_split_flags(_fewshot_refs(wc), wc),
            classes=_fewshot_classes,
            shots=" ".join(str(k) for k in FEWSHOT["shots"]),
            seeds=" ".join(str(s) for s in FEWSHOT["seeds"]),
            l2_reg=FEWSHOT["l2_reg"],
            norm="--l2-normalise" if FEWSHOT.get("l2_normalise", False) else "--no-l2-normalise",
        shell:
            "python3 -m metalign downstream-fewshot --task {wildcards.task} {params.splits} {params.classes} --shots {params.shots}"
            " --seeds {params.seeds} --l2-reg {params.l2_reg} {params.norm} --out {output} 2> {log}"

    rule downstream_fewshot_table:
        input:
            per_pair(f"{R}/downstream/fewshot/{{task}}/{{backbone}}/{{variant}}.json", task=list(FEWSHOT["tasks"])),
        output:
            f"{R}/downstream/fewshot.csv",
        log:
            f"{R}/logs/downstream/fewshot_table.log",
        params:
            code=code_hash("downstream-fewshot-table"),
        shell:
            "python3 -m metalign downstream-fewshot-table --summaries {input} --out {output} 2> {log}"


if "breeds" in DS:
    BREEDS = DS["breeds"]
    BREEDS_REFS = _ds_roles("breeds", ("train", "test"))
    DS_TABLES.append(f"{R}/downstream/breeds.csv")

    rule downstream_breeds_splits:
        input:
            BREEDS.get("requires", []),  # the hierarchy files arrive inside a downloaded (or generated) folder
        output:
            f"{R}/downstream/breeds_splits.json",
        log:
            f"{R}/logs/downstream/breeds_splits.log",
        params:
            code=code_hash("downstream-breeds-splits"),
            class_info=BREEDS["hierarchy"]["class_info"],
            class_hierarchy=BREEDS["hierarchy"]["class_hierarchy"],
            node_names=BREEDS["hierarchy"]["node_names"],
            tasks=as_json(BREEDS["tasks"]),
            split=BREEDS.get("split", "rand"),
            seed=BREEDS.get("seed", 2),
            root=BREEDS.get("root", "n00001740"),
        shell:
            "python3 -m metalign downstream-breeds-splits --class-info {params.class_info} --class-hierarchy {params.class_hierarchy}"
            " --node-names {params.node_names} --root {params.root} --tasks {params.tasks} --split {params.split}"
            " --seed {params.seed} --out {output} 2> {log}"

    rule downstream_breeds:
        input:
            unpack(lambda wc: _ds_inputs(BREEDS_REFS, wc)),
            splits=f"{R}/downstream/breeds_splits.json",
        output:
            f"{R}/downstream/breeds/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/downstream/breeds/{{backbone}}/{{variant}}.log",
        params:
            code=code_hash("downstream-breeds"),
            splits=lambda wc: _ds_split_flags(BREEDS_REFS, wc),
            probe=_ds_probe_flags(),
        shell:
            "python3 -m metalign downstream-breeds --splits {input.splits} {params.splits} {params.probe} --out {output} 2> {log}"


if "imagenet_a" in DS:
    IMAGENET_A = DS["imagenet_a"]
    IMAGENET_A_REFS = _ds_roles("imagenet_a", ("train", "test", "shifted"))
    DS_TABLES.append(f"{R}/downstream/imagenet_a.csv")

    rule downstream_imagenet_a:
        input:
            unpack(lambda wc: _ds_inputs(IMAGENET_A_REFS, wc)),
        output:
            f"{R}/downstream/imagenet_a/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/downstream/imagenet_a/{{backbone}}/{{variant}}.log",
        params:
            code=code_hash("downstream-imagenet-a"),
            splits=lambda wc: _ds_split_flags(IMAGENET_A_REFS, wc),
            probe=_ds_probe_flags(),
            per_class=IMAGENET_A["train_per_class"],
            seed=IMAGENET_A["seed"],
        shell:
            "python3 -m metalign downstream-imagenet-a {params.splits} --train-per-class {params.per_class} --seed {params.seed}"
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
        log:
            f"{R}/logs/downstream/shape_bias/{{backbone}}/{{variant}}.log",
        params:
            code=code_hash("downstream-shape-bias"),
            splits=lambda wc: _ds_split_flags(SHAPE_BIAS_REFS, wc),
            probe=_ds_probe_flags(),
            categories=as_json(SHAPE_BIAS["categories"]),
            decision=SHAPE_BIAS["decision"],
            per_category=(
                f"--train-per-category {SHAPE_BIAS['train_per_category']}"
                if SHAPE_BIAS.get("train_per_category")
                else ""
            ),
            seed=SHAPE_BIAS["seed"],
        shell:
            "python3 -m metalign downstream-shape-bias {params.splits} --categories {params.categories} --decision {params.decision}"
            " {params.per_category} --seed {params.seed} {params.probe} --out-summary {output.summary}"
            " --out-decisions {output.decisions} 2> {log}"


rule downstream_table:
    input:
        lambda wc: per_pair(f"{R}/downstream/{wc.table}/{{backbone}}/{{variant}}.json"),
    output:
        f"{R}/downstream/{{table}}.csv",
    log:
        f"{R}/logs/downstream/{{table}}_table.log",
    wildcard_constraints:
        table="breeds|imagenet_a|shape_bias",
    params:
        code=code_hash("collect-summaries"),
    shell:
        "python3 -m metalign collect-summaries --summaries {input} --out {output} 2> {log}"


if DS_TABLES:

    rule figure_downstream:
        input:
            alignment=f"{R}/alignment/things_ooo.csv",
            tables=DS_TABLES,
        output:
            report(f"{R}/figures/downstream_gain.png", caption="../report/downstream_gain.rst", category="Downstream"),
        log:
            f"{R}/logs/figures/downstream_gain.log",
        params:
            code=code_hash("figure-downstream"),
        shell:
            "python3 -m metalign figure-downstream --alignment {input.alignment} --tables {input.tables} --out {output} 2> {log}"


rule downstream_all:
    input:
        DS_TABLES,
        [f"{R}/figures/downstream_gain.png"] if DS_TABLES else [],
