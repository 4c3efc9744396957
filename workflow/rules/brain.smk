# Brain alignment (docs/methods.md §9.5–9.6): THINGS-fMRI and BOLD5000 voxelwise ridge encoding from the backbone
# ("base", once per backbone) and every meta-learned variant, on folds that depend only on the subject, then ROI
# statistics (sign-flip per subject over folds, Fisher over subjects, BH-FDR over ROIs) and figures.

from metalign.brain.cv import scheme_alphas

BRAIN = {name: config["benchmarks"][name] for name in ("things_fmri", "bold5000") if name in config["benchmarks"]}


if "things_fmri" in BRAIN:

    rule brain_prepare_things:
        input:
            lambda wc: BRAIN["things_fmri"].get("requires")
            or [
                f"{BRAIN['things_fmri']['betas_dir']}/sub-{wc.subject}_{name}"
                for name in ("ResponseData.h5", "VoxelMetadata.csv", "StimulusMetadata.csv")
            ],
        output:
            f"{R}/brain/things_fmri/subjects/sub-{{subject}}.h5",
        log:
            f"{R}/logs/brain/things_fmri/prepare_sub-{{subject}}.log",
        wildcard_constraints:
            subject="[0-9]+",
        params:
            code=code_hash("brain-prepare-things"),
            betas_dir=BRAIN["things_fmri"]["betas_dir"],
            nc_threshold=BRAIN["things_fmri"]["nc_threshold"],
        shell:
            "python3 -m metalign brain-prepare-things --betas-dir {params.betas_dir} --subject {wildcards.subject}"
            " --nc-threshold {params.nc_threshold} --out {output} 2> {log}"

    rule figure_brain_volume:
        input:
            base=lambda wc: _brain_encodings(
                "things_fmri", BRAIN["things_fmri"]["schemes"][:1], [wc.backbone], ["base"]
            ),
            meta=lambda wc: _brain_encodings(
                "things_fmri",
                BRAIN["things_fmri"]["schemes"][:1],
                [wc.backbone],
                [shown_variant(wc.backbone, BRAIN["things_fmri"]["figure_variant"])],
            ),
            masks=lambda wc: BRAIN["things_fmri"].get("requires")
            or [BRAIN["things_fmri"]["masks"].format(subject=s) for s in BRAIN["things_fmri"]["subjects"]],
        output:
            report(
                f"{R}/figures/brain/things_fmri_volume_{{backbone}}.png",
                caption="../report/brain_volume.rst",
                category="Brain",
            ),
        log:
            f"{R}/logs/figures/brain/things_fmri_volume_{{backbone}}.log",
        params:
            code=code_hash("figure-brain-volume"),
            masks=[BRAIN["things_fmri"]["masks"].format(subject=s) for s in BRAIN["things_fmri"]["subjects"]],
            variant=lambda wc: shown_variant(wc.backbone, BRAIN["things_fmri"]["figure_variant"]),
        shell:
            "python3 -m metalign figure-brain-volume --base {input.base} --meta {input.meta} --masks {params.masks}"
            " --label {params.variant}"
            " --title 'THINGS-fMRI {wildcards.backbone}: held-out R², {params.variant} − base'"
            " --out {output} 2> {log}"


if "bold5000" in BRAIN:

    rule brain_prepare_bold5000:
        input:
            BRAIN["bold5000"].get("requires", []),
        output:
            f"{R}/brain/bold5000/subjects/{{subject}}.h5",
        log:
            f"{R}/logs/brain/bold5000/prepare_{{subject}}.log",
        wildcard_constraints:
            subject="CSI[0-9]+",
        params:
            code=code_hash("brain-prepare-bold5000"),
            root=BRAIN["bold5000"]["root"],
            nc_threshold=BRAIN["bold5000"]["nc_threshold"],
            roi_files=BRAIN["bold5000"]["roi_files"],
            excluded=BRAIN["bold5000"]["exclude_prefixes"],
            zscore="--zscore-sessions" if BRAIN["bold5000"]["zscore_sessions"] else "--no-zscore-sessions",
        shell:
            "python3 -m metalign brain-prepare-bold5000 --root {params.root} --subject {wildcards.subject}"
            " --nc-threshold {params.nc_threshold} --rois {params.roi_files} {params.zscore}"
            " --exclude-prefixes {params.excluded} --out {output} 2> {log}"


