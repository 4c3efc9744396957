# THINGS odd-one-out: zero-shot accuracy and per-participant cross-validated choice model, for the backbone
# ("base", computed once per backbone) and every meta-learned variant, with identical folds.

THINGS = config["benchmarks"].get("things_ooo")


rule things_ooo:
    input:
        features=features_of(THINGS["dataset"]),
        manifest=f"{R}/manifests/{THINGS['dataset']}.csv",
        triplets=THINGS["triplets"],
        unique_ids=THINGS["unique_ids"],
        ceiling=f"{R}/alignment/noise_ceiling/things_ooo.json",
    output:
        trials=f"{R}/alignment/things_ooo/{{backbone}}/{{variant}}.parquet",
        summary=f"{R}/alignment/things_ooo/{{backbone}}/{{variant}}.json",
    log:
        f"{R}/logs/things_ooo/{{backbone}}/{{variant}}.log",
    params:
        code=code_hash("evaluate-things"),
        seed=THINGS["seed"],
    shell:
        "python3 -m metalign evaluate-things --triplets {input.triplets} --unique-ids {input.unique_ids} --manifest {input.manifest}"
        " --features {input.features} --label {wildcards.variant} --seed {params.seed} --noise-ceiling {input.ceiling}"
        " --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


rule things_ooo_table:
    input:
        per_pair(f"{R}/alignment/things_ooo/{{backbone}}/{{variant}}.json"),
    output:
        report(
            f"{R}/alignment/things_ooo.csv",
            caption="../report/things_ooo.rst",
            category="Alignment",
            subcategory="tables",
        ),
    log:
        f"{R}/logs/things_ooo_table.log",
    params:
        code=code_hash("collect-summaries"),
    shell:
        "python3 -m metalign collect-summaries --summaries {input} --out {output} 2> {log}"


rule figure_things_ooo:
    input:
        table=f"{R}/alignment/things_ooo.csv",
        stats=f"{R}/alignment/things_ooo_stats.csv",
    output:
        report(f"{R}/figures/things_ooo.png", caption="../report/things_ooo.rst", category="Alignment"),
    log:
        f"{R}/logs/figures/things_ooo.log",
    params:
        code=code_hash("figure-things"),
    shell:
        "python3 -m metalign figure-things --table {input.table} --stats {input.stats} --out {output} 2> {log}"


# Behavioural alignment beyond the THINGS choice model (docs/methods.md §9.2–9.4, docs/methods.md §9.8, §10, §11): Levels odd-one-out,
# category and reward learning, cached noise ceilings, paired group statistics (BMS, Wilcoxon, pseudo-R²) per
# benchmark, representational geometry, and their figures. "base" (backbone features) is one job per backbone.

BENCH = config["benchmarks"]
LEVELS = BENCH.get("levels_ooo")
CATEGORY = BENCH.get("category_learning")
REWARD = BENCH.get("reward_learning")
GEOMETRY = BENCH.get("geometry")
STATS = config.get("statistics", {})
REFERENCE = STATS.get("reference", "main")
BEHAVIOUR = [b for b in ("things_ooo", "levels_ooo", "category_learning", "reward_learning") if b in BENCH]
N_CHOICES = {"things_ooo": 3, "levels_ooo": 3, "category_learning": 2, "reward_learning": 2}
CEILINGS = {"things_ooo": "things_ooo", "levels_ooo": "levels_ooo"}
TABLES = [b for b in ("levels_ooo", "category_learning", "reward_learning", "geometry") if b in BENCH]


if "things_ooo" in BENCH:

    rule noise_ceiling_things:
        input:
            BENCH["things_ooo"]["triplets"],
        output:
            f"{R}/alignment/noise_ceiling/things_ooo.json",
        log:
            f"{R}/logs/noise_ceiling/things_ooo.log",
        params:
            code=code_hash("noise-ceiling"),
        shell:
            "python3 -m metalign noise-ceiling --things-triplets {input} --out {output} 2> {log}"


