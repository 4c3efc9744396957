FSETS = resolve_function_sets(config["function_sets"])


rule sae_train:
    input:
        lambda wc: _source_features(wc, _fs(wc).train_split),
    output:
        sae=f"{R}/functions/{{fset}}/sae.pt",
        metrics=f"{R}/functions/{{fset}}/sae_metrics.json",
    log:
        f"{R}/logs/functions/{{fset}}/sae_train.log",
    wildcard_constraints:
        fset=_sets("train"),
    priority: 10  # the trainings wait on it
    threads: THREADS["sae_train"]
    params:
        code=code_hash("sae-train"),
        sae=lambda wc: stable(_fs(wc).entry["sae"]),
        output=lambda wc: _fs(wc).source_output,
    shell:
        "python3 -m metalign sae-train --features {input} --output {params.output} --out {output.sae} --metrics {output.metrics}"
        " --expansion {params.sae[expansion]} --k {params.sae[k]} --steps {params.sae[steps]}"
        " --batch-size {params.sae[batch_size]} --lr {params.sae[lr]} --seed {params.sae[seed]} 2> {log}"


rule sae_import:
    input:
        # the download receipt when a rule fetches the weights, else the weights file itself
        lambda wc: _fs(wc).entry["sae"].get("requires") or [_fs(wc).entry["sae"]["weights"]],
    output:
        f"{R}/functions/{{fset}}/sae.pt",
    log:
        f"{R}/logs/functions/{{fset}}/sae_import.log",
    wildcard_constraints:
        fset=_sets("pretrained"),
    params:
        code=code_hash("sae-import"),
        weights=lambda wc: _fs(wc).entry["sae"]["weights"],
        opts=lambda wc: " ".join(
            f"--{key} {_fs(wc).entry['sae'][key]}"
            for key in ("k", "repo", "revision")
            if _fs(wc).entry["sae"].get(key) is not None
        ),
    shell:
        "python3 -m metalign sae-import --weights {params.weights} --out {output} {params.opts} 2> {log}"


rule sae_encode:
    input:
        sae=f"{R}/functions/{{fset}}/sae.pt",
        features=_source_features,
    output:
        f"{R}/functions/{{fset}}/{{split}}.h5",
    log:
        f"{R}/logs/functions/{{fset}}/{{split}}.log",
    wildcard_constraints:
        fset=_sets("train", "pretrained"),
    params:
        code=code_hash("sae-encode"),
        output=lambda wc: _fs(wc).source_output,
        min_nonzero=lambda wc: _fs(wc).entry["min_nonzero"],
        sl=lambda wc: _max_sl(wc.fset),
    shell:
        "python3 -m metalign sae-encode --sae {input.sae} --features {input.features} --output {params.output} --out {output}"
        " --min-nonzero {params.min_nonzero} --sl {params.sl} 2> {log}"


rule functions_neurons:
    input:
        _source_features,
    output:
        f"{R}/functions/{{fset}}/{{split}}.h5",
    log:
        f"{R}/logs/functions/{{fset}}/{{split}}.log",
    wildcard_constraints:
        fset=_sets("neurons"),
    params:
        code=code_hash("functions-neurons"),
        output=lambda wc: _fs(wc).source_output,
        min_nonzero=lambda wc: _fs(wc).entry["min_nonzero"],
        sl=lambda wc: _max_sl(wc.fset),
    shell:
        "python3 -m metalign functions-neurons --features {input} --output {params.output} --out {output}"
        " --min-nonzero {params.min_nonzero} --sl {params.sl} 2> {log}"


rule functions_subset:
    input:
        lambda wc: f"{R}/functions/{_fs(wc).parent}/{wc.split}.h5",
    output:
        f"{R}/functions/{{fset}}/{{split}}.h5",
    log:
        f"{R}/logs/functions/{{fset}}/{{split}}.log",
    wildcard_constraints:
        fset=_sets("subset"),
    params:
        code=code_hash("functions-subset"),
        how=_subset_args,
    shell:
        "python3 -m metalign functions-subset --parent {input} --out {output} {params.how} 2> {log}"


rule functions_shuffle:
    input:
        lambda wc: f"{R}/functions/{_fs(wc).parent}/{wc.split}.h5",
    output:
        f"{R}/functions/{{fset}}/{{split}}.h5",
    log:
        f"{R}/logs/functions/{{fset}}/{{split}}.log",
    wildcard_constraints:
        fset=_sets("shuffle"),
    params:
        code=code_hash("functions-shuffle"),
        seed=lambda wc: _fs(wc).entry["seed"],
    shell:
        "python3 -m metalign functions-shuffle --parent {input} --out {output} --seed {params.seed} --split {wildcards.split}"
        " 2> {log}"


rule functions_summary:
    input:
        [f"{R}/functions/{name}/{split}.h5" for name, fset in FSETS.items() for split in fset.splits],
    output:
        f"{R}/functions/summary.csv",
    log:
        f"{R}/logs/functions/summary.log",
    params:
        code=code_hash("functions-summary"),
    shell:
        "python3 -m metalign functions-summary --inputs {input} --out {output} 2> {log}"