rule brain_encode:
    input:
        subject=f"{R}/brain/{{bench}}/subjects/{{subject}}.h5",
        features=lambda wc: features_path(BRAIN[wc.bench]["dataset"], wc.backbone, wc.variant),
    output:
        f"{R}/brain/{{bench}}/{{scheme}}/{{backbone}}/{{variant}}/{{subject}}.h5",
    log:
        f"{R}/logs/brain/{{bench}}/{{scheme}}/{{backbone}}/{{variant}}/{{subject}}.log",
    wildcard_constraints:
        bench="things_fmri|bold5000",
        scheme="heldout_session|image_kfold|upstream_leaky",
        subject="sub-[0-9]+|CSI[0-9]+",
    threads: THREADS["brain_encode"]
    resources:
        gpu=lambda wc: int(BRAIN[wc.bench].get("gpu", False)),
        mem_mb=lambda wc: BRAIN[wc.bench].get("mem_mb", 8000),
    params:
        code=code_hash("brain-encode"),
        alphas=lambda wc: as_json(scheme_alphas(BRAIN[wc.bench], wc.scheme)),
        n_inner=lambda wc: BRAIN[wc.bench]["n_inner"],
        n_folds=lambda wc: f"--n-folds {BRAIN[wc.bench]['n_folds']}" if "n_folds" in BRAIN[wc.bench] else "",
        seed=lambda wc: BRAIN[wc.bench]["seed"],
        backend=lambda wc: BRAIN[wc.bench]["backend"],
        standardize=lambda wc: "--standardize" if BRAIN[wc.bench]["standardize"] else "",
    shell:
        "python3 -m metalign brain-encode --subject-file {input.subject} --features {input.features} --scheme {wildcards.scheme}"
        " --alphas {params.alphas} --n-inner {params.n_inner} {params.n_folds} --seed {params.seed}"
        " --backend {params.backend} {params.standardize} --out {output} 2> {log}"


rule brain_table:
    input:
        lambda wc: _brain_encodings(wc.bench),
    output:
        folds=f"{R}/brain/{{bench}}_folds.csv",
        stats=report(
            f"{R}/brain/{{bench}}_stats.csv",
            caption="../report/brain_rois.rst",
            category="Brain",
            subcategory="tables",
        ),
        alphas=f"{R}/brain/{{bench}}_alphas.csv",
    log:
        f"{R}/logs/brain/{{bench}}_table.log",
    wildcard_constraints:
        bench="things_fmri|bold5000",
    params:
        code=code_hash("brain-table"),
        rois=lambda wc: as_json(BRAIN[wc.bench]["rois"]),
    shell:
        "python3 -m metalign brain-table --encodings {input} --rois {params.rois} --out-folds {output.folds}"
        " --out-stats {output.stats} --out-alphas {output.alphas} 2> {log}"


rule figure_brain_rois:
    input:
        folds=f"{R}/brain/{{bench}}_folds.csv",
        stats=f"{R}/brain/{{bench}}_stats.csv",
    output:
        report(f"{R}/figures/brain/{{bench}}_rois_{{scheme}}.png", caption="../report/brain_rois.rst", category="Brain"),
    log:
        f"{R}/logs/figures/brain/{{bench}}_rois_{{scheme}}.log",
    wildcard_constraints:
        bench="things_fmri|bold5000",
        scheme="heldout_session|image_kfold|upstream_leaky",
    params:
        code=code_hash("figure-brain-rois"),
        rois=lambda wc: as_json(BRAIN[wc.bench]["rois"]),
        title=lambda wc: {"things_fmri": "THINGS-fMRI", "bold5000": "BOLD5000"}[wc.bench],
    shell:
        "python3 -m metalign figure-brain-rois --folds {input.folds} --stats {input.stats} --scheme {wildcards.scheme}"
        " --rois {params.rois} --title '{params.title}' --out {output} 2> {log}"


rule brain_all:
    input:
        _brain_targets(),