if LEVELS:

    rule noise_ceiling_levels:
        input:
            LEVELS["levels"],
        output:
            f"{R}/alignment/noise_ceiling/levels_ooo.json",
        log:
            f"{R}/logs/noise_ceiling/levels_ooo.log",
        params:
            code=code_hash("noise-ceiling"),
        shell:
            "python3 -m metalign noise-ceiling --levels {input} --out {output} 2> {log}"

    rule levels_ooo:
        input:
            features=features_of(LEVELS["dataset"]),
            manifest=f"{R}/manifests/{LEVELS['dataset']}.csv",
            levels=LEVELS["levels"],
            ceiling=f"{R}/alignment/noise_ceiling/levels_ooo.json",
        output:
            trials=f"{R}/alignment/levels_ooo/{{backbone}}/{{variant}}.parquet",
            summary=f"{R}/alignment/levels_ooo/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/levels_ooo/{{backbone}}/{{variant}}.log",
        threads: THREADS["levels_ooo"]
        params:
            code=code_hash("evaluate-levels"),
            seed=LEVELS["seed"],
        shell:
            "python3 -m metalign evaluate-levels --levels {input.levels} --manifest {input.manifest} --features {input.features}"
            " --label {wildcards.variant} --seed {params.seed} --noise-ceiling {input.ceiling}"
            " --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


if CATEGORY:

    rule category_learning:
        input:
            features=features_of(CATEGORY["dataset"]),
            table=CATEGORY["table"],
        output:
            trials=f"{R}/alignment/category_learning/{{backbone}}/{{variant}}.parquet",
            summary=f"{R}/alignment/category_learning/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/category_learning/{{backbone}}/{{variant}}.log",
        params:
            code=code_hash("evaluate-category"),
            c_selection=CATEGORY.get("c_selection", "cv"),
            scoring=CATEGORY.get("scoring", "in_sample"),
            temperature=CATEGORY.get("temperature", "individual"),
            t_bounds=CATEGORY.get("t_bounds", "study"),
        shell:
            "python3 -m metalign evaluate-category --table {input.table} --features {input.features} --label {wildcards.variant}"
            " --c-selection {params.c_selection} --scoring {params.scoring} --temperature {params.temperature}"
            " --t-bounds {params.t_bounds} --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


if REWARD:

    rule reward_learning:
        input:
            features=features_of(REWARD["dataset"]),
            table=REWARD["table"],
        output:
            trials=f"{R}/alignment/reward_learning/{{backbone}}/{{variant}}.parquet",
            summary=f"{R}/alignment/reward_learning/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/reward_learning/{{backbone}}/{{variant}}.log",
        params:
            code=code_hash("evaluate-reward"),
            scoring=REWARD.get("scoring", "in_sample"),
            temperature=REWARD.get("temperature", "individual"),
            t_bounds=REWARD.get("t_bounds", "study"),
        shell:
            "python3 -m metalign evaluate-reward --table {input.table} --features {input.features} --label {wildcards.variant}"
            " --scoring {params.scoring} --temperature {params.temperature} --t-bounds {params.t_bounds}"
            " --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


rule behaviour_stats:
    input:
        trials=lambda wc: per_pair(f"{R}/alignment/{wc.bench}/{{backbone}}/{{variant}}.parquet"),
        ceiling=lambda wc: f"{R}/alignment/noise_ceiling/{CEILINGS[wc.bench]}.json" if wc.bench in CEILINGS else [],
    output:
        report(
            f"{R}/alignment/{{bench}}_stats.csv",
            caption="../report/behaviour_r2.rst",
            category="Behaviour",
            subcategory="tables",
        ),
    log:
        f"{R}/logs/behaviour_stats/{{bench}}.log",
    wildcard_constraints:
        bench="|".join(BEHAVIOUR) or "^$",
    params:
        code=code_hash("behaviour-stats"),
        n_choices=lambda wc: N_CHOICES[wc.bench],
        ceiling=lambda wc, input: f"--noise-ceiling {input.ceiling}" if input.ceiling else "",
        subset=lambda wc: "--subset-column triplet_type" if wc.bench == "levels_ooo" else "",
        groups=" ".join(f"--group {name}={','.join(members)}" for name, members in STATS.get("groups", {}).items()),
        reference=REFERENCE,
        seed=STATS.get("seed", config["seed"]),
    shell:
        "python3 -m metalign behaviour-stats --benchmark {wildcards.bench} --trials {input.trials} --n-choices {params.n_choices}"
        " {params.ceiling} {params.subset} {params.groups} --reference {params.reference} --seed {params.seed}"
        " --out {output} 2> {log}"


rule behaviour_table:
    input:
        lambda wc: per_pair(f"{R}/alignment/{wc.table}/{{backbone}}/{{variant}}.json"),
    output:
        f"{R}/alignment/{{table}}.csv",
    log:
        f"{R}/logs/tables/{{table}}.log",
    wildcard_constraints:
        table="|".join(TABLES) or "^$",
    params:
        code=code_hash("collect-summaries"),
    shell:
        "python3 -m metalign collect-summaries --summaries {input} --out {output} 2> {log}"


