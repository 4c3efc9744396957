# Functions: a top-k SAE over the source backbone's training-pool embeddings, then sparse codes per split.


def _fset(wildcards):
    return config["function_sets"][wildcards.fset]


def _max_sl(fset: str) -> int:
    """Episode length that the function filter must support: the longest of the variants using this set (P-16)."""
    return max(variant_params(config, v)["sl"] for v in VARIANTS if config["variants"][v]["function_set"] == fset)


rule sae_train:
    input:
        lambda wc: f"{R}/embeddings/{_fset(wc)['train_split']}/{_fset(wc)['source']['backbone']}.h5",
    output:
        sae=f"{R}/functions/{{fset}}/sae.pt",
        metrics=f"{R}/functions/{{fset}}/sae_metrics.json",
    params:
        sae=lambda wc: _fset(wc)["sae"],
    log:
        f"{R}/logs/functions/{{fset}}/sae_train.log",
    shell:
        "{PY} sae-train --features {input} --out {output.sae} --metrics {output.metrics}"
        " --expansion {params.sae[expansion]} --k {params.sae[k]} --steps {params.sae[steps]}"
        " --batch-size {params.sae[batch_size]} --lr {params.sae[lr]} --seed {params.sae[seed]} 2> {log}"


rule sae_encode:
    input:
        sae=f"{R}/functions/{{fset}}/sae.pt",
        features=lambda wc: f"{R}/embeddings/{wc.split}/{_fset(wc)['source']['backbone']}.h5",
    output:
        f"{R}/functions/{{fset}}/{{split}}.h5",
    params:
        min_nonzero=lambda wc: _fset(wc)["min_nonzero"],
        sl=lambda wc: _max_sl(wc.fset),
    log:
        f"{R}/logs/functions/{{fset}}/{{split}}.log",
    shell:
        "{PY} sae-encode --sae {input.sae} --features {input.features} --out {output}"
        " --min-nonzero {params.min_nonzero} --sl {params.sl} 2> {log}"
