# Behavioural alignment beyond the THINGS choice model (protocols.md §9.2–9.4, §9.8, §10, §11): Levels odd-one-out,
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
REPRESENTATIONS = ["base"] + ENCODED


def _features(dataset):
    """Backbone features for variant "base", the variant's meta-learned representation otherwise."""
    def inner(wc):
        if wc.variant == "base":
            return f"{R}/embeddings/{dataset}/{wc.backbone}.h5"
        return f"{R}/representations/{dataset}/{wc.backbone}/{wc.variant}.h5"
    return inner


if "demo" in config and "behaviour" in config["demo"]:

    rule demo_behaviour:
        input:
            f"{RES}/world/world.json",
        output:
            levels=f"{RES}/behaviour/levels.pkl",
            category=f"{RES}/behaviour/category_learning.csv",
            reward=f"{RES}/behaviour/reward_learning.csv",
            metadata=f"{RES}/behaviour/things_metadata.tsv",
            truth=f"{RES}/behaviour/ground_truth.json",
        params:
            spec=as_json(config["demo"]["behaviour"]),
            world=f"{RES}/world",
            out=f"{RES}/behaviour",
        log:
            f"{R}/logs/demo_behaviour.log",
        shell:
            "{PY} demo-behaviour --world {params.world} --spec {params.spec} --out {params.out} 2> {log}"


if "things_ooo" in BENCH:

    rule noise_ceiling_things:
        input:
            BENCH["things_ooo"]["triplets"],
        output:
            f"{R}/alignment/noise_ceiling/things_ooo.json",
        log:
            f"{R}/logs/noise_ceiling/things_ooo.log",
        shell:
            "{PY} noise-ceiling --things-triplets {input} --out {output} 2> {log}"


if LEVELS:

    rule noise_ceiling_levels:
        input:
            LEVELS["levels"],
        output:
            f"{R}/alignment/noise_ceiling/levels_ooo.json",
        log:
            f"{R}/logs/noise_ceiling/levels_ooo.log",
        shell:
            "{PY} noise-ceiling --levels {input} --out {output} 2> {log}"

    rule levels_ooo:
        input:
            features=_features(LEVELS["dataset"]),
            manifest=f"{R}/manifests/{LEVELS['dataset']}.csv",
            levels=LEVELS["levels"],
            ceiling=f"{R}/alignment/noise_ceiling/levels_ooo.json",
        output:
            trials=f"{R}/alignment/levels_ooo/{{backbone}}/{{variant}}.parquet",
            summary=f"{R}/alignment/levels_ooo/{{backbone}}/{{variant}}.json",
        params:
            seed=LEVELS["seed"],
        threads: 2
        log:
            f"{R}/logs/levels_ooo/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} evaluate-levels --levels {input.levels} --manifest {input.manifest} --features {input.features}"
            " --label {wildcards.variant} --seed {params.seed} --noise-ceiling {input.ceiling}"
            " --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


if CATEGORY:

    rule category_learning:
        input:
            features=_features(CATEGORY["dataset"]),
            table=CATEGORY["table"],
        output:
            trials=f"{R}/alignment/category_learning/{{backbone}}/{{variant}}.parquet",
            summary=f"{R}/alignment/category_learning/{{backbone}}/{{variant}}.json",
        params:
            c_selection=CATEGORY.get("c_selection", "cv"),
        log:
            f"{R}/logs/category_learning/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} evaluate-category --table {input.table} --features {input.features} --label {wildcards.variant}"
            " --c-selection {params.c_selection} --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


if REWARD:

    rule reward_learning:
        input:
            features=_features(REWARD["dataset"]),
            table=REWARD["table"],
        output:
            trials=f"{R}/alignment/reward_learning/{{backbone}}/{{variant}}.parquet",
            summary=f"{R}/alignment/reward_learning/{{backbone}}/{{variant}}.json",
        log:
            f"{R}/logs/reward_learning/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} evaluate-reward --table {input.table} --features {input.features} --label {wildcards.variant}"
            " --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


rule behaviour_stats:
    input:
        trials=lambda wc: expand(f"{R}/alignment/{wc.bench}/{{backbone}}/{{variant}}.parquet", backbone=BACKBONES,
                                 variant=REPRESENTATIONS),
        ceiling=lambda wc: f"{R}/alignment/noise_ceiling/{CEILINGS[wc.bench]}.json" if wc.bench in CEILINGS else [],
    output:
        f"{R}/alignment/{{bench}}_stats.csv",
    wildcard_constraints:
        bench="|".join(BEHAVIOUR) or "^$",
    params:
        n_choices=lambda wc: N_CHOICES[wc.bench],
        ceiling=lambda wc, input: f"--noise-ceiling {input.ceiling}" if input.ceiling else "",
        subset=lambda wc: "--subset-column triplet_type" if wc.bench == "levels_ooo" else "",
        groups=" ".join(f"--group {name}={','.join(members)}" for name, members in STATS.get("groups", {}).items()),
        reference=REFERENCE,
        seed=STATS.get("seed", config["seed"]),
    log:
        f"{R}/logs/behaviour_stats/{{bench}}.log",
    shell:
        "{PY} behaviour-stats --benchmark {wildcards.bench} --trials {input.trials} --n-choices {params.n_choices}"
        " {params.ceiling} {params.subset} {params.groups} --reference {params.reference} --seed {params.seed}"
        " --out {output} 2> {log}"


