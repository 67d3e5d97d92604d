"""Keskar ε-sharpness (METHODS.md §5, §10 T12): a closed form on a quadratic, the y = 0 pitfall,
determinism, purity, and its documented non-invariance under rescaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

from flatness.batches import Batches, default_loss
from flatness.measures import keskar, keskar_sharpness
from flatness.reparam import dinh_alpha_rescale, layerwise_rescale, neuronwise_rescale
from tests.conftest import LAYERWISE_FACTORS, make_mlp, neuron_scales

SEEDS = range(4)


def _quadratic_problem(eps: float):
    """Least squares on a bias-free linear model with orthogonal design columns, at its minimum.

    L(θ* + δ) − L(θ*) = δᵀ(XᵀX/N)δ with XᵀX diagonal, so over the box |δ_i| ≤ b_i the maximum is
    at any vertex: Σ_i b_i² (XᵀX)_ii / N, with b_i = ε(|θ*_i| + 1) (A = I)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    X = Q * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)  # orthogonal columns, norms 3, 1, .5
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    with torch.no_grad():
        loss0 = float(nn.functional.mse_loss(model(X), y))
    b = eps * (model.weight.detach().abs().flatten() + 1)
    rise = float((b**2 * (X * X).sum(0)).sum()) / X.shape[0]
    return model, X, y, 100 * rise / (1 + loss0)


@pytest.mark.parametrize("seed", SEEDS)
def test_closed_form_on_a_quadratic(seed):
    model, X, y, expected = _quadratic_problem(eps=0.1)
    # Two batches: the mean over all samples must weigh them by size (13 + 7).
    data = [(X[:13], y[:13]), (X[13:], y[13:])]
    value = keskar_sharpness(model, data, loss_fn=nn.functional.mse_loss, epsilon=0.1, seed=seed)
    assert value == pytest.approx(expected, rel=1e-9)


def test_zero_start_at_an_exact_minimum_returns_zero():
    """The pitfall: ∇L(θ*) = 0 at y = 0, so L-BFGS-B never moves; a random start finds the rise."""
    model, X, y, expected = _quadratic_problem(eps=0.1)
    kw = dict(loss_fn=nn.functional.mse_loss, epsilon=0.1)
    assert keskar_sharpness(model, (X, y), start="zero", **kw) <= 1e-10 * expected
    assert keskar_sharpness(model, (X, y), start="random", **kw) == pytest.approx(
        expected, rel=1e-9
    )


def test_zero_start_on_the_fixture(trained_mlp64, fixture_data64):
    """On the trained fixture (‖∇L‖ ≈ 4e-5) the zero start stops almost at once: ≈ 0 next to the
    random start's value (measured 1.6e-7 vs 1.2e-5)."""
    zero = keskar_sharpness(trained_mlp64, fixture_data64, start="zero")
    rand = keskar_sharpness(trained_mlp64, fixture_data64, start="random")
    assert 0 <= zero <= 0.05 * rand


def test_nonnegative_deterministic_and_seed_dependent(trained_mlp64, random_mlp64, fixture_data64):
    for model in (trained_mlp64, random_mlp64):
        values = [keskar_sharpness(model, fixture_data64, seed=s) for s in (0, 0, 1)]
        assert all(v >= 0 and math.isfinite(v) for v in values)
        assert values[0] == values[1]
    # Near a minimum the start matters; at random init every start climbs to the same vertex.
    assert keskar_sharpness(trained_mlp64, fixture_data64, seed=1) != keskar_sharpness(
        trained_mlp64, fixture_data64, seed=0
    )
    # At random init θ is no minimum: y = 0 is not stationary and the ascent finds a rise.
    assert keskar_sharpness(random_mlp64, fixture_data64, start="zero") > 1e-3


def test_subspace_variant(trained_mlp64, fixture_data64):
    a = keskar_sharpness(trained_mlp64, fixture_data64, subspace_dim=100, seed=0)
    b = keskar_sharpness(trained_mlp64, fixture_data64, subspace_dim=100, seed=0)
    c = keskar_sharpness(trained_mlp64, fixture_data64, subspace_dim=100, seed=1)
    full = keskar_sharpness(trained_mlp64, fixture_data64, seed=0)
    assert a == b and a != c and a >= 0 and math.isfinite(a)
    assert a != full


def test_model_untouched_and_mode_restored(trained_mlp64, fixture_data64):
    model = make_mlp(seed=3).train()
    before = [p.detach().clone() for p in model.parameters()]
    keskar_sharpness(model, fixture_data64)
    keskar_sharpness(model, fixture_data64, subspace_dim=10)
    assert model.training
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_float32_model_gives_a_float(fixture_data64):
    X, y = fixture_data64
    value = keskar_sharpness(make_mlp(seed=3, dtype=torch.float32), (X.float(), y))
    assert isinstance(value, float) and value > 0


def _mean_over_seeds(model, data) -> float:
    return sum(keskar_sharpness(model, data, seed=s) for s in range(8)) / 8


