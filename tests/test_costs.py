"""The cost table: sums, per-job means and start-up shares recomputed by hand on synthetic benchmark
frames, the import extraction the start-up probe replays, and the table the tiny study produces."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from flatness.analysis import (
    COST_COLUMNS,
    PREAMBLE_IMPORTS,
    cost_table,
    notebook_imports,
    script_imports,
)
from tests.workflow_helpers import REPO, tiny_study  # noqa: F401

BENCH_COLUMNS = ["s", "h:m:s", "max_rss", "max_vms", "max_uss", "max_pss", "io_in", "io_out",
                 "mean_load", "cpu_time"]  # fmt: skip


def bench_frame(rows):
    """Rows of (rule, s, cpu_time, max_rss[, threads]) as Snakemake's TSV columns plus `rule`."""
    records = []
    for row in rows:
        rule, s, cpu, rss, *threads = row
        record = dict.fromkeys(BENCH_COLUMNS, 0.0)
        record.update(rule=rule, s=s, cpu_time=cpu, max_rss=rss, **{"h:m:s": "0:00:01"})
        if threads:
            record["threads"] = threads[0]
        records.append(record)
    return pd.DataFrame(records)


def startup_frame(**per_rule):
    return pd.DataFrame({"rule": list(per_rule), "startup_s": list(per_rule.values())})


def test_sums_means_and_shares_match_a_hand_computation():
    bench = bench_frame(
        [
            ("train", 40.0, 38.0, 500.0),
            ("train", 20.0, 19.0, 700.0),
            ("train", 30.0, 28.0, 600.0),
            ("measure", 10.0, 9.0, 800.0),
            ("measure", 14.0, 12.0, 300.0),
            ("aggregate", 2.0, 1.5, 100.0),
        ]
    )
    table = cost_table(bench, startup_frame(train=3.0, measure=4.0, aggregate=1.0))
    assert list(table.columns) == list(COST_COLUMNS)
    assert list(table["rule"]) == ["train", "measure", "aggregate", "total"]  # most core-s first
    row = table.set_index("rule")

    assert row.loc["train", "jobs"] == 3 and row.loc["measure", "jobs"] == 2
    assert row.loc["train", "wall_s"] == pytest.approx(90.0)
    assert row.loc["train", "wall_s_per_job"] == pytest.approx(30.0)
    assert row.loc["train", "cpu_s"] == pytest.approx(85.0)
    assert row.loc["train", "cpu_s_per_job"] == pytest.approx(85.0 / 3)
    assert row.loc["train", "max_rss_mb"] == 700.0
    assert row.loc["measure", "max_rss_mb"] == 800.0

    total = 90.0 + 24.0 + 2.0
    assert row.loc["total", "jobs"] == 6
    assert row.loc["total", "core_s"] == pytest.approx(total)
    assert row.loc["total", "cpu_s"] == pytest.approx(85.0 + 21.0 + 1.5)
    assert row.loc["total", "max_rss_mb"] == 800.0
    assert row.loc["train", "core_share"] == pytest.approx(90.0 / total)
    assert row["core_share"].drop("total").sum() == pytest.approx(1.0)

    assert row.loc["train", "startup_core_s"] == pytest.approx(9.0)
    assert row.loc["train", "startup_share"] == pytest.approx(9.0 / 90.0)
    assert row.loc["measure", "startup_share"] == pytest.approx(8.0 / 24.0)
    assert row.loc["total", "startup_core_s"] == pytest.approx(9.0 + 8.0 + 1.0)
    assert row.loc["total", "startup_share"] == pytest.approx(18.0 / total)
    assert row.loc["total", "startup_s_per_job"] == pytest.approx(18.0 / 6)


