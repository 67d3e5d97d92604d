"""T1 (METHODS.md §10): the rescalings of flatness.reparam preserve the function; BN folding too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatness.reparam import (
    dinh_alpha_rescale,
    fold_batchnorm,
    layerwise_rescale,
    neuronwise_rescale,
    random_layerwise_factors,
    weight_layers,
)
from tests.conftest import LAYERWISE_FACTORS, make_mlp, neuron_scales

T1_TOL = 1e-12  # METHODS.md §10 T1: logits unchanged ≤ 1e-12 (float64)
BN_TOL = 1e-10  # task spec: folded BN net equals the eval-mode BN net ≤ 1e-10 (float64)
CONV_FACTORS = (7.0, 0.2, 2.5, 1 / 3.5)  # ∏ = 1 over the conv net's 4 weight layers


def make_convnet(seed: int = 0, bn: bool = False) -> nn.Sequential:
    """conv-relu-maxpool-conv-relu-flatten-linear-relu-linear on 1×8×8 inputs, float64."""
    torch.manual_seed(seed)  # test-side only: module init draws from the global RNG
    layers: list[nn.Module] = [nn.Conv2d(1, 3, 3, padding=1)]
    layers += [nn.BatchNorm2d(3)] if bn else []
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1)]
    layers += [nn.BatchNorm2d(4)] if bn else []
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)]
    layers += [nn.BatchNorm1d(5)] if bn else []
    layers += [nn.ReLU(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


@pytest.fixture(scope="module")
def conv_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)


def max_diff(a: nn.Module, b: nn.Module, X: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(X) - b(X)).abs().max())


def _dinh(alpha: float, layer: int = -2):
    def transform(m):
        return dinh_alpha_rescale(m, alpha, layer=layer)

    transform.__name__ = "identity" if alpha == 1 else f"dinh{alpha}"  # T_1 changes nothing
    return transform


def _cases():
    """(id, model factory, input key, transform) for every T1 case."""
    mlp = ("mlp", lambda: make_mlp(seed=3))
    conv = ("conv", lambda: make_convnet())
    return [
        pytest.param(*mlp, lambda m: layerwise_rescale(m, LAYERWISE_FACTORS), id="mlp-layerwise"),
        pytest.param(*mlp, lambda m: neuronwise_rescale(m, 1, neuron_scales()), id="mlp-neuron"),
        pytest.param(
            *mlp, lambda m: neuronwise_rescale(m, 0, torch.linspace(0.2, 5, 8)), id="mlp-neuron0"
        ),
        *[pytest.param(*mlp, _dinh(a), id=f"mlp-dinh{a:g}") for a in (1.0, 10.0, 100.0)],
        pytest.param(*conv, lambda m: layerwise_rescale(m, CONV_FACTORS), id="conv-layerwise"),
        # conv → conv (through ReLU and max-pool): one scale per output channel.
        pytest.param(
            *conv, lambda m: neuronwise_rescale(m, 0, [0.2, 3.0, 7.0]), id="conv-neuron-conv"
        ),
        # conv → linear through flatten: each channel owns a block of 16 input columns.
        pytest.param(
            *conv, lambda m: neuronwise_rescale(m, 1, [0.3, 2.0, 5.0, 0.25]), id="conv-neuron-fc"
        ),
        *[pytest.param(*conv, _dinh(a), id=f"conv-dinh{a:g}") for a in (1.0, 10.0, 100.0)],
        pytest.param(*conv, _dinh(10.0, layer=0), id="conv-dinh-first-layer"),
    ]


@pytest.mark.parametrize("kind,factory,transform", _cases())
def test_t1_function_preserved_random_init(kind, factory, transform, fixture_data64, conv_inputs):
    model = factory()
    X = fixture_data64[0] if kind == "mlp" else conv_inputs
    before = [p.detach().clone() for p in model.parameters()]
    new = transform(model)
    assert max_diff(model, new, X) <= T1_TOL
    # The argument is untouched and the copy really differs (a no-op would pass the first check).
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    changed = any(not torch.equal(a, b) for a, b in zip(before, new.parameters(), strict=True))
    assert changed == (transform.__name__ != "identity")


def test_t1_on_trained_fixture(trained_mlp64, fixture_data64):
    X, _ = fixture_data64
    for new in (
        layerwise_rescale(trained_mlp64, LAYERWISE_FACTORS),
        neuronwise_rescale(trained_mlp64, 1, neuron_scales()),
        *(dinh_alpha_rescale(trained_mlp64, a) for a in (1.0, 10.0, 100.0)),
    ):
        assert max_diff(trained_mlp64, new, X) <= T1_TOL


def test_rescalings_change_the_parameters_as_stated():
    """The exact maps of METHODS.md §1: cumulative bias products, row × λ, column ÷ λ."""
    net = make_mlp(seed=3)
    W = [lay.weight.detach() for lay in weight_layers(net)]
    b = [lay.bias.detach() for lay in weight_layers(net)]
    lw = weight_layers(layerwise_rescale(net, LAYERWISE_FACTORS))
    cum = 1.0
    for lay, a, w0, b0 in zip(lw, LAYERWISE_FACTORS, W, b, strict=True):
        cum *= a
        torch.testing.assert_close(lay.weight, a * w0, rtol=1e-15, atol=0)
        torch.testing.assert_close(lay.bias, cum * b0, rtol=1e-15, atol=0)
    lam = neuron_scales()
    nw = weight_layers(neuronwise_rescale(net, 1, lam))
    torch.testing.assert_close(nw[1].weight, W[1] * lam[:, None], rtol=1e-15, atol=0)
    torch.testing.assert_close(nw[1].bias, b[1] * lam, rtol=1e-15, atol=0)
    torch.testing.assert_close(nw[2].weight, W[2] / lam[None, :], rtol=1e-15, atol=0)
    dw = weight_layers(dinh_alpha_rescale(net, 10.0))
    torch.testing.assert_close(dw[1].weight, W[1] / 10, rtol=1e-15, atol=0)
    torch.testing.assert_close(dw[2].weight, W[2] * 10, rtol=1e-15, atol=0)


def test_random_layerwise_factors_multiply_to_one():
    f = random_layerwise_factors(5, 10.0, torch.Generator().manual_seed(0))
    assert len(f) == 5 and all(a > 0 for a in f)
    assert abs(torch.tensor(f, dtype=torch.float64).prod().item() - 1) <= 1e-12
    assert max(f) / min(f) > 1.5  # actually random, not all ones


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: layerwise_rescale(m, (2.0, 0.5)), "one factor per weight layer"),
        (lambda m: layerwise_rescale(m, (2.0, -0.5, -1.0)), "positive"),
        (lambda m: layerwise_rescale(m, (2.0, 0.5, 2.0)), "multiply to 1"),
        (lambda m: neuronwise_rescale(m, 1, torch.ones(5)), "6 units"),
        (lambda m: neuronwise_rescale(m, 1, torch.tensor([1.0, 1, 1, 1, 1, 0])), "positive"),
        (lambda m: neuronwise_rescale(m, -1, torch.ones(4)), "last layer"),
        (lambda m: dinh_alpha_rescale(m, 0.0), "positive"),
        (lambda m: dinh_alpha_rescale(m, 2.0, layer=2), "successor"),
    ],
    ids=["count", "negative", "product", "scale-count", "zero-scale", "last", "alpha", "dinh-last"],
)
def test_bad_rescaling_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_mlp())


@pytest.mark.parametrize(
    "call",
    [
        lambda m: layerwise_rescale(m, CONV_FACTORS),
        lambda m: neuronwise_rescale(m, 0, [1.0, 2.0, 3.0]),
        lambda m: dinh_alpha_rescale(m, 10.0),
    ],
    ids=["layerwise", "neuronwise", "dinh"],
)
def test_bn_nets_are_refused(call):
    with pytest.raises(ValueError, match="normalisation layers"):
        call(make_convnet(bn=True))


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.1 + 3 * torch.rand(n, generator=g, dtype=torch.float64))
                m.weight.copy_(torch.randn(n, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
    return model


def test_fold_batchnorm_preserves_eval_function(conv_inputs):
    net = _randomise_bn(make_convnet(bn=True), seed=1).train()
    net.get_submodule("0").bias = None  # a conv without bias gains one when folded
    folded = fold_batchnorm(net)
    assert net.training and folded.training  # the argument's mode is kept, not changed
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    n_id = sum(isinstance(m, nn.Identity) for m in folded.modules())
    assert n_bn == 0 and n_id == 3
    net.eval(), folded.eval()
    assert max_diff(net, folded, conv_inputs) <= BN_TOL
    # The folded net is BN-free, so the ReLU rescalings now apply and still preserve it.
    rescaled = neuronwise_rescale(folded, 1, [0.3, 2.0, 5.0, 0.25])
    assert max_diff(folded, rescaled, conv_inputs) <= T1_TOL
    # The original still has its BN modules (a copy was folded).
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2


def test_fold_batchnorm_check_has_teeth(conv_inputs):
    """Dropping the BNs instead of folding them changes the function: the BN stats matter."""
    net = _randomise_bn(make_convnet(bn=True), seed=2).eval()
    dropped = nn.Sequential(
        *[nn.Identity() if isinstance(m, nn.modules.batchnorm._BatchNorm) else m for m in net]
    )
    assert max_diff(net, dropped, conv_inputs) > 1e-3
    assert max_diff(net, fold_batchnorm(net), conv_inputs) <= BN_TOL


@pytest.mark.parametrize(
    "net,match",
    [
        (nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)), "comes first"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)), "running"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4)), "follows '1'"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)), "follows '1'"),
        (nn.Sequential(nn.Linear(3, 5), nn.Flatten(0), nn.BatchNorm1d(4)), "follows"),
        (nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(4)), "4 features"),
    ],
    ids=["bn-first", "no-running-stats", "relu-between", "two-bns", "flatten-between", "width"],
)
def test_fold_batchnorm_refuses_unfoldable(net, match):
    with pytest.raises(ValueError, match=match):
        fold_batchnorm(net)


class _Residual(nn.Module):
    """y = x + W2 relu(W1 x): the skip connection breaks every ReLU rescaling."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    def forward(self, x):
        return x + self.body(x)


