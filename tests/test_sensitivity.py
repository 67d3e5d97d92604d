"""flatness.sensitivity: a measure re-taken with one of its own settings varied, on one model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from flatness.analysis.paper_figures import sensitivity_figure
from flatness.analysis.papers import sensitivity_notes
from flatness.measures import keskar_sharpness
from flatness.models import build_model
from flatness.sensitivity import measure_sensitivity
from flatness.suite import training_subset


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    net = build_model({"name": "mlp", "widths": [16], "in_shape": [1, 4, 4], "num_classes": 3})
    X = torch.randn(120, 1, 4, 4)
    return net.double().eval(), (X.double(), torch.randint(0, 3, (120,)))


def test_rows_reproduce_direct_calls_on_the_same_subset(model_and_data):
    net, train = model_and_data
    t = measure_sensitivity(net, train, "r0", "keskar_sharpness", {"epsilon": 1e-3}, "maxiter",
                            [2, 10], [30, 500], base_n_samples=60, subset_seed=4, seed=1)  # fmt: skip
    assert list(zip(t.setting, t.value_of_setting, t.n_samples, strict=True)) == [
        ("maxiter", 2, 60), ("maxiter", 10, 60), ("n_samples", 30, 30), ("n_samples", 500, 120)
    ]
    for r in t.itertuples():
        X, y = training_subset(*train, r.n_samples, 4)
        opts = {"maxiter": r.value_of_setting} if r.setting == "maxiter" else {}
        assert r.value == keskar_sharpness(net, (X, y), epsilon=1e-3, seed=1, **opts)
    # more L-BFGS-B iterations can only find a higher loss in the box (same start)
    a, b = t[t.setting == "maxiter"].value
    assert b >= a


def test_notes_and_figure(model_and_data, tmp_path):
    rows = [dict(run_id=f"r{k}", function="keskar_sharpness", setting=s, value_of_setting=v,
                 n_samples=100, value=float(v * (k + 1)), seconds=0.1)
            for k in range(2) for s, vals in (("maxiter", (3, 10, 30)), ("n_samples", (250, 4000)))
            for v in vals]  # fmt: skip
    table = pd.DataFrame(rows)
    notes = sensitivity_notes(table)
    assert len(notes) == 4
    assert any("keskar_sharpness of r1 goes from 6 at maxiter = 3 to 60 at 30" in n for n in notes)
    sensitivity_figure(table, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
