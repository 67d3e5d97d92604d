"""Feature robustness against a direct perturbation of the features through the model, and its
second-order relation to κ^φ_Tr (METHODS.md §3.6)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatness.measures import feature_robustness, relative_flatness
from flatness.reparam import layerwise_rescale, neuronwise_rescale
from tests.conftest import LAYERWISE_FACTORS, neuron_scales


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def draws(m, n, seed, dtype=torch.float64):
    """The documented draw sequence: A_k = randn(m, m, generator=manual_seed(seed)) / √m."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, m, generator=g, dtype=dtype) / math.sqrt(m) for _ in range(n)]


def direct_reference(model, X, y, delta, As, loss_fn=F.cross_entropy):
    """Perturb every sample's features φ_i → φ_i + δAφ_i and run the head of the Sequential."""
    with torch.no_grad():
        phi = model[:-1](X)
        base = float(loss_fn(model(X), y))
        vals = []
        for A in As:
            plus = float(loss_fn(model[-1](phi + delta * phi @ A.T), y))
            minus = float(loss_fn(model[-1](phi - delta * phi @ A.T), y))
            vals.append((plus + minus) / 2 - base)
    return sum(vals) / len(vals)


@pytest.fixture(params=["trained", "random"])
def net(request, trained_mlp64, random_mlp64):
    return trained_mlp64 if request.param == "trained" else random_mlp64


@pytest.mark.parametrize("delta", [0.5, 0.1])
def test_matches_direct_feature_perturbation(delta, net, fixture_data64):
    X, y = fixture_data64
    ref = direct_reference(net, X, y, delta, draws(6, 30, seed=3))
    value = feature_robustness(net, (X, y), delta=delta, num_samples=30, seed=3)
    assert rel(value, ref) <= 1e-8


def test_matches_direct_reference_mse(random_mlp64, fixture_data64):
    X, y = fixture_data64

    def mse(z, t):
        return F.mse_loss(z, F.one_hot(t, z.shape[-1]).to(z.dtype))

    ref = direct_reference(random_mlp64, X, y, 0.2, draws(6, 20, seed=0), mse)
    value = feature_robustness(random_mlp64, (X, y), loss_fn=mse, delta=0.2, num_samples=20)
    assert rel(value, ref) <= 1e-8


def test_second_order_coefficient_is_the_quadratic_form(net, fixture_data64):
    """At small δ the estimator is (δ²/2)·mean_k ⟨WA_k, H[WA_k]⟩ over the same draws (dense H)."""
    X, y = fixture_data64
    last = net[-1]
    W = last.weight.detach()

    def loss(Wv):
        return F.cross_entropy(torch.func.functional_call(last, {"weight": Wv}, (net[:-1](X),)), y)

    with torch.no_grad():
        H = torch.func.hessian(loss)(W).reshape(W.numel(), W.numel())
    quad = [float((W @ A).flatten() @ H @ (W @ A).flatten()) for A in draws(6, 40, seed=7)]
    delta = 1e-4
    value = feature_robustness(net, (X, y), delta=delta, num_samples=40, seed=7)
    # The pair average removes odd orders; the δ⁴ remainder is ≈ 1e-8 relative here.
    assert rel(value, delta**2 / 2 * sum(quad) / len(quad)) <= 1e-5


def test_small_delta_equals_kappa_over_2m(net, fixture_data64):
    X, y = fixture_data64
    delta, m, n = 1e-3, 6, 2000
    value, se = feature_robustness(net, (X, y), delta=delta, num_samples=n, return_stderr=True)
    target = delta**2 / (2 * m) * relative_flatness(net, (X, y))
    assert 0 < se < 0.1 * target
    assert abs(value - target) <= 4 * se


def test_delta_zero_seed_and_sign(random_mlp64, fixture_data64):
    assert feature_robustness(random_mlp64, fixture_data64, delta=0.0) == 0.0
    a = feature_robustness(random_mlp64, fixture_data64, seed=5, return_stderr=True)
    assert a == feature_robustness(random_mlp64, fixture_data64, seed=5, return_stderr=True)
    assert a[0] != feature_robustness(random_mlp64, fixture_data64, seed=6)
    assert a[0] > 0 and a[1] > 0  # CE is convex in the logits, so every pair term is ≥ 0


def test_layerwise_invariant_neuronwise_not(net, fixture_data64):
    before = feature_robustness(net, fixture_data64, num_samples=50)
    after_l = feature_robustness(
        layerwise_rescale(net, LAYERWISE_FACTORS), fixture_data64, num_samples=50
    )
    assert rel(after_l, before) <= 1e-10  # W→aW, φ→φ/a leaves W(I + δA)φ unchanged
    after_n = feature_robustness(
        neuronwise_rescale(net, 1, neuron_scales()), fixture_data64, num_samples=50
    )
    assert max(after_n / before, before / after_n) > 1.5  # like κ_Tr (rows): not invariant


def test_data_forms_agree(random_mlp64, fixture_data64):
    X, y = fixture_data64
    pair = feature_robustness(random_mlp64, (X, y), num_samples=20)
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, len(X), 20)]
    assert rel(feature_robustness(random_mlp64, batches, num_samples=20), pair) <= 1e-12


def test_float32_close_to_float64(net, fixture_data64):
    X, y = fixture_data64
    v64 = feature_robustness(net, (X, y), num_samples=20)
    v32 = feature_robustness(copy.deepcopy(net).float(), (X.float(), y), num_samples=20)
    assert rel(v32, v64) <= 1e-3


def test_mode_restored_and_parameters_untouched(random_mlp64, fixture_data64):
    net = random_mlp64.train()
    before = [p.detach().clone() for p in net.parameters()]
    feature_robustness(net, fixture_data64, num_samples=5)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_bad_input_raises(random_mlp64, fixture_data64):
    X, y = fixture_data64
    with pytest.raises(ValueError, match="no nn.Linear"):
        feature_robustness(nn.Sequential(nn.Flatten()), (X, y))
    with pytest.raises(ValueError, match="empty"):
        feature_robustness(random_mlp64, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="delta"):
        feature_robustness(random_mlp64, (X, y), delta=-0.1)
    with pytest.raises(ValueError, match="num_samples"):
        feature_robustness(random_mlp64, (X, y), num_samples=1)
    Xbad = X.clone()
    Xbad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        feature_robustness(random_mlp64, (Xbad, y))


def test_sum_loss_is_n_times_mean_loss_beyond_one_chunk(random_mlp64):
    from tests.conftest import fixture_data

    X, y = fixture_data(n=300)  # N > 256: the head is collected in two chunks
    N = X.shape[0]
    mean = feature_robustness(random_mlp64, (X, y), delta=0.2, num_samples=6)
    summed = feature_robustness(
        random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss(reduction="sum"), delta=0.2, num_samples=6
    )
    assert rel(summed, N * mean) <= 1e-10
    with pytest.raises(ValueError, match="reduction"):
        feature_robustness(random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss(reduction="none"))
