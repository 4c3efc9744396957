rule train:
    input:
        unpack(_split_paths),
    output:
        ckpt=f"{R}/checkpoints/{{backbone}}/{{variant}}.pt",
        metrics=f"{R}/checkpoints/{{backbone}}/{{variant}}.metrics.csv",
    log:
        f"{R}/logs/train/{{backbone}}/{{variant}}.log",
    priority: 10  # the longest jobs and the critical path: start them before the small ones
    threads: THREADS["train"]
    resources:
        gpu=_gpus,
    params:
        code=code_hash("train"),
        cfg=lambda wc: as_json(variant_params(config, wc.variant)),
        launcher=_launcher,
    shell:
        "{params.launcher} train --train-features {input.train_features} --train-codes {input.train_codes}"
        " --val-features {input.val_features} --val-codes {input.val_codes} --params {params.cfg}"
        " --out-ckpt {output.ckpt} --out-metrics {output.metrics} 2> {log}"


rule encode:
    input:
        ckpt=f"{R}/checkpoints/{{backbone}}/{{variant}}.pt",
        features=f"{R}/embeddings/{{dataset}}/{{backbone}}.h5",
    output:
        f"{R}/representations/{{dataset}}/{{backbone}}/{{variant}}.h5",
    log:
        f"{R}/logs/encode/{{dataset}}/{{backbone}}/{{variant}}.log",
    wildcard_constraints:
        variant="|".join(map(re.escape, ENCODED)) or "(?!)",  # no_embed variants have no representation (docs/methods.md §8)
    params:
        code=code_hash("encode"),
    shell:
        "python3 -m metalign encode --ckpt {input.ckpt} --features {input.features} --out {output} 2> {log}"


ICL = config.get("icl", {"variants": [], "n_per_function": 20, "seed": config["seed"]})


rule icl_eval:
    input:
        ckpt=f"{R}/checkpoints/{{backbone}}/{{variant}}.pt",
        features=lambda wc: f"{R}/embeddings/{_variant_set(wc).eval_split}/{wc.backbone}.h5",
        codes=lambda wc: f"{R}/functions/{_variant_set(wc).name}/{_variant_set(wc).eval_split}.h5",
    output:
        f"{R}/icl/{{backbone}}/{{variant}}.h5",
    log:
        f"{R}/logs/icl/{{backbone}}/{{variant}}.log",
    resources:
        gpu=1,
    params:
        code=code_hash("icl-eval"),
        n=ICL["n_per_function"],
        seed=ICL["seed"],
    shell:
        "python3 -m metalign icl-eval --ckpt {input.ckpt} --features {input.features} --codes {input.codes} --out {output}"
        " --n-per-function {params.n} --seed {params.seed} 2> {log}"


rule figure_icl:
    input:
        per_pair(f"{R}/icl/{{backbone}}/{{variant}}.h5", ICL["variants"]),
    output:
        report(f"{R}/figures/icl.png", caption="../report/icl.rst", category="Training"),
    log:
        f"{R}/logs/figures/icl.log",
    params:
        code=code_hash("figure-icl"),
    shell:
        "python3 -m metalign figure-icl --inputs {input} --out {output} 2> {log}"


rule figure_learning_curves:
    input:
        per_pair(f"{R}/checkpoints/{{backbone}}/{{variant}}.metrics.csv", VARIANTS),
    output:
        report(f"{R}/figures/learning_curves.png", caption="../report/learning_curves.rst", category="Training"),
    log:
        f"{R}/logs/figures/learning_curves.log",
    params:
        code=code_hash("figure-curves"),
    shell:
        "python3 -m metalign figure-curves --metrics {input} --out {output} 2> {log}"