def test_branching_containers_are_refused():
    """A folded ResNet has no BN left but still branches: rescaling it would change the function
    silently (checked here by hand on a residual block), so the maps refuse custom containers."""
    net = nn.Sequential(_Residual(), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # The hazard is real: the layer-wise map with a = (2, 1, 1/2), applied by hand (biases by the
    # cumulative product), scales the body's output by 2 but not the skip path.
    manual = copy.deepcopy(net)
    with torch.no_grad():
        manual[0].body[0].weight.mul_(2.0), manual[0].body[0].bias.mul_(2.0)
        manual[0].body[2].bias.mul_(2.0)
        manual[2].weight.mul_(0.5)
    assert max_diff(net, manual, x) > 1e-3
    for call in (
        lambda m: layerwise_rescale(m, (2.0, 0.5, 1.0)),
        lambda m: neuronwise_rescale(m, 0, torch.ones(4)),
        lambda m: dinh_alpha_rescale(m, 10.0),
    ):
        with pytest.raises(ValueError, match="_Residual"):
            call(net)


# --------------------------------------------------------------------------------------------
# Only positively homogeneous maps may sit between rescaled layers (an allowlist)

REFUSED = [nn.Tanh, nn.GELU, nn.Sigmoid, nn.Softplus, nn.ELU, nn.SELU, nn.SiLU, nn.Mish,
           nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign,
           nn.CELU, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink]  # fmt: skip
HOMOGENEITY = r"not positively homogeneous"


def _all_rescalings(net: nn.Module):
    """Layer-wise (∏ = 1, every partial product ≠ 1), neuron-wise and Dinh α = 100 at every
    hidden weight layer: (id, rescaled copy) pairs, computed lazily."""
    layers = weight_layers(net)
    n = len(layers)
    factors = [3.0] * (n - 1) + [3.0 ** -(n - 1)]
    yield "layerwise", lambda: layerwise_rescale(net, factors)
    for i in range(n - 1):
        units = layers[i].weight.shape[0]
        lam = torch.linspace(0.5, 3.0, units, dtype=torch.float64)
        yield f"neuron{i}", lambda i=i, lam=lam: neuronwise_rescale(net, i, lam)
        yield f"dinh{i}", lambda i=i: dinh_alpha_rescale(net, 100.0, layer=i)


def test_rescaling_across_tanh_would_change_the_function():
    # The defect the allowlist closes (the review's example): ×4 / ÷4 across a Tanh moves the
    # outputs by ≈ 0.5, where across a ReLU it moves them by nothing.
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    for act, moves in ((nn.Tanh(), True), (nn.ReLU(), False)):
        net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double()
        with torch.no_grad():
            manual = copy.deepcopy(net)
            manual[0].weight.mul_(4.0), manual[0].bias.mul_(4.0), manual[2].weight.div_(4.0)
            change = float((manual(x) - net(x)).abs().max())
        assert (change > 0.05) if moves else (change < 1e-12), (act, change)
    with pytest.raises(ValueError, match=rf"'1' \(Tanh\).*{HOMOGENEITY}"):
        layerwise_rescale(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), [4, 0.25])


