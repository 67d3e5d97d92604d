"""Step functions against hand-written references, FAM against the exact layer Hessian (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatness.config import RegularizerConfig
from flatness.lastlayer import features_and_logits, kappa_tr_ce_per_sample, last_linear
from flatness.regularizers import STEPS, fam_penalty, lipschitz_penalty
from flatness.reparam import layerwise_rescale
from tests.conftest import fixture_data, make_mlp

LR, WD = 0.1, 1e-3


def _mse(logits, y):
    return nn.functional.mse_loss(logits, nn.functional.one_hot(y, logits.shape[1]).to(logits))


def _grads(model, X, y, params):
    loss = nn.functional.cross_entropy(model(X), y)
    return torch.autograd.grad(loss, params)


def _reference_two_pass(model, X, y, perturb):
    """w ← w − lr (∇L(w + ε) + wd·w): the first SGD step with momentum (buffer = gradient)."""
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    eps = perturb([p.detach() for p in params], _grads(model, X, y, params))
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    g2 = _grads(model, X, y, params)
    return [wi - LR * (gi + WD * wi) for wi, gi in zip(w, g2, strict=True)]


def _run_step(name, model, X, y, **cfg):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    STEPS[name](model, X, y, opt, RegularizerConfig(name=name, **cfg))
    return [p.detach().clone() for p in model.parameters()]


def test_sam_step_equals_hand_written_two_pass():
    X, y = fixture_data(n=32)
    rho = 0.3

    def perturb(ws, gs):
        norm = torch.sqrt(sum((g * g).sum() for g in gs))
        return [rho * g / norm for g in gs]

    ref = _reference_two_pass(make_mlp(), X, y, perturb)
    got = _run_step("sam", make_mlp(), X, y, rho=rho)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_asam_step_equals_hand_written_two_pass():
    X, y = fixture_data(n=32)
    rho, eta = 0.5, 0.01
    model = make_mlp()
    is_weight = [n.endswith("weight") for n, _ in model.named_parameters()]

    def perturb(ws, gs):
        t = [
            w.abs() + eta if iw else torch.ones_like(w) for w, iw in zip(ws, is_weight, strict=True)
        ]
        norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, gs, strict=True)))
        return [rho * ti * ti * g / norm for ti, g in zip(t, gs, strict=True)]

    ref = _reference_two_pass(model, X, y, perturb)
    got = _run_step("asam", make_mlp(), X, y, rho=rho, eta=eta)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_second_pass_leaves_bn_running_stats_alone(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    X, y = fixture_data(n=32)
    ref = copy.deepcopy(net)
    ref(X)  # one training-mode forward at w: the only update the step may make
    _run_step(name, net, X, y)
    bn, bn_ref = net[1], ref[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats


# ---------------------------------------------------------------- FAM


def _layer_hessian(model, X, y, loss_fn):
    """Exact (d, m, d, m) Hessian of the mean batch loss w.r.t. the last weight (float64)."""
    layer = last_linear(model)
    phi, _ = features_and_logits(model, X, layer)
    phi = phi.detach()
    return torch.func.hessian(
        lambda W: loss_fn(nn.functional.linear(phi, W, layer.bias.detach()), y)
    )(layer.weight.detach())


LOSSES = {"ce": None, "mse": _mse}


@pytest.mark.parametrize("loss", LOSSES)
def test_fam_penalty_is_kappa_over_m(trained_mlp64, fixture_data64, loss):
    X, y = fixture_data64
    model, loss_fn = trained_mlp64, LOSSES[loss]
    W = last_linear(model).weight.detach()
    d, m = W.shape
    H = _layer_hessian(model, X, y, loss_fn or nn.functional.cross_entropy)
    assert H.shape == (d, m, d, m)
    kappa = float((W @ W.T * torch.einsum("stut->su", H)).sum())
    for variant in ("as_released", "full"):
        R = fam_penalty(model, X, y, variant, loss_fn).item()
        assert R == pytest.approx(kappa / m, rel=1e-10, abs=1e-300)
    if loss_fn is None:
        phi, logits = features_and_logits(model, X)
        closed = float(kappa_tr_ce_per_sample(phi, W, logits).mean()) / m
        assert float(fam_penalty(model, X, y)) == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_fam_as_released_gradient_is_2CW(loss):
    model, loss_fn = make_mlp(seed=2), LOSSES[loss]
    X, y = fixture_data(n=48)
    W = last_linear(model).weight
    m = W.shape[1]
    C = torch.einsum(
        "stut->su", _layer_hessian(model, X, y, loss_fn or nn.functional.cross_entropy)
    )
    C = C / m
    params = list(model.parameters())
    R = fam_penalty(model, X, y, "as_released", loss_fn)
    grads = torch.autograd.grad(R, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if p is W:
            assert (g - (C + C.T) @ W.detach()).abs().max() <= 1e-14
        else:  # the curvature is a constant: nothing reaches the features
            assert g is None or not g.any()


def _flat_grad(model, fn):
    params = list(model.parameters())
    grads = torch.autograd.grad(fn(), params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]
    )


def _fd_grad(model, fn, h=1e-6):
    out = []
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                plus = float(fn())
                flat[i] = old - h
                minus = float(fn())
                flat[i] = old
                out.append((plus - minus) / (2 * h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss", LOSSES)
def test_fam_full_gradient_matches_finite_differences(loss):
    model, loss_fn = make_mlp(widths=(6, 5, 4, 3), seed=4), LOSSES[loss]
    X, y = fixture_data(n=24, d_in=6, classes=3)

    def R(variant="full"):
        return fam_penalty(model, X, y, variant, loss_fn)

    auto = _flat_grad(model, R)
    fd = _fd_grad(model, R)
    assert float((auto - fd).norm() / fd.norm()) <= 1e-6
    detached = _flat_grad(model, lambda: R("as_released"))
    assert float((auto - detached).norm() / auto.norm()) > 0.1


def test_fam_with_zero_lambda_is_the_plain_step_bit_for_bit():
    def trained(name, **cfg):
        torch.manual_seed(0)  # dropout masks come from the global RNG in both runs
        model = nn.Sequential(
            nn.Linear(12, 16),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(16, 6),
            nn.ReLU(),
            nn.Linear(6, 4),
        ).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        X, y = fixture_data(n=32)
        for _ in range(3):
            STEPS[name](model, X, y, opt, RegularizerConfig(name=name, **cfg))
        return [p.detach() for p in model.parameters()]

    plain = trained("none")
    for variant in ("as_released", "full"):
        fam = trained("fam", lam=0.0, variant=variant)
        assert all(torch.equal(a, b) for a, b in zip(plain, fam, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain, trained("fam", lam=1.0), strict=True))


@pytest.mark.parametrize("loss", LOSSES)
def test_fam_penalty_is_layerwise_invariant(trained_mlp64, fixture_data64, loss):
    X, y = fixture_data64
    for factors in [(1.0, 0.2, 5.0), (7.0, 0.2, 1 / 1.4)]:
        scaled = layerwise_rescale(trained_mlp64, factors)
        a = float(fam_penalty(trained_mlp64, X, y, loss_fn=LOSSES[loss]))
        b = float(fam_penalty(scaled, X, y, loss_fn=LOSSES[loss]))
        assert abs(a - b) <= 1e-10 * abs(a)


# ---------------------------------------------------------------- Lipschitz


def test_lipschitz_penalty_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = fixture_data(n=16, d_in=6, classes=3)
    norms = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda x: model(x), X[i])[y[i]].norm()
            for i in range(16)
        ]
    )
    k = float(norms.median())  # about half the samples active: the max(0, ·) branch is exercised

    def P():
        return lipschitz_penalty(model, X, y, k=k)

    assert float(P()) > 0
    manual = torch.relu(norms - k).square().mean()
    assert float(P()) == pytest.approx(float(manual), rel=1e-12)
    auto, fd = _flat_grad(model, P), _fd_grad(model, P)
    assert float((auto - fd).norm() / fd.norm()) <= 1e-6


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_step_lowers_the_loss_on_a_tiny_problem(name):
    model = make_mlp(seed=5)
    X, y = fixture_data(n=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = RegularizerConfig(name=name, lam=0.01, lipschitz_k=0.5)
    first = float(STEPS[name](model, X, y, opt, cfg))
    for _ in range(30):
        last = float(STEPS[name](model, X, y, opt, cfg))
    assert last < first


def test_fam_custom_loss_uses_the_shared_head_hessian(monkeypatch):
    """One exact last-layer Hessian (flatness.lastlayer.head_hessian) serves FAM and relative
    flatness; FAM's custom-loss path goes through it."""
    from flatness import batches, lastlayer, regularizers

    assert regularizers.LossFn is batches.LossFn
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return lastlayer.head_hessian(*args, **kwargs)

    monkeypatch.setattr(regularizers, "head_hessian", spy)
    X, y = fixture_data(n=16)
    model = make_mlp()
    mse = lambda z, t: nn.functional.mse_loss(z, nn.functional.one_hot(t, 4).to(z.dtype))  # noqa: E731
    R = fam_penalty(model, X, y, loss_fn=mse)
    assert calls == [1] and float(R) > 0


