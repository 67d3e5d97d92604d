"""rule collect_interpolation: one table of every small/large-batch interpolation.

Each file's rows must record the pair its name gives (results/interpolation/<pair>.csv).
"""

import sys
from pathlib import Path

import pandas as pd

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")

columns = ["pair", "small_run", "large_run", "split", "alpha", "loss", "accuracy", "note"]
frames = []
for path in sm.input:
    frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    recorded = set(frame["pair"])
    if recorded != {Path(path).stem}:
        raise ValueError(f"{path} records pairs {sorted(recorded)}, not {Path(path).stem!r}")
    frames.append(frame)
table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
table[columns].to_csv(sm.output[0], index=False)
