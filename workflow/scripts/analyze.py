"""rule analyze: runs.csv + measures_long.csv → correlation, batch, invariance tables and findings."""

import sys

import mistune
import pandas as pd

from flatness import analysis as an

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
cfg, measures = sm.params.analysis, list(sm.params.measures)

runs = pd.read_csv(sm.input.runs)
long = pd.read_csv(sm.input.long, keep_default_na=False, na_values=["", "nan", "NaN"])
functions = dict(zip(long["measure"], long["function"], strict=True))
tables = {
    "Kendall τ-b of each measure vs the generalisation gap": an.kendall_table(runs, measures),
    "Granulated Kendall ψ per axis and Ψ": an.granulated_kendall(runs, measures),
    "Largest vs smallest batch": an.batch_comparison(runs, measures, functions),
    "Ratio on reparameterised copies to the original": an.invariance_table(
        long, cfg["invariance_tolerance"]
    ),
}
kendall, granulated, batch, invariance = tables.values()
for df, path in zip(tables.values(), sm.output[:4], strict=True):
    df.to_csv(path, index=False)
open(sm.output.markdown, "w").write(an.markdown_tables(tables))
sentences = an.findings(
    runs,
    kendall,
    granulated,
    batch,
    invariance,
    functions,
    cfg["significance"],
    cfg["invariance_tolerance"],
)
md = an.findings_markdown(sentences)
open(sm.output.findings, "w").write(md)
open(sm.output.findings_html, "w").write(f"<html><body>{mistune.html(md)}</body></html>\n")
print(md)
