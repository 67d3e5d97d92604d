"""rule front_page: the report's first page — the intro, the headline numbers, the invariance figure."""

import sys
from pathlib import Path

import pandas as pd

from flatness.analysis import front_page_rst

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")

na = dict(keep_default_na=False, na_values=["", "nan", "NaN"])
page = front_page_rst(
    Path(sm.input.intro).read_text(),
    pd.read_csv(sm.input.runs),
    pd.read_csv(sm.input.batch),
    pd.read_csv(sm.input.kendall),
    pd.read_csv(sm.input.invariance, **na),
    Path(sm.input.figure).read_bytes(),
    # a paper study: its verdicts and table right after the introduction
    paper_rst=Path(sm.input.paper).read_text() if "paper" in sm.input.keys() else None,
)
Path(sm.output[0]).write_text(page)
