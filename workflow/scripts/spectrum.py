"""rule spectrum_run: the Hessian spectral density of one trained model (SLQ)."""

import logging
import sys

import pandas as pd
import torch

from flatness.config import DataConfig
from flatness.data import WORKFLOW_CACHE, load_dataset
from flatness.gpu_slots import claim_gpu
from flatness.measures import hessian_spectrum, spectrum_table
from flatness.models import load_model
from flatness.suite import measurement_data, metrics_of_run

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_num_threads(sm.threads)
claim_gpu(sm.params.measure.get("device", "auto"))

run_id, cfg = sm.params.run_id, sm.params.spectrum
metrics = metrics_of_run(sm.input.metrics, run_id)
if metrics["status"] == "ok":
    model = load_model(sm.input.model, map_location="cpu", expect_run_id=run_id)
    train = load_dataset(DataConfig(**sm.params.data), cache_dir=WORKFLOW_CACHE).train
    model, data = measurement_data(model, train, sm.params.measure)
    density = hessian_spectrum(model, data, num_probes=int(cfg["num_probes"]),
                               num_steps=int(cfg["num_steps"]),
                               seed=int(sm.params.measure["seed"]))  # fmt: skip
    table = spectrum_table(density)
    table["note"] = ""
else:
    table = pd.DataFrame({"eigenvalue": [float("nan")], "density": [float("nan")],
                          "note": [f"not measured: training status {metrics['status']}"]})  # fmt: skip
table.insert(0, "run_id", run_id)
table.to_csv(sm.output[0], index=False)
