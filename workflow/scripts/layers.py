"""rule layers: the per-layer profile of one trained model (each measure on each weight layer)."""

import logging
import sys

import pandas as pd
import torch

from flatness.config import DataConfig
from flatness.data import WORKFLOW_CACHE, load_dataset
from flatness.gpu_slots import claim_gpu
from flatness.measures import layer_profile
from flatness.models import load_model
from flatness.suite import measurement_data, metrics_of_run

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_num_threads(sm.threads)
claim_gpu(sm.params.measure.get("device", "auto"))

run_id = sm.params.run_id
metrics = metrics_of_run(sm.input.metrics, run_id)
if metrics["status"] == "ok":
    model = load_model(sm.input.model, map_location="cpu", expect_run_id=run_id)
    train = load_dataset(DataConfig(**sm.params.data), cache_dir=WORKFLOW_CACHE).train
    model, data = measurement_data(model, train, sm.params.measure)
    table = layer_profile(model, data, sm.params.measures, seed=int(sm.params.measure["seed"]))
else:  # a diverged run has no profile; one row per measure says so
    table = pd.DataFrame({"measure": sm.params.measures, "layer": None, "value": float("nan"),
                          "note": f"not measured: training status {metrics['status']}"})  # fmt: skip
table.insert(0, "run_id", run_id)
logging.info("\n%s", table.to_string())
table.to_json(sm.output[0], orient="records", indent=1)
