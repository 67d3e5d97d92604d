"""rule aggregate: metrics.json + measures.json of every run → runs.csv, measures_long.csv, history.csv.

Files are read back by the run id each one records (a file under another run's folder is refused),
checked for consistency (flatness.analysis.integrity), and joined on that id.
"""

import sys

from flatness.analysis import check_study, history_table, read_measures, read_metrics, runs_table

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")

runs = sm.params.runs  # the grid rows: run_id + axes
metrics = read_metrics(sm.input.metrics)
long = read_measures(sm.input.measures)
check_study(runs, metrics, long)
runs_table(runs, metrics, long).to_csv(sm.output.runs, index=False)
long.to_csv(sm.output.long, index=False)
history_table(runs, metrics).to_csv(sm.output.history, index=False)
print(f"{len(runs)} runs, {len(long)} measure rows; identities and sanity checks passed")
