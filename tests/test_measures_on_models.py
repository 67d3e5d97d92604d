"""Every measure in ``flatness.measures.MEASURES`` runs on the project's architectures: an MLP,
LeNet5 and torchvision's ResNet-18 (BatchNorm, skip connections, ``fc`` its last nn.Linear),
built by ``flatness.models.build_model``. A smoke test of the contract (finite Python float, model
untouched, mode restored), with cheap options; correctness lives in each measure's own tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flatness.lastlayer import last_linear
from flatness.measures import MEASURES
from flatness.models import build_model
from flatness.reparam import fold_batchnorm

#: Options that keep each call cheap on one CPU core; the defaults are what the workflow uses.
CHEAP = {
    "hessian_max_eigenvalue": {"tol": 1e-1},
    "hessian_trace": {"num_probes": 3},
    "quotient_sharpness": {"tol": 1e-1},
    "adaptive_sharpness": {"tol": 1e-1},
    "relative_flatness": {"num_probes": 2},
    "feature_robustness": {"num_samples": 4},
    "keskar_sharpness": {"maxiter": 2},
    "pacbayes_sigma": {"depth": 3, "num_samples": 2},
    "pacbayes_magnitude_sigma": {"depth": 3, "num_samples": 2},
}
#: Architectures a measure refuses by design, with ``ValueError`` naming why.
REFUSED = {("resnet18", "path_norm"): "BatchNorm"}
#: ResNet-18 (11M parameters): scipy's L-BFGS-B loops over the n bounds in Python (≈ 1 min per
#: call here), so Keskar runs in a 2-D random subspace; everything else as above.
RESNET_EXTRA = {"keskar_sharpness": {"subspace_dim": 2}}

#: (config, number of samples). ResNet-18 gets 2 images of 3×16×16 (its CIFAR stem and adaptive
#: pooling accept them): each Hessian-vector product is ≈ 0.3 s on one core, and the Lanczos
#: measures need ≈ 30 of them.
MODELS = {
    "mlp": ({"name": "mlp", "widths": [16], "in_shape": [1, 28, 28], "num_classes": 10}, 8),
    "lenet5": ({"name": "lenet5", "in_shape": [1, 28, 28], "num_classes": 10}, 8),
    "resnet18": ({"name": "resnet18", "in_shape": [3, 16, 16], "num_classes": 10}, 2),
}


@pytest.fixture(scope="module")
def built():
    """name → (model, (X, y)), built once for the module; the global RNG is left as found."""
    out = {}
    for name, (cfg, n) in MODELS.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)  # build_model draws torch's default init from the global RNG
            model = build_model(cfg)
        g = torch.Generator().manual_seed(1)
        X = torch.randn(n, *cfg["in_shape"], generator=g)
        y = torch.randint(0, cfg["num_classes"], (n,), generator=g)
        out[name] = (model, (X, y))
    return out


@pytest.mark.parametrize("measure", sorted(MEASURES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_measure_runs(model_name, measure, built):
    model, data = built[model_name]
    model.train()  # measures must switch to eval() themselves and give the mode back
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    opts = {
        **CHEAP.get(measure, {}),
        **(RESNET_EXTRA.get(measure, {}) if model_name == "resnet18" else {}),
    }
    if measure == "distance_from_init":  # θ₀: the same architecture from another draw
        with torch.random.fork_rng():
            torch.manual_seed(1)
            opts["init_model"] = build_model(MODELS[model_name][0])
    if (model_name, measure) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[model_name, measure]):
            MEASURES[measure](model, data, **opts)
        return
    value = MEASURES[measure](model, data, **opts)
    assert isinstance(value, float) and math.isfinite(value), value
    assert model.training
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # BN running statistics too: a forward pass in train mode would have updated them.
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_resnet18_last_linear_is_fc(built):
    """The relative-flatness family uses ResNet-18's ``fc``, 512 features → 10 classes."""
    model, _ = built["resnet18"]
    assert last_linear(model) is model.fc and model.fc.weight.shape == (10, 512)


def test_fold_batchnorm_on_resnet18(built):
    """Folding every BN of ResNet-18 (with non-trivial running statistics) keeps its eval()
    function, float64, ≤ 1e-10 (the ≤ 1e-10 of tests/test_reparam.py on a deep net)."""
    model, (X, _) = built["resnet18"]
    net = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        x = X.double()
        assert float((net(x) - folded(x)).abs().max()) <= 1e-10
