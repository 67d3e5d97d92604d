"""rule snapshot: the run's weights after one epoch (kept by the trainer, else replayed)."""

import logging
import sys

from flatness.data import WORKFLOW_CACHE
from flatness.gpu_slots import claim_gpu
from flatness.suite import metrics_of_run
from flatness.train import snapshot_at

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
run_id = sm.params.run_id
metrics = metrics_of_run(sm.input.metrics, run_id)
claim_gpu(sm.params.config["device"])
info = snapshot_at(
    sm.params.config, int(sm.wildcards.epoch), sm.output[0], run_id=run_id,
    axes=dict(sm.params.axes), final_model=sm.input.model, trained_epochs=metrics["epochs"],
    keep_dir=sm.params.keep_dir, threads=sm.threads, data_cache=WORKFLOW_CACHE,
)  # fmt: skip
logging.info("epoch %s of %s: %s", sm.wildcards.epoch, run_id, info)