if GEOMETRY:

    rule geometry:
        input:
            features=features_of(GEOMETRY["dataset"]),
            manifest=f"{R}/manifests/{GEOMETRY['dataset']}.csv",
            unique_ids=config["datasets"][GEOMETRY["dataset"]]["unique_ids"],
            embedding=GEOMETRY["embedding"],
            metadata=GEOMETRY["metadata"],
        output:
            f"{R}/alignment/geometry/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/geometry/{{backbone}}/{{variant}}.log",
        params:
            code=code_hash("evaluate-geometry"),
            columns=" ".join(f"'{c}'" for c in GEOMETRY["label_columns"]),
            id_column=GEOMETRY.get("id_column", "uniqueID"),
            n_bootstrap=GEOMETRY.get("n_bootstrap", 100),
            seed=GEOMETRY["seed"],
        shell:
            "python3 -m metalign evaluate-geometry --features {input.features} --manifest {input.manifest}"
            " --unique-ids {input.unique_ids} --embedding {input.embedding} --metadata {input.metadata}"
            " --id-column '{params.id_column}' --label-columns {params.columns} --n-bootstrap {params.n_bootstrap}"
            " --seed {params.seed} --label {wildcards.variant} --out {output} 2> {log}"

    rule figure_geometry:
        input:
            f"{R}/alignment/geometry.csv",
        output:
            report(f"{R}/figures/geometry.png", caption="../report/geometry.rst", category="Geometry"),
        log:
            f"{R}/logs/figures/geometry.log",
        params:
            code=code_hash("figure-geometry"),
        shell:
            "python3 -m metalign figure-geometry --table {input} --out {output} 2> {log}"

    rule figure_tsne:
        input:
            base=f"{R}/embeddings/{GEOMETRY['dataset']}/{{backbone}}.h5",
            meta=lambda wc: f"{R}/representations/{GEOMETRY['dataset']}/{wc.backbone}/{shown_variant(wc.backbone, REFERENCE)}.h5",
            manifest=f"{R}/manifests/{GEOMETRY['dataset']}.csv",
            unique_ids=config["datasets"][GEOMETRY["dataset"]]["unique_ids"],
            metadata=GEOMETRY["metadata"],
        output:
            report(
                f"{R}/figures/tsne/{{backbone}}.png",
                caption="../report/tsne.rst",
                category="Geometry",
                subcategory="t-SNE",
            ),
        log:
            f"{R}/logs/figures/tsne/{{backbone}}.log",
        params:
            code=code_hash("figure-tsne"),
            colour=GEOMETRY["tsne_colour"],
            reference=lambda wc: shown_variant(wc.backbone, REFERENCE),
            id_column=GEOMETRY.get("id_column", "uniqueID"),
            seed=GEOMETRY["seed"],
        shell:
            "python3 -m metalign figure-tsne --base {input.base} --meta {input.meta} --manifest {input.manifest}"
            " --unique-ids {input.unique_ids} --metadata {input.metadata} --id-column '{params.id_column}'"
            " --colour-column '{params.colour}' --seed {params.seed}"
            " --title '{wildcards.backbone}: base vs {params.reference}' --out {output} 2> {log}"


rule figure_behaviour:
    input:
        f"{R}/alignment/{{bench}}_stats.csv",
    output:
        report(f"{R}/figures/{{bench}}_r2.png", caption="../report/behaviour_r2.rst", category="Behaviour"),
    log:
        f"{R}/logs/figures/{{bench}}_r2.log",
    wildcard_constraints:
        bench="|".join(BEHAVIOUR) or "^$",
    params:
        code=code_hash("figure-behaviour"),
    shell:
        "python3 -m metalign figure-behaviour --stats {input} --title '{wildcards.bench}: McFadden R² across participants'"
        " --out {output} 2> {log}"


rule behaviour_all:
    input:
        expand(f"{R}/alignment/{{bench}}_stats.csv", bench=BEHAVIOUR),
        expand(f"{R}/figures/{{bench}}_r2.png", bench=BEHAVIOUR),
        expand(f"{R}/alignment/{{table}}.csv", table=TABLES),
        [f"{R}/figures/geometry.png"] if GEOMETRY else [],
        expand(f"{R}/figures/tsne/{{backbone}}.png", backbone=shown_backbones(REFERENCE)) if GEOMETRY else [],
