"""Rescaling models with their own forward: the chain read from the torch.fx graph (issue 11.1).

The maps must preserve the function (T1, read relative here: ≤ 1e-9 of the output scale), keep the
invariant measures put (METHODS.md §10: T3 quotient sharpness under L ≤ 1e-9, T8 std-normalised
κ_Tr under N ≤ 1e-12, T17 Fisher-Rao under L and N ≤ 1e-12, T10 λ_R under Dinh α ≤ 1e-9) and
move the Euclidean λ_max under Dinh α; and refuse, by name, what would break the symmetry.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatness.measures import (
    fisher_rao_norm,
    hessian_max_eigenvalue,
    quotient_sharpness,
    relative_flatness,
)
from flatness.reparam import (
    dinh_alpha_rescale,
    fold_batchnorm,
    layerwise_rescale,
    neuronwise_rescale,
    weight_layers,
)

REL_TOL = 1e-9  # task spec: outputs unchanged ≤ 1e-9 relative (float64)
TIGHT = 1e-12  # Lanczos tolerance for the 1e-9 comparisons (as in test_curvature_measures)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def out_rel_diff(a: nn.Module, b: nn.Module, X: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(X), b(X)
    return float((ya - yb).abs().max() / ya.abs().max())


# --------------------------------------------------------------------------------------------
# (a) a class with its own forward, functional ReLUs and a flatten


class FunctionalMLP(nn.Module):
    """(N, 3, 4) → flatten → 12-8-6-4 with F.relu, torch.relu, Tensor.relu and F.dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 6)
        self.fc3 = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.flatten(x, 1)
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h)).relu()
        h = F.dropout(h, 0.3, training=self.training)
        return self.fc3(h)


# (b) nested blocks in an nn.ModuleList iterated in forward


class Block(nn.Module):
    def __init__(self, fin: int, fout: int, leaky: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(fin, fout), nn.Identity())
        self.act = nn.LeakyReLU(0.1) if leaky else nn.ReLU()

    def forward(self, x):
        return F.dropout(self.act(self.body(x)), 0.2, self.training)


class BlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(12, 8, leaky=True), Block(8, 6, leaky=False)])
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# (c) a conv net with functional max-pool (and several ways to flatten)

FLATTENS = {
    "torch.flatten": lambda h: torch.flatten(h, 1),
    "Tensor.flatten": lambda h: h.flatten(start_dim=1),
    "view(size(0))": lambda h: h.view(h.size(0), -1),
    "reshape(shape[0])": lambda h: h.reshape(h.shape[0], -1),
    "torch.reshape": lambda h: torch.reshape(h, (h.size()[0], -1)),
}


class ConvNet(nn.Module):
    """conv-relu-maxpool-conv-relu-flatten-linear-relu-linear on 1×8×8, all functional."""

    def __init__(self, flatten: str = "torch.flatten") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.flatten = flatten

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return FLATTENS[self.flatten](F.relu(self.conv2(x)))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x))))


def _make(cls, seed: int, *args) -> nn.Module:
    torch.manual_seed(seed)  # test-side only: module init draws from the global RNG
    return cls(*args).double().eval()


