"""rule aggregate: metrics.json + measures.csv of every run → runs.csv, measures_long.csv, history.csv."""

import json
import sys

import pandas as pd

from flatness.analysis import history_table, runs_table

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")

runs = sm.params.runs
metrics = {
    r["run_id"]: json.loads(open(p).read()) for r, p in zip(runs, sm.input.metrics, strict=True)
}
long = pd.concat(
    [
        pd.read_csv(p, keep_default_na=False, na_values=["", "nan", "NaN"])
        for p in sm.input.measures
    ],
    ignore_index=True,
)
runs_table(runs, metrics, long).to_csv(sm.output.runs, index=False)
long.to_csv(sm.output.long, index=False)
history_table(runs, metrics).to_csv(sm.output.history, index=False)
print(f"{len(runs)} runs, {len(long)} measure rows")
