"""Curvature along training, per-layer profiles and spectra in the tiny study (real Snakemake).

Every table value is recomputed from the run's own files (the kept weights, model.pt, the measure
rows of the same run), and editing the epoch list is shown to rerun only that epoch's jobs.
"""

from __future__ import annotations

import inspect
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from flatness.config import DataConfig
from flatness.data import load_dataset
from flatness.measures import MEASURES
from flatness.models import load_model
from flatness.suite import measurement_data
from flatness.train import initial_model
from tests.workflow_helpers import TINY_CONFIG, run_snakemake, tiny_study  # noqa: F401

pytestmark = pytest.mark.slow


def tables(study, name) -> pd.DataFrame:
    return pd.read_csv(study.workdir / "results" / "tables" / f"{name}.csv")


def measure_config(study) -> dict:
    """The measure section the workflow used (schema defaults filled by a dry parse of the
    config: the tiny config names every key the measures read)."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())["measure"]
    return {"subset_seed": 0, "dtype": "float64", "seed": 0, **cfg}


def train_split(run_dir) -> tuple:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = dict(metrics["provenance"]["config"]["data"], augment=False)
    return metrics, load_dataset(DataConfig(**data)).train


def test_trajectory_rows_are_each_runs_kept_weights_measured(tiny_study):  # noqa: F811
    traj, runs = tables(tiny_study, "trajectory"), tables(tiny_study, "runs")
    assert set(traj.run_id) == set(runs.run_id)
    assert len(traj) == len(runs) * 2 * 2  # runs × epochs {0, 3} × two measures
    mcfg = measure_config(tiny_study)
    for run_id, rows in traj.groupby("run_id"):
        run_dir = tiny_study.workdir / "results" / "runs" / run_id
        metrics, train = train_split(run_dir)
        for epoch, at in rows.groupby("epoch"):
            path = run_dir / "epochs" / f"epoch{epoch}.pt"
            blob = torch.load(path, weights_only=True)
            assert blob["run_id"] == run_id and blob["requested_epoch"] == epoch
            reached = min(int(epoch), metrics["epochs"])
            assert (at.epoch_reached == reached).all() and blob["epoch"] == reached
            assert set(at.source) == {"final model" if reached < epoch else "at epoch"}
            model, data = measurement_data(load_model(path, expect_run_id=run_id), train, mcfg)
            for row in at.itertuples():
                fn = MEASURES[row.function]
                seed = {"seed": 0} if "seed" in inspect.signature(fn).parameters else {}
                expected = fn(model, data, **seed)
                assert np.isclose(row.value, expected, rtol=1e-9), (run_id, epoch, row.measure)


def test_epoch_zero_is_the_initialisation_and_the_last_epoch_the_final_model(tiny_study):  # noqa: F811
    for run_dir in (tiny_study.workdir / "results" / "runs").iterdir():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        theta0 = initial_model(metrics["provenance"]["config"],
                               metrics["provenance"]["model_config"]).state_dict()  # fmt: skip
        kept0 = torch.load(run_dir / "epochs" / "epoch0.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(theta0[k], kept0[k]) for k in theta0)
        final = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
        if metrics["epochs"] <= 3:  # stopped at or before the last listed epoch
            kept = torch.load(run_dir / "epochs" / "epoch3.pt", weights_only=True)["state_dict"]
            assert all(torch.equal(final[k], kept[k]) for k in final)


def test_the_last_layers_profile_equals_the_runs_own_relative_flatness(tiny_study):  # noqa: F811
    """Two jobs, one definition: relative flatness of the last layer (rule layers) is the
    relative_flatness of the run's measures.json (rule measure), joined by run id."""
    prof, long = tables(tiny_study, "layer_profile"), tables(tiny_study, "measures_long")
    assert set(prof.measure) == {"hessian_trace", "relative_flatness"}
    assert set(prof.layer) == {0, 1}  # the 64-32-10 MLP's two weight layers
    rf = prof[(prof.measure == "relative_flatness") & (prof.layer == 1)].set_index("run_id")
    ours = long[(long.measure == "relative_flatness") & (long.variant == "original")]
    ours = ours.set_index("run_id")
    assert set(rf.index) == set(ours.index)
    for run_id in rf.index:
        assert np.isclose(rf.loc[run_id, "value"], ours.loc[run_id, "value"], rtol=1e-10), run_id
    assert (prof.value.dropna() >= 0).all()


def test_each_spectrum_is_a_density_reaching_its_runs_top_eigenvalue(tiny_study):  # noqa: F811
    spec, runs = tables(tiny_study, "spectrum"), tables(tiny_study, "runs")
    for run_id, rows in spec.groupby("run_id"):
        x, p = rows.eigenvalue.to_numpy(), rows.density.to_numpy()
        assert np.isclose(np.trapezoid(p, x), 1.0, atol=1e-2), run_id
        lam = runs.set_index("run_id").loc[run_id, "hessian_max_eigenvalue"]
        # The grid spans the Gauss nodes ± 5σ (σ = 1% of their range). The top node is a Ritz
        # value, so ≤ λ_max, and after 15 steps close to it: the grid ends a few % above.
        assert 0.95 * lam <= x.max() <= 1.1 * lam, (run_id, x.max(), lam)


def test_editing_the_epoch_list_reruns_only_that_epochs_jobs(tiny_study, tmp_path):  # noqa: F811
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg["trajectory"]["epochs"] = [0, 2, 3]
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(cfg, sort_keys=False))  # key order is part of params
    dry = run_snakemake(tiny_study.workdir, "-n", "--quiet", "rules", configfile=edited)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout, flags=re.M))
    assert jobs.get("snapshot") == "4" and jobs.get("measure_epoch") == "4", dry.stdout
    assert not {"train", "measure", "layers", "spectrum_run", "aggregate"} & set(jobs), jobs


def test_error_bars_recomputed_from_each_runs_model(tiny_study):  # noqa: F811
    """The interval of every run's relative flatness: its four fold values, from model.pt and
    the same folds, give the data_se in measures_long.csv; deterministic, so seed_sd = 0; the
    seeded λ_max has a finite seed spread."""
    from flatness.suite import data_folds

    long = tables(tiny_study, "measures_long")
    orig = long[long.variant == "original"].set_index(["run_id", "measure"])
    assert long.loc[long.variant != "original", "data_se"].isna().all()
    mcfg = measure_config(tiny_study)
    for run_id in orig.index.get_level_values(0).unique():
        run_dir = tiny_study.workdir / "results" / "runs" / run_id
        _, train = train_split(run_dir)
        model, data = measurement_data(
            load_model(run_dir / "model.pt", expect_run_id=run_id), train, mcfg
        )
        fold_values = [MEASURES["relative_flatness"](model, f) for f in data_folds(data, 4, 0)]
        row = orig.loc[(run_id, "relative_flatness")]
        assert np.isclose(row.data_se, np.std(fold_values, ddof=1) / 2, rtol=1e-9), run_id
        assert row.seed_sd == 0 and "deterministic" in row.error_note
        half = 1.96 * row.data_se
        assert np.isclose(row.ci_low, row.value - half) and np.isclose(row.ci_high, row.value + half)
        lam = orig.loc[(run_id, "hessian_max_eigenvalue")]
        assert np.isfinite(lam.seed_sd) and lam.ci_low <= lam.value <= lam.ci_high
    summary = tables(tiny_study, "summary")
    assert "relative_flatness_meas_se" in summary.columns
