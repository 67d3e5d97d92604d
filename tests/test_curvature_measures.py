"""Curvature measures vs dense float64 references and their (non-)invariances (METHODS.md §2, §5, §10)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatness.measures.curvature import (
    adaptive_sharpness,
    hessian_max_eigenvalue,
    hessian_trace,
    quotient_sharpness,
)
from flatness.reparam import dinh_alpha_rescale, layerwise_rescale, neuronwise_rescale
from tests.conftest import LAYERWISE_FACTORS, neuron_scales, train_full_batch
from tests.test_hvp import dense_hessian, snapshot, unchanged

TIGHT = 1e-12  # Lanczos tolerance for the 1e-9 comparisons (the operators are 186-dimensional)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def tensor_scale(model, kind: str) -> torch.Tensor:
    """D (per-tensor Frobenius norms) or C = |w| as a flat vector, parameters() order."""
    if kind == "D":
        parts = [
            torch.full((p.numel(),), float(p.detach().norm()), dtype=torch.float64)
            for p in model.parameters()
        ]
    else:
        parts = [p.detach().abs().reshape(-1) for p in model.parameters()]
    return torch.cat(parts).to(torch.float64)


def dense_top(model, X, y, kind: str | None = None) -> float:
    H = dense_hessian(model, X, y)
    if kind is not None:
        s = tensor_scale(model, kind)
        H = s[:, None] * H * s[None, :]
    return float(torch.linalg.eigvalsh(H)[-1])


def rescaled(model, how: str):
    if how == "L":
        return layerwise_rescale(model, LAYERWISE_FACTORS)
    return neuronwise_rescale(model, 1, neuron_scales())  # the 6 feature units


@pytest.fixture(params=["trained", "random"])
def net(request, trained_mlp64, random_mlp64):
    return trained_mlp64 if request.param == "trained" else random_mlp64


# --- dense references -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lanczos", "eigsh"])
def test_max_eigenvalue_matches_dense(net, fixture_data64, method):
    X, y = fixture_data64
    lam = hessian_max_eigenvalue(net, (X, y), tol=TIGHT, method=method, chunk_size=16)
    assert rel(lam, dense_top(net, X, y)) <= 1e-8
    default = hessian_max_eigenvalue(net, (X, y), method=method)  # tol 1e-4 bounds the error
    assert rel(default, dense_top(net, X, y)) <= 1e-4


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_max_eigenvalue_within_tol_and_fewer_matvecs_when_looser(
    net, fixture_data64, tol, monkeypatch
):
    X, y = fixture_data64
    ref = dense_top(net, X, y)
    counts = []
    for t in (tol, tol / 100):
        count = _CountMatvecs(monkeypatch)
        assert rel(hessian_max_eigenvalue(net, (X, y), tol=t), ref) <= t
        counts.append(count.calls)
    assert counts[0] < counts[1]  # a looser tol stops earlier


def test_max_eigenvalue_on_parameter_subset(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    H = dense_hessian(trained_mlp64, X, y, names={"2.weight"})
    lam = hessian_max_eigenvalue(trained_mlp64, (X, y), params=[trained_mlp64[2].weight], tol=TIGHT)
    assert rel(lam, float(torch.linalg.eigvalsh(H)[-1])) <= 1e-8


@pytest.mark.parametrize("method", ["auto", "ggn_exact", "dense"])
def test_trace_exact_matches_dense(net, fixture_data64, method):
    X, y = fixture_data64
    value, se = hessian_trace(net, (X, y), method=method, return_stderr=True)
    assert se == 0.0
    assert rel(value, float(torch.trace(dense_hessian(net, X, y)))) <= 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_trace_stochastic_within_its_stderr(net, fixture_data64, seed):
    X, y = fixture_data64
    exact = float(torch.trace(dense_hessian(net, X, y)))
    v, se = hessian_trace(net, (X, y), num_probes=45, seed=seed, return_stderr=True)
    assert 0 < se and abs(v - exact) <= 4 * se
    # Adaptive rounds (forced past the exact path): stop at 2% relative stderr or the cap.
    v, se = hessian_trace(
        net, (X, y), method="hutchpp", max_probes=1000, seed=seed, return_stderr=True
    )
    assert abs(v - exact) <= 4 * se
    assert se <= 0.02 * abs(v)
    capped = hessian_trace(
        net, (X, y), method="hutchpp", rel_stderr=1e-9, max_probes=40, return_stderr=True
    )
    assert capped[1] > 1e-9 * abs(capped[0])  # the cap, not the target, ended it
    assert hessian_trace(net, (X, y), num_probes=45, seed=seed) == hessian_trace(
        net, (X, y), num_probes=45, seed=seed
    )


def test_quotient_sharpness_matches_dense_dhd(net, fixture_data64):
    X, y = fixture_data64
    ref = dense_top(net, X, y, "D")
    for method in ("lanczos", "eigsh"):
        assert rel(quotient_sharpness(net, (X, y), tol=TIGHT, method=method), ref) <= 1e-9


def test_quotient_sharpness_normalised_forms(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    lam = quotient_sharpness(trained_mlp64, (X, y), tol=TIGHT)
    L = float(nn.functional.cross_entropy(trained_mlp64(X), y).detach())
    norm = quotient_sharpness(trained_mlp64, (X, y), normalized=True, tol=TIGHT)
    assert norm == pytest.approx(lam / (2 * (1 + L)), rel=1e-12)
    eps = quotient_sharpness(trained_mlp64, (X, y), normalized=True, epsilon=1e-3, tol=TIGHT)
    assert eps == pytest.approx(lam * 1e-6 / (2 * (1 + L)), rel=1e-12)


def test_quotient_sharpness_with_a_zero_tensor(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    net = copy.deepcopy(trained_mlp64)
    with torch.no_grad():
        net[0].bias.zero_()  # a zero block of D: no division anywhere
    assert rel(quotient_sharpness(net, (X, y), tol=TIGHT), dense_top(net, X, y, "D")) <= 1e-9


def test_t15_power_iteration_on_g_inverse_h(trained_mlp64, fixture_data64):
    """R4: the reference algorithm (g-normalised power iteration on G⁻¹H, Rayleigh quotient vᵀHv
    with g(v, v) = 1) and Lanczos on DHD both give dense eigh(DHD)."""
    X, y = fixture_data64
    H = dense_hessian(trained_mlp64, X, y)
    d2 = tensor_scale(trained_mlp64, "D") ** 2  # G⁻¹ = diag(‖T‖²)

    def g_norm(v):
        return torch.sqrt((v * v / d2).sum())

    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v / g_norm(v)
    for _ in range(1000):
        w = d2 * (H @ v)
        w = w / g_norm(w)
        done = torch.linalg.vector_norm(w - v) / torch.linalg.vector_norm(v) < 1e-13
        v = w
        if done:
            break
    power = float(v @ H @ v)
    ref = dense_top(trained_mlp64, X, y, "D")
    assert rel(power, ref) <= 1e-9
    assert rel(quotient_sharpness(trained_mlp64, (X, y), tol=TIGHT), ref) <= 1e-9


def test_adaptive_quadratic_matches_dense(net, fixture_data64):
    X, y = fixture_data64
    ref = dense_top(net, X, y, "C")
    assert rel(adaptive_sharpness(net, (X, y), tol=TIGHT), ref) <= 1e-9
    assert adaptive_sharpness(net, (X, y), rho=0.1, tol=TIGHT) == pytest.approx(
        0.5 * 0.01 * ref, rel=1e-9
    )
    H = dense_hessian(net, X, y)
    c = tensor_scale(net, "C") + 0.01
    ref_eta = float(torch.linalg.eigvalsh(c[:, None] * H * c[None])[-1])
    assert rel(adaptive_sharpness(net, (X, y), eta=0.01, tol=TIGHT), ref_eta) <= 1e-9


# --- invariances (METHODS.md §10) -------------------------------------------------------------


@pytest.mark.parametrize("how", ["L", "N"])
def test_t2_euclidean_measures_have_teeth(net, fixture_data64, how):
    """T2/R2: λ_max and Tr H change ≥ 2× under both function-preserving rescalings."""
    X, y = fixture_data64
    other = rescaled(net, how)
    for f, kw in [(hessian_max_eigenvalue, {"tol": 1e-8}), (hessian_trace, {})]:
        a, b = f(net, (X, y), **kw), f(other, (X, y), **kw)
        assert max(a / b, b / a) >= 2.0, f.__name__


def test_t3_quotient_sharpness_layerwise_invariant(net, fixture_data64):
    X, y = fixture_data64
    a = quotient_sharpness(net, (X, y), tol=TIGHT)
    b = quotient_sharpness(rescaled(net, "L"), (X, y), tol=TIGHT)
    assert rel(b, a) <= 1e-9


def test_t4_quotient_sharpness_not_neuronwise_invariant(net, fixture_data64):
    """R3, a documented limitation: a per-tensor D cannot absorb per-unit scalings."""
    X, y = fixture_data64
    a = quotient_sharpness(net, (X, y), tol=TIGHT)
    b = quotient_sharpness(rescaled(net, "N"), (X, y), tol=TIGHT)
    assert max(a / b, b / a) >= 2.0


@pytest.mark.parametrize("how", ["L", "N"])
def test_t5_adaptive_quadratic_invariant(net, fixture_data64, how):
    X, y = fixture_data64
    a = adaptive_sharpness(net, (X, y), tol=TIGHT)
    assert rel(adaptive_sharpness(rescaled(net, how), (X, y), tol=TIGHT), a) <= 1e-10


def test_t10_dinh_alpha(trained_mlp64, fixture_data64):
    """R5: T_α leaves the function, λ_R and the adaptive form put, while the Euclidean λ_max is
    at least α² × the top eigenvalue of the (W, b) block of the layer divided by α."""
    X, y = fixture_data64
    block = dense_hessian(trained_mlp64, X, y, names={"2.weight", "2.bias"})
    lam_block = float(torch.linalg.eigvalsh(block)[-1])
    lam_r = quotient_sharpness(trained_mlp64, (X, y), tol=TIGHT)
    ada = adaptive_sharpness(trained_mlp64, (X, y), tol=TIGHT)
    for alpha in (1.0, 10.0, 100.0):
        net = dinh_alpha_rescale(trained_mlp64, alpha)  # weight layer 1 ÷ α, layer 2 × α
        assert float((net(X) - trained_mlp64(X)).abs().max()) <= 1e-12
        lam = hessian_max_eigenvalue(net, (X, y), tol=TIGHT)
        assert lam >= alpha**2 * lam_block * (1 - 1e-9)
        assert rel(quotient_sharpness(net, (X, y), tol=TIGHT), lam_r) <= 1e-9
        assert rel(adaptive_sharpness(net, (X, y), tol=TIGHT), ada) <= 1e-9
    assert lam >= 1e4 * lam_block * (1 - 1e-9) > 100 * hessian_max_eigenvalue(trained_mlp64, (X, y))


def test_float32_close_to_float64(net, trained_mlp64, fixture_data64):
    """float32 within 1e-3 of float64 where the loss is O(1). At the memorised minimum the CE
    curvature p(1 − p) rests on 1 − p ≈ L ≈ 1.6e-5, resolved by float32 only to ≈ eps32/L; the
    bound there is 2·eps32/L (≈ 1.5e-2) instead."""
    X, y = fixture_data64
    L = float(nn.functional.cross_entropy(net(X), y).detach())
    bound = 1e-3 if net is not trained_mlp64 else 2 * torch.finfo(torch.float32).eps / L
    assert bound < 0.05
    net32 = copy.deepcopy(net).float()
    for f, kw in [
        (hessian_max_eigenvalue, {"tol": 1e-6}),
        (hessian_trace, {}),
        (quotient_sharpness, {"tol": 1e-6}),
        (adaptive_sharpness, {"tol": 1e-6}),
    ]:
        v32 = f(net32, (X.float(), y), **kw)
        assert isinstance(v32, float)
        assert rel(v32, f(net, (X, y), **kw)) <= bound, f.__name__


# --- worst-case adaptive sharpness ------------------------------------------------------------


def _loss_at(model, X, y, flat_delta):
    ps, i = {}, 0
    for n, p in model.named_parameters():
        ps[n] = p.detach() + flat_delta[i : i + p.numel()].view(p.shape)
        i += p.numel()
    return float(nn.functional.cross_entropy(functional_call(model, ps, (X,)), y))


@pytest.mark.parametrize("p", [2, "inf"])
def test_worst_case_beats_random_search_and_is_monotone(net, fixture_data64, p):
    X, y = fixture_data64
    rhos = [1e-3, 1e-2, 5e-2] if p == 2 else [2e-4, 2e-3, 8e-3]
    vals = [adaptive_sharpness(net, (X, y), kind="worst_case", rho=r, p=p) for r in rhos]
    assert all(v >= 0 for v in vals)
    assert vals[0] < vals[1] < vals[2]
    # Brute force: 100 random points on the boundary of the ball must not beat the ascent.
    c = tensor_scale(net, "C")
    L0 = _loss_at(net, X, y, torch.zeros_like(c))
    g = torch.Generator().manual_seed(1)
    for rho, v in zip(rhos, vals, strict=True):
        best = 0.0
        for _ in range(100):
            z = torch.randn(c.numel(), generator=g, dtype=torch.float64)
            z = rho * (z / z.norm() if p == 2 else z.sign())
            best = max(best, _loss_at(net, X, y, c * z) - L0)
        assert v >= best


def _trust_region_max(g: torch.Tensor, M: torch.Tensor, rho: float) -> float:
    """max gᵀγ + ½γᵀMγ over ‖γ‖ ≤ ρ (the trust-region subproblem, boundary case, M with a positive
    eigenvalue): γ = (μI − M)⁻¹g with μ > λ_max(M) chosen by bisection so that ‖γ‖ = ρ."""
    e, U = torch.linalg.eigh(M)
    gt = U.T @ g
    lo, hi = float(e[-1]), float(e[-1]) + float(g.norm()) / rho + 1.0
    for _ in range(200):
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if float((gt / (mu - e)).norm()) > rho else (lo, mu)
    gam = gt / (mu - e)
    return float(gt @ gam + 0.5 * (gam * e * gam).sum())


def test_worst_case_small_rho_matches_quadratic_model(fixture_data64):
    """At small ℓ2 radius, max L(w + δ) − L(w) over ‖δ ⊘ |w|‖ ≤ ρ equals the maximum of its
    second-order model over the ball, up to the cubic remainder. A smooth (tanh) net, near a
    minimum: ReLU kinks break Taylor models (on the ReLU fixture a unit flips at ρ ≈ 1e-4)."""
    X, y = fixture_data64
    torch.manual_seed(0)  # nn.Linear's default init, test-side only
    net = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    train_full_batch(net, X, y, steps=150, lr=0.5)
    c = tensor_scale(net, "C")
    net2 = copy.deepcopy(net)
    grad = torch.autograd.grad(nn.functional.cross_entropy(net2(X), y), list(net2.parameters()))
    g = c * torch.cat([t.reshape(-1) for t in grad])
    M = c[:, None] * dense_hessian(net, X, y) * c[None, :]
    for rho in (1e-3, 3e-3):
        v = adaptive_sharpness(net, (X, y), kind="worst_case", rho=rho, p=2)
        best = _trust_region_max(g, M, rho)
        assert rel(v, best) <= 1e-4
        # The linear term ρ‖g‖ dominates here; the second-order excess must match too.
        lin = rho * float(g.norm())
        assert rel(v - lin, best - lin) <= 2e-2


# --- contract: mode, parameters, errors -------------------------------------------------------


def test_mode_restored_params_unchanged(fixture_data64):
    X, y = fixture_data64
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 4)).double()
    net.train()
    snap = snapshot(net)
    ref = dense_top(net, X, y)  # dropout off (eval)
    assert rel(hessian_max_eigenvalue(net, (X, y), tol=TIGHT), ref) <= 1e-9
    for f, kw in [
        (hessian_trace, {}),
        (hessian_trace, {"num_probes": 6}),
        (quotient_sharpness, {"normalized": True}),
        (adaptive_sharpness, {}),
        (adaptive_sharpness, {"kind": "worst_case", "rho": 0.1}),
    ]:
        f(net, (X, y), **kw)
        assert net.training and net[2].training, f.__name__
        assert unchanged(net, snap), f.__name__


def test_data_forms_agree(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, 64, 20)]
    for f in (hessian_max_eigenvalue, quotient_sharpness, adaptive_sharpness):
        assert (
            rel(f(trained_mlp64, batches, tol=TIGHT), f(trained_mlp64, (X, y), tol=TIGHT)) <= 1e-9
        )
    assert rel(hessian_trace(trained_mlp64, batches), hessian_trace(trained_mlp64, (X, y))) <= 1e-12


def test_bad_input(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    Xnan = X.clone()
    Xnan[3, 1] = float("inf")
    for f in (hessian_max_eigenvalue, hessian_trace, quotient_sharpness, adaptive_sharpness):
        with pytest.raises(ValueError, match="empty"):
            f(trained_mlp64, (X[:0], y[:0]))
        with pytest.raises(ValueError, match="samples"):
            f(trained_mlp64, (X, y[:5]))
        with pytest.raises(ValueError, match="not finite"):
            f(trained_mlp64, (Xnan, y))
    with pytest.raises(ValueError, match="not finite"):
        adaptive_sharpness(trained_mlp64, (Xnan, y), kind="worst_case")
    with pytest.raises(ValueError, match="method"):
        hessian_max_eigenvalue(trained_mlp64, (X, y), method="power")
    with pytest.raises(ValueError, match="kind"):
        adaptive_sharpness(trained_mlp64, (X, y), kind="average")
    with pytest.raises(ValueError, match="p must"):
        adaptive_sharpness(trained_mlp64, (X, y), kind="worst_case", p=1)
    with pytest.raises(ValueError, match="epsilon"):
        quotient_sharpness(trained_mlp64, (X, y), epsilon=1e-3)
    with pytest.raises(ValueError, match="eta"):
        adaptive_sharpness(trained_mlp64, (X, y), eta=-1.0)


# --- review fixes: sum losses past one chunk, two-stage trace, quotient_sharpness checks --------


@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["recompute", "kept-graph"])
def test_p6_sum_loss_gives_n_times_the_mean_loss_value(random_mlp64, budget):
    from tests.conftest import fixture_data

    X, y = fixture_data(n=300)  # N > DEFAULT_CHUNK = 256: two chunks of unequal size
    N = X.shape[0]
    summed = nn.CrossEntropyLoss(reduction="sum")
    kw = {"graph_budget_bytes": budget}
    for f, extra in [
        (hessian_max_eigenvalue, {"tol": TIGHT}),
        (hessian_trace, {}),  # exact (186 parameters)
        (hessian_trace, {"num_probes": 30, "seed": 2}),  # same probes: exactly N×
        (quotient_sharpness, {"tol": TIGHT}),
        (adaptive_sharpness, {"tol": TIGHT}),
    ]:
        mean = f(random_mlp64, (X, y), **kw, **extra)
        total = f(random_mlp64, (X, y), loss_fn=summed, **kw, **extra)
        assert rel(total, N * mean) <= 1e-9, (f.__name__, extra)
    wc = {"kind": "worst_case", "rho": 0.05}
    mean = adaptive_sharpness(random_mlp64, (X, y), **wc)
    assert rel(adaptive_sharpness(random_mlp64, (X, y), loss_fn=summed, **wc), N * mean) <= 1e-8
    with pytest.raises(ValueError, match="reduction"):
        hessian_trace(random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss(reduction="none"))


class _CountMatvecs:
    def __init__(self, monkeypatch):
        from flatness.hvp import HessianOperator

        self.calls = 0
        original = HessianOperator.matvec

        def counted(op, v):
            self.calls += 1
            return original(op, v)

        monkeypatch.setattr(HessianOperator, "matvec", counted)


def test_trace_given_num_probes_is_exactly_that_many_hvps(
    random_mlp64, fixture_data64, monkeypatch
):
    count = _CountMatvecs(monkeypatch)
    hessian_trace(random_mlp64, fixture_data64, num_probes=21)
    assert count.calls == 21  # no pilot


def test_trace_default_is_two_stage_with_a_warned_cap(net, fixture_data64, monkeypatch):
    import warnings

    from flatness import hutchinson

    X, y = fixture_data64
    count = _CountMatvecs(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the target is reachable: no cap warning
        v, se = hessian_trace(net, (X, y), method="hutchpp", max_probes=2000, return_stderr=True)
    assert se <= 0.02 * abs(v)
    # Pilot (sketch 10 + 10 probes) + main stage, whose count is fixed: the reported estimate
    # is a fresh Hutch++ run with exactly that count after the pilot's draws.
    gen = torch.Generator().manual_seed(0)
    op_mv = _dense_matvec(net, X, y)
    ref = hutchinson.adaptive_hutchpp_trace(op_mv, 186, gen, max_matvecs=2000)
    assert ref.pilot_matvecs == 30 and count.calls == 30 + ref.num_matvecs
    assert v == pytest.approx(ref.value, rel=1e-9) and se == pytest.approx(ref.stderr, rel=1e-6)
    with pytest.warns(RuntimeWarning, match="capped at max_matvecs=40"):
        hessian_trace(net, (X, y), method="hutchpp", max_probes=40)


def _dense_matvec(model, X, y):
    from tests.test_hvp import dense_hessian

    H = dense_hessian(model, X, y)
    return lambda v: H @ v


def test_quotient_sharpness_checks_options_before_the_eigensolve(
    trained_mlp64, fixture_data64, monkeypatch
):
    from flatness.measures import curvature

    def no_solve(*a, **k):
        raise AssertionError("the eigen-solve ran before the options were checked")

    with monkeypatch.context() as m:
        m.setattr(curvature, "top_eigenvalues", no_solve)
        for kw, msg in [
            ({"epsilon": 1e-3}, "normalized=True"),
            ({"normalized": True, "epsilon": -1.0}, "epsilon"),
            ({"normalized": True, "epsilon": float("nan")}, "epsilon"),
            ({"method": "power"}, "method"),
            ({"tol": 0.0}, "tol"),
        ]:
            with pytest.raises(ValueError, match=msg):
                quotient_sharpness(trained_mlp64, fixture_data64, **kw)


def test_quotient_sharpness_normalising_loss_needs_no_second_graph(
    trained_mlp64, fixture_data64, monkeypatch
):
    from flatness.hvp import HessianOperator

    builds = []
    original = HessianOperator._build_graph

    def counted(op):
        builds.append(1)
        return original(op)

    monkeypatch.setattr(HessianOperator, "_build_graph", counted)
    X, y = fixture_data64
    lam = quotient_sharpness(trained_mlp64, (X, y), tol=TIGHT)
    builds.clear()
    norm = quotient_sharpness(trained_mlp64, (X, y), normalized=True, tol=TIGHT)
    assert len(builds) == 1  # the eigen-solve's graph only; the loss is a no-grad pass
    L = float(nn.functional.cross_entropy(trained_mlp64(X), y).detach())
    assert norm == pytest.approx(lam / (2 * (1 + L)), rel=1e-12)


def test_eigsh_non_convergence_warns_or_fails_clearly(monkeypatch, trained_mlp64, fixture_data64):
    from flatness import lanczos
    from flatness.measures import curvature

    original = lanczos.eigsh_top_eigenvalues

    cluster = torch.linspace(1.0, 1.0 + 1e-4, 186, dtype=torch.float64)

    def starved(mv, n, k, *, method, **kw):  # ARPACK on a clustered spectrum, one restart
        return original(lambda v: cluster * v, n, k, **{**kw, "max_iter": 1, "tol": 1e-15})

    monkeypatch.setattr(curvature, "top_eigenvalues", starved)
    # Before: scipy's ArpackNoConvergence escaped; now a clear ValueError when nothing converged.
    with pytest.raises(ValueError, match="eigsh did not converge"):
        hessian_max_eigenvalue(trained_mlp64, fixture_data64, method="eigsh")

    def partial(mv, n, k, *, method, **kw):
        res = original(mv, n, k, **kw)
        return lanczos.LanczosResult(res.eigenvalues, res.num_matvecs, False)

    monkeypatch.setattr(curvature, "top_eigenvalues", partial)
    with pytest.warns(RuntimeWarning, match="eigsh did not reach"):
        lam = hessian_max_eigenvalue(trained_mlp64, fixture_data64, method="eigsh", tol=TIGHT)
    assert rel(lam, dense_top(trained_mlp64, *fixture_data64)) <= 1e-8


# --- exact GGN trace of piecewise-linear nets (flatness.ggn) ------------------------------------


def _conv_net(seed=0) -> nn.Module:
    """Conv + BatchNorm (eval, non-trivial running stats) + in-place ReLU + max-pool, a grouped
    reflect-padded conv, LeakyReLU, avg-pool, dropout, nested Sequential: piecewise linear."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect"), nn.LeakyReLU(0.1)
        ),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(16, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).double()
    bn = net[1]
    bn.running_mean.copy_(torch.randn(4, dtype=torch.float64) * 0.3)
    bn.running_var.copy_(torch.rand(4, dtype=torch.float64) + 0.5)
    nn.init.normal_(bn.weight, 1.0, 0.3)
    nn.init.normal_(bn.bias, 0.0, 0.3)
    return net.train()  # the measure must switch to eval() (BN running stats, dropout off)


