"""Jiang et al.'s norm baselines (flatness.measures.norms): each against its definition computed by
an independent route in float64, and its (non-)invariance under layer-wise, neuron-wise and Dinh α
rescaling by the predicted amount (METHODS.md §1, §6, §10 tolerances); θ₀ of distance_from_init is
the trainer's own initialisation, bitwise."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from flatness.config import DataConfig
from flatness.data import load_dataset
from flatness.measure_signatures import MEASURE_PARAMETERS, parameters
from flatness.measures import (
    HIGHER_IS_FLATTER,
    MEASURES,
    distance_from_init,
    path_norm,
    spectral_norm_product,
    weight_norm,
)
from flatness.models import load_model
from flatness.reparam import (
    dinh_alpha_rescale,
    layerwise_rescale,
    neuronwise_rescale,
    weight_layers,
)
from flatness.suite import MeasureSpec, Variant, measure_model, measure_run, measure_specs
from flatness.train import initial_model, train_run
from tests.conftest import LAYERWISE_FACTORS, fixture_data, make_mlp, neuron_scales

NAMES = ("weight_norm", "distance_from_init", "spectral_norm_product", "path_norm")
CLOSED_FORM_TOL = 1e-10  # METHODS.md §10: closed forms in float64 invariant to ≤ 1e-10 relative
CONV_FACTORS = (7.0, 0.2, 2.5, 1 / 3.5)  # ∏ = 1 over the conv net's 4 weight layers


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _fill(layers, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)


def tiny_mlp(bias: bool, seed: int = 0) -> nn.Sequential:
    """The 3-2-2 ReLU MLP of the path enumeration."""
    net = nn.Sequential(nn.Linear(3, 2, bias=bias), nn.ReLU(), nn.Linear(2, 2, bias=bias)).double()
    _fill(net, seed)
    return net


def convnet(seed: int = 0) -> nn.Sequential:
    """conv-relu-maxpool-conv-relu-flatten-linear-relu-linear on 1×8×8 inputs, float64."""
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).double()
    _fill(net, seed)
    return net


def conv_data(n=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.zeros(
        n, dtype=torch.long
    )


def data_for(net, n=5):
    d_in = weight_layers(net)[0].weight.shape[1]
    return torch.ones(n, d_in, dtype=torch.float64), torch.zeros(n, dtype=torch.long)


# ---- independent references: Python loops over entries, σ_max from eigvalsh(W Wᵀ) ---------------


def entries(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().flatten().tolist()]


def ref_sq_sum(tensors) -> float:
    return sum(v * v for t in tensors for v in entries(t))


def ref_sigma(W: torch.Tensor) -> float:
    """σ_max of the (out, in·k·k) matrix built entry by entry, via the eigenvalues of M Mᵀ."""
    out = W.shape[0]
    flat = entries(W)
    cols = len(flat) // out
    M = torch.tensor([flat[o * cols : (o + 1) * cols] for o in range(out)], dtype=torch.float64)
    return math.sqrt(float(torch.linalg.eigvalsh(M @ M.T).max()))


def weights(net) -> list[torch.Tensor]:
    return [m.weight.detach() for m in weight_layers(net)]


# ---- the definitions ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_weight_norm_is_the_sum_of_squared_weights(bias):
    for net in (tiny_mlp(bias), make_mlp(bias=bias), convnet()):
        assert rel(weight_norm(net, None), ref_sq_sum(weights(net))) <= 1e-13
        biases = [m.bias for m in weight_layers(net) if m.bias is not None]
        want = ref_sq_sum(weights(net)) + ref_sq_sum(biases)
        assert rel(weight_norm(net, None, include_bias=True), want) <= 1e-13


def test_weight_norms_ignore_batchnorm_parameters():
    plain = tiny_mlp(True)
    bn = nn.Sequential(plain[0], nn.BatchNorm1d(2), nn.ReLU(), plain[2]).double()
    with torch.no_grad():
        bn[1].weight.fill_(3.0)
        bn[1].bias.fill_(-2.0)
    assert weight_norm(bn, None) == weight_norm(plain, None)
    assert weight_norm(bn, None, include_bias=True) == weight_norm(plain, None, include_bias=True)
    assert spectral_norm_product(bn, None) == spectral_norm_product(plain, None)
    assert distance_from_init(bn, None, init_model=tiny_mlp(True, seed=1)) == distance_from_init(
        plain, None, init_model=tiny_mlp(True, seed=1)
    )


def test_distance_from_init_is_the_euclidean_distance_of_the_weights():
    for net, init in ((make_mlp(seed=3), make_mlp(seed=7)), (convnet(0), convnet(1))):
        want = math.sqrt(
            sum(
                (a - b) ** 2
                for w, w0 in zip(weights(net), weights(init), strict=True)
                for a, b in zip(entries(w), entries(w0), strict=True)
            )
        )
        assert rel(distance_from_init(net, None, init_model=init), want) <= 1e-13
        assert distance_from_init(net, None, init_model=net) == 0.0
    # θ₀ is moved to the model's dtype: a float32 init against a float64 model
    net, init = make_mlp(seed=3), make_mlp(seed=7, dtype=torch.float32)
    assert (
        rel(
            distance_from_init(net, None, init_model=init),
            distance_from_init(net, None, init_model=init.double()),
        )
        <= 1e-13
    )


def test_distance_from_init_refuses_a_missing_or_foreign_init():
    with pytest.raises(ValueError, match="init_model"):
        distance_from_init(make_mlp(), None)
    with pytest.raises(ValueError, match="not the same architecture"):
        distance_from_init(make_mlp(), None, init_model=make_mlp(widths=(12, 8, 4)))


def test_spectral_norm_product_is_the_product_of_largest_singular_values():
    for net in (tiny_mlp(True), make_mlp(seed=3), convnet()):
        want = 1.0
        for w in weights(net):
            want *= ref_sigma(w)
        assert rel(spectral_norm_product(net, None), want) <= 1e-12


def test_spectral_norm_product_is_taken_in_float64_and_refuses_overflow():
    # five float32 layers with ‖W‖₂ = 1e10: each norm is representable, the product 1e50 is not
    deep = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(5)])
    with torch.no_grad():
        for m in deep:
            m.weight.copy_(torch.eye(2) * 1e10)
    assert rel(spectral_norm_product(deep, None), 1e50) <= 1e-6  # float32 norms, float64 product
    deeper = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(40)]).double()
    with torch.no_grad():
        for m in deeper:
            m.weight.copy_(torch.eye(2, dtype=torch.float64) * 1e10)
    with pytest.raises(ValueError, match="outside float64's range"):
        spectral_norm_product(deeper, None)
    with torch.no_grad():
        deeper[3].weight.zero_()
    assert spectral_norm_product(deeper, None) == 0.0  # a zero layer is a true 0, not underflow


def ref_path_sum_mlp(net) -> float:
    """Σ over every path input → … → output (bias units as inputs at 1) of ∏ w², enumerated."""
    Ws = [m.weight.detach() for m in weight_layers(net)]
    bs = [None if m.bias is None else m.bias.detach() for m in weight_layers(net)]
    total = 0.0
    # A path starts at an input unit of layer 0, or at a bias unit of any layer s.
    for s, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        heads = []  # (first unit reached, its squared weight)
        if s == 0:
            heads += [
                (j, float(W[j, i]) ** 2) for i in range(W.shape[1]) for j in range(W.shape[0])
            ]
        if b is not None:
            heads += [(j, float(b[j]) ** 2) for j in range(W.shape[0])]
        for j, w2 in heads:
            for units in itertools.product(*(range(V.shape[0]) for V in Ws[s + 1 :])):
                prod, prev = w2, j
                for V, u in zip(Ws[s + 1 :], units, strict=True):
                    prod *= float(V[u, prev]) ** 2
                    prev = u
                total += prod
    return total


@pytest.mark.parametrize("bias", [False, True])
def test_path_norm_equals_the_enumerated_path_sum_on_mlps(bias):
    tiny = tiny_mlp(bias)
    W1, W2 = (entries(w) for w in weights(tiny))  # 3-2-2 written out once more, by hand
    by_hand = sum(
        W1[j * 3 + i] ** 2 * W2[k * 2 + j] ** 2
        for i in range(3)
        for j in range(2)
        for k in range(2)
    )
    if bias:
        b1, b2 = entries(tiny[0].bias), entries(tiny[2].bias)
        by_hand += sum(b1[j] ** 2 * W2[k * 2 + j] ** 2 for j in range(2) for k in range(2))
        by_hand += sum(v**2 for v in b2)
    assert rel(ref_path_sum_mlp(tiny), by_hand) <= 1e-14
    assert rel(path_norm(tiny, data_for(tiny)), math.sqrt(by_hand)) <= 1e-13
    deep = make_mlp(bias=bias, seed=3)  # 12-8-6-4: 2,304 input paths plus the bias paths
    assert rel(path_norm(deep, data_for(deep)), math.sqrt(ref_path_sum_mlp(deep))) <= 1e-12


def test_path_norm_of_a_conv_net_equals_its_enumerated_path_sum():
    """conv(2→3, 2×2) → ReLU → flatten → linear(27→2) on 2×4×4: the input unit (c, p+a, q+b)
    reaches hidden unit (o, p, q) through the kernel tap W1[o, c, a, b] only."""
    net = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)).double()
    _fill(net, 4)
    W1, b1 = net[0].weight.detach(), net[0].bias.detach()
    W2, b2 = net[3].weight.detach(), net[3].bias.detach()
    total = sum(float(b2[k]) ** 2 for k in range(2))
    for o, p, q in itertools.product(range(3), range(3), range(3)):
        into = float(b1[o]) ** 2 + sum(
            float(W1[o, c, a, b]) ** 2 for c in range(2) for a in range(2) for b in range(2)
        )
        total += into * sum(float(W2[k, o * 9 + p * 3 + q]) ** 2 for k in range(2))
    X = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert rel(path_norm(net, (X, torch.zeros(3, dtype=torch.long))), math.sqrt(total)) <= 1e-13


def test_path_norm_refuses_nets_it_cannot_sum_paths_through():
    X = data_for(make_mlp())
    bn = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    with pytest.raises(ValueError, match="BatchNorm1d.*fold_batchnorm"):
        path_norm(bn, X)
    tanh = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    with pytest.raises(ValueError, match="Tanh"):
        path_norm(tanh, X)


def test_measures_leave_the_model_alone_and_return_floats():
    net = convnet()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = conv_data()
    for name in NAMES:
        opts = {"init_model": convnet(1)} if name == "distance_from_init" else {}
        value = MEASURES[name](net, data, **opts)
        assert isinstance(value, float) and math.isfinite(value) and value > 0
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_registered_with_their_signatures_and_none_is_higher_is_flatter():
    for name in NAMES:
        assert MEASURE_PARAMETERS[name] == parameters(MEASURES[name])
    assert not HIGHER_IS_FLATTER & set(NAMES)


# ---- (non-)invariance: every rescaling is W_l → S_l ⊙ W_l with a known S_l ----------------------


def _mlp_case():
    return make_mlp(seed=3), fixture_data()


def _conv_case():
    return convnet(), conv_data()


def _scales_layerwise(factors):
    def scales(net):
        return [torch.full_like(w, a) for w, a in zip(weights(net), factors, strict=True)]

    return scales


def _scales_dinh(alpha):
    def scales(net):
        s = [torch.ones_like(w) for w in weights(net)]
        s[-2], s[-1] = s[-2] / alpha, s[-1] * alpha
        return s

    return scales


def _scales_neuron(layer, lam):
    """Rows of W_layer × λ, the matching input columns (a block per channel) of W_{layer+1} ÷ λ."""

    def scales(net):
        s = [torch.ones_like(w) for w in weights(net)]
        lam_t = torch.as_tensor(lam, dtype=torch.float64)
        s[layer] = s[layer] * lam_t.view(-1, *([1] * (s[layer].dim() - 1)))
        nxt = s[layer + 1]
        block = nxt.shape[1] // lam_t.numel()
        cols = lam_t.repeat_interleave(block)
        s[layer + 1] = nxt / cols.view(1, -1, *([1] * (nxt.dim() - 2)))
        return s

    return scales


LAM_CONV0 = [0.2, 3.0, 7.0]
LAM_CONV1 = [0.3, 2.0, 5.0, 0.25]
CASES = {  # id: (net + data, the copy, its weight scales S_l, kind)
    "mlp-layerwise": (
        _mlp_case,
        lambda m: layerwise_rescale(m, LAYERWISE_FACTORS),
        _scales_layerwise(LAYERWISE_FACTORS),
        "L",
    ),
    "mlp-neuron": (
        _mlp_case,
        lambda m: neuronwise_rescale(m, 1, neuron_scales()),
        _scales_neuron(1, neuron_scales()),
        "N",
    ),
    "mlp-dinh10": (_mlp_case, lambda m: dinh_alpha_rescale(m, 10.0), _scales_dinh(10.0), "L"),
    "mlp-dinh100": (_mlp_case, lambda m: dinh_alpha_rescale(m, 100.0), _scales_dinh(100.0), "L"),
    "conv-layerwise": (
        _conv_case,
        lambda m: layerwise_rescale(m, CONV_FACTORS),
        _scales_layerwise(CONV_FACTORS),
        "L",
    ),
    "conv-neuron-conv": (  # through ReLU and max-pool
        _conv_case,
        lambda m: neuronwise_rescale(m, 0, LAM_CONV0),
        _scales_neuron(0, LAM_CONV0),
        "N",
    ),
    "conv-neuron-fc": (  # through flatten: 16 input columns per channel
        _conv_case,
        lambda m: neuronwise_rescale(m, 1, LAM_CONV1),
        _scales_neuron(1, LAM_CONV1),
        "N",
    ),
    "conv-dinh100": (_conv_case, lambda m: dinh_alpha_rescale(m, 100.0), _scales_dinh(100.0), "L"),
}


@pytest.fixture(params=list(CASES), scope="module")
def rescaled(request):
    make, transform, scales, kind = CASES[request.param]
    net, data = make()
    copy = transform(net)
    with torch.no_grad():  # the copy is the same function (T1), so any change is the measure's
        assert (net(data[0]) - copy(data[0])).abs().max() <= 1e-12 * net(data[0]).abs().max()
    predicted = [s * w for s, w in zip(scales(net), weights(net), strict=True)]
    assert all(
        torch.allclose(p, w, rtol=1e-14, atol=0)
        for p, w in zip(predicted, weights(copy), strict=True)
    ), "the oracle's S_l disagree with flatness.reparam"
    return net, copy, data, predicted, kind


def test_path_norm_is_invariant_to_every_rescaling(rescaled):
    net, copy, data, _, _ = rescaled
    assert rel(path_norm(copy, data), path_norm(net, data)) <= CLOSED_FORM_TOL


def test_spectral_norm_product_is_invariant_layerwise_only(rescaled):
    net, copy, data, predicted, kind = rescaled
    before, after = spectral_norm_product(net, data), spectral_norm_product(copy, data)
    if kind == "L":  # ∏ a_l = 1 (Dinh's T_α: 1/α · α)
        assert rel(after, before) <= CLOSED_FORM_TOL
    else:  # documented non-invariance: the predicted ∏ σ(S_l ⊙ W_l), and a real change
        assert rel(after, math.prod(ref_sigma(w) for w in predicted)) <= 1e-10
        assert rel(after, before) > 0.05


def test_weight_norm_changes_by_the_predicted_amount(rescaled):
    net, copy, data, predicted, _ = rescaled
    # e.g. Dinh's T_α: ‖W_k‖²/α² + α²‖W_{k+1}‖² + the rest
    assert rel(weight_norm(copy, data), ref_sq_sum(predicted)) <= 1e-12
    assert rel(weight_norm(copy, data), weight_norm(net, data)) > 0.05


def test_distance_from_init_changes_by_the_predicted_amount(rescaled):
    """θ₀ is not rescaled with the copy: the distance becomes (Σ‖S_l ⊙ W_l − W⁰_l‖²)^½."""
    net, copy, data, predicted, _ = rescaled
    init = make_mlp(seed=7) if isinstance(net[0], nn.Linear) else convnet(seed=9)
    want = math.sqrt(ref_sq_sum(p - w0 for p, w0 in zip(predicted, weights(init), strict=True)))
    got = distance_from_init(copy, data, init_model=init)
    assert rel(got, want) <= 1e-12
    assert rel(got, distance_from_init(net, data, init_model=init)) > 0.01


# ---- the measure stage passes the run's θ₀ --------------------------------------------------------


def test_measure_model_passes_the_unrescaled_init_to_every_copy():
    net, init, data = make_mlp(seed=3), make_mlp(seed=7), fixture_data()
    specs = [MeasureSpec(n, n) for n in NAMES]
    variants = [Variant("original", "original"), Variant("dinh_alpha100", "dinh", 100.0)]
    rows = measure_model(net, data, specs, variants, init_model=init)
    got = {(r["measure"], r["variant"]): r["value"] for r in rows}
    assert got[("distance_from_init", "original")] == distance_from_init(net, data, init_model=init)
    assert got[("distance_from_init", "dinh_alpha100")] == distance_from_init(
        dinh_alpha_rescale(net, 100.0), data, init_model=init
    )
    assert rel(got[("path_norm", "dinh_alpha100")], got[("path_norm", "original")]) <= 1e-10
    # without θ₀ the measure's row says why; the other measures are unaffected
    rows = measure_model(net, data, specs, variants[:1])
    row = next(r for r in rows if r["measure"] == "distance_from_init")
    assert math.isnan(row["value"]) and "init_model" in row["note"]
    assert all(math.isfinite(r["value"]) for r in rows if r is not row)


def test_init_model_cannot_be_set_from_the_config():
    with pytest.raises(ValueError, match=r"options\.init_model is set by the workflow"):
        measure_specs([{"function": "distance_from_init", "options": {"init_model": None}}])


def run_cfg(**over) -> dict:
    cfg = {
        "data": {"name": "digits", "n_train": 256, "n_test": 128, "augment": False},
        "model": {"name": "mlp", "widths": [32], "dropout": 0.1},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "batch_size": 48,
        "epochs": 1,
        "seed": 3,
        "device": "cpu",
    }
    return {**cfg, **over}


def _train_capturing_init(tmp_path, monkeypatch, cfg):
    """Train one run; return (the weights the trainer built, before its first step; metrics)."""
    import flatness.train

    seen = {}
    build_optimizer = flatness.train.build_optimizer

    def spy(model, cfg):  # called right after the trainer built its model, before any step
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return build_optimizer(model, cfg)

    monkeypatch.setattr(flatness.train, "build_optimizer", spy)
    metrics = train_run(cfg, tmp_path, run_id="r")
    return seen, metrics


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_initial_model_rebuilds_the_trainers_init_bitwise(tmp_path, monkeypatch, dtype):
    seen, metrics = _train_capturing_init(tmp_path, monkeypatch, run_cfg(dtype=dtype))
    prov = json.loads((tmp_path / "metrics.json").read_text())["provenance"]
    with torch.random.fork_rng():
        rebuilt = initial_model(prov["config"], prov["model_config"]).state_dict()
    assert seen.keys() == rebuilt.keys()
    assert all(seen[k].dtype == rebuilt[k].dtype == getattr(torch, dtype) for k in seen)
    assert all(torch.equal(seen[k], rebuilt[k]) for k in seen)
    trained = load_model(tmp_path / "model.pt").state_dict()
    assert not torch.equal(trained["1.weight"], seen["1.weight"])  # it did train


def test_measure_run_measures_the_distance_from_the_runs_own_init(tmp_path, monkeypatch):
    seen, metrics = _train_capturing_init(tmp_path, monkeypatch, run_cfg())
    model = load_model(tmp_path / "model.pt")
    train = load_dataset(DataConfig(name="digits", n_train=256, n_test=128)).train
    measure_cfg = {
        "measures": [{"function": "distance_from_init"}, {"function": "weight_norm"}],
        "layerwise": {"copies": 1, "spread": 10.0},
        "dinh_alpha": [10],
        "n_samples": 64,
        "subset_seed": 0,
        "dtype": "float64",
        "device": "cpu",
    }
    rng = torch.get_rng_state()
    rows = measure_run(model, train, measure_cfg, "r", "ok", metrics["provenance"])
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding θ₀ left the caller's RNG alone
    got = {(r["measure"], r["variant"]): r["value"] for r in rows}
    W = {k: v.double() for k, v in model.state_dict().items() if k.endswith("weight")}
    want = math.sqrt(sum(float(((W[k] - seen[k].double()) ** 2).sum()) for k in W))
    assert rel(got[("distance_from_init", "original")], want) <= 1e-12
    assert rel(got[("distance_from_init", "dinh_alpha10")], want) > 0.01  # θ₀ not rescaled
    # the model at its init is at distance 0 from the rebuilt θ₀
    at_init = load_model(tmp_path / "model.pt")
    at_init.load_state_dict(seen)
    rows = measure_run(at_init, train, measure_cfg, "r", "ok", metrics["provenance"])
    assert next(r["value"] for r in rows if r["measure"] == "distance_from_init") == 0.0
    # without the provenance there is no θ₀: NaN rows that say so
    rows = measure_run(model, train, measure_cfg, "r", "ok")
    dist = [r for r in rows if r["measure"] == "distance_from_init"]
    assert all(math.isnan(r["value"]) and "init_model" in r["note"] for r in dist)
