"""The tiny study through the real Snakemake: tables with the contract columns, the report, and a
second invocation that finds nothing to do."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from flatness.config import DataConfig
from flatness.data import load_dataset
from tests.workflow_helpers import (  # noqa: F401
    CONTRACT_COLUMNS,
    TINY_CONFIG,
    run_snakemake,
    tiny_study,
)

pytestmark = pytest.mark.slow


def test_runs_table_has_one_row_per_run_and_the_contract_columns(tiny_study):  # noqa: F811
    runs = pd.read_csv(tiny_study.runs_csv)
    assert len(runs) == 4  # 2 batch sizes × 2 regularisers × 1 seed
    for col in CONTRACT_COLUMNS:
        assert col in runs.columns, col
    assert set(runs["batch_size"]) == {32, 256} and set(runs["regularizer"]) == {"none", "fam"}
    # one column per configured measure, named exactly as its function (or label)
    for m in (
        "hessian_max_eigenvalue",
        "quotient_sharpness",
        "relative_flatness",
        "fisher_rao_norm",
    ):
        assert m in runs.columns
        assert runs.loc[runs["status"] == "ok", m].notna().all()
    assert (runs["gap_loss"] - (runs["test_loss"] - runs["train_loss"])).abs().max() < 1e-9


def test_invariant_measures_survive_the_reparameterised_copies(tiny_study):  # noqa: F811
    inv = pd.read_csv(tiny_study.workdir / "results/tables/invariance.csv")
    by = inv.set_index(["measure", "variant"])
    assert bool(by.loc[("quotient_sharpness", "layerwise0"), "invariant"])
    assert bool(by.loc[("fisher_rao_norm", "dinh_alpha10"), "invariant"])
    assert not bool(by.loc[("hessian_max_eigenvalue", "dinh_alpha10"), "invariant"])
    findings = (tiny_study.workdir / "results/tables/findings.md").read_text()
    assert "hessian_max_eigenvalue is not invariant" in findings


def test_every_stage_left_its_outputs(tiny_study):  # noqa: F811
    w = tiny_study.workdir
    for name in (
        "measures_by_batch",
        "invariance_alpha",
        "measure_vs_gap",
        "training_curves",
        "interpolation",
    ):
        assert (w / f"results/figures/{name}.png").stat().st_size > 1000, name
    interp = pd.read_csv(w / "results/tables/interpolation.csv")
    assert set(interp["split"]) == {"train", "test"} and interp["pair"].nunique() == 2
    metrics = json.loads(next((w / "results/runs").glob("*/metrics.json")).read_text())
    assert metrics["status"] in ("ok", "diverged")


def test_report_is_built(tiny_study):  # noqa: F811
    html = tiny_study.report_html
    assert html.exists() and html.stat().st_size > 100_000
    assert "measure_vs_gap.png" in html.read_text(errors="ignore")


def test_nothing_left_to_do_after_the_run(tiny_study):  # noqa: F811
    proc = run_snakemake(tiny_study.workdir, "-n")
    assert "Nothing to be done" in proc.stdout, proc.stdout[-3000:]


# --------------------------------------------------------------------------------------------
# Every table value traced back to the run's own files, recomputed without the package's analysis

RUN_ID = re.compile(
    r"(?P<dataset>[^-]+)-(?P<model>[^-]+)-(?P<optimizer>[^-]+)-(?P<regularizer>[^-]+)"
    r"-bs(?P<batch_size>\d+)-lr(?P<lr>[0-9.e-]+)-s(?P<seed>\d+)$"
)


def own_files(workdir):
    """run id → (metrics.json, {measure: value on the original model}) read straight from disk."""
    out = {}
    for folder in sorted((workdir / "results" / "runs").iterdir()):
        metrics = json.loads((folder / "metrics.json").read_text())
        rows = json.loads((folder / "measures.json").read_text())
        values = {r["measure"]: r["value"] for r in rows if r["variant"] == "original"}
        assert metrics["run_id"] == folder.name and {r["run_id"] for r in rows} == {folder.name}
        out[folder.name] = (metrics, values)
    return out


def test_tiny_grid_order_is_not_the_sorted_order():
    grid = yaml.safe_load(TINY_CONFIG.read_text())["grid"]
    assert grid["regularizer"] != sorted(grid["regularizer"])
    assert [f"bs{b}" for b in grid["batch_size"]] != sorted(f"bs{b}" for b in grid["batch_size"])


def test_every_runs_csv_value_is_its_own_runs(tiny_study):  # noqa: F811
    files = own_files(tiny_study.workdir)
    runs = pd.read_csv(tiny_study.runs_csv)
    assert sorted(runs["run_id"]) == sorted(files)
    n_train = load_dataset(DataConfig(name="digits", test_fraction=0.2)).train[0].shape[0]
    for _, row in runs.iterrows():
        metrics, values = files[row["run_id"]]
        axes = RUN_ID.match(row["run_id"]).groupdict()
        for axis in ("dataset", "model", "optimizer", "regularizer"):
            assert row[axis] == axes[axis]
        assert row["batch_size"] == int(axes["batch_size"]) and row["seed"] == int(axes["seed"])
        for key in ("train_loss", "test_loss", "train_acc", "test_acc", "gap_loss", "gap_acc",
                    "epochs", "steps", "status"):  # fmt: skip
            assert row[key] == pytest.approx(metrics[key]), (row["run_id"], key)
        for measure, value in values.items():
            assert row[measure] == pytest.approx(value), (row["run_id"], measure)
        # a scientist's check, from the data size alone: steps = epochs × ⌈N / batch⌉
        assert row["steps"] == row["epochs"] * math.ceil(n_train / row["batch_size"])
        last = metrics["history"][-1]
        assert (last["train_acc"], last["test_acc"]) == (row["train_acc"], row["test_acc"])


def test_history_csv_rows_are_their_own_runs(tiny_study):  # noqa: F811
    files = own_files(tiny_study.workdir)
    history = pd.read_csv(tiny_study.workdir / "results/tables/history.csv")
    for run_id, frame in history.groupby("run_id"):
        metrics, _ = files[run_id]
        assert list(frame["epoch"]) == [h["epoch"] for h in metrics["history"]]
        assert np.allclose(frame["train_acc"], [h["train_acc"] for h in metrics["history"]])
        assert (frame["batch_size"] == metrics["axes"]["batch_size"]).all()
        assert (frame["regularizer"] == metrics["axes"]["regularizer"]).all()


def test_kendall_and_batch_tables_recomputed_from_the_run_files(tiny_study):  # noqa: F811
    files = own_files(tiny_study.workdir)
    kendall = pd.read_csv(tiny_study.workdir / "results/tables/kendall.csv")
    for _, row in kendall.iterrows():
        pairs = [(v[row["measure"]], m[row["gap"]]) for m, v in files.values()]
        ref = stats.kendalltau(*zip(*pairs, strict=True))
        if math.isnan(ref.statistic):
            assert math.isnan(row["tau"])
            continue
        assert row["tau"] == pytest.approx(ref.statistic), row["measure"]
        assert row["p_value"] == pytest.approx(ref.pvalue)
        assert row["ci_low"] <= row["tau"] <= row["ci_high"]
    batch = pd.read_csv(tiny_study.workdir / "results/tables/batch_comparison.csv")
    for _, row in batch.iterrows():
        def group(bs, row=row):
            return [
                (v | m)[row["measure"]] for m, v in files.values() if m["axes"]["batch_size"] == bs
            ]

        small, large = group(row["small_batch"]), group(row["large_batch"])
        assert row["median_small"] == pytest.approx(np.median(small)), row["measure"]
        assert row["median_large"] == pytest.approx(np.median(large)), row["measure"]
        assert row["diff_mean"] == pytest.approx(np.mean(large) - np.mean(small))
        ref = stats.mannwhitneyu(large, small, alternative="two-sided")
        assert row["p_value"] == pytest.approx(ref.pvalue)
    test_acc = batch.set_index("measure").loc["test_acc"]
    assert test_acc["kind"] == "outcome"


def test_interpolation_rows_name_their_runs(tiny_study):  # noqa: F811
    interp = pd.read_csv(tiny_study.workdir / "results/tables/interpolation.csv")
    files = own_files(tiny_study.workdir)
    for _, row in interp.drop_duplicates("pair").iterrows():
        small, large = files[row["small_run"]][0]["axes"], files[row["large_run"]][0]["axes"]
        assert small["batch_size"] < large["batch_size"]
        assert {k: v for k, v in small.items() if k != "batch_size"} == {
            k: v for k, v in large.items() if k != "batch_size"
        }
        assert row["pair"].endswith(f"bs{small['batch_size']}vs{large['batch_size']}")


def test_front_page_carries_the_headline(tiny_study):  # noqa: F811
    page = (tiny_study.workdir / "results/report/front_page.rst").read_text()
    batch = pd.read_csv(tiny_study.workdir / "results/tables/batch_comparison.csv")
    acc = batch.set_index("measure").loc["test_acc"]
    assert "Headline" in page and f"{acc['diff_mean']:.3g} [" in page
    assert "data:image/png;base64," in page
    html = tiny_study.report_html.read_text(errors="ignore")
    assert "Headline" in html
