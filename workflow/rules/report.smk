# Figures: papermill notebooks that read only tables, executed by scripts/figure.py with every
# named input (but the notebook) as a parameter. The notebook is an input, so editing it redraws
# its figure; its cell tagged `parameters` lets it run standalone too:
#   papermill workflow/notebooks/invariance.py.ipynb out.ipynb -p long results/tables/measures_long.csv


rule fig_measures_by_batch:
    input:
        notebook=notebook("measures_by_batch"),
        runs="results/tables/runs.csv",
        long="results/tables/measures_long.csv",
    output:
        report(
            "results/figures/measures_by_batch.png",
            caption="../report/fig_measures_by_batch.rst",
            category="Figures",
            labels={"figure": "measure by batch size and regulariser"},
        ),
    log:
        notebook="results/logs/notebooks/measures_by_batch.ipynb",
        stderr="results/logs/notebooks/measures_by_batch.log",
    benchmark:
        "results/benchmarks/fig_measures_by_batch/fig_measures_by_batch.tsv"
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/figure.py"


rule fig_invariance:
    input:
        notebook=notebook("invariance"),
        long="results/tables/measures_long.csv",
    output:
        report(
            "results/figures/invariance_alpha.png",
            caption="../report/fig_invariance.rst",
            category="Figures",
            labels={"figure": "measure vs Dinh alpha"},
        ),
    log:
        notebook="results/logs/notebooks/invariance.ipynb",
        stderr="results/logs/notebooks/invariance.log",
    benchmark:
        "results/benchmarks/fig_invariance/fig_invariance.tsv"
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/figure.py"


rule fig_measure_vs_gap:
    input:
        notebook=notebook("measure_vs_gap"),
        runs="results/tables/runs.csv",
        long="results/tables/measures_long.csv",
        kendall="results/tables/kendall.csv",
    output:
        report(
            "results/figures/measure_vs_gap.png",
            caption="../report/fig_measure_vs_gap.rst",
            category="Figures",
            labels={"figure": "measure vs generalisation gap"},
        ),
    log:
        notebook="results/logs/notebooks/measure_vs_gap.ipynb",
        stderr="results/logs/notebooks/measure_vs_gap.log",
    benchmark:
        "results/benchmarks/fig_measure_vs_gap/fig_measure_vs_gap.tsv"
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/figure.py"


rule fig_training_curves:
    input:
        notebook=notebook("training_curves"),
        history="results/tables/history.csv",
    output:
        report(
            "results/figures/training_curves.png",
            caption="../report/fig_training_curves.rst",
            category="Figures",
            labels={"figure": "training curves"},
        ),
    log:
        notebook="results/logs/notebooks/training_curves.ipynb",
        stderr="results/logs/notebooks/training_curves.log",
    benchmark:
        "results/benchmarks/fig_training_curves/fig_training_curves.tsv"
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/figure.py"


rule fig_interpolation:
    input:
        notebook=notebook("interpolation"),
        table="results/tables/interpolation.csv",
    output:
        report(
            "results/figures/interpolation.png",
            caption="../report/fig_interpolation.rst",
            category="Figures",
            labels={"figure": "small-to-large-batch interpolation"},
        ),
    log:
        notebook="results/logs/notebooks/interpolation.ipynb",
        stderr="results/logs/notebooks/interpolation.log",
    benchmark:
        "results/benchmarks/fig_interpolation/fig_interpolation.tsv"
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/figure.py"


rule front_page:
    input:
        unpack(front_page_extra),
        intro=source_file("workflow", "report", "workflow.rst"),
        runs="results/tables/runs.csv",
        batch="results/tables/batch_comparison.csv",
        kendall="results/tables/kendall.csv",
        invariance="results/tables/invariance.csv",
        figure="results/figures/invariance_alpha.png",
    output:
        FRONT_PAGE,
    log:
        "results/logs/front_page.log",
    benchmark:
        "results/benchmarks/front_page/front_page.tsv"
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/front_page.py"


# Job costs (COST_RULES, benchmark_files and job_sources live in common.smk).


rule startup_probe:
    output:
        "results/tables/startup.csv",
    log:
        "results/logs/startup_probe.log",
    conda:
        "../../envs/flatness.yaml"
    params:
        jobs=job_sources,
        repeats=1,
    script:
        "../scripts/startup_probe.py"


rule costs:
    input:
        unpack(benchmark_files),
        startup="results/tables/startup.csv",
    output:
        report(
            "results/tables/costs.csv",
            caption="../report/costs.rst",
            category="Tables",
            labels={"table": "job costs (time, CPU, memory, start-up)"},
        ),
    log:
        "results/logs/costs.log",
    conda:
        "../../envs/flatness.yaml"
    params:
        jobs=job_sources,
    script:
        "../scripts/costs.py"


rule report:
    input:
        report_inputs(),
