# Figures, each placed in `snakemake --report` with its caption (workflow/report/).


rule figure_things_ooo:
    input:
        f"{R}/alignment/things_ooo.csv",
    output:
        report(f"{R}/figures/things_ooo.png", caption="../workflow/report/things_ooo.rst", category="Alignment"),
    log:
        f"{R}/logs/figures/things_ooo.log",
    shell:
        "{PY} figure-things --table {input} --out {output} 2> {log}"


rule figure_learning_curves:
    input:
        expand(f"{R}/checkpoints/{{backbone}}/{{variant}}.metrics.csv", backbone=BACKBONES, variant=VARIANTS),
    output:
        report(f"{R}/figures/learning_curves.png", caption="../workflow/report/learning_curves.rst", category="Training"),
    log:
        f"{R}/logs/figures/learning_curves.log",
    shell:
        "{PY} figure-curves --metrics {input} --out {output} 2> {log}"


rule report_all:
    input:
        f"{R}/alignment/things_ooo.csv",
        f"{R}/figures/things_ooo.png",
        f"{R}/figures/learning_curves.png",