def _conv1d_net() -> nn.Module:
    """Conv1d (stride, dilation, padding, no bias) + BatchNorm1d + max-pool."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, bias=False),
        nn.BatchNorm1d(3),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(9, 3),
    ).double()


def _conv3d_net() -> nn.Module:
    """Conv3d: the generic (torch.func) per-sample path."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 3)
    ).double()


CONV_CASES = {
    "conv2d_bn_maxpool": (_conv_net, (20, 1, 8, 8)),
    "conv1d_bn": (_conv1d_net, (20, 2, 12)),
    "conv3d": (_conv3d_net, (20, 1, 3, 3, 3)),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_ggn_exact_trace_matches_dense_on_conv_nets(case):
    make, shape = CONV_CASES[case]
    net = make()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],), generator=g)
    dense = float(torch.trace(dense_hessian(net, X, y)))
    snap = snapshot(net)
    value, se = hessian_trace(net, (X, y), method="ggn_exact", return_stderr=True)
    assert se == 0.0 and rel(value, dense) <= 1e-8
    assert hessian_trace(net, (X, y)) == value  # auto takes the exact GGN path
    assert net.training and all(m.training for m in net.modules())  # mode restored
    assert unchanged(net, snap)
    bn = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(int(m.num_batches_tracked) == 0 for m in bn)  # running stats untouched


