"""Per-layer measures (``layer=``) and ``layer_profile`` vs dense float64 references (issue 11).

The reference is the full Hessian of the mean loss over the flat vector of *all* parameters
(``torch.autograd.functional.hessian``), sliced to the block of one layer's weight. Tolerances as
METHODS.md §10: Lanczos (tol 1e-12) vs eigvalsh ≤ 1e-9 relative, closed forms and exact traces
≤ 1e-10 relative. Invariances from the exact transform H' = Λ⁻¹HΛ⁻¹ (METHODS.md §1, §3.4, §6).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatness.batches import eval_mode
from flatness.measures import (
    MEASURES,
    hessian_max_eigenvalue,
    hessian_trace,
    layer_profile,
    quotient_sharpness,
    relative_flatness,
)
from flatness.reparam import (
    dinh_alpha_rescale,
    layerwise_rescale,
    neuronwise_rescale,
    weight_layer,
    weight_layers,
)
from tests.conftest import LAYERWISE_FACTORS, fixture_data, make_mlp

TIGHT = 1e-12
LAYERS = [0, 1, 2]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def full_hessian(model, X, y, loss_fn=None):
    """Dense H of the mean loss w.r.t. all parameters (flat, ``named_parameters()`` order) and
    each parameter's slice of the flat vector."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    named = list(model.named_parameters())
    numels = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    offsets, start = {}, 0
    for (name, _p), n in zip(named, numels, strict=True):
        offsets[name] = slice(start, start + n)
        start += n

    def f(flat):
        ps = {
            name: c.view(p.shape)
            for (name, p), c in zip(named, flat.split(numels), strict=True)
        }  # fmt: skip
        return loss_fn(functional_call(model, ps, (X,)), y)

    with eval_mode(model):
        H = torch.autograd.functional.hessian(f, theta)
    return H, offsets


def weight_block(model, H, offsets, layer: int) -> torch.Tensor:
    """The dense block H_ll of weight layer ``layer``'s weight, shape (d·m, d·m)."""
    _, name, _ = weight_layer(model, layer)
    sl = offsets[f"{name}.weight"]
    return H[sl, sl]


def dense_kappa(model, H, offsets, layer: int, scale: torch.Tensor | None = None) -> float:
    """κ^φ_Tr of weight layer ``layer`` by its definition Σ_{s,s'} ⟨w_s, w_s'⟩ Tr H_{s,s'};
    with ``scale`` s, of the std-normalised pair W̃ = W·s, H̃ = H / (s_t s_t')."""
    W = weight_layer(model, layer)[2].weight.detach()
    d, m = W.shape
    Hb = weight_block(model, H, offsets, layer).reshape(d, m, d, m)
    if scale is not None:
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        W = W * scale
        Hb = Hb * inv[None, :, None, None] * inv[None, None, None, :]
    return float(torch.einsum("su,stut->", W @ W.T, Hb))


def feature_std(model, X, layer: int) -> torch.Tensor:
    """Population std of each unit of φ_l (the input of weight layer ``layer``) over X."""
    got = []
    module = weight_layer(model, layer)[2]
    h = module.register_forward_hook(lambda mod, inp, out: got.append(inp[0].detach()))
    with eval_mode(model), torch.no_grad():
        model(X)
    h.remove()
    return got[0].std(dim=0, correction=0)


