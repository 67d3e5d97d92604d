"""rule analyze: runs.csv + measures_long.csv → statistics tables, analysis.md and the findings."""

import sys

import mistune
import pandas as pd

from flatness import analysis as an

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
cfg, measures = sm.params.analysis, list(sm.params.measures)
boot = dict(n_resamples=cfg["bootstrap_resamples"], seed=cfg["bootstrap_seed"])

runs = pd.read_csv(sm.input.runs)
long = pd.read_csv(sm.input.long, keep_default_na=False, na_values=["", "nan", "NaN"])
functions = dict(zip(long["measure"], long["function"], strict=True))
tables = {  # output name → (Markdown heading, table)
    "kendall": (
        "Kendall τ-b of each measure vs the generalisation gap",
        an.kendall_table(runs, measures, **boot),
    ),
    "granulated": ("Granulated Kendall ψ per axis and Ψ", an.granulated_kendall(runs, measures)),
    "batch": (
        "Largest vs smallest batch",
        an.batch_comparison(runs, measures, functions, **boot),
    ),
    "invariance": (
        "Ratio on reparameterised copies to the original",
        an.invariance_table(long, cfg["invariance_tolerance"]),
    ),
    "summary": ("Mean and std over seeds", an.seed_summary(runs, measures, long)),
}
for name, (_, df) in tables.items():
    df.to_csv(sm.output[name], index=False)
open(sm.output.markdown, "w").write(an.markdown_tables(dict(tables.values())))
t = {name: df for name, (_, df) in tables.items()}
sentences = an.findings(
    runs, t["kendall"], t["granulated"], t["batch"], t["invariance"], functions,
    cfg["significance"], cfg["invariance_tolerance"],
)  # fmt: skip
md = an.findings_markdown(sentences)
open(sm.output.findings, "w").write(md)
open(sm.output.findings_html, "w").write(f"<html><body>{mistune.html(md)}</body></html>\n")
print(md)
