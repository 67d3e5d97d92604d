"""rule interpolate: Keskar's 1-D plot between a small- and a large-batch solution (train and test)."""

import sys

import numpy as np
import pandas as pd
import torch

from flatness.config import DataConfig
from flatness.data import WORKFLOW_CACHE, load_dataset
from flatness.gpu_slots import claim_gpu
from flatness.models import load_model
from flatness.suite import interpolation_table
from flatness.train import resolve_device

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
torch.set_num_threads(sm.threads)
claim_gpu(sm.params.device)  # own GPU on a multi-GPU workstation, before CUDA starts
cfg, device = sm.params.interpolation, resolve_device(sm.params.device)

splits = load_dataset(DataConfig(**sm.params.data), device, cache_dir=WORKFLOW_CACHE)
small = load_model(sm.input.small, map_location=device, expect_run_id=sm.params.small)
large = load_model(sm.input.large, map_location=device, expect_run_id=sm.params.large)
alphas = np.linspace(cfg["alpha_min"], cfg["alpha_max"], cfg["num"])
rows = interpolation_table(
    small, large, {"train": splits.train, "test": splits.test}, alphas, cfg["n_samples"]
)
table = pd.DataFrame(rows).assign(
    pair=sm.params.pair_id, small_run=sm.params.small, large_run=sm.params.large
)
table.to_csv(sm.output[0], index=False)
