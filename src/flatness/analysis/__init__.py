"""Study analysis: tables joined on run identity, statistics with intervals, generated findings.

- :mod:`~flatness.analysis.integrity`: read per-run files back by the id they record; sanity checks.
- :mod:`~flatness.analysis.tables`: runs.csv, history.csv, mean ± std over seeds.
- :mod:`~flatness.analysis.stats`: Kendall τ, granulated Ψ, batch-size effects, invariance, bootstrap.
- :mod:`~flatness.analysis.findings`: sentences and the report's front page.
- :mod:`~flatness.analysis.costs`: benchmark records → where the study's time goes, per rule.
"""

from flatness.analysis.costs import (
    COST_COLUMNS,
    PREAMBLE_IMPORTS,
    cost_table,
    notebook_imports,
    script_imports,
)
from flatness.analysis.findings import (
    findings,
    findings_markdown,
    front_page_rst,
    invariant_measures,
)
from flatness.analysis.integrity import (
    StudyIntegrityError,
    check_study,
    read_measures,
    read_metrics,
    read_per_run,
    run_problems,
)
from flatness.analysis.stats import (
    BATCH_OUTCOMES,
    GAPS,
    HYPERPARAMETER_AXES,
    batch_comparison,
    bootstrap_ci,
    cliffs_delta,
    cliffs_delta_batch,
    granulated_kendall,
    hedges_g,
    invariance_table,
    kendall_table,
    kendall_tau_b,
    mean_difference,
    sharpness_sign,
    varying_axes,
)
from flatness.analysis.tables import (
    OUTCOMES,
    history_table,
    markdown_tables,
    runs_table,
    seed_summary,
)

__all__ = [
    "BATCH_OUTCOMES",
    "COST_COLUMNS",
    "GAPS",
    "HYPERPARAMETER_AXES",
    "OUTCOMES",
    "PREAMBLE_IMPORTS",
    "StudyIntegrityError",
    "batch_comparison",
    "bootstrap_ci",
    "check_study",
    "cliffs_delta",
    "cliffs_delta_batch",
    "cost_table",
    "findings",
    "findings_markdown",
    "front_page_rst",
    "granulated_kendall",
    "hedges_g",
    "history_table",
    "invariance_table",
    "invariant_measures",
    "kendall_tau_b",
    "kendall_table",
    "markdown_tables",
    "mean_difference",
    "notebook_imports",
    "read_measures",
    "read_per_run",
    "read_metrics",
    "run_problems",
    "runs_table",
    "script_imports",
    "seed_summary",
    "sharpness_sign",
    "varying_axes",
]
