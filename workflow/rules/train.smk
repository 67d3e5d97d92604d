# Training: one job per grid point. threads = the job's torch threads: 1 here, so two small jobs
# share 2 cores without oversubscribing (process start-up and data loading are serial anyway);
# profiles raise it (set-threads). Checkpoints live in the undeclared results/ckpt/{run}/, so a
# retried or re-run job resumes instead of starting over (Snakemake deletes declared outputs).


rule train:
    output:
        model="results/runs/{run}/model.pt",
        metrics="results/runs/{run}/metrics.json",
    log:
        "results/logs/train/{run}.log",
    benchmark:
        "results/benchmarks/train/{run}.tsv"
    retries: 1
    group:
        run_group
    conda:
        "../../envs/flatness.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(120),
        gpu=run_gpu,
    params:
        run_id="{run}",
        axes=run_axes,
        config=run_config,
        resume_dir="results/ckpt/{run}",
    script:
        "../scripts/train.py"


rule train_all:
    input:
        expand("results/runs/{run}/metrics.json", run=RUN_IDS),
