"""Loss slices (flatness.slices): exact endpoints, filter normalisation, shapes, purity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatness.batches import Batches, mean_loss
from flatness.slices import (
    evaluate_at,
    interpolate_loss,
    loss_slice_1d,
    loss_surface_2d,
    random_direction,
)
from tests.conftest import make_mlp


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, before) -> bool:
    return all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_interpolation_endpoints_reproduce_each_model(trained_mlp64, fixture_data64):
    other = make_mlp(seed=3)
    before_a, before_b = _params(trained_mlp64), _params(other)
    df = interpolate_loss(trained_mlp64, other, fixture_data64, [0.0, 0.5, 1.0, -1.0, 2.0])
    assert list(df.columns) == ["alpha", "loss", "accuracy"] and len(df) == 5
    for alpha, model in ((0.0, trained_mlp64), (1.0, other)):
        row = df[df.alpha == alpha].iloc[0]
        # Exactly: (1 − 0)θ_a + 0·θ_b is θ_a bit for bit, and the same code path evaluates it.
        assert (row.loss, row.accuracy) == evaluate_at(model, fixture_data64)
        # And against the package's own mean loss, to rounding.
        expected = float(mean_loss(model, Batches.for_model(fixture_data64, model)).detach())
        assert row.loss == pytest.approx(expected, rel=1e-14)
        X, y = fixture_data64
        assert row.accuracy == float((model(X).argmax(1) == y).double().mean())
    # The middle of the path is neither endpoint: the slice has content.
    assert df.loss[1] not in (df.loss[0], df.loss[2])
    assert _unchanged(trained_mlp64, before_a) and _unchanged(other, before_b)


def test_interpolation_matches_a_hand_built_model(trained_mlp64, fixture_data64):
    other = make_mlp(seed=3)
    alpha = 0.3
    mixed = make_mlp()
    with torch.no_grad():
        for p, a, b in zip(
            mixed.parameters(), trained_mlp64.parameters(), other.parameters(), strict=True
        ):
            p.copy_((1 - alpha) * a + alpha * b)
    df = interpolate_loss(trained_mlp64, other, fixture_data64, [alpha])
    assert df.loss[0] == pytest.approx(evaluate_at(mixed, fixture_data64)[0], rel=1e-14)


def test_interpolation_with_batchnorm_buffers(fixture_data64):
    """BN running statistics are endpoints too: α = 1 must use model_b's, not model_a's."""
    X, _ = fixture_data64
    a = nn.Sequential(nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4)).double()
    b = nn.Sequential(nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        b[1].running_mean.fill_(0.7), b[1].running_var.fill_(3.0)
    df = interpolate_loss(a, b, fixture_data64, [0.0, 1.0])
    assert df.loss[0] == evaluate_at(a, fixture_data64)[0]
    assert df.loss[1] == evaluate_at(b, fixture_data64)[0]
    with pytest.raises(ValueError, match="same parameter names"):
        interpolate_loss(a, make_mlp(), fixture_data64, [0.5])


def test_filter_normalised_direction_norms(trained_mlp64):
    d = random_direction(trained_mlp64, torch.Generator().manual_seed(0))
    for name, p in trained_mlp64.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(
                d[name].norm(dim=1), p.detach().norm(dim=1), rtol=1e-12, atol=0
            )
            assert not torch.allclose(d[name], p.detach())  # random, not the weight itself
        else:
            assert torch.count_nonzero(d[name]) == 0
    kept = random_direction(trained_mlp64, torch.Generator().manual_seed(0), one_dim="weight")
    assert torch.equal(kept["0.bias"], trained_mlp64[0].bias.detach())
    again = random_direction(trained_mlp64, torch.Generator().manual_seed(0))
    assert all(torch.equal(d[k], again[k]) for k in d)
    raw = random_direction(trained_mlp64, torch.Generator().manual_seed(0), filter_normalized=False)
    assert not torch.allclose(raw["0.weight"].norm(dim=1), trained_mlp64[0].weight.norm(dim=1))


def test_filter_normalisation_on_conv_filters():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).double()
    d = random_direction(conv, torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        d["0.weight"].flatten(1).norm(dim=1),
        conv[0].weight.detach().flatten(1).norm(dim=1),
        rtol=1e-12,
        atol=0,
    )
    with pytest.raises(ValueError, match="one_dim"):
        random_direction(conv, torch.Generator(), one_dim="keep")


def test_slice_1d(trained_mlp64, fixture_data64):
    before = _params(trained_mlp64)
    d = random_direction(trained_mlp64, torch.Generator().manual_seed(0))
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    df = loss_slice_1d(trained_mlp64, fixture_data64, d, alphas)
    assert df.alpha.tolist() == alphas
    assert df.loss[2] == evaluate_at(trained_mlp64, fixture_data64)[0]
    # At (or very near) a minimum, moving along a filter-normalised direction raises the loss.
    assert df.loss[0] > df.loss[2] and df.loss[4] > df.loss[2]
    # A list in parameters() order means the same direction as the dict.
    df_list = loss_slice_1d(trained_mlp64, fixture_data64, list(d.values()), alphas)
    assert df_list.loss.tolist() == df.loss.tolist()
    # θ + 1·d by hand.
    moved = make_mlp()
    with torch.no_grad():
        for p, q, v in zip(moved.parameters(), trained_mlp64.parameters(), d.values(), strict=True):
            p.copy_(q + v)
    assert df.loss[4] == pytest.approx(evaluate_at(moved, fixture_data64)[0], rel=1e-14)
    assert _unchanged(trained_mlp64, before)
    with pytest.raises(ValueError, match="missing"):
        loss_slice_1d(trained_mlp64, fixture_data64, {"0.weight": d["0.weight"]}, alphas)


def test_surface_2d_shape_and_axes(trained_mlp64, fixture_data64):
    g = torch.Generator().manual_seed(0)
    d1, d2 = random_direction(trained_mlp64, g), random_direction(trained_mlp64, g)
    alphas, betas = [-0.5, 0.0, 0.5], [-0.4, 0.0, 0.4, 0.8]
    df = loss_surface_2d(trained_mlp64, fixture_data64, d1, d2, alphas, betas)
    grid = df.pivot(index="alpha", columns="beta", values="loss")
    assert grid.shape == (3, 4)
    assert grid.loc[0.0, 0.0] == evaluate_at(trained_mlp64, fixture_data64)[0]
    # The β = 0 column is the 1-D slice along d1.
    line = loss_slice_1d(trained_mlp64, fixture_data64, d1, alphas)
    assert grid[0.0].tolist() == pytest.approx(line.loss.tolist(), rel=1e-14)
    assert df.accuracy.between(0, 1).all()


def test_regression_data_gives_nan_accuracy():
    net = nn.Linear(3, 1).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    loss, acc = evaluate_at(
        net, (X, torch.zeros(5, 1, dtype=torch.float64)), loss_fn=nn.functional.mse_loss
    )
    assert loss > 0 and acc != acc  # NaN


def test_sum_loss_over_many_chunks_is_the_sum():
    # 600 samples span three default chunks: a sum-reduced loss must give N × the mean loss.
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()
    X = torch.randn(600, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (600,), generator=g)
    mean_value, _ = evaluate_at(net, (X, y))
    sum_loss, _ = evaluate_at(net, (X, y), loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"))
    assert abs(sum_loss - 600 * mean_value) <= 1e-10 * sum_loss
