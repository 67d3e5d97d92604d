"""rule interpolate: Keskar's 1-D plot between a small- and a large-batch solution (train and test)."""

import sys

import numpy as np
import pandas as pd
import torch

from flatness.config import DataConfig
from flatness.data import load_dataset
from flatness.models import load_model
from flatness.suite import interpolation_table
from flatness.train import resolve_device

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
torch.set_num_threads(sm.threads)
cfg, device = sm.params.interpolation, resolve_device(sm.params.device)

splits = load_dataset(DataConfig(**sm.params.data), device=device)
small = load_model(sm.input.small, map_location=device)
large = load_model(sm.input.large, map_location=device)
alphas = np.linspace(cfg["alpha_min"], cfg["alpha_max"], cfg["num"])
rows = interpolation_table(
    small, large, {"train": splits.train, "test": splits.test}, alphas, cfg["n_samples"]
)
pd.DataFrame(rows).assign(pair=sm.params.pair_id).to_csv(sm.output[0], index=False)
