"""rule interpolate: Keskar's 1-D plot between a small- and a large-batch solution (train and test)."""

import sys

import numpy as np
import pandas as pd
import torch

from flatness.config import DataConfig
from flatness.data import load_dataset
from flatness.models import load_model
from flatness.slices import interpolate_loss
from flatness.train import resolve_device

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")
torch.set_num_threads(sm.threads)
cfg, device = sm.params.interpolation, resolve_device(sm.params.device)

splits = load_dataset(DataConfig(**sm.params.data), device=device)
small = load_model(sm.input.small, map_location=device)
large = load_model(sm.input.large, map_location=device)
alphas = np.linspace(cfg["alpha_min"], cfg["alpha_max"], cfg["num"])
n = cfg["n_samples"]
frames = []
for split, (X, y) in (("train", splits.train), ("test", splits.test)):
    X, y = (X[:n], y[:n]) if n else (X, y)
    frame = interpolate_loss(small, large, (X.to(next(small.parameters()).dtype), y), alphas)
    frames.append(frame.assign(split=split))
pd.concat(frames).assign(pair=sm.params.pair_id).to_csv(sm.output[0], index=False)
