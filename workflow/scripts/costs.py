"""rule costs: every job's benchmark TSV + the start-up probe (rule startup_probe) → costs.csv."""

import sys

import pandas as pd

from flatness.analysis import cost_table

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")

frames = []
for rule, files in sm.input.items():
    if rule == "startup":
        continue
    for path in [files] if isinstance(files, str) else files:
        frame = pd.read_csv(path, sep="\t", na_values=["NA"])
        frame.insert(0, "rule", rule)
        frame.insert(1, "benchmark", path)
        frame["threads"] = sm.params.jobs[rule]["threads"]
        frames.append(frame)
benchmarks = pd.concat(frames, ignore_index=True)

table = cost_table(benchmarks, pd.read_csv(sm.input.startup))
table.to_csv(sm.output[0], index=False, float_format="%.4g")
print(table.to_string(index=False))
