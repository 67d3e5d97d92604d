"""Error bars of the measure suite (``measure.error_bars``): fold and seed spreads, the interval.

Dense float64 references on the tiny fixture (METHODS.md §10): ``torch.func.hessian`` for the
per-fold Hessian traces, per-sample autograd gradients for the Fisher–Rao norm.
"""

from __future__ import annotations

import math
import statistics

import jsonschema
import pytest
import torch
import yaml
from torch import nn

from flatness.measure_signatures import DATA_INDEPENDENT, MEASURE_PARAMETERS
from flatness.measures import MEASURES
from flatness.suite import (
    ERROR_COLUMNS,
    FOLD_SEED_OFFSET,
    MEASURE_COLUMNS,
    MeasureSpec,
    Variant,
    data_folds,
    error_bar_settings,
    measure_model,
    measure_run,
    skipped_rows,
)
from tests.conftest import fixture_data, make_mlp
from tests.workflow_helpers import REPO

SEED = 3
BARS = {"folds": 4, "seeds": 3}
SPECS = [
    MeasureSpec("hessian_trace", "hessian_trace"),
    MeasureSpec("relative_flatness", "relative_flatness"),
    MeasureSpec("fisher_rao_norm", "fisher_rao_norm"),
    MeasureSpec("feature_robustness", "feature_robustness", {"num_samples": 5}),
    MeasureSpec("hessian_max_eigenvalue", "hessian_max_eigenvalue"),
    MeasureSpec("weight_norm", "weight_norm"),
    MeasureSpec("spectral_norm_product", "spectral_norm_product"),
    MeasureSpec("path_norm", "path_norm"),
    MeasureSpec("distance_from_init", "distance_from_init"),
]
VARIANTS = [Variant("original", "original"), Variant("layerwise0", "layerwise", 10.0)]


def _measure(error_bars=None, specs=SPECS, variants=VARIANTS, data=None, **kw):
    return measure_model(
        make_mlp(),
        fixture_data() if data is None else data,
        specs,
        variants,
        seed=SEED,
        init_model=make_mlp(seed=7),
        error_bars=error_bars,
        **kw,
    )


@pytest.fixture(scope="module")
def rows_on():
    return _measure(BARS)


@pytest.fixture(scope="module")
def rows_off():
    return _measure()


def _row(rows, measure, variant="original"):
    return next(r for r in rows if r["measure"] == measure and r["variant"] == variant)


def _rel(a, b):
    return abs(a - b) / abs(b)


# ---- dense references on the folds -----------------------------------------------------------


def _flat_loss(model, X, y):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def loss(theta):
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        out = torch.func.functional_call(model, params, (X,))
        return nn.functional.cross_entropy(out, y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss, theta


def _dense_trace(model, X, y):
    loss, theta = _flat_loss(model, X, y)
    return float(torch.func.hessian(loss)(theta).trace())


def _direct_fisher_rao(model, X, y):
    theta = [p.detach() for p in model.parameters()]
    total = 0.0
    for i in range(X.shape[0]):
        loss = nn.functional.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        total += float(sum((g * t).sum() for g, t in zip(grads, theta, strict=True))) ** 2
    return total / X.shape[0]


def test_folds_are_disjoint_equal_and_fixed_by_the_measure_seed():
    X, y = fixture_data()
    folds = data_folds((X, y), 4, SEED)
    assert [f[0].shape[0] for f in folds] == [16] * 4
    rows = [tuple(r.tolist()) for f in folds for r in f[0]]
    assert sorted(rows) == sorted(tuple(r.tolist()) for r in X)  # disjoint and covering
    again = data_folds((X, y), 4, SEED)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(folds, again, strict=True)
    )
    other = data_folds((X, y), 4, SEED + 1)
    assert not torch.equal(folds[0][0], other[0][0])
    # 65 samples in 4 folds: equal parts of 16, one sample left out
    X5, y5 = fixture_data(n=65)
    assert [f[0].shape[0] for f in data_folds((X5, y5), 4, SEED)] == [16] * 4
    assert FOLD_SEED_OFFSET != 0


