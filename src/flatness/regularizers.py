"""Training step functions: plain, weight decay, SAM, ASAM, FAM and a one-sided Lipschitz penalty.

Each ``step(model, X, y, optimizer, cfg, loss_fn=None) -> loss`` does one full update (forward,
backward, ``optimizer.step()``) and returns the detached data loss at the weights before the step;
``STEPS`` maps ``RegularizerConfig.name`` to its step (STYLE.md point 7: a dict, no class tree).
The default loss is the mean cross-entropy of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flatness.batches import LossFn, default_loss
from flatness.config import RegularizerConfig
from flatness.lastlayer import (
    check_head_output,
    features_and_logits,
    head_hessian,
    kappa_tr_ce_per_sample,
    last_linear,
)

_BN = nn.modules.batchnorm._BatchNorm


def extra_weight_decay(cfg: RegularizerConfig) -> float:
    """The coupled L2 coefficient the ``weight_decay`` regulariser adds to the optimizer's."""
    return cfg.weight_decay if cfg.name == "weight_decay" else 0.0


def plain_step(model, X, y, optimizer, cfg=None, loss_fn: LossFn | None = None) -> Tensor:
    """One SGD/Adam step on the batch loss (also the ``weight_decay`` step: the decay is coupled
    into the optimizer)."""
    return _descend(optimizer, (loss_fn or default_loss)(model(X), y))


def _descend(optimizer, loss: Tensor, penalty: Tensor | None = None, lam: float = 0.0) -> Tensor:
    """Zero the gradients, backpropagate ``loss`` (+ ``lam``·``penalty``), step; the one update
    every single-pass step shares. Returns the detached data loss."""
    optimizer.zero_grad(set_to_none=True)
    (loss if penalty is None else loss + lam * penalty).backward()
    optimizer.step()
    return loss.detach()


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm still normalises with the batch statistics but does not update its running
    statistics (nor ``num_batches_tracked``): SAM's second pass at w + ε must not count twice."""
    bns = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BN)]
    for m, _ in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in bns:
            m.track_running_stats = flag


def _two_pass_step(model, X, y, optimizer, loss_fn, perturbation) -> Tensor:
    """Shared SAM/ASAM step: gradient at w, move to w + ε(g), gradient there, step from w."""
    loss_fn = loss_fn or default_loss
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(X), y)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        eps = perturbation(params, [p.grad for p in params])
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    with frozen_bn_stats(model):
        loss_fn(model(X), y).backward()
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.sub_(e)
    optimizer.step()
    return loss.detach()


def _guard(norm: Tensor) -> Tensor:
    # A zero gradient gives ε = 0 (not NaN); any positive norm is used exactly.
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


def sam_perturbation(params, grads, rho: float) -> list[Tensor]:
    """SAM (Foret et al. 2021): ε = ρ g / ‖g‖₂, the norm over all parameters together.

    >>> [e.tolist() for e in sam_perturbation(None, [torch.tensor([3.0, 4.0])], rho=1.0)]
    [[0.6000000238418579, 0.800000011920929]]
    """
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * (rho / _guard(norm)) for g in grads]


def _is_weight(name: str, p: Tensor) -> bool:
    # "weight tensors only, not biases": Linear/Conv kernels and BN scales, by name.
    return name.endswith("weight")


def asam_perturbation(params, grads, names, rho: float, eta: float) -> list[Tensor]:
    """ASAM (Kwon et al. 2021): ε = ρ T_w² g / ‖T_w g‖₂ with T_w = |w| + η on weight tensors and
    T_w = 1 on biases.

    >>> w, g = torch.tensor([3.0, -4.0]), torch.tensor([1.0, 1.0])
    >>> [e.tolist() for e in asam_perturbation([w], [g], ["weight"], rho=5.0, eta=0.0)]
    [[9.0, 16.0]]
    """
    t = [
        p.abs() + eta if _is_weight(n, p) else torch.ones_like(p)
        for p, n in zip(params, names, strict=True)
    ]
    tg = [ti * g for ti, g in zip(t, grads, strict=True)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in tg]))
    return [ti * v * (rho / _guard(norm)) for ti, v in zip(t, tg, strict=True)]


def sam_step(model, X, y, optimizer, cfg: RegularizerConfig, loss_fn=None) -> Tensor:
    """SAM step, BN running statistics updated on the first pass only (standard SAM)."""
    return _two_pass_step(
        model, X, y, optimizer, loss_fn, lambda ps, gs: sam_perturbation(ps, gs, cfg.rho)
    )


def asam_step(model, X, y, optimizer, cfg: RegularizerConfig, loss_fn=None) -> Tensor:
    """ASAM step (adaptive SAM), otherwise as :func:`sam_step`."""
    names = {id(p): n for n, p in model.named_parameters()}

    def perturb(ps, gs):
        return asam_perturbation(ps, gs, [names[id(p)] for p in ps], cfg.rho, cfg.eta)

    return _two_pass_step(model, X, y, optimizer, loss_fn, perturb)