@pytest.fixture(scope="module")
def dense_refs(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    random = make_mlp(seed=3)
    return {
        "trained": (trained_mlp64, *full_hessian(trained_mlp64, X, y)),
        "random": (random, *full_hessian(random, X, y)),
    }


@pytest.fixture(params=["trained", "random"])
def ref(request, dense_refs):
    return dense_refs[request.param]


# --- dense references ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS + [-1])
def test_layer_lambda_max_and_trace_equal_the_dense_block(ref, fixture_data64, layer):
    net, H, offsets = ref
    X, y = fixture_data64
    block = weight_block(net, H, offsets, layer)
    top = float(torch.linalg.eigvalsh(block)[-1])
    for method in ("lanczos", "eigsh"):
        lam = hessian_max_eigenvalue(net, (X, y), layer=layer, tol=TIGHT, method=method)
        assert rel(lam, top) <= 1e-9, method
    tr = float(torch.trace(block))
    for method in ("auto", "ggn_exact", "dense"):  # auto: ggn_exact (CE, piecewise linear)
        value, se = hessian_trace(net, (X, y), layer=layer, method=method, return_stderr=True)
        assert se == 0.0 and rel(value, tr) <= 1e-10, method
    # quotient sharpness on the block: D = ‖W_l‖_F I, so ‖W_l‖² λ_max(H_ll).
    w2 = float(weight_layer(net, layer)[2].weight.detach().square().sum())
    assert rel(quotient_sharpness(net, (X, y), layer=layer, tol=TIGHT), w2 * top) <= 1e-9


def test_layer_trace_hutchpp_and_non_ce_loss(random_mlp64, fixture_data64):
    """The HVP routes of a block: Hutch++ within 4 stderr, and a non-CE loss (no GGN path)."""
    X, y = fixture_data64
    mse = lambda out, yy: ((out - nn.functional.one_hot(yy, 4).to(out)) ** 2).mean()  # noqa: E731
    H, offsets = full_hessian(random_mlp64, X, y, loss_fn=mse)
    for layer in LAYERS:
        block = weight_block(random_mlp64, H, offsets, layer)
        tr = hessian_trace(random_mlp64, (X, y), loss_fn=mse, layer=layer)  # auto: dense
        assert rel(tr, float(torch.trace(block))) <= 1e-10
        lam = hessian_max_eigenvalue(random_mlp64, (X, y), loss_fn=mse, layer=layer, tol=TIGHT)
        assert rel(lam, float(torch.linalg.eigvalsh(block)[-1])) <= 1e-9
    H, offsets = full_hessian(random_mlp64, X, y)
    exact = float(torch.trace(weight_block(random_mlp64, H, offsets, 0)))
    v, se = hessian_trace(random_mlp64, (X, y), layer=0, num_probes=30, return_stderr=True)
    assert 0 < se and abs(v - exact) <= 4 * se


@pytest.mark.parametrize("layer", LAYERS)
def test_relative_flatness_of_a_layer_equals_its_definition(ref, fixture_data64, layer):
    net, H, offsets = ref
    X, y = fixture_data64
    kappa = dense_kappa(net, H, offsets, layer)
    # auto: the last layer's closed form, a hidden layer's GGN closed form (CE, ReLU net)
    assert rel(relative_flatness(net, (X, y), layer=layer), kappa) <= 1e-10
    assert rel(relative_flatness(net, (X, y), layer=layer, method="exact"), kappa) <= 1e-10
    # a loss_fn (even plain CE) takes the Hessian-vector route on a hidden layer
    ce = nn.CrossEntropyLoss()
    assert rel(relative_flatness(net, (X, y), layer=layer, loss_fn=ce), kappa) <= 1e-10
    v, se = relative_flatness(
        net, (X, y), layer=layer, method="hutchinson", num_probes=200, return_stderr=True
    )
    assert 0 < se and abs(v - kappa) <= 4 * se
    # std-normalised features: the definition on the pair (W·s, H / (s_t s_t'))
    s = feature_std(net, X, layer)
    norm = dense_kappa(net, H, offsets, layer, scale=s)
    for method in ("closed_form", "exact"):
        got = relative_flatness(net, (X, y), layer=layer, normalize_features=True, method=method)
        assert rel(got, norm) <= 1e-10, method
    m = weight_layer(net, layer)[2].weight.shape[1]
    by_m = relative_flatness(net, (X, y), layer=layer, divide_by_m=True)
    assert by_m == pytest.approx(relative_flatness(net, (X, y), layer=layer) / m, rel=1e-14)


def test_relative_flatness_of_a_hidden_layer_without_closed_form(fixture_data64):
    """A Tanh net (no GGN identity): HVP route on an expanding (d > m) and a shrinking layer."""
    X, y = fixture_data64
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(
        nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(),
        nn.Linear(7, 4),
    ).double()  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    H, offsets = full_hessian(net, X, y)
    for layer in (1, 2):  # W 9×5 (d > m) and 7×9 (d < m)
        kappa = dense_kappa(net, H, offsets, layer)
        assert rel(relative_flatness(net, (X, y), layer=layer), kappa) <= 1e-10  # auto: exact
        assert rel(relative_flatness(net, (X, y), layer=layer, method="exact"), kappa) <= 1e-10
        with pytest.raises(ValueError, match="piecewise-linear"):
            relative_flatness(net, (X, y), layer=layer, method="closed_form")


# --- the whole-network defaults are unchanged -----------------------------------------------------


def test_defaults_unchanged(random_mlp64, fixture_data64):
    X, y = fixture_data64
    net, data = random_mlp64, (X, y)
    assert hessian_max_eigenvalue(net, data, layer=None) == hessian_max_eigenvalue(net, data)
    W = [weight_layer(net, 1)[2].weight]
    assert hessian_max_eigenvalue(net, data, layer=1) == hessian_max_eigenvalue(net, data, params=W)
    for method in ("ggn_exact", "dense"):
        assert hessian_trace(net, data, method=method, layer=None) == hessian_trace(
            net, data, method=method
        )
    assert quotient_sharpness(net, data, layer=None) == quotient_sharpness(net, data)
    # the last nn.Linear by index is exactly the default head computation, on every route
    for kw in ({}, {"method": "exact"}, {"method": "hutchinson", "num_probes": 5},
               {"normalize_features": True}, {"divide_by_m": True}):  # fmt: skip
        base = relative_flatness(net, data, **kw)
        assert relative_flatness(net, data, layer=None, **kw) == base
        assert relative_flatness(net, data, layer=-1, **kw) == base
        assert relative_flatness(net, data, layer=2, **kw) == base
    # the whole-network trace is the sum of the blocks' traces plus the bias entries
    blocks = sum(hessian_trace(net, data, layer=i) for i in LAYERS)
    assert blocks < hessian_trace(net, data)


def test_layer_option_errors(random_mlp64, fixture_data64):
    X, y = fixture_data64
    W = [random_mlp64[0].weight]
    with pytest.raises(ValueError, match="not both"):
        hessian_max_eigenvalue(random_mlp64, (X, y), params=W, layer=0)
    for fn in (hessian_max_eigenvalue, hessian_trace, quotient_sharpness, relative_flatness):
        with pytest.raises(ValueError, match="out of range"):
            fn(random_mlp64, (X, y), layer=3)
        with pytest.raises(ValueError, match="integer"):
            fn(random_mlp64, (X, y), layer=True)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(20, 4)).double()
    with pytest.raises(ValueError, match="nn.Linear"):
        relative_flatness(conv, (X[:, None, :], y), layer=0)


