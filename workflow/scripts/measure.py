"""rule measure: every configured measure on one trained model and its reparameterised copies."""

import logging
import sys

import pandas as pd
import torch

from flatness.config import DataConfig
from flatness.data import WORKFLOW_CACHE, load_dataset
from flatness.gpu_slots import claim_gpu
from flatness.models import load_model
from flatness.suite import MEASURE_COLUMNS, measure_run, metrics_of_run

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_num_threads(sm.threads)
claim_gpu(sm.params.measure.get("device", "auto"))  # before measure_run resolves the device

run_id = sm.params.run_id
metrics = metrics_of_run(sm.input.metrics, run_id)
splits = load_dataset(DataConfig(**sm.params.data), cache_dir=WORKFLOW_CACHE)
model = load_model(sm.input.model, map_location="cpu", expect_run_id=run_id)
rows = measure_run(
    model, splits.train, sm.params.measure, run_id, metrics["status"], metrics["provenance"]
)
table = pd.DataFrame(rows, columns=list(MEASURE_COLUMNS))
table.to_json(sm.output[0], orient="records", indent=1)  # NaN (diverged, not applicable) → null