def test_hessian_trace_folds_match_dense_traces(rows_on):
    model, data = make_mlp(), fixture_data()
    folds = data_folds(data, BARS["folds"], SEED)
    dense = [_dense_trace(model, X, y) for X, y in folds]
    for (X, y), ref in zip(folds, dense, strict=True):
        assert _rel(MEASURES["hessian_trace"](model, (X, y)), ref) <= 1e-9
    row = _row(rows_on, "hessian_trace")
    # the trace is a mean over samples and the folds are equal: their mean is the full value
    assert _rel(statistics.mean(dense), row["value"]) <= 1e-9
    assert _rel(row["value"], _dense_trace(model, *data)) <= 1e-9
    assert _rel(row["data_se"], statistics.stdev(dense) / 2) <= 1e-9


def test_fisher_rao_folds_match_a_per_sample_computation(rows_on):
    model, data = make_mlp(), fixture_data()
    folds = data_folds(data, BARS["folds"], SEED)
    direct = [_direct_fisher_rao(model, X, y) for X, y in folds]
    for (X, y), ref in zip(folds, direct, strict=True):
        assert _rel(MEASURES["fisher_rao_norm"](model, (X, y)), ref) <= 1e-9
    row = _row(rows_on, "fisher_rao_norm")
    assert _rel(statistics.mean(direct), row["value"]) <= 1e-9
    assert _rel(row["data_se"], statistics.stdev(direct) / 2) <= 1e-9


def test_batches_give_the_same_folds_as_the_pair():
    X, y = fixture_data()
    batches = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 64, 10)]
    spec = [MeasureSpec("fisher_rao_norm", "fisher_rao_norm")]
    (pair,) = _measure({"folds": 4}, spec, VARIANTS[:1])
    (listed,) = _measure({"folds": 4}, spec, VARIANTS[:1], data=batches)
    assert _rel(listed["data_se"], pair["data_se"]) <= 1e-12
    assert _rel(listed["value"], pair["value"]) <= 1e-12


# ---- seeds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", ["hessian_trace", "relative_flatness", "fisher_rao_norm"])
def test_deterministic_measures_have_no_seed_spread(rows_on, measure):
    row = _row(rows_on, measure)
    assert row["seed_sd"] == 0.0
    assert "deterministic" in row["error_note"] and "folds=4" in row["error_note"]
    assert math.isfinite(row["data_se"]) and row["data_se"] > 0


@pytest.mark.parametrize("measure", ["feature_robustness", "hessian_max_eigenvalue"])
def test_stochastic_measure_gets_a_seed_spread_and_keeps_its_value(rows_on, rows_off, measure):
    assert "seed" in MEASURE_PARAMETERS[measure]
    on, off = _row(rows_on, measure), _row(rows_off, measure)
    assert math.isfinite(on["seed_sd"]) and on["seed_sd"] > 0
    assert "seeds=3" in on["error_note"] and "deterministic" not in on["error_note"]
    # bitwise: the extra evaluations leave the full-data, original-seed result as it was
    assert on["value"] == off["value"]
    assert on["stderr"] == off["stderr"] or math.isnan(on["stderr"]) and math.isnan(off["stderr"])
    fn, opts = MEASURES[measure], next(s.options for s in SPECS if s.label == measure)
    values = [fn(make_mlp(), fixture_data(), seed=SEED + k, **opts) for k in range(3)]
    assert values[0] == on["value"]
    assert _rel(on["seed_sd"], statistics.stdev(values)) <= 1e-12


# ---- data-independent measures ----------------------------------------------------------------


def test_data_independent_set_names_measures_that_ignore_the_data():
    assert DATA_INDEPENDENT <= set(MEASURES)
    model, init = make_mlp(), make_mlp(seed=7)
    a, b = fixture_data(seed=1), fixture_data(n=10, seed=2)
    for name in DATA_INDEPENDENT:
        opts = {"init_model": init} if name == "distance_from_init" else {}
        assert MEASURES[name](model, a, **opts) == MEASURES[name](model, b, **opts), name