# --- invariances ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_relative_flatness_layerwise_invariant(ref, fixture_data64, layer):
    """METHODS §3.4, row 1 (φ ×1/λ, W ×λ), for every feature layer: a layer-wise rescaling
    scales W_l by a_l and φ_l by ∏_{k<l} a_k; κ_l and the block's quotient sharpness stay."""
    net = ref[0]
    X, y = fixture_data64
    other = layerwise_rescale(net, LAYERWISE_FACTORS)
    for kw in ({}, {"normalize_features": True}, {"method": "exact"}):
        a = relative_flatness(net, (X, y), layer=layer, **kw)
        assert rel(relative_flatness(other, (X, y), layer=layer, **kw), a) <= 1e-10, kw
    q = quotient_sharpness(net, (X, y), layer=layer, tol=TIGHT)
    assert rel(quotient_sharpness(other, (X, y), layer=layer, tol=TIGHT), q) <= 1e-9
    lam = hessian_max_eigenvalue(net, (X, y), layer=layer, tol=TIGHT)
    lam_other = hessian_max_eigenvalue(other, (X, y), layer=layer, tol=TIGHT)
    a_l = LAYERWISE_FACTORS[layer]  # exact transform: H'_ll = H_ll / a_l²
    assert rel(lam_other, lam / a_l**2) <= 1e-9


@pytest.mark.parametrize("units_of", [0, 1])
def test_layer_relative_flatness_under_neuronwise_rescaling(ref, fixture_data64, units_of):
    """METHODS §3.4, row 2, for the feature layer: rescaling the units of φ_l (the outputs of
    layer l−1 = ``units_of``, W_l's columns) changes κ_l unless std-normalised. [derived] from
    H' = Λ⁻¹HΛ⁻¹: the same rescaling scales the *rows* of W_{l−1}, which leaves κ_{l−1}
    unchanged, and leaves every other layer's W_k and H_kk, hence κ_k, unchanged."""
    net = ref[0]
    X, y = fixture_data64
    n_units = weight_layers(net)[units_of].weight.shape[0]
    scales = torch.linspace(0.2, 5.0, n_units, dtype=torch.float64)
    other = neuronwise_rescale(net, units_of, scales)
    fed = units_of + 1  # the layer whose feature units were rescaled
    a, b = (relative_flatness(m, (X, y), layer=fed) for m in (net, other))
    assert max(a / b, b / a) >= 1.1  # has teeth
    a, b = (relative_flatness(m, (X, y), layer=fed, normalize_features=True) for m in (net, other))
    assert rel(b, a) <= 1e-10
    for layer in set(LAYERS) - {fed}:
        a, b = (relative_flatness(m, (X, y), layer=layer) for m in (net, other))
        assert rel(b, a) <= 1e-10, layer


def test_normalize_features_equals_editing_the_model(ref, fixture_data64):
    """Std-normalisation of φ_1 as a real reparameterisation: layer 0's rows ÷ s, W_1's columns
    × s (neuron-wise with 1/s); κ_1 of the edited model = the normalised κ_1."""
    net = ref[0]
    X, y = fixture_data64
    s = feature_std(net, X, 1)
    assert (s > 0).all()  # no dead unit on these data
    canon = neuronwise_rescale(net, 0, 1 / s)
    got = relative_flatness(net, (X, y), layer=1, normalize_features=True)
    assert rel(relative_flatness(canon, (X, y), layer=1), got) <= 1e-10


