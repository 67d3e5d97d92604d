"""flatness.suite: grid expansion, measure specs and the measure suite on reparameterised copies."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatness.config import RunConfig
from flatness.suite import (
    AXES,
    MEASURE_COLUMNS,
    MeasureSpec,
    Variant,
    batch_pairs,
    expand_grid,
    format_lr,
    interpolation_table,
    measure_model,
    measure_run,
    measure_specs,
    training_subset,
    variants_from_config,
)
from tests.conftest import make_mlp


def study(**grid):
    base = dict(
        dataset=["digits"],
        model=["mlp"],
        optimizer=["sgd"],
        regularizer=["none", "sam"],
        batch_size=[16, 256],
        lr=[0.05],
        seed=[0, 1],
    )
    base.update(grid)
    return {
        "grid": base,
        "datasets": {"digits": {"name": "digits"}},
        "models": {"mlp": {"name": "mlp", "widths": [16]}},
        "optimizers": {"sgd": {"name": "sgd", "momentum": 0.9}},
        "regularizers": {"none": {"name": "none"}, "sam": {"name": "sam", "rho": 0.1}},
        "training": {"epochs": 3, "target_train_loss": 0.05},
    }


def test_expand_grid_is_the_full_product_with_readable_ids_and_valid_configs():
    runs = expand_grid(study())
    assert len(runs) == 1 * 1 * 1 * 2 * 2 * 1 * 2
    ids = {r.run_id for r in runs}
    assert "digits-mlp-sgd-sam-bs16-lr0.05-s0" in ids
    assert len(ids) == len(runs)
    run = next(r for r in runs if r.run_id == "digits-mlp-sgd-sam-bs256-lr0.05-s1")
    assert run.axes == dict(
        dataset="digits",
        model="mlp",
        optimizer="sgd",
        regularizer="sam",
        batch_size=256,
        lr=0.05,
        seed=1,
    )
    cfg = RunConfig.from_dict(run.config)
    assert (cfg.batch_size, cfg.seed, cfg.optimizer.lr, cfg.regularizer.rho) == (256, 1, 0.05, 0.1)
    assert (cfg.epochs, cfg.target_train_loss, cfg.model.widths) == (3, 0.05, (16,))
    assert set(run.axes) == set(AXES)


def test_grid_id_missing_from_its_section_names_the_key():
    with pytest.raises(ValueError, match=r"grid.regularizer names 'fam'.*regularizers"):
        expand_grid(study(regularizer=["none", "fam"]))


def test_run_config_errors_name_the_key():
    cfg = study()
    cfg["models"]["mlp"]["dropout"] = -0.5
    with pytest.raises(ValueError, match="model.dropout"):
        expand_grid(cfg)


@pytest.mark.parametrize("lr, text", [(0.05, "0.05"), (1e-4, "0.0001"), (2, "2"), (1.6, "1.6")])
def test_format_lr(lr, text):
    assert format_lr(lr) == text


def test_batch_pairs_pair_smallest_and_largest_batch_of_otherwise_equal_runs():
    runs = expand_grid(study(batch_size=[16, 64, 256]))
    pairs = batch_pairs(runs)
    assert len(pairs) == 2 * 2  # regularizer × seed
    p = next(p for p in pairs if p.small == "digits-mlp-sgd-none-bs16-lr0.05-s1")
    assert p.large == "digits-mlp-sgd-none-bs256-lr0.05-s1"
    assert p.pair_id == "digits-mlp-sgd-none-lr0.05-s1-bs16vs256"
    assert batch_pairs(expand_grid(study(batch_size=[16]))) == []


def test_measure_specs_check_options_against_the_signature_and_labels():
    specs = measure_specs(
        [
            {"function": "relative_flatness"},
            {
                "function": "relative_flatness",
                "label": "rf_std",
                "options": {"normalize_features": True},
            },
        ]
    )
    assert [s.label for s in specs] == ["relative_flatness", "rf_std"]
    assert specs[1].options == {"normalize_features": True}
    with pytest.raises(ValueError, match=r"measure.measures\[0\].options.bogus"):
        measure_specs([{"function": "relative_flatness", "options": {"bogus": 1}}])
    with pytest.raises(ValueError, match="used twice"):
        measure_specs([{"function": "relative_flatness"}, {"function": "relative_flatness"}])
    with pytest.raises(ValueError, match="set by the workflow"):
        measure_specs([{"function": "relative_flatness", "options": {"seed": 3}}])


def test_measure_parameters_table_is_exactly_the_measures_signatures():
    """measure_specs (and so the workflow, without torch) reads flatness.measure_signatures; the
    functions stay the source of truth: the table must be their signatures, measure for measure."""
    from flatness.measure_signatures import MEASURE_PARAMETERS, parameters
    from flatness.measures import MEASURES

    actual = {name: parameters(fn) for name, fn in sorted(MEASURES.items())}
    table = "\n".join(f"    {name!r}: {params!r}," for name, params in actual.items())
    assert MEASURE_PARAMETERS == actual, f"paste into flatness/measure_signatures.py:\n{table}"


def test_measure_specs_with_a_registry_read_its_signatures():
    def plain(model, data, alpha=1.0, seed=0):
        return 0.0

    def open_ended(model, data, **options):
        return 0.0

    registry = {"plain": plain, "open_ended": open_ended}
    (spec,) = measure_specs([{"function": "open_ended", "options": {"x": 1}}], registry)
    assert spec.options == {"x": 1}
    with pytest.raises(ValueError, match=r"plain takes no option 'beta' \(it takes \['alpha'"):
        measure_specs([{"function": "plain", "options": {"beta": 1}}], registry)
    with pytest.raises(ValueError, match=r"measure.measures\[0\].function = 'hessian_trace'"):
        measure_specs([{"function": "hessian_trace"}], registry)


def test_variants_from_config():
    names = [
        v.name
        for v in variants_from_config(
            {"layerwise": {"copies": 2, "spread": 5.0}, "dinh_alpha": [10, 100]}
        )
    ]
    assert names == ["original", "layerwise0", "layerwise1", "dinh_alpha10", "dinh_alpha100"]


# A registry of closed-form toy "measures": one invariant (depends on the function only), one not.
def output_energy(model, data):
    X, _ = data
    return float(model(X).detach().pow(2).mean())


def weight_energy(model, data):
    return float(sum(p.detach().pow(2).sum() for p in model.parameters()))


def noisy(model, data, *, seed=0, return_stderr=False):
    value = float(torch.randn((), generator=torch.Generator().manual_seed(seed)))
    return (value, 0.5) if return_stderr else value


REGISTRY = {"output_energy": output_energy, "weight_energy": weight_energy, "noisy": noisy}
SPECS = [MeasureSpec(n, n) for n in REGISTRY]
VARIANTS = [
    Variant("original", "original"),
    Variant("layerwise0", "layerwise", 10.0),
    Variant("dinh_alpha100", "dinh", 100.0),
]


def _value(rows, measure, variant):
    return next(r["value"] for r in rows if r["measure"] == measure and r["variant"] == variant)


def test_measure_model_rows_and_reparameterised_copies(fixture_data64):
    model = make_mlp()
    rows = measure_model(
        model, fixture_data64, SPECS, VARIANTS, seed=4, run_id="r", registry=REGISTRY
    )
    assert len(rows) == len(SPECS) * len(VARIANTS)
    assert set(rows[0]) == set(MEASURE_COLUMNS)
    base = _value(rows, "output_energy", "original")
    for variant in ("layerwise0", "dinh_alpha100"):
        assert _value(rows, "output_energy", variant) == pytest.approx(base, rel=1e-10)
    # the Euclidean weight norm grows ≈ α² on the Dinh copy
    assert _value(rows, "weight_energy", "dinh_alpha100") > 50 * _value(
        rows, "weight_energy", "original"
    )
    noisy_rows = [r for r in rows if r["measure"] == "noisy"]
    expected = float(torch.randn((), generator=torch.Generator().manual_seed(4)))
    assert all(r["value"] == pytest.approx(expected) and r["stderr"] == 0.5 for r in noisy_rows)
    assert all(r["seconds"] >= 0 and r["note"] == "" for r in rows)
    assert all(math.isnan(r["stderr"]) for r in rows if r["measure"] != "noisy")


def test_real_invariant_measures_stay_put_on_the_copies(trained_mlp64, fixture_data64):
    specs = measure_specs([{"function": "relative_flatness"}, {"function": "fisher_rao_norm"}])
    variants = variants_from_config(
        {"layerwise": {"copies": 1, "spread": 10.0}, "dinh_alpha": [100]}
    )
    rows = measure_model(trained_mlp64, fixture_data64, specs, variants, seed=0)
    for spec in specs:
        base = _value(rows, spec.label, "original")
        for v in variants[1:]:
            assert _value(rows, spec.label, v.name) == pytest.approx(base, rel=1e-6), (spec, v)


def test_variant_that_does_not_apply_is_recorded_not_raised(fixture_data64):
    bn = (
        nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
        .double()
        .eval()
    )
    rows = measure_model(bn, fixture_data64, SPECS, VARIANTS, registry=REGISTRY)
    orig = [r for r in rows if r["variant"] == "original"]
    copies = [r for r in rows if r["variant"] != "original"]
    assert all(math.isfinite(r["value"]) for r in orig if r["measure"] != "noisy")
    assert copies and all(math.isnan(r["value"]) for r in copies)
    assert all(r["note"].startswith("not applicable") and "BatchNorm" in r["note"] for r in copies)


def test_other_errors_propagate(fixture_data64):
    def broken(model, data):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        measure_model(
            make_mlp(),
            fixture_data64,
            [MeasureSpec("b", "b")],
            VARIANTS[:1],
            registry={"b": broken},
        )


def test_measure_run_skips_diverged_runs_but_returns_every_row(fixture_data64):
    cfg = {
        "measures": [{"function": "fisher_rao_norm"}],
        "layerwise": {"copies": 1, "spread": 10.0},
        "dinh_alpha": [10],
        "n_samples": 32,
        "subset_seed": 0,
    }
    rows = measure_run(make_mlp(), fixture_data64, cfg, "r", status="diverged")
    assert len(rows) == 3 and all(math.isnan(r["value"]) for r in rows)
    assert all("diverged" in r["note"] for r in rows)
    ok = measure_run(make_mlp(), fixture_data64, cfg, "r", status="ok")
    assert all(math.isfinite(r["value"]) for r in ok)


def test_training_subset_is_fixed_and_sized():
    X, y = torch.arange(100.0).view(100, 1), torch.arange(100)
    a, b = training_subset(X, y, 10, seed=3), training_subset(X, y, 10, seed=3)
    assert torch.equal(a[0], b[0]) and a[0].shape == (10, 1)
    assert torch.equal(a[0].view(-1).long(), a[1])
    assert training_subset(X, y, 1000, seed=0)[0].shape[0] == 100


def test_grid_exclude_couples_optimizer_settings_to_batch_sizes_and_pairs_across_them():
    cfg = study(optimizer=["sgd_sb", "sgd_lb"], regularizer=["none"], seed=[0])
    cfg["optimizers"] = {
        "sgd_sb": {"name": "sgd", "momentum": 0.9},
        "sgd_lb": {"name": "sgd", "momentum": 0.99},
    }
    cfg["grid"]["exclude"] = [
        {"optimizer": "sgd_sb", "batch_size": 256, "seed": None},
        {"optimizer": "sgd_lb", "batch_size": 16},
    ]
    runs = expand_grid(cfg)
    assert sorted(r.run_id for r in runs) == [
        "digits-mlp-sgd_lb-none-bs256-lr0.05-s0",
        "digits-mlp-sgd_sb-none-bs16-lr0.05-s0",
    ]
    assert batch_pairs(runs) == []
    (pair,) = batch_pairs(runs, across=["optimizer"])
    assert (pair.small, pair.large) == (
        "digits-mlp-sgd_sb-none-bs16-lr0.05-s0",
        "digits-mlp-sgd_lb-none-bs256-lr0.05-s0",
    )
    cfg["grid"]["exclude"] = [{"optimizer": "adam"}]
    with pytest.raises(ValueError, match=r"grid.exclude\[0\].optimizer"):
        expand_grid(cfg)


def test_interpolation_table_end_points_and_a_diverged_model(fixture_data64):
    a, b = make_mlp(seed=0), make_mlp(seed=1)
    rows = interpolation_table(a, b, {"train": fixture_data64}, [0.0, 0.5, 1.0])
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0] and all(r["note"] == "" for r in rows)
    loss_b = float(nn.functional.cross_entropy(b(fixture_data64[0]), fixture_data64[1]))
    assert rows[2]["loss"] == pytest.approx(loss_b)
    with torch.no_grad():
        b[0].weight.fill_(float("nan"))
    bad = interpolation_table(a, b, {"train": fixture_data64}, [0.0, 1.0])
    assert all(math.isnan(r["loss"]) and "not finite" in r["note"] for r in bad)


def test_metrics_of_run_refuses_another_runs_file(tmp_path):
    import json as _json

    from flatness.suite import metrics_of_run

    path = tmp_path / "metrics.json"
    path.write_text(_json.dumps({"run_id": "a", "status": "ok"}))
    assert metrics_of_run(path, "a")["status"] == "ok"
    with pytest.raises(ValueError, match="records run 'a', not 'b'"):
        metrics_of_run(path, "b")