def test_ggn_exact_chunking_and_data_forms_agree(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    ref = hessian_trace(trained_mlp64, (X, y), method="ggn_exact")
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, 64, 20)]  # unequal last batch
    assert rel(hessian_trace(trained_mlp64, batches, method="ggn_exact"), ref) <= 1e-12
    assert rel(hessian_trace(trained_mlp64, iter(batches), method="ggn_exact"), ref) <= 1e-12
    for chunk in (1, 7, None):
        assert rel(hessian_trace(trained_mlp64, (X, y), chunk_size=chunk), ref) <= 1e-12
    net = _conv_net()
    g = torch.Generator().manual_seed(4)
    Xc = torch.randn(30, 1, 8, 8, generator=g, dtype=torch.float64)
    yc = torch.randint(0, 3, (30,), generator=g)
    full = hessian_trace(net, (Xc, yc), method="ggn_exact", chunk_size=None)
    assert rel(hessian_trace(net, (Xc, yc), method="ggn_exact", chunk_size=4), full) <= 1e-12


def test_ggn_exact_soft_targets_and_ignored_labels(random_mlp64, fixture_data64):
    X, y = fixture_data64
    soft = torch.softmax(torch.randn(64, 4, generator=torch.Generator().manual_seed(5)), 1).double()
    dense = float(torch.trace(dense_hessian(random_mlp64, X, soft)))
    assert rel(hessian_trace(random_mlp64, (X, soft), method="ggn_exact"), dense) <= 1e-8
    ignored = y.clone()
    ignored[::3] = -100  # cross_entropy's ignore_index: left out of each batch's mean
    for chunk in (None, 16):  # batches weighted as loss_term does (n_b / N per batch mean)
        data = [
            (X[i : i + (chunk or 64)], ignored[i : i + (chunk or 64)])
            for i in range(0, 64, chunk or 64)
        ]
        H = sum(dense_hessian(random_mlp64, Xb, yb) * (Xb.shape[0] / 64) for Xb, yb in data)
        got = hessian_trace(random_mlp64, data, method="ggn_exact")
        assert rel(got, float(torch.trace(H))) <= 1e-8


