# Validation, the run table and small input/param helpers shared by every stage.
import inspect
import os

from flatness.suite import (
    batch_pairs,
    expand_grid,
    id_regex,
    measure_specs,
    variants_from_config,
)
from flatness.paper_specs import missing_measures
from flatness.trajectory import check_curvature, epoch_measure_config
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

# `snakemake --report report/report.html` does not create the folder (9.27.1); DESIGN contract 3.
os.makedirs("report", exist_ok=True)

try:
    RUNS = expand_grid(config)
    MEASURE_SPECS = measure_specs(config["measure"]["measures"])
    check_curvature(config)
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
# The paper this study reproduces (flatness.analysis.papers), or None; its table's measures must
# be measured, which is checked here rather than after hours of training.
PAPER = config["paper"]["study"]
_missing = missing_measures(PAPER, MEASURE_LABELS)
if _missing:
    raise WorkflowError(
        f"invalid config: paper.study = {PAPER!r} reads the measure labels {_missing}; "
        "add them to measure.measures (label: ...)"
    )
VARIANT_NAMES = [v.name for v in variants_from_config(config["measure"])]
# Curvature along training (trajectory.epochs), per-layer profiles and spectra: off when empty.
TRAJECTORY_EPOCHS = sorted(config["trajectory"]["epochs"])
LAYER_MEASURES = config["layer_profile"]["measures"]
SPECTRUM = config["spectrum"]


# {run} and {pair} match exactly the study's ids, so no rule claims another path. id_regex factors
# the ids like the grid (≈ 150 characters for 1,000 runs): Snakemake embeds the constraint in every
# file pattern and rescans it on each wildcard substitution, and an alternation of every id
# (≈ 40 kB) made DAG building cost ≈ 7 ms a job. Lookups below re-check membership all the same.
wildcard_constraints:
    run=id_regex(RUN_IDS),
    pair=id_regex(sorted(PAIR_BY_ID)),
    epoch=r"\d+",


def per_job(func):
    """`func` with its signature computed once, for the functions Snakemake calls per job.

    Snakemake reads the signature of an input, params, resources or group function
    (inspect.signature, ≈ 10 µs) on every call, ≈ 30,000 times on a 1,000-run grid; a stored
    `__signature__` (PEP 362) makes that a lookup.
    """
    func.__signature__ = inspect.signature(func)
    return func


def per_attempt(amount):
    """A resource of `amount` × the attempt: a retried job asks for more."""
    return per_job(lambda wildcards, attempt: amount * attempt)


# SLURM job grouping. A profile that sets `group-components: {runs: N, pairs: M}` (profiles/slurm)
# packs N runs (each run's train and measure jobs) into one sbatch job, and M interpolation pairs
# into another, once the study has more runs (pairs) than that: a 1,000-run grid is then ≈ 60
# submissions instead of 2,200. Smaller studies, and local runs (Snakemake ignores groups there),
# keep one job per rule. The profile's `resources: {gpu: 1}` with `set-resource-scopes: {gpu: local}`
# makes each group hold one GPU and run its GPU jobs one after another (a group sums the
# resources of jobs it runs side by side, WORKFLOW_NOTES §8.2).
# Functions, not values: the group settings reach the workflow after this file is read.
def group_if_larger(name, n_items):
    """`name` when the profile's group size for it is > 1 and below `n_items`, else None."""
    settings = getattr(workflow, "group_settings", None)
    size = settings.group_components.get(name, 1) if settings is not None else 1
    return name if 1 < size < n_items else None


@per_job
def run_group(wildcards):
    """The `group:` of a run's train and measure jobs."""
    return group_if_larger("runs", len(RUNS))


@per_job
def pair_group(wildcards):
    """The `group:` of an interpolation job."""
    return group_if_larger("pairs", len(PAIRS))


def study_run(run_id):
    """The grid's Run of `run_id`; a WorkflowError (not a KeyError) for an id outside the study."""
    try:
        return RUN_BY_ID[run_id]
    except KeyError:
        raise WorkflowError(
            f"{run_id!r} is not a run of this study ({len(RUN_BY_ID)} runs, "
            f"e.g. {RUN_IDS[0]!r})"
        ) from None


def study_pair(pair_id):
    """The Pair of `pair_id`; a WorkflowError for an id outside the study."""
    try:
        return PAIR_BY_ID[pair_id]
    except KeyError:
        raise WorkflowError(
            f"{pair_id!r} is not an interpolation pair of this study"
        ) from None


@per_job
def run_config(wildcards):
    """The resolved flatness.config.RunConfig dict of one run (its single source: the grid)."""
    return study_run(wildcards.run).config


@per_job
def run_axes(wildcards):
    """The grid point of one run (axis → value), recorded in its metrics.json."""
    return study_run(wildcards.run).axes


def run_table():
    """Hyperparameter columns of every run, for the aggregate table (joined on run_id)."""
    return [dict(run_id=r.run_id, **r.axes) for r in RUNS]


def uses_gpu(device):
    # "auto" runs on CUDA whenever the job sees a GPU, so it must hold one for --resources gpu=N.
    return 1 if device in ("cuda", "auto") else 0


@per_job
def run_gpu(wildcards):
    """The `gpu` resource of a run's train job (its training device)."""
    return uses_gpu(run_config(wildcards)["device"])


@per_job
def run_data(wildcards):
    """Data config of a run without augmentation (what its measures see)."""
    return dict(run_config(wildcards)["data"], augment=False)


@per_job
def pair_models(wildcards):
    pair = study_pair(wildcards.pair)
    return {
        "small": f"results/runs/{pair.small}/model.pt",
        "large": f"results/runs/{pair.large}/model.pt",
    }


