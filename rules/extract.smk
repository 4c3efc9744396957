# Inputs → manifests → backbone embeddings (one HDF5 per dataset × backbone).


def _dataset(wildcards):
    return config["datasets"][wildcards.dataset]


rule manifest:
    input:
        lambda wc: _dataset(wc).get("requires", []),
    output:
        f"{R}/manifests/{{dataset}}.csv",
    params:
        entry=lambda wc: stable(_dataset(wc)),
        split=lambda wc: f"--split {_dataset(wc)['split']}" if "split" in _dataset(wc) else "",  # else from split files
        unique_ids=lambda wc: f"--unique-ids {_dataset(wc)['unique_ids']}" if "unique_ids" in _dataset(wc) else "",
        options=lambda wc: f"--options {as_json(_dataset(wc)['options'])}" if "options" in _dataset(wc) else "",
        checksums=lambda wc: "--checksums" if _dataset(wc).get("checksums") else "",
        expected=lambda wc: f"--expected-count {_dataset(wc)['expected_count']}" if "expected_count" in _dataset(wc) else "",
    log:
        f"{R}/logs/manifest/{{dataset}}.log",
    shell:
        "{PY} manifest --layout {params.entry[layout]} --root {params.entry[root]} {params.split} {params.options}"
        " {params.unique_ids} {params.expected} {params.checksums} --out {output} 2> {log}"


rule extract:
    input:
        manifest=f"{R}/manifests/{{dataset}}.csv",
        weights=lambda wc: config["backbones"][wc.backbone].get("requires", []),
    output:
        f"{R}/embeddings/{{dataset}}/{{backbone}}.h5",
    params:
        entry=lambda wc: as_json({"name": wc.backbone, **config["backbones"][wc.backbone]}),
        opts=stable(config.get("extract", {})),
        amp="--amp" if config.get("extract", {}).get("amp") else "",
    threads: 2
    resources:
        gpu=1,
    log:
        f"{R}/logs/extract/{{dataset}}/{{backbone}}.log",
    shell:
        "{PY} extract --backbone {params.entry} --manifest {input.manifest} --out {output}"
        " --batch-size {params.opts[batch_size]} --workers {params.opts[workers]} --threads {threads} {params.amp} 2> {log}"