def test_ggn_exact_refuses_non_piecewise_linear_and_auto_falls_back(fixture_data64, monkeypatch):
    from flatness import ggn
    from flatness.measures import curvature

    X, y = fixture_data64
    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).double()

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 12)

        def forward(self, x):
            return x + self.lin(x)

    residual = nn.Sequential(Residual(), nn.ReLU(), nn.Linear(12, 4)).double()
    shared_lin = nn.Linear(12, 12)
    shared = nn.Sequential(shared_lin, nn.ReLU(), shared_lin, nn.Linear(12, 4)).double()
    softmax_inside = nn.Sequential(nn.Linear(12, 4), nn.Softmax(dim=1)).double()
    no_stats = nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4, track_running_stats=False))
    cases = {
        "Tanh": tanh,
        "Residual": residual,
        "used more than once": shared,
        "Softmax": softmax_inside,
        "running statistics": no_stats.double(),
    }
    for what, net in cases.items():
        with pytest.raises(ValueError, match=what):
            hessian_trace(net, (X, y), method="ggn_exact")
    with pytest.raises(ValueError, match="loss_fn"):
        hessian_trace(tanh, (X, y), method="ggn_exact", loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="num_probes"):
        hessian_trace(tanh, (X, y), method="ggn_exact", num_probes=10)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(tanh, (X, y), method="exact")

    # auto: never the GGN path for these; the dense exact trace (n ≤ exact_max_params) instead.
    def refuse(*a, **k):
        raise AssertionError("ggn_trace called on a non-qualifying model")

    monkeypatch.setattr(curvature, "ggn_trace", refuse)
    for what, net in cases.items():
        if what == "running statistics":
            continue  # batch statistics in eval(): its dense Hessian couples the samples
        value, se = hessian_trace(net, (X, y), return_stderr=True)
        assert se == 0.0
        assert rel(value, float(torch.trace(dense_hessian(net, X, y)))) <= 1e-8, what
    # A qualifying net with a custom loss also falls back (the identity is for softmax CE).
    mse = lambda out, t: ((out - nn.functional.one_hot(t, 4).to(out)) ** 2).mean()  # noqa: E731
    relu = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    dense = float(torch.trace(dense_hessian(relu, X, y, loss_fn=mse)))
    assert rel(hessian_trace(relu, (X, y), loss_fn=mse), dense) <= 1e-8
    assert ggn.piecewise_linear_offender(relu) is None


