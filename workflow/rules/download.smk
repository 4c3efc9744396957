# Verified downloads (docs/methods.md P-60): one job per `downloads.items` entry fetches, verifies and places it before any compute
# job needs it (compute jobs run with the hubs offline). Each job writes the receipt {RES}/downloads/<item>.json last;
# a single-file item also declares its file, so rules that read it (unique_id.txt, triplets) find their producer.
# Datasets and backbones point `requires:` at receipts. Unlike every other rule, downloads carry no code hash: their
# outputs are verified against checksums, so a code edit cannot change them, and re-fetching would restart every
# extraction.

DOWNLOADS = config.get("downloads", {}).get("items", {})
DOWNLOAD_LOCK = config.get("downloads", {}).get("lock", "config/downloads.lock.json")


for _item, _spec in DOWNLOADS.items():

    rule:
        name:
            "download_" + "".join(c if c.isalnum() else "_" for c in _item)
        input:
            _download_inputs(_spec),
        output:
            **_download_outputs(_item, _spec),
        log:
            f"{R}/logs/download/{_item}.log",
        localrule: True  # compute nodes often have no internet: run on the submitting host, even with --profile slurm
        resources:
            downloads=1,  # cap concurrent transfers with --resources downloads=N
        params:
            spec=as_json({"name": _item, **_spec}),
            lock=DOWNLOAD_LOCK,
            root=RES,
        shell:
            "python3 -m metalign download --spec {params.spec} --root {params.root} --lock {params.lock} --receipt {output.receipt} 2> {log}"


rule downloads:
    input:
        expand(f"{RES}/downloads/{{item}}.json", item=list(DOWNLOADS)),
    localrule: True