def test_threads_scale_core_seconds_and_startup_never_exceeds_a_jobs_wall_time():
    bench = bench_frame([("train", 10.0, 18.0, 1.0, 2), ("fig", 0.8, 0.5, 1.0)])
    row = cost_table(bench, startup_frame(train=2.0, fig=3.0)).set_index("rule")
    assert row.loc["train", "core_s"] == pytest.approx(20.0)
    assert row.loc["train", "threads"] == 2
    assert row.loc["train", "startup_core_s"] == pytest.approx(4.0)  # 2 s × 2 cores held
    # a 0.8 s job cannot have started up for 3 s: capped at its wall time
    assert row.loc["fig", "startup_core_s"] == pytest.approx(0.8)
    assert row.loc["fig", "startup_share"] == pytest.approx(1.0)
    assert row.loc["total", "startup_share"] == pytest.approx(4.8 / 20.8)


def test_unsampled_jobs_and_rules_without_a_probe():
    bench = bench_frame(
        [("a", 5.0, np.nan, np.nan), ("a", 7.0, 6.0, 50.0), ("b", 0.3, np.nan, np.nan)]
    )
    row = cost_table(bench, startup_frame(a=1.0)).set_index("rule")
    assert row.loc["a", "cpu_s"] == pytest.approx(6.0)
    assert row.loc["a", "cpu_s_per_job"] == pytest.approx(6.0)  # mean over the sampled job only
    assert row.loc["a", "wall_s_per_job"] == pytest.approx(6.0)
    assert math.isnan(row.loc["b", "cpu_s"]) and math.isnan(row.loc["b", "max_rss_mb"])
    assert row.loc["b", "startup_core_s"] == 0.0  # no probe: counted as no start-up
    assert row.loc["total", "cpu_s"] == pytest.approx(6.0)


def test_the_probe_replays_module_level_imports_only():
    source = (
        '"""doc"""\nfrom __future__ import annotations\nimport sys\nimport numpy as np\n'
        "from .sibling import x\nfrom flatness.analysis import (\n    cost_table,\n    script_imports,\n)\n"
        "def f():\n    import torch\n"
    )
    assert script_imports(source) == [
        "import sys",
        "import numpy as np",
        "from flatness.analysis import cost_table, script_imports",
    ]
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": ["import not_code"]},
            {
                "cell_type": "code",
                "source": ["%matplotlib inline\n", "import pandas as pd\n", "x = 1"],
            },
            {"cell_type": "code", "source": "import pandas as pd\nimport seaborn as sns"},
        ]
    }
    assert notebook_imports(nb) == ["import pandas as pd", "import seaborn as sns"]
    # every job script of the workflow parses and the preamble's modules exist
    for script in (REPO / "workflow" / "scripts").glob("*.py"):
        assert script_imports(script.read_text()), script
    compile("\n".join(PREAMBLE_IMPORTS), "<preamble>", "exec")


@pytest.mark.slow
def test_the_tiny_study_reports_one_cost_row_per_rule_that_ran(tiny_study):  # noqa: F811
    bench_dir = tiny_study.workdir / "results" / "benchmarks"
    files = {d.name: len(list(d.glob("*.tsv"))) for d in bench_dir.iterdir() if d.is_dir()}
    assert {"train", "measure", "aggregate", "analyze", "front_page"} <= set(files)
    assert files["train"] == files["measure"] == 4  # one per run
    costs = pd.read_csv(tiny_study.workdir / "results" / "tables" / "costs.csv")
    assert list(costs.columns) == list(COST_COLUMNS)
    row = costs.set_index("rule")
    assert set(row.index) == set(files) | {"total"}
    for rule, n in files.items():
        assert row.loc[rule, "jobs"] == n, rule
    assert row.loc["total", "jobs"] == sum(files.values())
    assert row.loc["total", "core_s"] == pytest.approx(row["core_s"].drop("total").sum(), rel=1e-3)
    assert 0 < row.loc["total", "startup_share"] < 1
    assert (row["startup_s_per_job"].drop("total") > 0).all()
    assert "job costs" in tiny_study.report_html.read_text(errors="replace")