def _fam_terms(model, X, y, variant: str, loss_fn: LossFn | None) -> tuple[Tensor, Tensor]:
    """(batch loss, FAM R) from one forward pass; see :func:`fam_penalty`."""
    if variant not in ("as_released", "full"):
        raise ValueError(f"FAM variant {variant!r}; choose 'as_released' or 'full'")
    layer = last_linear(model)
    W = layer.weight  # (d, m)
    m = W.shape[1]
    phi, logits = features_and_logits(model, X, layer)
    # Every path (the CE closed form included) reads the model output as W φ + b of the last
    # nn.Linear: the shared check compares the two on this forward pass (one small no-grad matmul
    # of the head, no extra forward), so a model that transforms its logits raises, never misleads.
    check_head_output(phi, W, layer.bias, logits)
    if loss_fn is None:
        loss = default_loss(logits, y)
        if variant == "full":
            return loss, kappa_tr_ce_per_sample(phi, W, logits).mean() / m
        # As released: the curvature Tr H_{ss'} is a constant. Detaching φ and p but not W keeps
        # that exactly: with the p_i fixed, the closed form ½Σ_{cc'} p_c p_c'‖w_c − w_c'‖² equals
        # Σ_{ss'} C_{ss'}⟨w_s, w_s'⟩ (the rows of C sum to 0) for every W, so ∇_W R = (C + Cᵀ)W,
        # nothing reaches the features, and the pairwise form avoids float32 cancellation.
        return loss, kappa_tr_ce_per_sample(phi.detach(), W, logits.detach()).mean() / m
    # Any other loss: the exact Hessian of the batch loss w.r.t. W, layout (d, m, d, m) (§4.2),
    # by the same function as relative flatness.
    loss = loss_fn(logits, y)
    H = head_hessian(lambda out: loss_fn(out, y), phi, W, layer.bias, logits.shape)
    block_tr = torch.einsum("stut->su", H)  # Tr H_{s,s'}  (d, d)
    if variant == "as_released":
        block_tr = block_tr.detach()
    return loss, (W @ W.T * block_tr).sum() / m


def fam_penalty(model, X, y, variant: str = "as_released", loss_fn: LossFn | None = None) -> Tensor:
    """FAM's neuron-wise regulariser on the batch (Adilova et al. 2023; METHODS §4):

    .. math::
        R_B(W) = \\frac{1}{m}\\sum_{s,s'} ⟨w_s, w_{s'}⟩ \\operatorname{Tr} H^B_{s,s'}

    with W (d×m) the last ``nn.Linear`` weight and H^B the Hessian of the mean batch loss w.r.t.
    W (intended (d, m, d, m) layout). Its value is κ^φ_Tr/m of the batch. ``as_released``: the
    curvature is a constant, so ∇_W R = (C + Cᵀ)W with C = Tr H_{s,s'}/m and no gradient reaches
    the features; ``full``: the gradient flows through the curvature (p_i and φ_i). Cross-entropy
    (``loss_fn=None``) uses the closed form ``kappa_tr_ce_per_sample``; any other loss the exact
    layer Hessian (``torch.func.hessian``, small heads only). Both need the model output to be
    the last ``nn.Linear``'s output ``W φ + b``; a model that transforms it afterwards (a scale, a
    softmax, a second use of the layer) raises a ValueError
    (:func:`flatness.lastlayer.check_head_output`).
    """
    return _fam_terms(model, X, y, variant, loss_fn)[1]


def fam_step(model, X, y, optimizer, cfg: RegularizerConfig, loss_fn=None) -> Tensor:
    """One step on ℓ_B + λ R_B (λ = ``cfg.lam``; the penalty is always formed, also at λ = 0)."""
    return _descend(optimizer, *_fam_terms(model, X, y, cfg.variant, loss_fn), cfg.lam)


def _lipschitz_terms(model, X, y, k: float, loss_fn) -> tuple[Tensor, Tensor]:
    # The penalty is itself a gradient: it needs autograd even when called under no_grad.
    with torch.enable_grad():
        X = X.detach().requires_grad_(True)
        logits = model(X)
        f_y = logits.gather(1, y[:, None]).sum()  # samples are independent (no BN in train mode)
        (gx,) = torch.autograd.grad(f_y, X, create_graph=True)
    norms = torch.linalg.vector_norm(gx.reshape(gx.shape[0], -1), dim=1)
    return (loss_fn or default_loss)(logits, y), torch.relu(norms - k).square().mean()


def lipschitz_penalty(model, X, y, k: float = 1.0) -> Tensor:
    """One-sided input-gradient penalty of the true-class logit:

    .. math::  P = \\operatorname{mean}_i \\max(0, ‖∇_x f_{y_i}(x_i)‖_2 − K)^2

    differentiable in the parameters (``create_graph``). With BatchNorm in train mode samples
    interact and the per-sample gradient is only approximate; use it on BN-free nets.
    """
    return _lipschitz_terms(model, X, y, k, None)[1]


def lipschitz_step(model, X, y, optimizer, cfg: RegularizerConfig, loss_fn=None) -> Tensor:
    """One step on ℓ_B + λ P_B (λ = ``cfg.lam``, K = ``cfg.lipschitz_k``)."""
    return _descend(optimizer, *_lipschitz_terms(model, X, y, cfg.lipschitz_k, loss_fn), cfg.lam)


STEPS: dict[str, Callable[..., Tensor]] = {
    "none": plain_step,
    "weight_decay": plain_step,
    "sam": sam_step,
    "asam": asam_step,
    "fam": fam_step,
    "lipschitz": lipschitz_step,
}