class _Scale(nn.Module):
    """Multiplies the logits after the last nn.Linear: the model output is no longer W φ + b."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, z):
        return self.factor * z


@pytest.mark.parametrize("variant", ["as_released", "full"])
def test_fam_ce_rejects_a_model_that_transforms_its_logits(trained_mlp64, fixture_data64, variant):
    """The CE closed form reads the logits as W φ + b of the last nn.Linear; a model that rescales
    them after that layer would get a penalty ≈ 9× off (×3 logits) without a word. The CE path runs
    the same shared output check (flatness.lastlayer.check_head_output) as the other paths."""
    X, y = fixture_data64
    scaled = nn.Sequential(*copy.deepcopy(trained_mlp64), _Scale(3.0))
    with pytest.raises(ValueError, match="not the output of its last nn.Linear"):
        fam_penalty(scaled, X, y, variant)
    opt = torch.optim.SGD(scaled.parameters(), lr=LR)
    with pytest.raises(ValueError, match="not the output of its last nn.Linear"):
        STEPS["fam"](scaled, X, y, opt, RegularizerConfig(name="fam", lam=0.1, variant=variant))
    # The unmodified model still passes the check and gives κ_Tr/m (the exact layer Hessian).
    W = last_linear(trained_mlp64).weight.detach()
    H = _layer_hessian(trained_mlp64, X, y, nn.functional.cross_entropy)
    kappa = float((W @ W.T * torch.einsum("stut->su", H)).sum())
    R = float(fam_penalty(trained_mlp64, X, y, variant))
    assert R == pytest.approx(kappa / W.shape[1], rel=1e-10)


def test_fam_ce_uses_the_shared_output_check(monkeypatch):
    """One output check (flatness.lastlayer.check_head_output) for every FAM path, run on the
    logits of the forward pass the step already does (no extra forward)."""
    from flatness import lastlayer, regularizers

    calls, forwards = [], []

    def spy(*args, **kwargs):
        calls.append(1)
        return lastlayer.check_head_output(*args, **kwargs)

    monkeypatch.setattr(regularizers, "check_head_output", spy)
    X, y = fixture_data(n=16)
    model = make_mlp()
    model.register_forward_hook(lambda mod, inp, out: forwards.append(1))
    for variant in ("as_released", "full"):
        fam_penalty(model, X, y, variant)
    assert calls == [1, 1] and forwards == [1, 1]
