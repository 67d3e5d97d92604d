"""rule sensitivity: one measure on a small- and a large-batch model, its own settings varied."""

import json
import sys

import pandas as pd
import torch

from flatness.analysis.paper_figures import sensitivity_figure
from flatness.config import DataConfig
from flatness.data import WORKFLOW_CACHE, load_dataset
from flatness.models import load_model
from flatness.sensitivity import measure_sensitivity

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
torch.set_num_threads(sm.threads)
cfg, measure = sm.params.sensitivity, sm.params.measure
train = load_dataset(DataConfig(**sm.params.data), cache_dir=WORKFLOW_CACHE).train
dtype = getattr(torch, measure.get("dtype", "float64"))
tables = []
for i, run_id in enumerate(sm.params.runs):
    metrics = json.loads(open(sm.input[f"metrics_{i}"]).read())
    if metrics.get("run_id") != run_id or metrics["status"] != "ok":
        continue  # a diverged run has nothing to measure
    model = load_model(sm.input[f"model_{i}"], map_location="cpu", expect_run_id=run_id)
    tables.append(measure_sensitivity(
        model.to(dtype), train, run_id, cfg["function"], cfg["options"], cfg["option"],
        cfg["values"], cfg["n_samples"], int(measure["n_samples"]),
        int(measure["subset_seed"]), int(measure.get("seed", 0)),
    ))  # fmt: skip
table = pd.concat(tables, ignore_index=True)
table.to_csv(sm.output.table, index=False)
sensitivity_figure(table, sm.output.figure)
print(table.to_string())