def _data(shape: tuple[int, ...], classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(48, *shape, generator=g, dtype=torch.float64)
    return X, torch.randint(0, classes, (48,), generator=g)


MODELS = {
    "functional-mlp": (lambda: _make(FunctionalMLP, 0), lambda: _data((3, 4), 4, 1)),
    "modulelist-blocks": (lambda: _make(BlockNet, 1), lambda: _data((12,), 4, 2)),
    "conv-functional-pool": (lambda: _make(ConvNet, 2), lambda: _data((1, 8, 8), 3, 3)),
}


def _rescalings(net: nn.Module):
    """Layer-wise (∏ = 1, no partial product 1), neuron-wise and Dinh α = 100 at every hidden
    weight layer: (id, thunk) pairs."""
    layers = weight_layers(net)
    n = len(layers)
    factors = [3.0] * (n - 1) + [3.0 ** -(n - 1)]
    yield "layerwise", lambda: layerwise_rescale(net, factors)
    for i in range(n - 1):
        lam = torch.linspace(0.3, 4.0, layers[i].weight.shape[0], dtype=torch.float64)
        yield f"neuron{i}", lambda i=i, lam=lam: neuronwise_rescale(net, i, lam)
        yield f"dinh{i}", lambda i=i: dinh_alpha_rescale(net, 100.0, layer=i)


@pytest.mark.parametrize("name", list(MODELS))
def test_function_preserved(name):
    make, data = MODELS[name]
    net, (X, _) = make(), data()
    before = [p.detach().clone() for p in net.parameters()]
    attrs = set(vars(net))
    done = []
    for rid, rescale in _rescalings(net):
        new = rescale()
        assert out_rel_diff(net, new, X) <= REL_TOL, rid
        changed = any(not torch.equal(a, b) for a, b in zip(before, new.parameters(), strict=True))
        assert changed, rid  # not a no-op
        done.append(rid)
    n = len(weight_layers(net))
    assert len(done) == 1 + 2 * (n - 1)
    # The argument is untouched: its parameters, and no attribute left behind by the tracer.
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert set(vars(net)) == attrs


@pytest.mark.parametrize("flatten", list(FLATTENS))
def test_conv_channels_map_to_their_flattened_blocks(flatten):
    """Each way of flattening from dim 1: neuron-wise on conv2 scales channel c's block of fc1's
    columns, and the parameters equal those of the same layers in an nn.Sequential (the path used
    before, unchanged) bit for bit, under every rescaling."""
    net = _make(ConvNet, 4, flatten)
    X, _ = _data((1, 8, 8), 3, 5)
    seq = nn.Sequential(
        net.conv1, nn.ReLU(), nn.MaxPool2d(2), net.conv2, nn.ReLU(), nn.Flatten(),
        net.fc1, nn.ReLU(), net.fc2,
    )  # fmt: skip
    assert out_rel_diff(net, seq, X) == 0
    pairs = zip(_rescalings(net), _rescalings(seq), strict=True)
    for (rid, traced), (_, sequential) in pairs:
        a, b = traced(), sequential()
        assert out_rel_diff(net, a, X) <= REL_TOL, rid
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), rid
    lam = torch.tensor([0.5, 2.0, 3.0, 7.0], dtype=torch.float64)
    fc1 = neuronwise_rescale(net, 1, lam).fc1.weight
    expected = net.fc1.weight.view(5, 4, 16) / lam.view(1, 4, 1)
    assert torch.equal(fc1, expected.view(5, 64))


@pytest.mark.parametrize("name", list(MODELS))
def test_invariant_measures_stay_put(name):
    make, data = MODELS[name]
    net, (X, y) = make(), data()
    n = len(weight_layers(net))
    factors = [3.0] * (n - 1) + [3.0 ** -(n - 1)]
    lam = torch.linspace(0.2, 5.0, weight_layers(net)[-2].weight.shape[0], dtype=torch.float64)
    L = layerwise_rescale(net, factors)
    N = neuronwise_rescale(net, -2, lam)  # the feature units of relative flatness
    D = dinh_alpha_rescale(net, 100.0)
    # T3 / T10: quotient sharpness under layer-wise and Dinh α.
    q = quotient_sharpness(net, (X, y), tol=TIGHT)
    assert rel(quotient_sharpness(L, (X, y), tol=TIGHT), q) <= 1e-9
    assert rel(quotient_sharpness(D, (X, y), tol=TIGHT), q) <= 1e-9
    # T8: std-normalised κ_Tr under neuron-wise rescaling of the feature layer (and it has teeth:
    # the unnormalised κ moves).
    k = relative_flatness(net, (X, y), normalize_features=True)
    assert rel(relative_flatness(N, (X, y), normalize_features=True), k) <= 1e-12
    assert rel(relative_flatness(N, (X, y)), relative_flatness(net, (X, y))) > 0.1
    # T17: Fisher-Rao under layer-wise and neuron-wise.
    fr = fisher_rao_norm(net, (X, y))
    assert rel(fisher_rao_norm(L, (X, y)), fr) <= 1e-12
    assert rel(fisher_rao_norm(N, (X, y)), fr) <= 1e-12
    # The documented non-invariance: the Euclidean λ_max grows under Dinh's T_α (METHODS.md §6).
    lam_max = hessian_max_eigenvalue(net, (X, y), tol=1e-8)
    assert hessian_max_eigenvalue(D, (X, y), tol=1e-8) >= 100 * lam_max


# --------------------------------------------------------------------------------------------
# Refusals, with the op and its place in the graph named


class ActNet(nn.Module):
    """fc1 · ``act`` · fc2 · relu · fc3, ``act`` a module or a function applied in forward."""

    def __init__(self, act) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.fn = act

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h) if hasattr(self, "act") else self.fn(h)
        return self.fc3(F.relu(self.fc2(h)))


