"""``hessian_spectrum`` (stochastic Lanczos quadrature) vs the dense float64 Hessian.

Fixture of METHODS.md §10 (ReLU MLP 12-8-6-4, N = 64, float64; n = 186 parameters). The dense
reference is ``torch.func.hessian`` of the mean cross-entropy over the flat vector of all
parameters (``parameters()`` order, the operator's) and ``torch.linalg.eigvalsh``. With as many
Lanczos steps as parameters each probe's run ends on an invariant subspace, so its Gauss nodes
are eigenvalues of H (measured: ≤ 1.1e-12·max|λ| away; asserted 1e-8). With 15 steps the
extreme node already matches λ_max (measured ≤ 6e-13 relative on both fixtures; asserted 1e-6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from flatness.hutchinson import rademacher_probes
from flatness.measures import (
    MEASURES,
    hessian_max_eigenvalue,
    hessian_spectrum,
    spectrum_nodes,
    spectrum_table,
    top_node,
)
from flatness.reparam import dinh_alpha_rescale, weight_layer
from tests.conftest import fixture_data, make_mlp

NODE_TOL = 1e-8  # relative to max|λ|: nodes of an exact (n-step) Lanczos run
TOP_TOL = 1e-6  # relative: the largest node after a few steps vs dense λ_max


def dense_hessian(model, X, y) -> torch.Tensor:
    """Dense H of the mean CE over all parameters, flat in ``parameters()`` order."""
    named = list(model.named_parameters())
    numels = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat):
        ps = {name: c.view(p.shape) for (name, p), c in zip(named, flat.split(numels), strict=True)}
        return nn.functional.cross_entropy(functional_call(model, ps, (X,)), y)

    return hessian(f)(theta)


def param_slice(model, tensor) -> slice:
    start = 0
    for p in model.parameters():
        if p is tensor:
            return slice(start, start + p.numel())
        start += p.numel()
    raise KeyError("not a parameter of the model")


def nearest_distance(nodes, eigenvalues) -> np.ndarray:
    nodes = np.asarray(nodes, float)[:, None]
    return np.abs(nodes - eigenvalues.numpy()[None, :]).min(axis=1)


@pytest.fixture(scope="module")
def random_case():
    model = make_mlp(seed=3)
    X, y = fixture_data()
    H = dense_hessian(model, X, y)
    return model, (X, y), H, torch.linalg.eigvalsh(H)


@pytest.fixture(scope="module")
def trained_case(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    H = dense_hessian(trained_mlp64, X, y)
    return trained_mlp64, (X, y), H, torch.linalg.eigvalsh(H)


@pytest.fixture(params=["random", "trained"])
def case(request):
    return request.getfixturevalue(f"{request.param}_case")


def test_not_a_float_measure():
    assert "hessian_spectrum" not in MEASURES


def test_full_lanczos_nodes_are_eigenvalues(case):
    model, data, H, ev = case
    n = H.shape[0]
    sd = hessian_spectrum(model, data, num_probes=3, num_steps=n, seed=1)
    assert sd.n == n == sum(p.numel() for p in model.parameters())
    nodes = spectrum_nodes(sd)
    assert list(nodes.columns) == ["probe", "node", "weight"]
    assert sorted(nodes["probe"].unique()) == [0, 1, 2]
    assert (nodes["weight"] > 0).all()
    # breakdown leaves padded entries (weight 0), which the table drops
    assert len(nodes) == int((sd.weights > 0).sum())
    scale = float(ev.abs().max())
    assert nearest_distance(nodes["node"], ev).max() <= NODE_TOL * scale
    # the extreme nodes are λ_min and λ_max themselves
    assert top_node(sd) == pytest.approx(float(ev[-1]), rel=1e-10)
    assert float(nodes["node"].min()) == pytest.approx(float(ev[0]), abs=NODE_TOL * scale)
    # each probe's weights are a probability vector
    np.testing.assert_allclose(nodes.groupby("probe")["weight"].sum(), 1.0, rtol=1e-12)


def test_trace_of_is_hutchinson(case):
    """n Σ_j τ_j θ_j^k = rᵀHᵏr per probe (Gauss quadrature is exact for degree ≤ 2m − 1), whose
    mean over probes is the Hutchinson estimate of tr Hᵏ: within 4 standard errors."""
    model, data, H, _ = case
    n, P, steps = H.shape[0], 64, 10
    sd = hessian_spectrum(model, data, num_probes=P, num_steps=steps, seed=2)
    assert sd.trace_of(lambda x: x**0) == pytest.approx(n, rel=1e-13)
    probes = torch.stack(list(rademacher_probes(n, P, torch.Generator().manual_seed(2))))
    for k in (1, 2):
        Hk = torch.linalg.matrix_power(H, k)
        samples = n * (sd.weights * sd.nodes**k).sum(dim=1)
        # the same probes, quadratic forms from the dense Hessian: equal sample by sample
        exact = torch.einsum("pi,ij,pj->p", probes, Hk, probes)
        np.testing.assert_allclose(samples, exact, rtol=1e-9, atol=1e-12 * float(exact.abs().max()))
        estimate = sd.trace_of(lambda x, k=k: x**k)
        assert estimate == pytest.approx(float(samples.mean()), rel=1e-12)
        stderr = float(samples.std(unbiased=True)) / math.sqrt(P)
        assert abs(estimate - float(torch.trace(Hk))) <= 4 * stderr


def test_few_steps_find_lambda_max(case):
    """Lanczos converges to the extreme eigenvalues first: 15 of 186 steps suffice per probe."""
    model, data, _, ev = case
    sd = hessian_spectrum(model, data, num_probes=4, num_steps=15, seed=0)
    lam = float(ev[-1])
    assert sd.nodes.shape == (4, 15)
    per_probe = [float(sd.nodes[i][sd.weights[i] > 0].max()) for i in range(4)]
    for top in per_probe:
        assert abs(top - lam) <= TOP_TOL * lam
    assert top_node(sd) == max(per_probe)
    # the same number as the curvature measure's Lanczos (same operator)
    ref = hessian_max_eigenvalue(model, data, tol=1e-10)
    assert top_node(sd) == pytest.approx(ref, rel=TOP_TOL)


def test_density_integrates_to_one(case):
    model, data, _, _ = case
    sd = hessian_spectrum(model, data, num_probes=4, num_steps=30, num_grid=400)
    table = spectrum_table(sd)
    assert list(table.columns) == ["eigenvalue", "density"]
    assert len(table) == 400
    assert table["eigenvalue"].is_monotonic_increasing
    assert (table["density"] >= 0).all()
    area = np.trapezoid(table["density"], table["eigenvalue"])
    assert area == pytest.approx(1.0, abs=1e-3)
    # a given σ is used (narrower peaks, still normalised)
    width = float(np.ptp(table["eigenvalue"].to_numpy()))
    narrow = spectrum_table(
        hessian_spectrum(model, data, num_probes=4, num_steps=30, sigma=1e-3 * width, num_grid=4000)
    )
    assert narrow["density"].max() > table["density"].max()
    assert np.trapezoid(narrow["density"], narrow["eigenvalue"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_layer_block_spectrum(trained_case, layer):
    model, data, H, _ = trained_case
    W = weight_layer(model, layer)[2].weight
    s = param_slice(model, W)
    block_ev = torch.linalg.eigvalsh(H[s, s])
    m = W.numel()
    sd = hessian_spectrum(model, data, layer=layer, num_probes=3, num_steps=m, seed=4)
    assert sd.n == m
    nodes = spectrum_nodes(sd)["node"]
    scale = float(block_ev.abs().max())
    assert nearest_distance(nodes, block_ev).max() <= NODE_TOL * scale
    assert top_node(sd) == pytest.approx(float(block_ev[-1]), rel=1e-9)
    assert sd.trace_of(lambda x: x**0) == pytest.approx(m, rel=1e-13)
    # not the spectrum of the whole Hessian
    assert top_node(sd) < float(torch.linalg.eigvalsh(H)[-1]) * (1 + 1e-12)


def test_same_seed_same_result(random_case):
    model, data, _, _ = random_case
    a = hessian_spectrum(model, data, num_probes=3, num_steps=12, seed=7)
    b = hessian_spectrum(model, data, num_probes=3, num_steps=12, seed=7)
    c = hessian_spectrum(model, data, num_probes=3, num_steps=12, seed=8)
    for field in ("nodes", "weights", "grid", "density"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.weights, c.weights)


def test_eval_mode_used_and_restored():
    """A dropout net in train() mode gives the eval() spectrum, and stays in train() mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    X, y = fixture_data()
    net.eval()
    ref = hessian_spectrum(net, (X, y), num_probes=2, num_steps=20)
    net.train()
    got = hessian_spectrum(net, (X, y), num_probes=2, num_steps=20)
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(got.nodes, ref.nodes)
    assert torch.equal(got.density, ref.density)
    net.eval()
    hessian_spectrum(net, (X, y), num_probes=1, num_steps=5)
    assert not any(m.training for m in net.modules())


