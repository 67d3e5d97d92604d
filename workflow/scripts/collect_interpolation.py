"""rule collect_interpolation: one table of every small/large-batch interpolation."""

import sys

import pandas as pd

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")

columns = ["pair", "split", "alpha", "loss", "accuracy", "note"]
frames = [pd.read_csv(p) for p in sm.input]
table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
table[columns].to_csv(sm.output[0], index=False)
