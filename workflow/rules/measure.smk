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
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=uses_gpu(config["measure"]["device"]),
    params:
        run_id="{run}",
        data=lambda wc: dict(run_config(wc)["data"], augment=False),
        measure=config["measure"],
    script:
        "../scripts/measure.py"


rule measure_all:
    input:
        expand("results/runs/{run}/measures.json", run=RUN_IDS),
