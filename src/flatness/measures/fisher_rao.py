"""Fisher–Rao norm (Liang, Poggio, Rakhlin and Stokes, AISTATS 2019; METHODS.md §5)."""

from __future__ import annotations

import torch
from torch import nn

from flatness.batches import Batches, LossFn, check_finite, eval_mode


def fisher_rao_norm(model: nn.Module, data, *, loss_fn: LossFn | None = None) -> float:
    """Empirical Fisher–Rao norm: the mean over samples of the squared directional derivative of
    the per-sample loss along θ itself.

    .. math::
        ‖θ‖_{fr}^2 = \\frac1N \\sum_{i=1}^{N} ⟨θ, ∇_θ ℓ(f_θ(x_i), y_i)⟩^2

    with the **true** labels y_i and θ = **all** parameters, biases included (DESIGN.md). Since
    ⟨θ, ∇_θ ℓ_i⟩ = d/dt ℓ_i((1 + t)θ) at t = 0, one forward-mode JVP per batch with tangent θ
    gives every per-sample value; no per-sample gradients are formed. The per-sample loss is
    ``loss_fn`` applied to that sample alone (default: cross-entropy). Invariant to any positive
    diagonal rescaling θ → Λθ that preserves the function: ⟨Λθ, Λ⁻¹∇ℓ⟩ = ⟨θ, ∇ℓ⟩.
    For a bias-free ReLU net with K weight layers ⟨θ, ∇_θ f⟩ = K f (Euler), so with CE it
    equals K²·mean_i(⟨p_i, f_i⟩ − f_{i,y_i})² (Liang et al.'s analytic form).

    >>> import torch
    >>> net = torch.nn.Linear(1, 2, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0], [0.0]]))
    >>> X = torch.ones(1, 1, dtype=torch.float64); y = torch.tensor([1])
    >>> p0 = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)[0]
    >>> abs(fisher_rao_norm(net, (X, y)) - float(p0) ** 2) < 1e-15  # K = 1: (⟨p, f⟩ − f_y)²
    True
    """
    with eval_mode(model), torch.no_grad():
        batches = Batches.for_model(data, model)
        params = {k: p.detach() for k, p in model.named_parameters()}
        buffers = {k: b.detach() for k, b in model.named_buffers()}

        total = None
        for X, y in batches:
            if loss_fn is None:
                directional = _ce_directional(model, params, buffers, X, y)
            else:

                def per_sample_losses(theta, X=X, y=y):
                    out = torch.func.functional_call(model, (theta, buffers), (X,))
                    # Each sample's loss alone, so a mean- or sum-reduced loss_fn gives ℓ_i.
                    return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(
                        out, y
                    )

                losses, directional = torch.func.jvp(per_sample_losses, (params,), (params,))
                check_finite(losses.sum(), "loss")
            term = (directional * directional).sum()
            total = term if total is None else total + term
        value = total / batches.num_samples
    check_finite(value, "Fisher–Rao norm")
    return float(value)


def _ce_directional(model, params, buffers, X, y):
    """⟨θ, ∇_θ ℓ_i⟩ for cross-entropy, from the logits' JVP ż_i along θ, as Σ_{c≠y} p_ic(ż_ic − ż_iy).

    Autograd of CE forms p_y ż_y − ż_y, which near a minimum cancels to ≈ L·ż_y and leaves
    float32 with a relative error ≈ eps32/L (2e-3 on the test fixture); the pairwise form sums
    small positive weights p_ic (c ≠ y) and keeps full relative accuracy.
    """
    logits, dlogits = torch.func.jvp(
        lambda theta: torch.func.functional_call(model, (theta, buffers), (X,)),
        (params,),
        (params,),
    )
    check_finite(logits, "model output (logits)")
    p = torch.softmax(logits, dim=-1)
    return (p * (dlogits - dlogits.gather(1, y[:, None]))).sum(dim=1)
