"""Relative flatness κ_Tr, κ_max, κ_col, ρ_σ against a dense float64 layer Hessian and their
(non-)invariances (METHODS.md §3, §4.2, §10: T6–T9, T11, P1–P8, F1, F5)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatness.measures import (
    relative_flatness,
    relative_flatness_col,
    relative_flatness_max,
    rho_sigma,
)
from flatness.reparam import dinh_alpha_rescale, layerwise_rescale, neuronwise_rescale
from tests.conftest import LAYERWISE_FACTORS, make_mlp, neuron_scales

MEASURES = {
    "kappa_tr": relative_flatness,
    "kappa_max": relative_flatness_max,
    "kappa_col": relative_flatness_col,
    "rho_sigma": rho_sigma,
}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def mse_onehot(z, y):
    return F.mse_loss(z, F.one_hot(y, z.shape[-1]).to(z.dtype))


# ---- dense float64 reference: Hessian of the mean loss of the WHOLE model w.r.t. the last W ----


def dense_layer_hessian(model, X, y, loss_fn=F.cross_entropy):
    """(d, m, d, m) Hessian via torch.func.hessian through functional_call of the full model."""
    prefix = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    name = f"{prefix}.weight" if prefix else "weight"
    W = dict(model.named_parameters())[name].detach()

    def loss(Wv):
        return loss_fn(torch.func.functional_call(model, {name: Wv}, (X,)), y)

    return W, torch.func.hessian(loss)(W)


def reference(which, W, H):
    """The four contractions written directly from their definitions (METHODS.md §3.1, §3.3)."""
    d, m = W.shape
    if which == "kappa_tr":
        return sum(
            float(W[s] @ W[u]) * float(sum(H[s, t, u, t] for t in range(m)))
            for s in range(d)
            for u in range(d)
        )
    if which == "kappa_max":
        return sum(
            float(W[s] @ W[s]) * float(torch.linalg.eigvalsh(H[s, :, s, :])[-1]) for s in range(d)
        )
    if which == "kappa_col":
        return sum(
            float(W[:, t] @ W[:, v]) * float(sum(H[s, t, s, v] for s in range(d)))
            for t in range(m)
            for v in range(m)
        )
    if which == "rho_sigma":
        return sum(float(W[:, t] @ H[:, t, :, t] @ W[:, t]) for t in range(m))
    raise KeyError(which)


@pytest.fixture(params=["trained", "random"])
def net(request, trained_mlp64, random_mlp64):
    return trained_mlp64 if request.param == "trained" else random_mlp64


# ---- T6 / P1 / F1: closed form == exact layer Hessian; every measure vs dense reference ----


@pytest.mark.parametrize("which", list(MEASURES))
def test_closed_form_matches_dense_layer_hessian(which, net, fixture_data64):
    X, y = fixture_data64
    W, H = dense_layer_hessian(net, X, y)
    ref = reference(which, W, H)
    assert rel(MEASURES[which](net, (X, y)), ref) <= 1e-10
    # The exact route of the implementation (its own head Hessian) agrees too.
    assert rel(MEASURES[which](net, (X, y), method="exact"), ref) <= 1e-10


@pytest.mark.parametrize("which", list(MEASURES))
def test_non_ce_loss_matches_dense_reference(which, random_mlp64, fixture_data64):
    X, y = fixture_data64
    W, H = dense_layer_hessian(random_mlp64, X, y, mse_onehot)
    assert (
        rel(MEASURES[which](random_mlp64, (X, y), loss_fn=mse_onehot), reference(which, W, H))
        <= 1e-8
    )


def test_hutchinson_estimates_exact_kappa(random_mlp64, fixture_data64):
    X, y = fixture_data64
    exact = relative_flatness(random_mlp64, (X, y), loss_fn=mse_onehot)
    est, se = relative_flatness(
        random_mlp64,
        (X, y),
        loss_fn=mse_onehot,
        method="hutchinson",
        num_probes=300,
        return_stderr=True,
    )
    assert 0 < se < 0.2 * exact
    assert abs(est - exact) <= 4 * se
    # Fixed probes: the same seed gives the same value; another seed another one.
    again = relative_flatness(
        random_mlp64,
        (X, y),
        loss_fn=mse_onehot,
        method="hutchinson",
        num_probes=300,
        return_stderr=True,
    )
    assert again == (est, se)
    other = relative_flatness(
        random_mlp64, (X, y), loss_fn=mse_onehot, method="hutchinson", num_probes=300, seed=1
    )
    assert other != est


def test_exact_route_reports_zero_stderr(random_mlp64, fixture_data64):
    value, se = relative_flatness(random_mlp64, fixture_data64, return_stderr=True)
    assert se == 0.0 and value == relative_flatness(random_mlp64, fixture_data64)


def test_divide_by_m(random_mlp64, fixture_data64):
    k = relative_flatness(random_mlp64, fixture_data64)
    assert rel(relative_flatness(random_mlp64, fixture_data64, divide_by_m=True), k / 6) <= 1e-14


# ---- T7 / P2, T8 / P3, T9 / P4, Dinh α ----


@pytest.mark.parametrize("which", list(MEASURES))
def test_layerwise_invariance(which, net, fixture_data64):
    f = MEASURES[which]
    before = f(net, fixture_data64)
    assert rel(f(layerwise_rescale(net, LAYERWISE_FACTORS), fixture_data64), before) <= 1e-10


@pytest.mark.parametrize("which", ["kappa_tr", "kappa_max"])
def test_rows_change_under_neuronwise_unless_std_normalised(which, net, fixture_data64):
    f = MEASURES[which]
    scaled = neuronwise_rescale(net, 1, neuron_scales())
    before, after = f(net, fixture_data64), f(scaled, fixture_data64)
    assert max(after / before, before / after) > 2.0  # documented non-invariance (×39 / ×27)
    norm_before = f(net, fixture_data64, normalize_features=True)
    norm_after = f(scaled, fixture_data64, normalize_features=True)
    assert rel(norm_after, norm_before) <= 1e-12


@pytest.mark.parametrize("which", ["kappa_col", "rho_sigma"])
def test_columns_invariant_under_neuronwise(which, net, fixture_data64):
    f = MEASURES[which]
    scaled = neuronwise_rescale(net, 1, neuron_scales())
    assert rel(f(scaled, fixture_data64), f(net, fixture_data64)) <= 1e-11


@pytest.mark.parametrize("alpha", [10.0, 100.0])
def test_dinh_alpha_leaves_kappa_unchanged(alpha, trained_mlp64, fixture_data64):
    before = relative_flatness(trained_mlp64, fixture_data64)
    after = relative_flatness(dinh_alpha_rescale(trained_mlp64, alpha), fixture_data64)
    assert rel(after, before) <= 1e-10


def std_normalised_copy(model, X):
    """The canonicalisation done on the model itself: feature unit j's incoming row and bias ÷ σ_j,
    W[:, j] × σ_j (METHODS.md §3.4); units that are 0 on every sample get a zero column of W
    (on these data the function is unchanged)."""
    new = copy.deepcopy(model)
    prev, last = [m for m in new.modules() if isinstance(m, nn.Linear)][-2:]
    with torch.no_grad():
        std = new[:-1](X).std(dim=0, correction=0)
        dead = new[:-1](X).abs().amax(dim=0) == 0
        std = torch.where(std > 0, std, torch.ones_like(std))
        prev.weight.div_(std[:, None])
        prev.bias.div_(std)
        last.weight.mul_(std)
        last.weight[:, dead] = 0
    return new


def test_normalize_features_equals_editing_the_model(net, fixture_data64):
    X, y = fixture_data64
    edited = std_normalised_copy(net, X)
    assert torch.allclose(edited(X), net(X), rtol=0, atol=1e-12)
    W, H = dense_layer_hessian(edited, X, y)
    ref = reference("kappa_tr", W, H)
    assert rel(relative_flatness(net, (X, y), normalize_features=True), ref) <= 1e-10
    ref_max = reference("kappa_max", W, H)
    assert rel(relative_flatness_max(net, (X, y), normalize_features=True), ref_max) <= 1e-10


def test_normalize_features_zeroes_dead_units_and_mse_route(random_mlp64, fixture_data64):
    X, y = fixture_data64
    net = copy.deepcopy(random_mlp64)
    with torch.no_grad():  # feature unit 0 dead on every input
        net[2].weight[0].zero_()
        net[2].bias[0] = -1.0
    edited = std_normalised_copy(net, X)
    W, H = dense_layer_hessian(edited, X, y, mse_onehot)
    value = relative_flatness(net, (X, y), loss_fn=mse_onehot, normalize_features=True)
    assert rel(value, reference("kappa_tr", W, H)) <= 1e-10


@pytest.mark.parametrize("kind", ["dead", "constant"])
def test_normalized_kappa_invariant_with_dead_or_constant_units(random_mlp64, fixture_data64, kind):
    # A feature unit that is 0 (or constant) on every sample: Dinh's α on its layer and a
    # neuron-wise rescaling that includes it must still leave the normalised κ unchanged.
    X, y = fixture_data64
    net = copy.deepcopy(random_mlp64)
    with torch.no_grad():
        net[2].weight[0].zero_()
        net[2].bias[0] = -1.0 if kind == "dead" else 0.7
    base = relative_flatness(net, (X, y), normalize_features=True)
    for variant in (
        dinh_alpha_rescale(net, 100.0),
        neuronwise_rescale(net, 1, neuron_scales()),
    ):
        assert rel(relative_flatness(variant, (X, y), normalize_features=True), base) <= 1e-12


# ---- T11 / P5: OLS ----


def test_ols_reduces_to_ridge():
    g = torch.Generator().manual_seed(5)
    n, m = 40, 5
    X = torch.randn(n, m, generator=g, dtype=torch.float64)
    yv = torch.randn(n, 1, generator=g, dtype=torch.float64)
    ols = nn.Linear(m, 1).double()  # φ = x; the bias is not part of W
    W, H = dense_layer_hessian(ols, X, yv, F.mse_loss)
    assert H.shape == (1, m, 1, m)
    assert torch.allclose(H[0, :, 0, :], 2 * X.T @ X / n, rtol=1e-13, atol=1e-14)
    expected = float((W * W).sum()) * 2 * float((X * X).sum()) / n
    assert rel(relative_flatness(ols, (X, yv), loss_fn=F.mse_loss), expected) <= 1e-12


def test_ols_multi_output_mean_mse_divides_by_d():
    g = torch.Generator().manual_seed(6)
    n, m, d = 30, 4, 3
    X = torch.randn(n, m, generator=g, dtype=torch.float64)
    Y = torch.randn(n, d, generator=g, dtype=torch.float64)
    ols = nn.Linear(m, d).double()
    expected = float((ols.weight**2).sum()) * 2 * float((X * X).sum()) / n / d
    assert rel(relative_flatness(ols, (X, Y), loss_fn=F.mse_loss), expected) <= 1e-12


# ---- P6, P7 ----


@pytest.mark.parametrize("which", list(MEASURES))
def test_loss_scale_and_sum_loss(which, random_mlp64, fixture_data64):
    X, y = fixture_data64
    f = MEASURES[which]
    base = f(random_mlp64, (X, y))
    scaled = f(random_mlp64, (X, y), loss_fn=lambda z, t: 3.5 * F.cross_entropy(z, t))
    assert rel(scaled, 3.5 * base) <= 1e-10
    summed = f(random_mlp64, (X, y), loss_fn=lambda z, t: F.cross_entropy(z, t, reduction="sum"))
    assert rel(summed, X.shape[0] * base) <= 1e-10


@pytest.mark.parametrize("which", list(MEASURES))
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_nonnegative(which, loss, net, fixture_data64):
    kwargs = {} if loss == "ce" else {"loss_fn": mse_onehot}
    assert MEASURES[which](net, fixture_data64, **kwargs) >= 0.0


# ---- P8 / F5: layout on a non-square head ----


def test_non_square_head_uses_intended_block_trace(fixture_data64):
    X, y = fixture_data64
    y = y % 3
    model = make_mlp(widths=(12, 7, 3), seed=4)  # head W is 3×7
    W, H = dense_layer_hessian(model, X, y)
    d, m = W.shape
    assert H.shape == (d, m, d, m) == (3, 7, 3, 7)
    intended = float(torch.einsum("su,stut->", W @ W.T, H))
    # The released FAM indexing, which fits an (m, d, d, m) layout: trace of H[:, j, i, :].
    mis = sum(
        float(W[i] @ W[j]) * float(torch.diagonal(H[:, j, i, :]).sum())
        for i in range(d)
        for j in range(d)
    )
    ours = relative_flatness(model, (X, y))
    assert rel(ours, intended) <= 1e-10
    assert rel(mis, intended) > 0.1


# ---- data forms, dtype, modes, bad input ----


@pytest.mark.parametrize("which", list(MEASURES))
def test_data_forms_agree(which, random_mlp64, fixture_data64):
    X, y = fixture_data64
    f = MEASURES[which]
    pair = f(random_mlp64, (X, y))
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, len(X), 20)]
    assert rel(f(random_mlp64, batches), pair) <= 1e-12
    gen = ((X[i : i + 16], y[i : i + 16]) for i in range(0, len(X), 16))
    assert rel(f(random_mlp64, gen), pair) <= 1e-12
    mse_pair = f(random_mlp64, (X, y), loss_fn=mse_onehot)
    assert rel(f(random_mlp64, batches, loss_fn=mse_onehot), mse_pair) <= 1e-12


@pytest.mark.parametrize("which", list(MEASURES))
def test_float32_close_to_float64(which, trained_mlp64, fixture_data64):
    X, y = fixture_data64
    f = MEASURES[which]
    v64 = f(trained_mlp64, (X, y))
    v32 = f(copy.deepcopy(trained_mlp64).float(), (X.float(), y))
    assert rel(v32, v64) <= 1e-3


def test_mode_restored_and_parameters_untouched(random_mlp64, fixture_data64):
    net = random_mlp64.train()
    before = [p.detach().clone() for p in net.parameters()]
    for f in MEASURES.values():
        f(net, fixture_data64, loss_fn=mse_onehot)
        f(net, fixture_data64)
    relative_flatness(net, fixture_data64, normalize_features=True)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("which", list(MEASURES))
def test_bad_input_raises(which, random_mlp64, fixture_data64):
    X, y = fixture_data64
    f = MEASURES[which]
    with pytest.raises(ValueError, match="no nn.Linear"):
        f(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten()), (torch.randn(4, 1, 5).double(), y[:4]))
    with pytest.raises(ValueError, match="empty"):
        f(random_mlp64, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="must match"):
        f(random_mlp64, (X, y[:10]))
    Xbad = X.clone()
    Xbad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        f(random_mlp64, (Xbad, y))
    with pytest.raises(ValueError, match="last nn.Linear"):  # output post-processed after W
        f(nn.Sequential(random_mlp64, nn.Tanh()), (X, y))
    with pytest.raises(ValueError, match="closed_form"):
        f(random_mlp64, (X, y), loss_fn=mse_onehot, method="closed_form")
    with pytest.raises(ValueError, match="method"):
        f(random_mlp64, (X, y), method="bogus")


# ---- T14: the FAM regulariser's value is κ_Tr/m of its batch ----


@pytest.mark.parametrize("variant", ["as_released", "full"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_fam_penalty_is_kappa_over_m(variant, loss, net, fixture_data64):
    from flatness.regularizers import fam_penalty

    X, y = fixture_data64
    loss_fn = None if loss == "ce" else mse_onehot
    R = float(fam_penalty(net, X, y, variant=variant, loss_fn=loss_fn))
    kappa_m = relative_flatness(net, (X, y), loss_fn=loss_fn, divide_by_m=True)
    assert rel(R, kappa_m) <= 1e-10


def test_conv_features_flattened_into_the_last_linear(fixture_data64):
    X, y = fixture_data64
    g = torch.Generator().manual_seed(8)
    Xc = torch.randn(24, 1, 6, 6, generator=g, dtype=torch.float64)
    yc = y[:24]
    torch.manual_seed(0)  # test-side init only
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 4)
    ).double()
    W, H = dense_layer_hessian(cnn, Xc, yc)
    for which, f in MEASURES.items():
        assert rel(f(cnn, (Xc, yc)), reference(which, W, H)) <= 1e-10
    before = relative_flatness(cnn, (Xc, yc))
    assert rel(relative_flatness(layerwise_rescale(cnn, [5.0, 0.2]), (Xc, yc)), before) <= 1e-10


# ---- review fixes: P6 past one chunk, one Rademacher source, the shared head check ----


@pytest.mark.parametrize("which", list(MEASURES))
def test_p6_sum_loss_is_n_times_mean_loss_beyond_one_chunk(which, random_mlp64):
    from flatness.batches import DEFAULT_CHUNK
    from tests.conftest import fixture_data

    X, y = fixture_data(n=300)  # two chunks (256 + 44) inside every measure
    N = X.shape[0]
    assert N > DEFAULT_CHUNK
    f = MEASURES[which]
    base = f(random_mlp64, (X, y))  # CE closed form, mean loss
    summed = f(random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss(reduction="sum"))  # exact
    assert rel(summed, N * base) <= 1e-10
    onehot = F.one_hot(y, 4).double()
    mse_mean = f(random_mlp64, (X, onehot), loss_fn=nn.MSELoss())
    mse_sum = f(random_mlp64, (X, onehot), loss_fn=nn.MSELoss(reduction="sum"))
    # nn.MSELoss's mean is over all N·d entries (d = 4 outputs), its sum over the same entries.
    assert mse_mean > 0 and rel(mse_sum, N * 4 * mse_mean) <= 1e-10
    if which == "kappa_tr":  # Hutchinson route, same seed: the same probes, exactly N×
        kw = {"method": "hutchinson", "num_probes": 8, "seed": 1, "return_stderr": True}
        v_mean, se_mean = f(random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss(), **kw)
        v_sum, se_sum = f(random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss(reduction="sum"), **kw)
        assert rel(v_sum, N * v_mean) <= 1e-10 and rel(se_sum, N * se_mean) <= 1e-8
    with pytest.raises(ValueError, match="reduction"):
        f(random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss(reduction="none"))


def test_hutchinson_route_draws_its_probes_from_flatness_hutchinson(
    random_mlp64, fixture_data64, monkeypatch
):
    from flatness import hutchinson
    from flatness.measures import relative

    calls = []

    def spy(n, num, generator, device=None, dtype=torch.float64):
        calls.append((n, num))
        return hutchinson.rademacher(n, num, generator, device, dtype)

    monkeypatch.setattr(relative, "rademacher", spy)
    relative_flatness(random_mlp64, fixture_data64, loss_fn=mse_onehot, method="hutchinson",
                      num_probes=5)  # fmt: skip
    assert calls == [(6, 6)] * 5  # one m×m Rademacher Z per probe


def test_fam_and_relative_share_the_head_hessian_and_output_check(random_mlp64, fixture_data64):
    from flatness import batches, lastlayer, regularizers
    from flatness.regularizers import fam_penalty

    assert regularizers.LossFn is batches.LossFn
    assert regularizers.head_hessian is lastlayer.head_hessian
    X, y = fixture_data64
    post = nn.Sequential(random_mlp64, nn.Tanh())
    for f in (
        lambda: relative_flatness(post, (X, y), loss_fn=mse_onehot),
        lambda: fam_penalty(post, X, y, loss_fn=mse_onehot),
    ):
        with pytest.raises(ValueError, match="not the output of its last nn.Linear"):
            f()