def test_ggn_exact_makes_no_hvps_and_large_nets_stay_exact(monkeypatch):
    count = _CountMatvecs(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 10)).double()  # 2,634 > 2,000
    g = torch.Generator().manual_seed(6)
    X = torch.randn(40, 30, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (40,), generator=g)
    value, se = hessian_trace(net, (X, y), return_stderr=True)
    assert count.calls == 0 and se == 0.0
    assert rel(value, float(torch.trace(dense_hessian(net, X, y)))) <= 1e-8


# --- worst-case aggregation: max of the mean loss vs max per batch, then averaged (METHODS §5) ---


@pytest.mark.parametrize("p, rho", [(2, 0.05), ("inf", 2e-3)])
def test_adaptive_worst_case_per_batch_with_one_batch_is_the_mean_loss_version(
    random_mlp64, fixture_data64, p, rho
):
    """One batch of all N samples: the per-batch maximum is the maximum of the mean loss (same
    APGD, same seed, same chunks), whatever the data form."""
    X, y = fixture_data64
    N = X.shape[0]
    wc = {"kind": "worst_case", "rho": rho, "p": p, "seed": 3}
    mean = adaptive_sharpness(random_mlp64, (X, y), **wc)
    assert mean == adaptive_sharpness(random_mlp64, (X, y), aggregate="mean_loss", **wc)
    one = adaptive_sharpness(random_mlp64, (X, y), aggregate="per_batch", batch_size=N, **wc)
    assert one == pytest.approx(mean, rel=1e-12)
    # Batches are consecutive slices of all samples, so the two data forms agree.
    chunks = [(X[i : i + 20], y[i : i + 20]) for i in range(0, N, 20)]
    for bs in (N, 16):
        a = adaptive_sharpness(random_mlp64, (X, y), aggregate="per_batch", batch_size=bs, **wc)
        b = adaptive_sharpness(random_mlp64, chunks, aggregate="per_batch", batch_size=bs, **wc)
        assert a == pytest.approx(b, rel=1e-12)


