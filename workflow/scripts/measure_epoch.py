"""rule measure_epoch: the trajectory's measures on the weights kept after one epoch."""

import logging
import sys

import pandas as pd
import torch

from flatness.config import DataConfig
from flatness.data import WORKFLOW_CACHE, load_dataset
from flatness.gpu_slots import claim_gpu
from flatness.models import load_model
from flatness.suite import measure_run, metrics_of_run
from flatness.trajectory import TRAJECTORY_COLUMNS

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
torch.set_num_threads(sm.threads)
claim_gpu(sm.params.measure.get("device", "auto"))

run_id, epoch = sm.params.run_id, int(sm.wildcards.epoch)
metrics = metrics_of_run(sm.input.metrics, run_id)
blob = torch.load(sm.input.snapshot, map_location="cpu", weights_only=True)
model = load_model(sm.input.snapshot, map_location="cpu", expect_run_id=run_id,
                   expect_epoch=epoch)  # fmt: skip
reached = int(blob["epoch"])
# The weights of a diverged run are NaN from its divergence on; earlier epochs are measured.
diverged = metrics["status"] != "ok" and reached >= metrics["epochs"]
train = load_dataset(DataConfig(**sm.params.data), cache_dir=WORKFLOW_CACHE).train
rows = measure_run(
    model, train, sm.params.measure, run_id, "diverged" if diverged else "ok",
    metrics["provenance"],
)  # fmt: skip
source = "final model" if reached < epoch else "at epoch"
for row in rows:
    row.update(epoch=epoch, epoch_reached=reached, source=source)
    if reached < epoch:
        row["note"] = (f"the run stopped at epoch {reached} ({metrics['stopped_by']}); "
                       + row["note"]).rstrip("; ")  # fmt: skip
table = pd.DataFrame(rows)[list(TRAJECTORY_COLUMNS)]
table.to_json(sm.output[0], orient="records", indent=1)
