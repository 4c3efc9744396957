# Backbone embeddings: one HDF5 per dataset × backbone (features, ids, provenance).

from metalign.config.datasets import concat_parts

CONCAT = concat_parts(config["datasets"])  # datasets made of others: their parts, in row order (docs/methods.md §3)


rule extract:
    input:
        manifest=f"{R}/manifests/{{dataset}}.csv",
        weights=lambda wc: config["backbones"][wc.backbone].get("requires", []),
    output:
        f"{R}/embeddings/{{dataset}}/{{backbone}}.h5",
    log:
        f"{R}/logs/extract/{{dataset}}/{{backbone}}.log",
    wildcard_constraints:
        dataset="|".join(re.escape(d) for d in config["datasets"] if d not in CONCAT) or "(?!)",
    threads: THREADS["extract"]
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


rule embeddings_concat:
    input:
        parts=lambda wc: [f"{R}/embeddings/{part}/{wc.backbone}.h5" for part in CONCAT[wc.dataset]],
        manifests=lambda wc: [f"{R}/manifests/{part}.csv" for part in CONCAT[wc.dataset]],
    output:
        f"{R}/embeddings/{{dataset}}/{{backbone}}.h5",
    log:
        f"{R}/logs/extract/{{dataset}}/{{backbone}}.log",
    wildcard_constraints:
        dataset="|".join(map(re.escape, CONCAT)) or "(?!)",
    params:
        code=code_hash("embeddings-concat"),
        expected=lambda wc: (
            f"--expected-count {config['datasets'][wc.dataset]['expected_count']}"
            if "expected_count" in config["datasets"][wc.dataset]
            else ""
        ),
    shell:
        "python3 -m metalign embeddings-concat --parts {input.parts} --manifests {input.manifests} --out {output}"
        " {params.expected} 2> {log}"
