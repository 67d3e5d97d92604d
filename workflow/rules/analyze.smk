# Tables: one tidy row per run, the long measure table, correlations, batch-size tests,
# invariance ratios, the Keskar interpolation and the generated findings.


rule aggregate:
    input:
        metrics=expand("results/runs/{run}/metrics.json", run=RUN_IDS),
        measures=expand("results/runs/{run}/measures.json", run=RUN_IDS),
    output:
        runs=report(
            "results/tables/runs.csv",
            caption="../report/runs.rst",
            category="Tables",
            labels={"table": "runs"},
        ),
        long=report(
            "results/tables/measures_long.csv",
            caption="../report/measures_long.rst",
            category="Tables",
            labels={"table": "measures (long)"},
        ),
        history="results/tables/history.csv",
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate/aggregate.tsv"
    conda:
        "../../envs/flatness.yaml"
    params:
        runs=run_table(),
    script:
        "../scripts/aggregate.py"


rule analyze:
    input:
        runs="results/tables/runs.csv",
        long="results/tables/measures_long.csv",
    output:
        kendall=report(
            "results/tables/kendall.csv",
            caption="../report/kendall.rst",
            category="Tables",
            labels={"table": "Kendall tau vs gap"},
        ),
        granulated=report(
            "results/tables/granulated_kendall.csv",
            caption="../report/granulated_kendall.rst",
            category="Tables",
            labels={"table": "granulated Kendall Psi"},
        ),
        batch=report(
            "results/tables/batch_comparison.csv",
            caption="../report/batch_comparison.rst",
            category="Tables",
            labels={"table": "large vs small batch"},
        ),
        invariance=report(
            "results/tables/invariance.csv",
            caption="../report/invariance.rst",
            category="Tables",
            labels={"table": "invariance ratios"},
        ),
        summary=report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
            labels={"table": "mean and std over seeds"},
        ),
        markdown="results/tables/analysis.md",
        findings="results/tables/findings.md",
        findings_html=report(
            "results/tables/findings.html",
            caption="../report/findings.rst",
            category="Findings",
            labels={"table": "findings"},
        ),
    log:
        "results/logs/analyze.log",
    benchmark:
        "results/benchmarks/analyze/analyze.tsv"
    conda:
        "../../envs/flatness.yaml"
    params:
        measures=MEASURE_LABELS,
        analysis=config["analysis"],
    script:
        "../scripts/analyze.py"


rule interpolate:
    input:
        unpack(pair_models),
    output:
        "results/interpolation/{pair}.csv",
    log:
        "results/logs/interpolate/{pair}.log",
    benchmark:
        "results/benchmarks/interpolate/{pair}.tsv"
    group:
        pair_group
    conda:
        "../../envs/flatness.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=uses_gpu(config["measure"]["device"]),
    params:
        pair_id="{pair}",
        small=lambda wc: PAIR_BY_ID[wc.pair].small,
        large=lambda wc: PAIR_BY_ID[wc.pair].large,
        data=pair_data,
        interpolation=config["interpolation"],
        device=config["measure"]["device"],
    script:
        "../scripts/interpolate.py"


rule collect_interpolation:
    input:
        expand("results/interpolation/{pair}.csv", pair=sorted(PAIR_BY_ID)),
    output:
        report(
            "results/tables/interpolation.csv",
            caption="../report/interpolation_table.rst",
            category="Tables",
            labels={"table": "interpolation"},
        ),
    log:
        "results/logs/collect_interpolation.log",
    benchmark:
        "results/benchmarks/collect_interpolation/collect_interpolation.tsv"
    conda:
        "../../envs/flatness.yaml"
    script:
        "../scripts/collect_interpolation.py"


rule paper:
    input:
        unpack(paper_inputs),
    output:
        table=report(
            "results/tables/paper.csv",
            caption="../report/paper_table.rst",
            category="Paper",
            labels={"table": "ours beside the paper"},
        ),
        markdown="results/tables/paper.md",
        rst="results/tables/paper.rst",
        html=report(
            "results/tables/paper.html",
            caption="../report/paper_verdicts.rst",
            category="Paper",
            labels={"table": "verdicts"},
        ),
        figure=report(
            "results/figures/paper.png",
            caption="../report/paper_figure.rst",
            category="Paper",
            labels={"figure": "the paper's figure, from our runs"},
        ),
    log:
        "results/logs/paper.log",
    benchmark:
        "results/benchmarks/paper/paper.tsv"
    conda:
        "../../envs/flatness.yaml"
    params:
        study=PAPER,
        analysis=config["analysis"],
    script:
        "../scripts/paper.py"


rule sensitivity:
    input:
        unpack(sensitivity_inputs),
    output:
        table=report(
            "results/tables/sensitivity.csv",
            caption="../report/sensitivity.rst",
            category="Paper",
            labels={"table": "a measure vs its own settings"},
        ),
        figure=report(
            "results/figures/sensitivity.png",
            caption="../report/sensitivity.rst",
            category="Paper",
            labels={"figure": "a measure vs its own settings"},
        ),
    log:
        "results/logs/sensitivity.log",
    benchmark:
        "results/benchmarks/sensitivity/sensitivity.tsv"
    conda:
        "../../envs/flatness.yaml"
    threads: 1
    params:
        runs=SENSITIVITY_RUNS,
        data=lambda wc: dict(
            study_run(SENSITIVITY_RUNS[0]).config["data"], augment=False
        ),
        measure=config["measure"],
        sensitivity=SENSITIVITY,
    script:
        "../scripts/sensitivity.py"
