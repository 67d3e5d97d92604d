"""Where a study's time goes: Snakemake ``benchmark:`` records → one cost row per rule.

Pure: frames in, a table out. Reading the TSVs and timing the start-up probes is the job of
workflow/scripts/costs.py; :func:`script_imports` and :func:`notebook_imports` only read source
text, so the probes replay exactly the import statements a job runs before its real work.

>>> bench = pd.DataFrame({"rule": ["a", "a", "b"], "s": [10.0, 30.0, 4.0],
...                       "cpu_time": [9.0, 29.0, 3.0], "max_rss": [100.0, 150.0, 80.0]})
>>> table = cost_table(bench, pd.DataFrame({"rule": ["a", "b"], "startup_s": [2.0, 2.0]}))
>>> table[["rule", "jobs", "core_s", "startup_core_s", "startup_share"]].to_dict("records")[-1]
{'rule': 'total', 'jobs': 3, 'core_s': 44.0, 'startup_core_s': 6.0, 'startup_share': 0.13636363636363635}
"""

from __future__ import annotations

import ast

import numpy as np
import pandas as pd

#: What the ``script:`` preamble imports before the script's first line (Snakemake 9: it unpickles
#: the ``snakemake`` object, which needs snakemake.iocontainers, then imports the logger).
PREAMBLE_IMPORTS = (
    "import pickle",
    "import snakemake.iocontainers",
    "from snakemake.logging import logger",
)

#: Columns of :func:`cost_table`, in order.
COST_COLUMNS = (
    "rule",
    "jobs",
    "threads",
    "wall_s",
    "wall_s_per_job",
    "core_s",
    "core_share",
    "cpu_s",
    "cpu_s_per_job",
    "max_rss_mb",
    "startup_s_per_job",
    "startup_core_s",
    "startup_share",
)


def script_imports(source: str) -> list[str]:
    """The module-level ``import`` / ``from … import`` statements of a Python source, in order.

    >>> script_imports("import sys\\nfrom a.b import c as d, e\\nx = 1\\nif x:\\n    import os\\n")
    ['import sys', 'from a.b import c as d, e']
    """
    tree = ast.parse(source)
    return [
        ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.Import)
        # relative imports are not runnable outside their package; __future__ costs nothing
        or (isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__")
    ]


def notebook_imports(notebook: dict) -> list[str]:
    """The top-level import statements of every code cell of a notebook (nbformat 4 JSON).

    >>> notebook_imports({"cells": [{"cell_type": "code", "source": ["import numpy as np\\n", "x = 1"]},
    ...                              {"cell_type": "markdown", "source": "import nothing"}]})
    ['import numpy as np']
    """
    lines: list[str] = []
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        # IPython magics and shell escapes are not Python: drop them before parsing.
        source = "\n".join(
            line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        lines += [s for s in script_imports(source) if s not in lines]
    return lines


def cost_table(benchmarks: pd.DataFrame, startup: pd.DataFrame) -> pd.DataFrame:
    """One row per rule (most core-seconds first) and a final ``total`` row.

    ``benchmarks``: one row per job with ``rule``, ``s`` (wall seconds), ``cpu_time`` (seconds),
    ``max_rss`` (MB) as Snakemake's benchmark TSV has them (NaN where it sampled nothing) and
    optionally ``threads`` (the job's cores; 1 when absent). ``startup``: ``rule``, ``startup_s``
    (seconds one job of that rule spends before its real work); rules missing from it count 0.

    - ``core_s`` = Σ wall × threads (the cores the job held); ``core_share`` = its part of the total.
    - ``startup_core_s`` = Σ min(startup, wall) × threads: a job never starts up for longer than it ran.
    - ``startup_share`` = startup_core_s / core_s, per rule and, in the total row, for the study.
    - ``cpu_s`` and ``max_rss_mb`` skip unsampled jobs (NaN when no job of the rule was sampled).
    """
    b = benchmarks.copy()
    if "threads" not in b:
        b["threads"] = 1
    for col in ("s", "cpu_time", "max_rss", "threads"):
        b[col] = pd.to_numeric(b[col], errors="coerce")
    b["threads"] = b["threads"].fillna(1)
    per_job_startup = dict(zip(startup["rule"], pd.to_numeric(startup["startup_s"]), strict=True))
    b["startup_s"] = b["rule"].map(per_job_startup).fillna(0.0)
    b["core_s"] = b["s"] * b["threads"]
    b["startup_core_s"] = np.minimum(b["startup_s"], b["s"]) * b["threads"]

    grouped = b.groupby("rule", sort=False)
    table = pd.DataFrame(
        {
            "jobs": grouped.size(),
            "threads": grouped["threads"].max(),
            "wall_s": grouped["s"].sum(),
            "core_s": grouped["core_s"].sum(),
            "cpu_s": grouped["cpu_time"].sum(min_count=1),
            "max_rss_mb": grouped["max_rss"].max(),
            "startup_s_per_job": grouped["startup_s"].first(),
            "startup_core_s": grouped["startup_core_s"].sum(),
        }
    )
    table["cpu_jobs"] = grouped["cpu_time"].count()
    table = table.sort_values("core_s", ascending=False, kind="stable")
    total = pd.DataFrame(
        {
            "jobs": [table["jobs"].sum()],
            "threads": [table["threads"].max()],
            "wall_s": [table["wall_s"].sum()],
            "core_s": [table["core_s"].sum()],
            "cpu_s": [table["cpu_s"].sum(min_count=1)],
            "max_rss_mb": [table["max_rss_mb"].max()],
            "startup_s_per_job": [
                b["startup_s"].mean() if len(b) else np.nan
            ],  # mean over all jobs
            "startup_core_s": [table["startup_core_s"].sum()],
            "cpu_jobs": [table["cpu_jobs"].sum()],
        },
        index=pd.Index(["total"], name="rule"),
    )
    table = pd.concat([table, total])
    table.index.name = "rule"
    table["wall_s_per_job"] = table["wall_s"] / table["jobs"]
    table["cpu_s_per_job"] = table["cpu_s"] / table["cpu_jobs"].replace(0, np.nan)
    grand = table.loc["total", "core_s"]
    table["core_share"] = table["core_s"] / grand if grand > 0 else np.nan
    table["startup_share"] = table["startup_core_s"] / table["core_s"].replace(0, np.nan)
    table = table.reset_index()
    table["jobs"] = table["jobs"].astype(int)
    table["threads"] = table["threads"].astype(int)
    return table[list(COST_COLUMNS)]