class NestedAct(nn.Module):
    """The activation inside a block of a ModuleList: named with the block's path."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_FnBlock(3, 4, fn), _FnBlock(4, 4, F.relu)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _FnBlock(nn.Module):
    def __init__(self, fin, fout, fn) -> None:
        super().__init__()
        self.fc, self.fn = nn.Linear(fin, fout), fn

    def forward(self, x):
        return self.fn(self.fc(x))


REFUSED = [
    pytest.param(lambda: ActNet(nn.Tanh()), r"module 'act' \(Tanh\), graph node 'act'", id="Tanh"),
    pytest.param(lambda: ActNet(nn.GELU()), r"module 'act' \(GELU\)", id="GELU"),
    pytest.param(lambda: ActNet(nn.ELU()), r"module 'act' \(ELU\)", id="ELU"),
    pytest.param(lambda: ActNet(torch.tanh), r"torch\.tanh \(graph node 'tanh'", id="torch.tanh"),
    pytest.param(lambda: ActNet(F.gelu), r"torch\.nn\.functional\.gelu", id="F.gelu"),
    pytest.param(lambda: ActNet(F.elu), r"torch\.nn\.functional\.elu", id="F.elu"),
    pytest.param(lambda: ActNet(lambda h: h.tanh()), r"Tensor\.tanh", id="Tensor.tanh"),
    pytest.param(lambda: ActNet(nn.Softmax(dim=1)), r"module 'act' \(Softmax\)", id="Softmax"),
    pytest.param(
        lambda: ActNet(lambda h: F.layer_norm(h, (4,))),
        r"functional\.layer_norm",
        id="F.layer_norm",
    ),
    pytest.param(
        lambda: ActNet(lambda h: h * 2.0),
        r"operator\.mul \(graph node 'mul', in ActNet\.forward\)",
        id="mul",
    ),
    pytest.param(
        lambda: NestedAct(F.gelu),
        r"gelu \(graph node 'gelu', in 'blocks\.0' \(_FnBlock\)\)",
        id="nested-F.gelu",
    ),
    pytest.param(
        lambda: ActNet(lambda h: F.softmax(h, dim=1)), r"functional\.softmax", id="F.softmax"
    ),
]


@pytest.mark.parametrize("factory,match", REFUSED)
def test_non_homogeneous_ops_are_refused_by_name(factory, match):
    torch.manual_seed(0)
    net = factory().double()
    rescalings = list(_rescalings(net))
    assert len(rescalings) == 5
    for rid, rescale in rescalings:
        with pytest.raises(ValueError, match=rf"{match}.*between rescaled weight layers"):
            rescale()
            pytest.fail(f"{rid} accepted the model")


class Residual(nn.Module):
    """h = relu(fc1 x); h = h + relu(fc2 h); fc3 h: the skip branches off after fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = h + F.relu(self.fc2(h))
        return self.fc3(h)


