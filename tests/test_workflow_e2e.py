"""The tiny study through the real Snakemake: tables with the contract columns, the report, and a
second invocation that finds nothing to do."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.workflow_helpers import CONTRACT_COLUMNS, run_snakemake, tiny_study  # noqa: F401

pytestmark = pytest.mark.slow


def test_runs_table_has_one_row_per_run_and_the_contract_columns(tiny_study):  # noqa: F811
    runs = pd.read_csv(tiny_study.runs_csv)
    assert len(runs) == 4  # 2 batch sizes × 2 regularisers × 1 seed
    for col in CONTRACT_COLUMNS:
        assert col in runs.columns, col
    assert set(runs["batch_size"]) == {16, 256} and set(runs["regularizer"]) == {"none", "sam"}
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