@pytest.mark.parametrize("alpha", [10.0, 100.0])
@pytest.mark.parametrize("layer", [0, 1])
def test_dinh_alpha_scales_the_two_affected_blocks(ref, fixture_data64, alpha, layer):
    """METHODS §1/§6: T_α ((W_l, b_l) ÷ α, W_{l+1} × α) gives H'_ll = α² H_ll and
    H'_{l+1,l+1} = α⁻² H_{l+1,l+1}; the other block, κ_l and the blocks' λ_R stay put."""
    net = ref[0]
    X, y = fixture_data64
    other = dinh_alpha_rescale(net, alpha, layer=layer)
    expect = {layer: alpha**2, layer + 1: alpha**-2}
    for i in LAYERS:
        lam, lam_a = (hessian_max_eigenvalue(m, (X, y), layer=i, tol=TIGHT) for m in (net, other))
        assert rel(lam_a, expect.get(i, 1.0) * lam) <= 1e-9, i
        tr, tr_a = (hessian_trace(m, (X, y), layer=i) for m in (net, other))
        assert rel(tr_a, expect.get(i, 1.0) * tr) <= 1e-10, i
        k, k_a = (relative_flatness(m, (X, y), layer=i) for m in (net, other))
        assert rel(k_a, k) <= 1e-10, i
        q, q_a = (quotient_sharpness(m, (X, y), layer=i, tol=TIGHT) for m in (net, other))
        assert rel(q_a, q) <= 1e-9, i


# --- the table ------------------------------------------------------------------------------------


def test_layer_profile_table(random_mlp64, fixture_data64):
    X, y = fixture_data64
    net = random_mlp64
    table = layer_profile(net, (X, y), tol=TIGHT, seed=3)
    assert list(table.columns) == ["measure", "layer", "layer_name", "n_params", "value", "note"]
    names = ["hessian_max_eigenvalue", "hessian_trace", "quotient_sharpness", "relative_flatness"]
    assert list(table.measure) == [n for n in names for _ in LAYERS]
    assert list(table.layer) == LAYERS * 4
    assert list(table.layer_name) == ["0", "2", "4"] * 4
    assert list(table.n_params) == [96, 48, 24] * 4
    assert (table.note == "").all()
    for row in table.itertuples():
        fn = MEASURES[row.measure]
        kw = {"tol": TIGHT} if "tol" in inspect.signature(fn).parameters else {}
        direct = fn(net, (X, y), layer=row.layer, seed=3, **kw)
        assert row.value == direct, (row.measure, row.layer)
    sub = layer_profile(net, (X, y), measures=[relative_flatness], layers=[-1, 0])
    assert list(sub.layer) == [2, 0]
    assert sub.value.iloc[0] == relative_flatness(net, (X, y))
    with pytest.raises(ValueError, match="no chosen measure"):
        layer_profile(net, (X, y), measures=["relative_flatness"], tol=1e-3)
    with pytest.raises(ValueError, match="unknown"):
        layer_profile(net, (X, y), measures=["weight_norm"])
    with pytest.raises(ValueError, match="not allowed"):
        layer_profile(net, (X, y), return_stderr=True)


def test_layer_profile_marks_conv_layers_for_relative_flatness():
    X, y = fixture_data(n=16)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(20, 4)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    data = (X[:, None, :], y)
    table = layer_profile(net, data, measures=["hessian_trace", "relative_flatness"])
    conv_rf = table[(table.measure == "relative_flatness") & (table.layer == 0)].iloc[0]
    assert math.isnan(conv_rf.value) and "Conv1d" in conv_rf.note
    assert list(table.n_params) == [6, 80, 6, 80]
    H, offsets = full_hessian(net, *data)
    for i in (0, 1):
        assert (
            rel(table.value.iloc[i], float(torch.trace(weight_block(net, H, offsets, i)))) <= 1e-10
        )
    assert table.value.iloc[3] == relative_flatness(net, data)


def test_parameters_untouched(random_mlp64, fixture_data64):
    X, y = fixture_data64
    net = random_mlp64.train()
    before = copy.deepcopy(net.state_dict())
    flags = [p.requires_grad for p in net.parameters()]
    layer_profile(net, (X, y))
    relative_flatness(net, (X, y), layer=0, method="hutchinson", num_probes=3)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert flags == [p.requires_grad for p in net.parameters()]
    kappa = relative_flatness(net, (X, y), layer=0)
    net.requires_grad_(False)  # a frozen model: the closed form differentiates w.r.t. u, not θ
    assert relative_flatness(net, (X, y), layer=0) == kappa
    assert not any(p.requires_grad for p in net.parameters())