class ResidualBlockNet(nn.Module):
    """fc0 · relu · [x + fc_b(relu(fc_a x))] · relu · head: the add merges the block's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(3, 4)
        self.block = _ResBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.block(F.relu(self.fc0(x)))))


class _ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_a, self.fc_b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc_b(F.relu(self.fc_a(x)))


def test_residual_additions_are_refused_with_the_add_named():
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64)
    net = Residual().double()
    # The hazard is real: scaling fc2's unit (and dividing the add's consumer) by hand breaks it.
    manual = copy.deepcopy(net)
    with torch.no_grad():
        manual.fc2.weight.mul_(3.0), manual.fc2.bias.mul_(3.0), manual.fc3.weight.div_(3.0)
    assert out_rel_diff(net, manual, x) > 1e-3
    for _, rescale in _rescalings(net):
        with pytest.raises(ValueError, match=r"used by 2 nodes.*operator\.add \(graph node 'add'"):
            rescale()
    block = ResidualBlockNet().double()
    for _, rescale in _rescalings(block):
        with pytest.raises(ValueError, match=r"used by 2 nodes|operator\.add"):
            rescale()
    # The add after fc_b is named as a merge, with its block's path.
    with pytest.raises(
        ValueError,
        match=r"operator\.add \(graph node 'add', in '0' \(_ResBlock\)\).*with the input 'input'",
    ):
        layerwise_rescale(nn.Sequential(_ResBlock(), nn.ReLU(), nn.Linear(4, 2)), [2.0, 1.0, 0.5])


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:  # data-dependent control flow
            h = F.relu(h)
        return self.fc2(h)


def test_untraceable_model_gets_a_clear_error():
    net = Untraceable().double()
    for _, rescale in _rescalings(net):
        with pytest.raises(
            ValueError, match=r"cannot trace Untraceable with torch\.fx.*control flow"
        ):
            rescale()


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.mid(F.relu(self.fc1(x))))
        return self.fc3(F.relu(self.mid(h)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(self.fc2(F.relu(self.fc1(x))), self.fc1.weight)


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.relu(h)) + self.fc3(F.relu(h))


class Reordered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out, self.inp = nn.Linear(4, 2), nn.Linear(3, 4)

    def forward(self, x):
        return self.out(F.relu(self.inp(x)))


class ReturnsFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h), h


@pytest.mark.parametrize(
    "cls,match",
    [
        (Shared, r"weight layer 'mid' \(Linear\) is called 2 times"),
        (Tied, r"reads 'fc1\.weight' of weight layer 'fc1'"),
        (Branching, r"used by 2 nodes"),
        (Reordered, r"register them in the order forward calls them"),
        (ReturnsFeatures, r"used by 2 nodes.*the return value of ReturnsFeatures\.forward"),
    ],
    ids=["shared-weights", "tied-weights", "branching", "registration-order", "returns-features"],
)
def test_structures_that_break_the_chain_are_refused(cls, match):
    with pytest.raises(ValueError, match=match):
        layerwise_rescale(cls().double(), [2.0, 0.5])


def test_neuronwise_refused_where_units_cannot_be_followed():
    """A view(-1, K) (no provable batch dim) or a pool across a Linear's features: layer-wise and
    Dinh α still preserve the function, neuron-wise is refused at that gap only."""

    class ViewNet(ConvNet):
        def features(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            return F.relu(self.conv2(x)).view(-1, 64)

    class PoolFeatures(FunctionalMLP):
        def forward(self, x):
            h = F.relu(self.fc1(torch.flatten(x, 1)))
            h = F.max_pool1d(h.unsqueeze(1), 1).squeeze(1)
            return self.fc3(F.relu(self.fc2(h)))

    net = _make(ViewNet, 0)
    X, _ = _data((1, 8, 8), 3, 0)
    assert out_rel_diff(net, layerwise_rescale(net, [2.0, 3.0, 0.25, 2 / 3]), X) <= REL_TOL
    assert out_rel_diff(net, dinh_alpha_rescale(net, 100.0, layer=1), X) <= REL_TOL
    assert out_rel_diff(net, neuronwise_rescale(net, 0, [1.0, 2.0, 3.0]), X) <= REL_TOL
    with pytest.raises(ValueError, match=r"neuron-wise rescaling of weight layer 1.*Tensor\.view"):
        neuronwise_rescale(net, 1, [1.0, 2.0, 3.0, 4.0])
    # unsqueeze is not on the allowlist: refused for every rescaling, by name.
    with pytest.raises(ValueError, match=r"Tensor\.unsqueeze"):
        layerwise_rescale(_make(PoolFeatures, 0), [2.0, 0.5, 1.0])


def test_functional_prelu_with_a_constant_slope_leaves_the_model_clean():
    """F.prelu with a tensor made in forward: allowed, and the tracer's stowed constant does not
    stay on the caller's model."""

    class PReLUNet(FunctionalMLP):
        def forward(self, x):
            h = F.prelu(self.fc1(torch.flatten(x, 1)), torch.full((1,), -0.3, dtype=x.dtype))
            return self.fc3(F.leaky_relu(self.fc2(h), 0.2))

    net = _make(PReLUNet, 0)
    X, _ = _data((3, 4), 4, 0)
    attrs = set(vars(net))
    for rid, rescale in _rescalings(net):
        assert out_rel_diff(net, rescale(), X) <= REL_TOL, rid
    assert set(vars(net)) == attrs


def test_bn_in_a_custom_model_is_refused_and_folding_is_the_path():
    class BNNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(F.relu(self.bn(self.fc1(x))))

    net = _make(BNNet, 0)
    with pytest.raises(ValueError, match="normalisation layers"):
        layerwise_rescale(net, [2.0, 0.5])
    folded = fold_batchnorm(net)  # BN → Identity, which the traced chain passes through
    X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert out_rel_diff(net, folded, X) <= REL_TOL
    assert out_rel_diff(folded, layerwise_rescale(folded, [2.0, 0.5]), X) <= REL_TOL