@pytest.mark.parametrize("measure", sorted(DATA_INDEPENDENT))
def test_data_independent_measures_have_zero_data_se(rows_on, measure):
    row = _row(rows_on, measure)
    assert row["data_se"] == 0.0 and row["seed_sd"] == 0.0
    assert "does not depend on the data" in row["error_note"]
    assert row["ci_low"] == row["value"] == row["ci_high"]  # exact: the interval collapses
    assert row["error_seconds"] >= 0


# ---- off by default, copies, the interval -------------------------------------------------------


def test_off_by_default_leaves_the_values_and_nan_columns(rows_on, rows_off):
    assert all(set(r) == set(MEASURE_COLUMNS) for r in rows_off + rows_on)
    assert list(MEASURE_COLUMNS[-len(ERROR_COLUMNS) :]) == list(ERROR_COLUMNS)
    for r in rows_off:
        assert all(math.isnan(r[k]) for k in ("data_se", "seed_sd", "ci_low", "ci_high"))
        assert r["error_note"] == "off" and r["error_seconds"] == 0.0
    for off in rows_off:
        on = _row(rows_on, off["measure"], off["variant"])
        assert on["value"] == off["value"] or math.isnan(on["value"]) and math.isnan(off["value"])


def test_copies_get_nan_error_columns(rows_on):
    copies = [r for r in rows_on if r["variant"] != "original"]
    assert copies and all(math.isfinite(r["value"]) for r in copies)
    for r in copies:
        assert all(math.isnan(r[k]) for k in ("data_se", "seed_sd", "ci_low", "ci_high"))
        assert r["error_note"] == "not computed for copies" and r["error_seconds"] == 0.0


def test_interval_brackets_the_value(rows_on):
    computed = [r for r in rows_on if r["variant"] == "original" and math.isfinite(r["ci_low"])]
    assert {r["measure"] for r in computed} == {s.label for s in SPECS}
    for r in computed:
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
        half = 1.96 * math.hypot(r["data_se"], r["seed_sd"])
        assert r["ci_high"] - r["value"] == pytest.approx(half, rel=1e-12, abs=0)
        assert r["seconds"] >= 0 and r["error_seconds"] >= 0


def test_one_spread_off_leaves_no_interval():
    spec = [MeasureSpec("feature_robustness", "feature_robustness", {"num_samples": 5})]
    (folds_only,) = _measure({"folds": 2}, spec, VARIANTS[:1])
    assert math.isnan(folds_only["seed_sd"]) and math.isfinite(folds_only["data_se"])
    assert math.isnan(folds_only["ci_low"]) and "seeds off" in folds_only["error_note"]
    spec = [MeasureSpec("fisher_rao_norm", "fisher_rao_norm")]
    (seeds_only,) = _measure({"seeds": 3}, spec, VARIANTS[:1])
    assert seeds_only["seed_sd"] == 0.0 and math.isnan(seeds_only["data_se"])
    assert math.isnan(seeds_only["ci_high"]) and "folds off" in seeds_only["error_note"]


# ---- failures ----------------------------------------------------------------------------------


def _picky(model, data, seed=0):
    if data[0].shape[0] < 64:
        raise ValueError("needs all 64 samples")
    if seed != SEED:
        raise ValueError("only the original seed")
    return 1.0


def test_a_failing_fold_or_seed_gives_nan_and_the_reason():
    (row,) = _measure(BARS, [MeasureSpec("p", "picky")], VARIANTS[:1], registry={"picky": _picky})
    assert row["value"] == 1.0 and row["note"] == ""
    assert math.isnan(row["data_se"]) and math.isnan(row["seed_sd"])
    assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
    assert "needs all 64 samples" in row["error_note"]
    assert "only the original seed" in row["error_note"]


def test_more_folds_than_samples_is_a_nan_spread_not_a_crash():
    spec = [MeasureSpec("fisher_rao_norm", "fisher_rao_norm")]
    (row,) = _measure({"folds": 65}, spec, VARIANTS[:1])
    assert math.isnan(row["data_se"]) and "would be empty" in row["error_note"]