@pytest.mark.parametrize(
    "transform",
    [
        lambda m: layerwise_rescale(m, LAYERWISE_FACTORS),
        lambda m: neuronwise_rescale(m, 1, neuron_scales()),
    ],
    ids=["layerwise", "neuronwise"],
)
def test_rescaling_changes_it(transform, trained_mlp64, fixture_data64):
    """Documented non-invariance (T12): the +1 in ε(|θ_i| + 1) is not scale-aware. The random start
    alone moves one value by ≈ ±40% on this fixture (and a single seed can go either way), so
    the means over 8 seeds are compared (measured ×1.9 layer-wise, ×1.7 neuron-wise)."""
    base = _mean_over_seeds(trained_mlp64, fixture_data64)
    assert _mean_over_seeds(transform(trained_mlp64), fixture_data64) > 1.3 * base


def test_dinh_alpha_makes_it_arbitrarily_large(trained_mlp64, fixture_data64):
    """Dinh et al. 2017: T_α shrinks W2 by α while the box stays ≈ ε wide there."""
    base = keskar_sharpness(trained_mlp64, fixture_data64)
    assert keskar_sharpness(dinh_alpha_rescale(trained_mlp64, 1.0), fixture_data64) == base
    assert keskar_sharpness(dinh_alpha_rescale(trained_mlp64, 100.0), fixture_data64) > 1e3 * base


@pytest.mark.parametrize(
    "kwargs,data,match",
    [
        ({}, (torch.zeros(0, 12, dtype=torch.float64), torch.zeros(0, dtype=torch.long)), "empty"),
        ({}, (torch.zeros(4, 12, dtype=torch.float64), torch.zeros(3, dtype=torch.long)), "match"),
        (
            {},
            (torch.full((4, 12), float("nan"), dtype=torch.float64), torch.zeros(4).long()),
            "finite",
        ),
        ({"start": "middle"}, None, "start"),
        ({"epsilon": 0.0}, None, "epsilon"),
        ({"subspace_dim": 0}, None, "subspace_dim"),
    ],
    ids=["empty", "mismatch", "nan", "start", "epsilon", "subspace"],
)
def test_bad_input_raises(kwargs, data, match, fixture_data64):
    with pytest.raises(ValueError, match=match):
        keskar_sharpness(make_mlp(), data if data is not None else fixture_data64, **kwargs)


def test_return_stderr_is_nan(fixture_data64):
    value, stderr = keskar_sharpness(make_mlp(seed=3), fixture_data64, return_stderr=True)
    assert value > 0 and math.isnan(stderr)


def test_model_without_parameters_raises(fixture_data64):
    with pytest.raises(ValueError, match="no parameters"):
        keskar_sharpness(nn.Identity(), fixture_data64)


# --- the direct L-BFGS-B driver: same iterations, values and evaluations as scipy.optimize.minimize

#: Values of the implementation through ``scipy.optimize.minimize`` (before the direct driver),
#: measured on the fixtures: the driver reproduces them bit for bit.
PINNED = {
    ("trained", None, 0): 1.1801785363886842e-05,
    ("trained", None, 1): 2.719891628508422e-05,
    ("trained", 100, 0): 0.1562177112596788,
    ("random", None, 0): 0.17205889635121796,
    ("random", 10, 0): 0.0757993864951522,
}

needs_setulb = pytest.mark.skipif(
    not keskar._setulb_usable(), reason="scipy's setulb has another signature: minimize() is used"
)


def _through_minimize(monkeypatch):
    monkeypatch.setattr(keskar, "_setulb_usable", lambda: False)


@pytest.mark.parametrize("key", list(PINNED), ids=[f"{a}-p{b}-s{c}" for a, b, c in PINNED])
def test_value_unchanged(key, trained_mlp64, random_mlp64, fixture_data64, monkeypatch):
    which, p, seed = key
    model = trained_mlp64 if which == "trained" else random_mlp64
    fast = keskar_sharpness(model, fixture_data64, subspace_dim=p, seed=seed)
    assert fast == pytest.approx(PINNED[key], rel=1e-10, abs=0)
    _through_minimize(monkeypatch)
    slow = keskar_sharpness(model, fixture_data64, subspace_dim=p, seed=seed)
    assert fast == pytest.approx(slow, rel=1e-10, abs=0)


def _negated_loss(model, data, record: list):
    flat = keskar._FlatLoss(model, Batches.for_model(data, model), default_loss)

    def fun(y):
        record.append(np.array(y, copy=True))
        loss, g = flat(torch.from_numpy(np.array(y, copy=True)))
        return -loss, -g.numpy()

    return fun, flat.theta.numel()


