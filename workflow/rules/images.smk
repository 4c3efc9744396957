# Image sets: one manifest per dataset (image_id, path, label, split), the only row order downstream.


rule manifest:
    input:
        lambda wc: _dataset(wc).get("requires", []),
    output:
        f"{R}/manifests/{{dataset}}.csv",
    log:
        f"{R}/logs/manifest/{{dataset}}.log",
    params:
        code=code_hash("manifest"),
        entry=lambda wc: stable(_dataset(wc)),
        split=lambda wc: f"--split {_dataset(wc)['split']}" if "split" in _dataset(wc) else "",  # else from split files
        unique_ids=lambda wc: f"--unique-ids {_dataset(wc)['unique_ids']}" if "unique_ids" in _dataset(wc) else "",
        options=lambda wc: f"--options {as_json(_dataset(wc)['options'])}" if "options" in _dataset(wc) else "",
        checksums=lambda wc: "--checksums" if _dataset(wc).get("checksums") else "",
        expected=lambda wc: (
            f"--expected-count {_dataset(wc)['expected_count']}" if "expected_count" in _dataset(wc) else ""
        ),
    shell:
        "python3 -m metalign manifest --layout {params.entry[layout]} --root {params.entry[root]} {params.split} {params.options}"
        " {params.unique_ids} {params.expected} {params.checksums} --out {output} 2> {log}"
