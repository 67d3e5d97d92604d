"""rule train: one grid point → model.pt + metrics.json (resumes from params.resume_dir)."""

import logging
import sys
from pathlib import Path

from flatness.config import RunConfig
from flatness.data import WORKFLOW_CACHE
from flatness.gpu_slots import claim_gpu
from flatness.train import train_run

sys.stderr = sys.stdout = open(snakemake.log[0], "w")  # noqa: F821
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")

cfg = RunConfig.from_dict(snakemake.params.config)  # noqa: F821
claim_gpu(cfg.device)  # own GPU on a multi-GPU workstation, before train_run touches CUDA
out_dir = Path(snakemake.output.model).parent  # noqa: F821
# An edited config reruns this job (params trigger); its old checkpoint is then stale: restart.
metrics = train_run(
    cfg,
    out_dir,
    snakemake.params.resume_dir,  # noqa: F821
    threads=snakemake.threads,  # noqa: F821
    on_config_change="restart",
    run_id=snakemake.params.run_id,  # noqa: F821
    axes=dict(snakemake.params.axes),  # noqa: F821
    # From the config, not params: the list does not change the model, so editing it must not
    # rerun this job (rule snapshot replays an epoch kept by no earlier run).
    keep_epochs=snakemake.config["trajectory"]["epochs"],  # noqa: F821
    keep_dir=Path(snakemake.params.resume_dir) / "epochs",  # noqa: F821
    data_cache=WORKFLOW_CACHE,
)
logging.info("status %s after %s epochs", metrics["status"], metrics["epochs"])