@needs_setulb
@pytest.mark.parametrize("maxiter", [1, 3, 10])
@pytest.mark.parametrize("start", ["random", "zero"])
def test_driver_follows_scipy_minimize(maxiter, start, trained_mlp64, fixture_data64):
    """Same L-BFGS-B iterates: the same points evaluated in the same order, the same nit and nfev."""
    ours, theirs = [], []
    fun, n = _negated_loss(trained_mlp64, fixture_data64, ours)
    gen = np.random.default_rng(0)
    bound = 0.1 * (gen.random(n) + 0.5)
    y0 = (gen.random(n) * 2 - 1) * bound if start == "random" else np.zeros(n)
    nit, nfev = keskar._lbfgsb_box(fun, y0, bound, maxiter)
    fun_ref, _ = _negated_loss(trained_mlp64, fixture_data64, theirs)
    res = scipy.optimize.minimize(
        fun_ref,
        y0,
        jac=True,
        method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(-bound, bound),
        options={"maxiter": maxiter},
    )
    assert (nit, nfev) == (res.nit, res.nfev)
    assert len(ours) == len(theirs) == nfev
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


@needs_setulb
@pytest.mark.parametrize("subspace_dim", [None, 7])
def test_evaluations_are_scipy_nfev_plus_one(
    subspace_dim, trained_mlp64, fixture_data64, monkeypatch
):
    """No evaluation beyond L-BFGS-B's own (``res.nfev`` of the same run through
    ``scipy.optimize.minimize``) and the one loss at θ."""
    calls = {"grad": 0, "loss": 0}
    original = keskar._FlatLoss.__call__

    def counting(self, delta, grad=True):
        calls["grad" if grad else "loss"] += 1
        return original(self, delta, grad)

    monkeypatch.setattr(keskar._FlatLoss, "__call__", counting)
    kw = dict(subspace_dim=subspace_dim, seed=2)
    keskar_sharpness(trained_mlp64, fixture_data64, **kw)
    ours = dict(calls)

    results = []
    minimize = scipy.optimize.minimize
    monkeypatch.setattr(
        scipy.optimize, "minimize", lambda *a, **k: results.append(minimize(*a, **k))
    )
    _through_minimize(monkeypatch)
    keskar_sharpness(trained_mlp64, fixture_data64, **kw)
    (res,) = results
    assert res.nit >= 1 and res.nfev > res.nit
    assert ours == {"grad": res.nfev, "loss": 1}


# --- one BLAS thread inside setulb (n > 10⁴, where OpenBLAS threads its dot products)


def _box_quadratic(record: list):
    """½xᵀCx − bᵀx, C diagonal in [1, 100], over a box that holds about half the minimiser's
    coordinates: the iterates stay partly inside the box, where setulb's dot products set them
    (on a box-bound loss ascent they sit on vertices and rounding rarely shows)."""
    n = 30_000
    gen = np.random.default_rng(0)
    c, b = np.exp(gen.uniform(0, np.log(100), n)), gen.standard_normal(n)
    bound = np.full(n, 0.05)
    y0 = gen.uniform(-1, 1, n) * bound

    def fun(x):
        record.append(x.copy())
        return float(0.5 * (c * x) @ x - b @ x), c * x - b

    return fun, y0, bound


@needs_setulb
def test_driver_runs_setulb_on_one_blas_thread(monkeypatch):
    """Above n = 10⁴ the driver's iterates are ``minimize``'s with one BLAS thread, bit for bit
    (with the machine's threads they may differ in the last bits); setulb sees one thread, the
    function evaluations and the caller get their thread counts back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [
            (i["num_threads"], i.get("threading_layer"))
            for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"
        ]

    inside, outside, ours, theirs = [], [], [], []
    setulb = keskar._setulb

    def watched(*args):
        inside.append(blas_threads())
        return setulb(*args)

    monkeypatch.setattr(keskar, "_setulb", watched)
    fun, y0, bound = _box_quadratic(ours)

    def fun_watched(y):
        outside.append(blas_threads())
        return fun(y)

    before = blas_threads()
    nit, nfev = keskar._lbfgsb_box(fun_watched, y0, bound, 10)
    assert blas_threads() == before and all(t == before for t in outside)
    # OpenMP-threaded BLAS libraries are left alone (their count is torch's OpenMP setting too)
    one = [(1 if layer in keskar._OWN_THREAD_LAYERS else k, layer) for k, layer in before]
    assert inside and all(t == one for t in inside)
    monkeypatch.setattr(keskar, "_setulb", setulb)

    fun_ref, _, _ = _box_quadratic(theirs)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        res = scipy.optimize.minimize(
            fun_ref,
            y0,
            jac=True,
            method="L-BFGS-B",
            bounds=scipy.optimize.Bounds(-bound, bound),
            options={"maxiter": 10},
        )
    assert nit == 10 and (nit, nfev) == (res.nit, res.nfev)
    assert len(ours) == len(theirs) == nfev
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


@needs_setulb
def test_wide_value_agrees_with_threaded_minimize(fixture_data64, monkeypatch):
    """A 25k-parameter MLP against ``minimize`` on the machine's BLAS threads: the same value to
    rounding."""
    model = make_mlp(widths=(12, 1500, 4), seed=3)
    assert sum(p.numel() for p in model.parameters()) > 10_000
    fast = keskar_sharpness(model, fixture_data64, epsilon=0.05, seed=1)
    _through_minimize(monkeypatch)
    slow = keskar_sharpness(model, fixture_data64, epsilon=0.05, seed=1)
    assert fast > 0 and fast == pytest.approx(slow, rel=1e-10, abs=0)