def test_adaptive_worst_case_per_batch_is_at_least_the_mean_loss_version():
    """On a linear model with a loss linear in its output, L(w + δ) − L(w) = gᵀδ exactly, and over
    the ℓ∞ ball ‖δ ⊘ |w|‖∞ ≤ ρ its maximum is ρ‖|w| ⊙ g‖₁. APGD's first sign step of size 2ρ from
    any point of the box lands on that vertex, so both versions are exact maxima here:
    mean_loss = ρ‖|w| ⊙ Σ_b (n_b/N) g_b‖₁ ≤ Σ_b (n_b/N) ρ‖|w| ⊙ g_b‖₁ = per_batch (triangle
    inequality: max of the average ≤ average of the maxima), strictly when batch gradients have
    coordinates of opposite signs, as here (random ±1 targets)."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(5, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, 5, generator=g, dtype=torch.float64))
        lin.bias.fill_(0.3)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), generator=g).double() * 2 - 1

    def loss_fn(out, t):
        return (out.squeeze(-1) * t).mean()

    def exact(Xb, yb):
        grads = torch.autograd.grad(loss_fn(lin(Xb), yb), list(lin.parameters()))
        c = torch.cat([p.detach().abs().reshape(-1) for p in lin.parameters()])
        return rho * float((c * torch.cat([t.reshape(-1) for t in grads])).abs().sum())

    rho, bs = 0.01, 8
    wc = {"kind": "worst_case", "rho": rho, "p": "inf", "loss_fn": loss_fn}
    mean = adaptive_sharpness(lin, (X, y), **wc)
    per = adaptive_sharpness(lin, (X, y), aggregate="per_batch", batch_size=bs, **wc)
    assert mean == pytest.approx(exact(X, y), rel=1e-10)
    batch_max = [exact(X[i : i + bs], y[i : i + bs]) for i in range(0, 40, bs)]
    assert per == pytest.approx(sum(batch_max) / len(batch_max), rel=1e-10)
    assert per > 1.5 * mean


def test_adaptive_worst_case_aggregate_option_is_checked(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    with pytest.raises(ValueError, match=r"aggregate must be one of \('mean_loss', 'per_batch'\)"):
        adaptive_sharpness(trained_mlp64, (X, y), kind="worst_case", aggregate="max")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        adaptive_sharpness(
            trained_mlp64, (X, y), kind="worst_case", aggregate="per_batch", batch_size=0
        )
    with pytest.raises(ValueError, match="batch_size applies to aggregate='per_batch'"):
        adaptive_sharpness(trained_mlp64, (X, y), kind="worst_case", batch_size=16)
    with pytest.raises(ValueError, match="aggregate applies to kind='worst_case'"):
        adaptive_sharpness(trained_mlp64, (X, y), aggregate="per_batch")


def test_adaptive_worst_case_aggregate_passes_the_workflow_option_check():
    from flatness.suite import measure_specs

    opts = {"kind": "worst_case", "aggregate": "per_batch", "batch_size": 128}
    (spec,) = measure_specs([{"function": "adaptive_sharpness", "options": opts}])
    assert spec.options == opts