def _mlp_with(act: nn.Module, where: int = 1) -> nn.Sequential:
    """Linear(3,4) · ? · Linear(4,4) · ? · Linear(4,2), float64; ``act`` at index 1 or 3, ReLU at
    the other."""
    torch.manual_seed(0)
    mods = [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)]
    mods[where] = act
    return nn.Sequential(*mods).double()


@pytest.mark.parametrize("act", REFUSED, ids=lambda a: a.__name__)
@pytest.mark.parametrize("where", [1, 3], ids=["after-first-layer", "after-second-layer"])
def test_non_homogeneous_activations_are_refused_by_name(act, where):
    net = _mlp_with(act(), where)
    rescalings = list(_all_rescalings(net))
    assert len(rescalings) == 5  # layer-wise, neuron-wise and Dinh at layers 0 and 1
    for rid, rescale in rescalings:
        with pytest.raises(ValueError, match=rf"'{where}' \({act.__name__}\).*{HOMOGENEITY}"):
            rescale()
            pytest.fail(f"{rid} accepted {act.__name__}")


def test_refused_module_is_named_by_its_qualified_name():
    net = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.GELU()), nn.Linear(4, 2)
    ).double()  # fmt: skip
    with pytest.raises(ValueError, match=rf"'0\.1' \(GELU\).*{HOMOGENEITY}"):
        dinh_alpha_rescale(net, 100.0, layer=0)


