# The embedded demo world: procedural THINGS/COCO-shaped images, a planted concept embedding, simulated
# participants, and a small ViT saved in Hugging Face format.


rule demo_world:
    output:
        world=f"{RES}/world/world.json",
        triplets=f"{RES}/world/things/triplets.tsv",
        unique_ids=f"{RES}/world/things/unique_id.txt",
        planted=f"{RES}/world/things/spose_embedding_23d_sorted.txt",  # 23 = the factor space of metalign.demo.factors
    log:
        f"{R}/logs/demo_world.log",
    params:
        code=code_hash("demo-world"),
        spec=as_json(config["demo"]["world"]),
    shell:
        "python3 -m metalign demo-world --spec {params.spec} --out $(dirname {output.world}) 2> {log}"


rule demo_vit:
    output:
        f"{RES}/models/vit_tiny/config.json",
    log:
        f"{R}/logs/demo_vit.log",
    params:
        code=code_hash("demo-vit"),
        vit=stable(config["demo"]["vit"]),
    shell:
        "python3 -m metalign demo-vit --out $(dirname {output}) --image-size {params.vit[image_size]} --patch-size {params.vit[patch_size]}"
        " --hidden-size {params.vit[hidden_size]} --layers {params.vit[layers]} --heads {params.vit[heads]}"
        " --seed {params.vit[seed]} 2> {log}"


if "behaviour" in config["demo"]:

    rule demo_behaviour:
        input:
            f"{RES}/world/world.json",
        output:
            levels=f"{RES}/behaviour/levels.pkl",
            category=f"{RES}/behaviour/category_learning.csv",
            reward=f"{RES}/behaviour/reward_learning.csv",
            metadata=f"{RES}/behaviour/things_metadata.tsv",
            truth=f"{RES}/behaviour/ground_truth.json",
        log:
            f"{R}/logs/demo_behaviour.log",
        params:
            code=code_hash("demo-behaviour"),
            spec=as_json(config["demo"]["behaviour"]),
        shell:
            "python3 -m metalign demo-behaviour --world $(dirname {input}) --spec {params.spec} --out $(dirname {output.levels})"
            " 2> {log}"


if "fmri" in config["demo"]:

    rule demo_fmri:
        input:
            f"{RES}/world/world.json",
        output:
            f"{RES}/fmri/fmri.json",
        log:
            f"{R}/logs/demo_fmri.log",
        params:
            code=code_hash("demo-fmri"),
            spec=as_json(config["demo"]["fmri"]),
        shell:
            "python3 -m metalign demo-fmri --world $(dirname {input}) --spec {params.spec} --out $(dirname {output}) 2> {log}"


if "labelled" in config["demo"]:

    rule demo_labelled:
        input:
            f"{RES}/world/world.json",
        output:
            summary=f"{RES}/labelled/labelled.json",
            hierarchy=multiext(
                f"{RES}/labelled/breeds/", "dataset_class_info.json", "class_hierarchy.txt", "node_names.txt"
            ),
        log:
            f"{R}/logs/demo_labelled.log",
        params:
            code=code_hash("demo-labelled"),
            spec=as_json(config["demo"]["labelled"]),
        shell:
            "python3 -m metalign demo-labelled --world {input} --spec {params.spec} --out $(dirname {output.summary})"
            " 2> {log}"


if "planted" in config["demo"]:

    rule demo_planted:
        input:
            world=f"{RES}/world/world.json",
            labelled=[f"{RES}/labelled/labelled.json"] if "labelled" in config["demo"] else [],
        output:
            table=f"{RES}/planted/features.h5",
            summary=f"{RES}/planted/planted.json",
        log:
            f"{R}/logs/demo_planted.log",
        params:
            code=code_hash("demo-planted"),
            spec=as_json(config["demo"]["planted"]),
            labelled=lambda wc, input: f"--labelled $(dirname {input.labelled[0]})" if input.labelled else "",
        shell:
            "python3 -m metalign demo-planted --world $(dirname {input.world}) {params.labelled} --spec {params.spec}"
            " --out $(dirname {output.table}) 2> {log}"


if "effect" in config["demo"]:
    EFFECT = config["demo"]["effect"]

    rule demo_effect:
        input:
            tables=[
                f"{R}/alignment/{bench}{suffix}.csv"
                for bench in ("things_ooo", "levels_ooo", "category_learning", "reward_learning")
                for suffix in ("", "_stats")
            ],
            brain=[
                f"{R}/brain/{bench}_stats.csv"
                for bench in ("things_fmri", "bold5000")
                if bench in config["benchmarks"]
            ],
            downstream=expand(f"{R}/downstream/{{table}}.csv", table=["fewshot", "breeds", "imagenet_a"]),
            breeds_splits=f"{R}/downstream/breeds_splits.json",
            shape_bias=(
                [f"{R}/downstream/shape_bias/{EFFECT['backbone']}/base.json"]
                if "shape_bias" in config.get("downstream", {})
                else []
            ),
            icl=f"{R}/icl/{EFFECT['backbone']}/{EFFECT['planted']}.h5",
        output:
            report(f"{R}/alignment/planted_effect.csv", caption="../report/planted_effect.rst", category="Demo"),
        log:
            f"{R}/logs/demo_effect.log",
        params:
            code=code_hash("demo-effect"),
            effect=stable(EFFECT),
            controls=" ".join(EFFECT["controls"]),
            n_seeds=len(config["downstream"]["fewshot"]["seeds"]),
        shell:
            "python3 -m metalign demo-effect --results $(dirname $(dirname {output})) --backbone {params.effect[backbone]} --planted {params.effect[planted]}"
            " --controls {params.controls} --level {params.effect[level]} --shots {params.effect[shots]} --seeds {params.n_seeds} --out {output} 2> {log}"