def test_dtype_and_bad_options():
    model = make_mlp(seed=3, dtype=torch.float32)
    X64, y = fixture_data()
    X = X64.float()
    sd = hessian_spectrum(model, (X, y), num_probes=2, num_steps=10)
    assert sd.nodes.dtype == torch.float64  # quadrature stored in float64 whatever the model
    ref = hessian_spectrum(make_mlp(seed=3), (X64, y), num_probes=2, num_steps=10)
    assert top_node(sd) == pytest.approx(top_node(ref), rel=1e-4)
    for bad in ({"num_probes": 0}, {"num_steps": 0}, {"num_grid": 1}, {"sigma": 0.0}):
        with pytest.raises(ValueError):
            hessian_spectrum(model, (X, y), **bad)
    with pytest.raises(ValueError, match="out of range"):
        hessian_spectrum(model, (X, y), layer=3)


def test_not_invariant_under_dinh_alpha(trained_case):
    """Documented non-invariance: Dinh's T_α leaves the function unchanged but scales the block
    of the rescaled layer's weight by α², so the spectrum (its top node) moves by far more than 2×
    (measured ×53 for α = 10 on the trained fixture)."""
    model, data, _, ev = trained_case
    rescaled = dinh_alpha_rescale(model, 10.0)
    X, _ = data
    with torch.no_grad():
        assert torch.allclose(rescaled(X), model(X), rtol=0, atol=1e-10)
    before = hessian_spectrum(model, data, num_probes=2, num_steps=30)
    after = hessian_spectrum(rescaled, data, num_probes=2, num_steps=30)
    assert top_node(before) == pytest.approx(float(ev[-1]), rel=TOP_TOL)
    assert top_node(after) > 2 * top_node(before)
