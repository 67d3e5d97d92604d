"""Fisher–Rao norm against per-sample autograd gradients, the Euler identity of bias-free ReLU nets
and its invariance (METHODS.md §5, §10: T13, T17)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatness.measures import fisher_rao_norm
from flatness.reparam import dinh_alpha_rescale, layerwise_rescale, neuronwise_rescale
from tests.conftest import LAYERWISE_FACTORS, make_mlp, neuron_scales


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def mse_onehot(z, y):
    return F.mse_loss(z, F.one_hot(y, z.shape[-1]).to(z.dtype))


def dense_reference(model, X, y, loss_fn=F.cross_entropy):
    """mean_i ⟨θ, ∇_θ ℓ_i⟩² from one reverse-mode gradient per sample, all parameters."""
    params = list(model.parameters())
    total = 0.0
    for i in range(X.shape[0]):
        loss = loss_fn(model(X[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        total += float(sum((p.detach() * g).sum() for p, g in zip(params, grads, strict=True))) ** 2
    return total / X.shape[0]


@pytest.fixture(params=["trained", "random"])
def net(request, trained_mlp64, random_mlp64):
    return trained_mlp64 if request.param == "trained" else random_mlp64


def test_matches_per_sample_gradients(net, fixture_data64):
    X, y = fixture_data64
    assert rel(fisher_rao_norm(net, (X, y)), dense_reference(net, X, y)) <= 1e-10


def test_matches_per_sample_gradients_mse(random_mlp64, fixture_data64):
    X, y = fixture_data64
    value = fisher_rao_norm(random_mlp64, (X, y), loss_fn=mse_onehot)
    assert rel(value, dense_reference(random_mlp64, X, y, mse_onehot)) <= 1e-10


def test_per_sample_loss_does_not_depend_on_reduction(random_mlp64, fixture_data64):
    # ℓ_i is loss_fn on sample i alone, so a sum-reduced loss_fn gives the same ℓ_i.
    summed = fisher_rao_norm(
        random_mlp64, fixture_data64, loss_fn=lambda z, t: F.cross_entropy(z, t, reduction="sum")
    )
    assert rel(summed, fisher_rao_norm(random_mlp64, fixture_data64)) <= 1e-13


@pytest.mark.parametrize("widths", [(12, 8, 4), (12, 8, 6, 4), (12, 8, 6, 5, 4)])
def test_euler_identity_bias_free_relu(widths, fixture_data64):
    X, y = fixture_data64
    K = len(widths) - 1
    model = make_mlp(widths=widths, bias=False, seed=2)
    params = {k: p.detach() for k, p in model.named_parameters()}
    f, df = torch.func.jvp(
        lambda th: torch.func.functional_call(model, th, (X,)), (params,), (params,)
    )
    assert torch.allclose(df, K * f, rtol=1e-12, atol=1e-13)  # ⟨θ, ∇_θ f⟩ = K f
    p = torch.softmax(f, dim=1)
    analytic = K**2 * float((((p * f).sum(1) - f[torch.arange(len(y)), y]) ** 2).mean())
    assert rel(fisher_rao_norm(model, (X, y)), analytic) <= 1e-10


def test_with_biases_the_euler_shortcut_is_not_the_norm(random_mlp64, fixture_data64):
    X, y = fixture_data64
    with torch.no_grad():
        f = random_mlp64(X)
    p = torch.softmax(f, dim=1)
    shortcut = 9 * float((((p * f).sum(1) - f[torch.arange(len(y)), y]) ** 2).mean())
    assert rel(fisher_rao_norm(random_mlp64, (X, y)), shortcut) > 1e-3


def test_invariant_under_layerwise_neuronwise_and_dinh(net, fixture_data64):
    before = fisher_rao_norm(net, fixture_data64)
    for other in (
        layerwise_rescale(net, LAYERWISE_FACTORS),
        neuronwise_rescale(net, 1, neuron_scales()),
        neuronwise_rescale(net, 0, torch.linspace(0.3, 3.0, 8, dtype=torch.float64)),
        dinh_alpha_rescale(net, 100.0),
    ):
        assert rel(fisher_rao_norm(other, fixture_data64), before) <= 1e-12


def test_data_forms_agree(random_mlp64, fixture_data64):
    X, y = fixture_data64
    pair = fisher_rao_norm(random_mlp64, (X, y))
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, len(X), 20)]
    assert rel(fisher_rao_norm(random_mlp64, batches), pair) <= 1e-13
    gen = ((X[i : i + 7], y[i : i + 7]) for i in range(0, len(X), 7))
    assert rel(fisher_rao_norm(random_mlp64, gen), pair) <= 1e-13


def test_float32_close_to_float64(net, fixture_data64):
    # Same weights and inputs in both precisions (the float32 ones, cast up for the reference):
    # rounding the memorised fixture's weights to float32 moves its loss, and so FR, by 1.2e-3 by
    # itself; that is the model changing, not the measure's arithmetic being inaccurate.
    X, y = fixture_data64
    net32 = copy.deepcopy(net).float()
    v64 = fisher_rao_norm(copy.deepcopy(net32).double(), (X.float().double(), y))
    v32 = fisher_rao_norm(net32, (X.float(), y))
    assert rel(v32, v64) <= 1e-3


def test_mode_restored_parameters_untouched_and_dropout_off(fixture_data64):
    X, y = fixture_data64
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    net.train()
    before = [p.detach().clone() for p in net.parameters()]
    value = fisher_rao_norm(net, (X, y))
    assert all(m.training for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    net.eval()
    assert rel(value, dense_reference(net, X, y)) <= 1e-10  # measured as in eval(): no dropout


def test_bad_input_raises(random_mlp64, fixture_data64):
    X, y = fixture_data64
    with pytest.raises(ValueError, match="empty"):
        fisher_rao_norm(random_mlp64, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="must match"):
        fisher_rao_norm(random_mlp64, (X, y[:10]))
    Xbad = X.clone()
    Xbad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        fisher_rao_norm(random_mlp64, (Xbad, y))
    with pytest.raises(ValueError, match="pair"):
        fisher_rao_norm(random_mlp64, [X])
