# THINGS odd-one-out: zero-shot accuracy and per-participant cross-validated choice model, for the backbone
# ("base", computed once per backbone) and every meta-learned variant, with identical folds.

THINGS = config["benchmarks"].get("things_ooo")


def _representation(wc):
    if wc.variant == "base":
        return f"{R}/embeddings/{THINGS['dataset']}/{wc.backbone}.h5"
    return f"{R}/representations/{THINGS['dataset']}/{wc.backbone}/{wc.variant}.h5"


rule things_ooo:
    input:
        features=_representation,
        manifest=f"{R}/manifests/{THINGS['dataset']}.csv",
        triplets=THINGS["triplets"],
        unique_ids=THINGS["unique_ids"],
        ceiling=f"{R}/alignment/noise_ceiling/things_ooo.json",
    output:
        trials=f"{R}/alignment/things_ooo/{{backbone}}/{{variant}}.parquet",
        summary=f"{R}/alignment/things_ooo/{{backbone}}/{{variant}}.json",
    params:
        seed=THINGS["seed"],
    log:
        f"{R}/logs/things_ooo/{{backbone}}/{{variant}}.log",
    shell:
        "{PY} evaluate-things --triplets {input.triplets} --unique-ids {input.unique_ids} --manifest {input.manifest}"
        " --features {input.features} --label {wildcards.variant} --seed {params.seed} --noise-ceiling {input.ceiling}"
        " --out-trials {output.trials} --out-summary {output.summary} 2> {log}"


rule things_ooo_table:
    input:
        expand(f"{R}/alignment/things_ooo/{{backbone}}/{{variant}}.json", backbone=BACKBONES, variant=["base"] + ENCODED),
    output:
        f"{R}/alignment/things_ooo.csv",
    log:
        f"{R}/logs/things_ooo_table.log",
    shell:
        "{PY} things-table --summaries {input} --out {output} 2> {log}"
