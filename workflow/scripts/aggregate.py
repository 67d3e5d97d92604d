"""rule aggregate: metrics.json + measures.json of every run → runs.csv, measures_long.csv, history.csv."""

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
# json.load, not pd.read_json, which guesses dtypes (dates) from the values.
long = pd.concat(
    [pd.DataFrame(json.loads(open(p).read())) for p in sm.input.measures], ignore_index=True
)
numeric = ["factor", "value", "stderr", "seconds"]  # null → NaN, also when a column is all null
long[numeric] = long[numeric].apply(pd.to_numeric)
runs_table(runs, metrics, long).to_csv(sm.output.runs, index=False)
long.to_csv(sm.output.long, index=False)
history_table(runs, metrics).to_csv(sm.output.history, index=False)
print(f"{len(runs)} runs, {len(long)} measure rows")