def test_other_errors_in_the_extra_evaluations_propagate():
    def broken_on_folds(model, data):
        if data[0].shape[0] < 64:
            raise RuntimeError("bug")
        return 1.0

    with pytest.raises(RuntimeError, match="bug"):
        _measure(
            {"folds": 2}, [MeasureSpec("b", "b")], VARIANTS[:1], registry={"b": broken_on_folds}
        )


def test_a_measure_without_a_value_gets_no_error_bars():
    def never(model, data):
        raise ValueError("not for this model")

    (row,) = _measure(BARS, [MeasureSpec("n", "n")], VARIANTS[:1], registry={"n": never})
    assert math.isnan(row["value"]) and "not computed" in row["error_note"]
    assert math.isnan(row["data_se"]) and row["error_seconds"] == 0.0


# ---- settings: the function, the schema, measure_run --------------------------------------------

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
ERROR_BARS_SCHEMA = SCHEMA["properties"]["measure"]["properties"]["error_bars"]


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"folds": 1}, "measure.error_bars.folds"),
        ({"folds": -1}, "measure.error_bars.folds"),
        ({"folds": 2.5}, "measure.error_bars.folds"),
        ({"seeds": 0}, "measure.error_bars.seeds"),
        ({"seeds": True}, "measure.error_bars.seeds"),
        ({"fold": 4}, "measure.error_bars.fold"),
    ],
)
def test_bad_settings_raise_naming_the_key_and_fail_the_schema(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        error_bar_settings(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(ERROR_BARS_SCHEMA).validate(bad)


def test_folds_one_is_refused_by_measure_model_too():
    with pytest.raises(ValueError, match=r"measure\.error_bars\.folds"):
        _measure({"folds": 1}, SPECS[:1], VARIANTS[:1])


def test_schema_accepts_good_settings_with_off_defaults():
    assert error_bar_settings({"folds": 2.0}).folds == 2  # an integer to JSON Schema too
    for good in (
        {},
        {"folds": 0},
        {"folds": 2.0},
        {"folds": 2, "seeds": 1},
        {"folds": 8, "seeds": 5},
    ):
        jsonschema.Draft202012Validator(ERROR_BARS_SCHEMA).validate(good)
        error_bar_settings(good)
    props = ERROR_BARS_SCHEMA["properties"]
    assert ERROR_BARS_SCHEMA["default"] == {} and ERROR_BARS_SCHEMA["additionalProperties"] is False
    assert (props["folds"]["default"], props["seeds"]["default"]) == (0, 1)
    assert not error_bar_settings(None).on and not error_bar_settings({}).on


def test_measure_run_reads_error_bars_from_the_config():
    cfg = {
        "measures": [{"function": "fisher_rao_norm"}],
        "layerwise": {"copies": 1, "spread": 10.0},
        "n_samples": 32,
        "subset_seed": 0,
        "device": "cpu",
        "error_bars": {"folds": 2},
    }
    rows = measure_run(make_mlp(), fixture_data(), cfg, "r")
    orig, copy = rows
    assert math.isfinite(orig["data_se"]) and orig["error_note"] == "deterministic; folds=2"
    assert math.isnan(copy["data_se"]) and copy["error_note"] == "not computed for copies"
    skipped = measure_run(make_mlp(), fixture_data(), cfg, "r", status="diverged")
    assert all(set(r) == set(MEASURE_COLUMNS) and math.isnan(r["ci_low"]) for r in skipped)
    with pytest.raises(ValueError, match=r"measure\.error_bars\.folds"):
        measure_run(make_mlp(), fixture_data(), dict(cfg, error_bars={"folds": 1}), "r", "diverged")


def test_skipped_rows_have_every_column():
    (row,) = skipped_rows("r", SPECS[:1], VARIANTS[:1], "not measured: diverged")
    assert set(row) == set(MEASURE_COLUMNS) and row["error_note"] == "not measured"
