"""rules trajectory, layer_profile, spectrum: the per-run files → one table and its figure.

Each file's rows are checked against the run its path names, and the figure joins them to
runs.csv by run id (batch size, regulariser, status).
"""

import sys

import pandas as pd

from flatness.analysis import read_per_run
from flatness.analysis.curvature_figures import (
    layer_profile_figure,
    spectrum_figure,
    trajectory_figure,
)

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
kind = sm.params.kind
files = {"trajectory": "epochs", "layer_profile": "layers", "spectrum": "spectra"}[kind]
table = read_per_run(sm.input[files])
runs = pd.read_csv(sm.input.runs)
unknown = sorted(set(table.run_id) - set(runs.run_id))
if unknown:
    raise ValueError(f"{kind}: rows of runs not in runs.csv: {unknown}")
table.to_csv(sm.output.table, index=False)
draw = {"trajectory": trajectory_figure, "layer_profile": layer_profile_figure,
        "spectrum": spectrum_figure}[kind]  # fmt: skip
draw(table, runs, sm.output.figure)
print(f"{kind}: {len(table)} rows of {table.run_id.nunique()} runs")