rule behaviour_table:
    input:
        lambda wc: expand(f"{R}/alignment/{wc.table}/{{backbone}}/{{variant}}.json", backbone=BACKBONES,
                          variant=REPRESENTATIONS),
    output:
        f"{R}/alignment/{{table}}.csv",
    wildcard_constraints:
        table="|".join(TABLES) or "^$",
    log:
        f"{R}/logs/tables/{{table}}.log",
    shell:
        "{PY} things-table --summaries {input} --out {output} 2> {log}"


if GEOMETRY:

    rule geometry:
        input:
            features=_features(GEOMETRY["dataset"]),
            manifest=f"{R}/manifests/{GEOMETRY['dataset']}.csv",
            unique_ids=config["datasets"][GEOMETRY["dataset"]]["unique_ids"],
            embedding=GEOMETRY["embedding"],
            metadata=GEOMETRY["metadata"],
        output:
            f"{R}/alignment/geometry/{{backbone}}/{{variant}}.json",
        params:
            columns=" ".join(f"'{c}'" for c in GEOMETRY["label_columns"]),
            id_column=GEOMETRY.get("id_column", "uniqueID"),
            n_bootstrap=GEOMETRY.get("n_bootstrap", 100),
            seed=GEOMETRY["seed"],
        log:
            f"{R}/logs/geometry/{{backbone}}/{{variant}}.log",
        shell:
            "{PY} evaluate-geometry --features {input.features} --manifest {input.manifest}"
            " --unique-ids {input.unique_ids} --embedding {input.embedding} --metadata {input.metadata}"
            " --id-column '{params.id_column}' --label-columns {params.columns} --n-bootstrap {params.n_bootstrap}"
            " --seed {params.seed} --label {wildcards.variant} --out {output} 2> {log}"

    rule figure_geometry:
        input:
            f"{R}/alignment/geometry.csv",
        output:
            report(f"{R}/figures/geometry.png", caption="../workflow/report/geometry.rst", category="Geometry"),
        log:
            f"{R}/logs/figures/geometry.log",
        shell:
            "{PY} figure-geometry --table {input} --out {output} 2> {log}"

    rule figure_tsne:
        input:
            base=f"{R}/embeddings/{GEOMETRY['dataset']}/{{backbone}}.h5",
            meta=f"{R}/representations/{GEOMETRY['dataset']}/{{backbone}}/{REFERENCE}.h5",
            manifest=f"{R}/manifests/{GEOMETRY['dataset']}.csv",
            unique_ids=config["datasets"][GEOMETRY["dataset"]]["unique_ids"],
            metadata=GEOMETRY["metadata"],
        output:
            report(f"{R}/figures/tsne/{{backbone}}.png", caption="../workflow/report/tsne.rst", category="Geometry",
                   subcategory="t-SNE"),
        params:
            colour=GEOMETRY["tsne_colour"],
            id_column=GEOMETRY.get("id_column", "uniqueID"),
            seed=GEOMETRY["seed"],
        log:
            f"{R}/logs/figures/tsne/{{backbone}}.log",
        shell:
            "{PY} figure-tsne --base {input.base} --meta {input.meta} --manifest {input.manifest}"
            " --unique-ids {input.unique_ids} --metadata {input.metadata} --id-column '{params.id_column}'"
            " --colour-column '{params.colour}' --seed {params.seed}"
            " --title '{wildcards.backbone}: base vs {REFERENCE}' --out {output} 2> {log}"


rule figure_behaviour:
    input:
        f"{R}/alignment/{{bench}}_stats.csv",
    output:
        report(f"{R}/figures/{{bench}}_r2.png", caption="../workflow/report/behaviour_r2.rst", category="Behaviour"),
    wildcard_constraints:
        bench="|".join(BEHAVIOUR) or "^$",
    log:
        f"{R}/logs/figures/{{bench}}_r2.log",
    shell:
        "{PY} figure-behaviour --stats {input} --title '{wildcards.bench}: McFadden R² across participants'"
        " --out {output} 2> {log}"


rule behaviour_all:
    input:
        expand(f"{R}/alignment/{{bench}}_stats.csv", bench=BEHAVIOUR),
        expand(f"{R}/figures/{{bench}}_r2.png", bench=BEHAVIOUR),
        expand(f"{R}/alignment/{{table}}.csv", table=TABLES),
        [f"{R}/figures/geometry.png"] if GEOMETRY else [],
        expand(f"{R}/figures/tsne/{{backbone}}.png", backbone=BACKBONES) if GEOMETRY and REFERENCE in ENCODED else [],