class _Gate(nn.Module):
    def forward(self, z):
        return z * torch.sigmoid(z)


def test_an_unknown_module_between_layers_is_refused():
    net = _mlp_with(_Gate())
    for _, rescale in _all_rescalings(net):
        with pytest.raises(ValueError, match=rf"'1' \(_Gate\).*{HOMOGENEITY}"):
            rescale()


def test_maps_outside_the_chain_are_not_checked():
    """Before the first and after the last weight layer nothing is rescaled: a Tanh there (or a
    softmax head) is fine."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Tanh(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid(), nn.Softmax(dim=1)
    ).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    for _, rescale in _all_rescalings(net):
        assert max_diff(net, rescale(), x) <= T1_TOL


def _conv_with(mid: nn.Module) -> nn.Sequential:
    """conv-relu-``mid``-conv-relu-flatten-linear-relu-linear on 1×8×8 inputs, float64, eval."""
    torch.manual_seed(1)
    head = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), mid, nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        flat = head.eval()(torch.zeros(1, 1, 8, 8)).numel()
    return nn.Sequential(
        *head, nn.ReLU(), nn.Flatten(), nn.Linear(flat, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double().eval()  # fmt: skip


ALLOWED = [
    pytest.param(lambda: _mlp_with(nn.ReLU()), id="ReLU"),
    pytest.param(lambda: _mlp_with(nn.LeakyReLU(0.1)), id="LeakyReLU(0.1)"),
    pytest.param(lambda: _mlp_with(nn.LeakyReLU(-0.5), where=3), id="LeakyReLU(-0.5)"),
    pytest.param(lambda: _mlp_with(nn.PReLU(4, init=0.3)), id="PReLU(per-unit)"),
    pytest.param(lambda: _mlp_with(nn.PReLU(init=-0.7)), id="PReLU(shared,negative)"),
    pytest.param(lambda: _mlp_with(nn.Identity()), id="Identity"),
    pytest.param(lambda: _mlp_with(nn.Dropout(0.5), where=3).eval(), id="Dropout(eval)"),
    pytest.param(lambda: _conv_with(nn.MaxPool2d(2, padding=1)), id="MaxPool2d"),
    pytest.param(lambda: _conv_with(nn.AdaptiveMaxPool2d(5)), id="AdaptiveMaxPool2d"),
    pytest.param(lambda: _conv_with(nn.AvgPool2d(2, padding=1)), id="AvgPool2d"),
    pytest.param(lambda: _conv_with(nn.AdaptiveAvgPool2d(5)), id="AdaptiveAvgPool2d"),
    pytest.param(lambda: _conv_with(nn.Dropout2d(0.5)), id="Dropout2d(eval)"),
    pytest.param(lambda: _conv_with(nn.Identity()), id="Flatten(conv-to-linear)"),
    pytest.param(
        lambda: _conv_with(nn.Sequential(nn.Flatten(), nn.Unflatten(1, (3, 8, 8)))),
        id="Flatten+Unflatten(nested)",
    ),
]


@pytest.mark.parametrize("factory", ALLOWED)
def test_homogeneous_maps_keep_the_function(factory):
    net = factory()
    conv = isinstance(weight_layers(net)[0], nn.Conv2d)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, *((1, 8, 8) if conv else (3,)), generator=g, dtype=torch.float64)
    before = [p.detach().clone() for p in net.parameters()]
    for rid, rescale in _all_rescalings(net):
        new = rescale()
        assert max_diff(net, new, x) <= T1_TOL, rid
        changed = any(not torch.equal(a, b) for a, b in zip(before, new.parameters(), strict=True))
        assert changed, rid  # not a no-op


# The allowlist is about what a module computes, not what it inherits from, and a module reused
# elsewhere in the chain runs at every place it sits.


class _TanhNamedReLU(nn.ReLU):
    """Passes isinstance(m, nn.ReLU), but its own forward is tanh."""

    def forward(self, z):
        return torch.tanh(z)


def _reused_tanh_net() -> nn.Sequential:
    """One Tanh instance both before the first layer (harmless) and between the layers."""
    torch.manual_seed(0)
    t = nn.Tanh()
    return nn.Sequential(t, nn.Linear(3, 4), t, nn.Linear(4, 2)).double()


def _overriding_subclass_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), _TanhNamedReLU(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize(
    "factory,match",
    [
        (_overriding_subclass_net, r"'1' \(_TanhNamedReLU\).*own forward"),
        (_reused_tanh_net, rf"'2' \(Tanh\).*{HOMOGENEITY}"),
    ],
    ids=["allowlisted-subclass-own-forward", "reused-instance-between-layers"],
)
def test_allowlist_loopholes_are_refused(factory, match):
    net = factory()
    # The hazard is real: ×4 / ÷4 across the module moves the outputs.
    x = 3 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    manual = copy.deepcopy(net)
    with torch.no_grad():
        m_first, m_last = weight_layers(manual)
        m_first.weight.mul_(4.0), m_first.bias.mul_(4.0), m_last.weight.div_(4.0)
    assert max_diff(net, manual, x) > 0.05
    for rid, rescale in _all_rescalings(net):
        with pytest.raises(ValueError, match=match):
            rescale()
            pytest.fail(f"{rid} accepted the model")
