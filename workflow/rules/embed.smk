# Backbone embeddings: one HDF5 per dataset × backbone (features, ids, provenance).


rule extract:
    input:
        manifest=f"{R}/manifests/{{dataset}}.csv",
        weights=lambda wc: config["backbones"][wc.backbone].get("requires", []),
    output:
        f"{R}/embeddings/{{dataset}}/{{backbone}}.h5",
    log:
        f"{R}/logs/extract/{{dataset}}/{{backbone}}.log",
    threads: 2
    resources:
        gpu=1,
    params:
        code=code_hash("extract"),
        entry=lambda wc: as_json({"name": wc.backbone, **config["backbones"][wc.backbone]}),
        opts=stable(config.get("extract", {})),
        amp="--amp" if config.get("extract", {}).get("amp") else "",
    shell:
        "python3 -m metalign extract --backbone {params.entry} --manifest {input.manifest} --out {output}"
        " --batch-size {params.opts[batch_size]} --workers {params.opts[workers]} --threads {threads} {params.amp} 2> {log}"
