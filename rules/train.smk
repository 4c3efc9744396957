# The meta-learner: one checkpoint per backbone × variant, and its representation of every evaluated image set.


def _split_paths(wc):
    fset = config["variants"][wc.variant]["function_set"]
    entry = config["function_sets"][fset]
    return {
        "train_features": f"{R}/embeddings/{entry['train_split']}/{wc.backbone}.h5",
        "train_codes": f"{R}/functions/{fset}/{entry['train_split']}.h5",
        "val_features": f"{R}/embeddings/{entry['eval_split']}/{wc.backbone}.h5",
        "val_codes": f"{R}/functions/{fset}/{entry['eval_split']}.h5",
    }


rule train:
    input:
        unpack(_split_paths),
    output:
        ckpt=f"{R}/checkpoints/{{backbone}}/{{variant}}.pt",
        metrics=f"{R}/checkpoints/{{backbone}}/{{variant}}.metrics.csv",
    params:
        cfg=lambda wc: as_json(variant_params(config, wc.variant)),
    threads: 2
    resources:
        gpu=1,
    log:
        f"{R}/logs/train/{{backbone}}/{{variant}}.log",
    shell:
        "{PY} train --train-features {input.train_features} --train-codes {input.train_codes}"
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
    shell:
        "{PY} encode --ckpt {input.ckpt} --features {input.features} --out {output} 2> {log}"
