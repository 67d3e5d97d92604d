# Validation, the run table and small input/param helpers shared by every stage.
import os
import re

from flatness.suite import (
    batch_pairs,
    expand_grid,
    measure_specs,
    variants_from_config,
)
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

# `snakemake --report report/report.html` does not create the folder (9.27.1); DESIGN contract 3.
os.makedirs("report", exist_ok=True)

try:
    RUNS = expand_grid(config)
    MEASURE_SPECS = measure_specs(config["measure"]["measures"])
except ValueError as err:
    raise WorkflowError(f"invalid config: {err}") from None

RUN_BY_ID = {r.run_id: r for r in RUNS}
RUN_IDS = sorted(RUN_BY_ID)
PAIRS = (
    batch_pairs(RUNS, config["interpolation"]["pair_across"])
    if config["interpolation"]["enabled"]
    else []
)
PAIR_BY_ID = {p.pair_id: p for p in PAIRS}
MEASURE_LABELS = [s.label for s in MEASURE_SPECS]
VARIANT_NAMES = [v.name for v in variants_from_config(config["measure"])]


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUN_IDS),
    pair="|".join(re.escape(p) for p in PAIR_BY_ID) or "(?!x)x",


def run_config(wildcards):
    """The resolved flatness.config.RunConfig dict of one run (its single source: the grid)."""
    return RUN_BY_ID[wildcards.run].config


def run_axes(wildcards):
    """The grid point of one run (axis → value), recorded in its metrics.json."""
    return RUN_BY_ID[wildcards.run].axes


def run_table():
    """Hyperparameter columns of every run, for the aggregate table (joined on run_id)."""
    return [dict(run_id=r.run_id, **r.axes) for r in RUNS]


def uses_gpu(device):
    # "auto" runs on CUDA whenever the job sees a GPU, so it must hold one for --resources gpu=N.
    return 1 if device in ("cuda", "auto") else 0


def pair_models(wildcards):
    pair = PAIR_BY_ID[wildcards.pair]
    return {
        "small": f"results/runs/{pair.small}/model.pt",
        "large": f"results/runs/{pair.large}/model.pt",
    }


def pair_data(wildcards):
    """Data config of a pair (both runs share it), without augmentation."""
    return dict(
        RUN_BY_ID[PAIR_BY_ID[wildcards.pair].small].config["data"], augment=False
    )


def source_file(*parts):
    """Path of a file of this repository relative to the working directory (runs with
    --directory find it).

    Not workflow.source_path: that gives a per-invocation cache path, so the `params` of every
    figure job changed on each run and `-n` was never clean.
    """
    return os.path.relpath(os.path.join(workflow.basedir, *parts))


def notebook(name):
    """Path of a figure notebook (an input of its figure rule: editing it redraws the figure)."""
    return source_file("workflow", "notebooks", f"{name}.py.ipynb")


def report_inputs():
    """Every figure and the headline tables: what `rule report` (and `rule all`) builds."""
    figures = [
        "results/figures/measures_by_batch.png",
        "results/figures/invariance_alpha.png",
        "results/figures/measure_vs_gap.png",
        "results/figures/training_curves.png",
    ]
    if PAIRS:
        figures.append("results/figures/interpolation.png")
    tables = [
        "runs",
        "measures_long",
        "kendall",
        "granulated_kendall",
        "batch_comparison",
    ]
    tables += ["invariance", "summary"] + (["interpolation"] if PAIRS else [])
    return (
        figures
        + [f"results/tables/{t}.csv" for t in tables]
        + [
            "results/tables/findings.html",
            "results/tables/analysis.md",
            FRONT_PAGE,
        ]
    )
