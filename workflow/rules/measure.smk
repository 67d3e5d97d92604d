# Measures: every configured measure on each trained model and on reparameterised copies of it.


rule measure:
    input:
        model="results/runs/{run}/model.pt",
        metrics="results/runs/{run}/metrics.json",
    output:
        "results/runs/{run}/measures.json",
    log:
        "results/logs/measure/{run}.log",
    benchmark:
        "results/benchmarks/measure/{run}.tsv"
    group:
        run_group
    conda:
        "../../envs/flatness.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(120),
        gpu=uses_gpu(config["measure"]["device"]),
    params:
        run_id="{run}",
        data=run_data,
        measure=config["measure"],
    script:
        "../scripts/measure.py"


rule measure_all:
    input:
        expand("results/runs/{run}/measures.json", run=RUN_IDS),
