# The embedded demo world: procedural THINGS/COCO-shaped images, a planted concept embedding, simulated
# participants, and a small ViT saved in Hugging Face format.

rule demo_world:
    output:
        world=f"{RES}/world/world.json",
        triplets=f"{RES}/world/things/triplets.tsv",
        unique_ids=f"{RES}/world/things/unique_id.txt",
        planted=f"{RES}/world/things/spose_embedding_23d_sorted.txt",  # 23 = the factor space of metalign.demo.factors
    params:
        spec=as_json(config["demo"]["world"]),
        out=f"{RES}/world",
    log:
        f"{R}/logs/demo_world.log",
    shell:
        "{PY} demo-world --spec {params.spec} --out {params.out} 2> {log}"


rule demo_vit:
    output:
        f"{RES}/models/vit_tiny/config.json",
    params:
        vit=stable(config["demo"]["vit"]),
        out=f"{RES}/models/vit_tiny",
    log:
        f"{R}/logs/demo_vit.log",
    shell:
        "{PY} demo-vit --out {params.out} --image-size {params.vit[image_size]} --patch-size {params.vit[patch_size]}"
        " --hidden-size {params.vit[hidden_size]} --layers {params.vit[layers]} --heads {params.vit[heads]}"
        " --seed {params.vit[seed]} 2> {log}"
