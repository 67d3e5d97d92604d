"""rule paper: the reproduced paper's table (ours beside theirs), its verdicts and its figure."""

import sys

import mistune
import pandas as pd

from flatness.analysis.paper_figures import paper_figure
from flatness.analysis.papers import paper_tables

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
cfg = sm.params.analysis
na = dict(keep_default_na=False, na_values=["", "nan", "NaN"])
runs = pd.read_csv(sm.input.runs)
long = pd.read_csv(sm.input.long, **na)
interpolation = pd.read_csv(sm.input.interpolation, **na) if "interpolation" in sm.input.keys() else None
sensitivity = pd.read_csv(sm.input.sensitivity) if "sensitivity" in sm.input.keys() else None
result = paper_tables(
    sm.params.study, runs, long, sensitivity, alpha=cfg["significance"],
    n_resamples=cfg["bootstrap_resamples"], seed=cfg["bootstrap_seed"],
)  # fmt: skip
result.table.to_csv(sm.output.table, index=False)
md = result.markdown()
open(sm.output.markdown, "w").write(md)
open(sm.output.rst, "w").write(result.rst())
open(sm.output.html, "w").write(f"<html><body>{mistune.html(md)}</body></html>\n")
paper_figure(sm.params.study, runs, long, interpolation, sm.output.figure)
print(md)
