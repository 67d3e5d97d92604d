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
           nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.LogSigmoid, nn.Softsign, nn.CELU]  # fmt: skip


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
    with pytest.raises(ValueError, match="Tanh"):
        layerwise_rescale(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), [4, 0.25])


def _mlp_with(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("act", REFUSED, ids=lambda a: a.__name__)
def test_non_homogeneous_activations_are_refused_by_name(act):
    net = _mlp_with(act())
    for rescale in (
        lambda m: layerwise_rescale(m, [4.0, 0.25, 1.0]),
        lambda m: neuronwise_rescale(m, 0, torch.linspace(0.5, 2.0, 4)),
        lambda m: dinh_alpha_rescale(m, 100.0, layer=0),
    ):
        with pytest.raises(ValueError, match=rf"'1' \({act.__name__}\).*not positively homogeneous"):
            rescale(net)


class _Gate(nn.Module):
    def forward(self, z):
        return z * torch.sigmoid(z)


def test_an_unknown_module_between_layers_is_refused():
    net = _mlp_with(_Gate())
    with pytest.raises(ValueError, match="_Gate"):
        layerwise_rescale(net, [4.0, 0.25, 1.0])


def _conv_net(pool: nn.Module) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), pool, nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(48, 5), nn.Identity(), nn.Linear(5, 3), nn.Softmax(dim=1),
    ).double().eval()  # fmt: skip


ALLOWED = {
    "relu": lambda: _mlp_with(nn.ReLU()),
    "leaky_relu": lambda: _mlp_with(nn.LeakyReLU(0.1)),
    "prelu": lambda: _mlp_with(nn.PReLU(4, init=0.3)),
    "maxpool+flatten+dropout+identity": lambda: _conv_net(nn.MaxPool2d(2, padding=1)),
    "avgpool": lambda: _conv_net(nn.AvgPool2d(2, padding=1)),
}


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_homogeneous_maps_keep_the_function(name):
    net = ALLOWED[name]().double().eval()
    x = torch.randn(7, 3, dtype=torch.float64) if "relu" in name else torch.randn(
        7, 1, 8, 8, dtype=torch.float64
    )
    n = len(weight_layers(net))
    factors = [4.0, 0.25] + [1.0] * (n - 2)
    units = weight_layers(net)[0].weight.shape[0]
    with torch.no_grad():
        ref = net(x)
        for copy_ in (
            layerwise_rescale(net, factors),
            neuronwise_rescale(net, 0, torch.linspace(0.5, 2.0, units, dtype=torch.float64)),
            dinh_alpha_rescale(net, 100.0, layer=0),
        ):
            assert (copy_(x) - ref).abs().max() <= 1e-12
