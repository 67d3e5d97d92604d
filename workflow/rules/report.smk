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
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/figure.py"


rule front_page:
    input:
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
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/front_page.py"


rule report:
    input:
        report_inputs(),