@per_job
def pair_data(wildcards):
    """Data config of a pair (both runs share it), without augmentation."""
    return dict(
        study_run(study_pair(wildcards.pair).small).config["data"], augment=False
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
    tables.append("costs")  # every job's benchmark → time per rule (rule costs)
    if PAPER:
        figures.append("results/figures/paper.png")
        tables.append("paper")
    if SENSITIVITY_RUNS:
        figures.append("results/figures/sensitivity.png")
        tables.append("sensitivity")
    for name, on in CURVATURE_OUTPUTS.items():
        if on:
            figures.append(f"results/figures/{name}.png")
            tables.append(name)
    return (
        figures
        + [f"results/tables/{t}.csv" for t in tables]
        + [
            "results/tables/findings.html",
            "results/tables/analysis.md",
            FRONT_PAGE,
        ]
    )


# Job costs: every job's benchmark (results/benchmarks/<rule>/<job>.tsv) → one row per rule, with
# the share of job start-up measured by replaying each job's imports (workflow/report/costs.rst).
# Only jobs upstream of this table: `report` (and `costs` itself) would depend on it.
COST_RULES = [
    "train",
    "measure",
    "aggregate",
    "analyze",
    "fig_measures_by_batch",
    "fig_invariance",
    "fig_measure_vs_gap",
    "fig_training_curves",
    "front_page",
] + (["interpolate", "collect_interpolation", "fig_interpolation"] if PAIRS else [])


# Sensitivity of one measure to its own settings (paper.sensitivity): on the first seed's
# smallest- and largest-batch runs that share every other axis.
SENSITIVITY = config["paper"]["sensitivity"]
SENSITIVITY_RUNS = []
if SENSITIVITY.get("function"):
    _varied = {SENSITIVITY["option"]: None} if SENSITIVITY.get("option") else {}
    try:  # the function and every option key must exist, as for measure.measures
        measure_specs([{"function": SENSITIVITY["function"],
                        "options": {**SENSITIVITY["options"], **_varied}}])  # fmt: skip
    except ValueError as err:
        raise WorkflowError(f"invalid config: paper.sensitivity: {err}") from None
    _first = min(RUNS, key=lambda r: (r.axes["seed"], r.axes["batch_size"], r.run_id))
    _peers = [
        r
        for r in RUNS
        if all(r.axes[a] == _first.axes[a] for a in r.axes if a != "batch_size")
    ]
    SENSITIVITY_RUNS = sorted(
        {min(_peers, key=lambda r: r.axes["batch_size"]).run_id,
         max(_peers, key=lambda r: r.axes["batch_size"]).run_id}
    )  # fmt: skip


COST_RULES += (["paper"] if PAPER else []) + (
    ["sensitivity"] if SENSITIVITY_RUNS else []
)
# table/figure name → whether the study turns it on (workflow/rules/curvature.smk)
CURVATURE_OUTPUTS = {
    "trajectory": bool(TRAJECTORY_EPOCHS),
    "layer_profile": bool(LAYER_MEASURES),
    "spectrum": bool(SPECTRUM["enabled"]),
}
COST_RULES += (
    (["snapshot", "measure_epoch"] if TRAJECTORY_EPOCHS else [])
    + (["layers"] if LAYER_MEASURES else [])
    + (["spectrum_run"] if SPECTRUM["enabled"] else [])
    + [name for name, on in CURVATURE_OUTPUTS.items() if on]
)


def paper_inputs(wildcards):
    """The tables rule paper reads (the interpolation only where the study has pairs)."""
    files = {
        "runs": "results/tables/runs.csv",
        "long": "results/tables/measures_long.csv",
    }
    if PAIRS:
        files["interpolation"] = "results/tables/interpolation.csv"
    if SENSITIVITY_RUNS:
        files["sensitivity"] = "results/tables/sensitivity.csv"
    return files


def sensitivity_inputs(wildcards):
    """The models and metrics of the sensitivity runs."""
    return {
        f"{kind}_{i}": f"results/runs/{run}/{kind}.{ext}"
        for i, run in enumerate(SENSITIVITY_RUNS)
        for kind, ext in (("model", "pt"), ("metrics", "json"))
    }


def front_page_extra(wildcards):
    """The paper section of the front page, for a study that reproduces a paper."""
    return {"paper": "results/tables/paper.rst"} if PAPER else {}


def benchmark_files(wildcards):
    """rule → the benchmark files of all its jobs (named inputs of rule costs)."""
    files = {}
    for name in COST_RULES:
        pattern = getattr(rules, name).benchmark
        if "{epoch}" in pattern:
            files[name] = expand(pattern, run=RUN_IDS, epoch=TRAJECTORY_EPOCHS)
        elif "{run}" in pattern:
            files[name] = expand(pattern, run=RUN_IDS)
        elif "{pair}" in pattern:
            files[name] = expand(pattern, pair=sorted(PAIR_BY_ID))
        else:
            files[name] = [pattern]
    return files


def job_sources(wildcards):
    """Each cost rule's script, notebook (figure rules) and threads (what the start-up probe replays)."""
    sources = {}
    for name in COST_RULES:
        job_rule = workflow.get_rule(name)
        threads = job_rule.resources.get("_cores") or 1
        sources[name] = {
            "script": source_file(
                "workflow", "scripts", os.path.basename(job_rule.script)
            ),
            "notebook": (
                notebook(name.removeprefix("fig_")) if name.startswith("fig_") else None
            ),
            "threads": threads if isinstance(threads, int) else 1,
        }
    return sources
