"""The last linear layer W of a classifier, its input features φ, and the CE closed form of κ^φ_Tr.

Relative flatness (``flatness.measures``) and the FAM regulariser (``flatness.regularizers``) both
need the features feeding the last ``nn.Linear``, the check that the model's output is that layer's
output, the exact layer Hessian for any loss, and the softmax cross-entropy closed form of
METHODS.md §3.2; this module is the one place they live.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in ``model.modules()`` order (the DESIGN.md convention)."""
    found = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            found = m
    if found is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; relative flatness and FAM need a "
            "final linear classifier W (features φ → logits W φ + b)"
        )
    return found


def features_and_logits(model: nn.Module, X: Tensor, layer: nn.Linear | None = None):
    """Run ``model(X)`` once and return ``(φ, logits)``, φ the input of ``layer`` (default: the last
    ``nn.Linear``), flattened to ``(N, m)``. The graph is kept, so both can be differentiated."""
    layer = layer if layer is not None else last_linear(model)
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    try:
        logits = model(X)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"the last nn.Linear was called {len(captured)} times in one forward pass; "
            "relative flatness needs it applied exactly once"
        )
    phi = captured[0]
    return phi.reshape(-1, phi.shape[-1]), logits


def check_head_output(phi: Tensor, W: Tensor, bias: Tensor | None, logits: Tensor) -> None:
    """Raise a ValueError unless ``logits`` is ``W φ + b``: the closed forms and the layer Hessian
    of relative flatness and FAM treat the model output as the last ``nn.Linear``'s output, and a
    model that post-processes it would make them silently wrong. One tolerance for every user:
    ``rtol=1e-5, atol=1e-6`` (float32 round-off of the same product computed in another order)."""
    with torch.no_grad():
        recomputed = F.linear(phi.detach(), W.detach(), None if bias is None else bias.detach())
        same = recomputed.numel() == logits.numel() and torch.allclose(
            recomputed.reshape(logits.shape), logits.detach(), rtol=1e-5, atol=1e-6
        )
    if not same:
        raise ValueError(
            "the model's output is not the output of its last nn.Linear; relative flatness and "
            "FAM need f(x) = W φ(x) + b with W the last nn.Linear"
        )


def head_hessian(
    loss_of_output: Callable[[Tensor], Tensor],
    phi: Tensor,
    W: Tensor,
    bias: Tensor | None,
    out_shape: torch.Size | tuple[int, ...] | None = None,
) -> Tensor:
    """Exact Hessian w.r.t. W of ``loss_of_output(W φ + b)``, layout (d, m, d, m) (METHODS §4.2):
    ``H[s, t, u, v] = ∂²ℓ / ∂W_{s,t} ∂W_{u,v}`` (``torch.func.hessian``; small heads only).

    ``out_shape`` reshapes ``W φ + b`` back to the model's output shape. Gradients reach ``phi``
    and ``bias`` through the result when they require them (FAM's attached curvature).

    >>> phi = torch.tensor([[1.0, 2.0]], dtype=torch.float64); W = torch.zeros(1, 2, dtype=torch.float64)
    >>> head_hessian(lambda z: (z ** 2).sum(), phi, W, None).reshape(2, 2).tolist()  # 2 φᵀφ
    [[2.0, 4.0], [4.0, 8.0]]
    """

    def loss(Wv: Tensor) -> Tensor:
        out = F.linear(phi, Wv, bias)
        return loss_of_output(out if out_shape is None else out.reshape(out_shape))

    return torch.func.hessian(loss)(W)


def kappa_tr_ce_per_sample(phi: Tensor, W: Tensor, logits: Tensor) -> Tensor:
    """Per-sample terms of κ^φ_Tr for softmax cross-entropy (METHODS.md §3.2).

    .. math::
        κ_i = ‖φ_i‖² \\operatorname{tr}(W W^⊤ A_i) = ‖φ_i‖² \\Big(\\sum_c ‖w_c‖² p_{ic} − ‖W^⊤ p_i‖²\\Big)
            = ‖φ_i‖² \\, \\tfrac12 \\sum_{c,c'} p_{ic} p_{ic'} ‖w_c − w_{c'}‖²,
        \\quad A_i = \\operatorname{diag}(p_i) − p_i p_i^⊤

    so that κ^φ_Tr = mean_i κ_i for the mean CE loss. Differentiable in φ, W and the logits.
    Computed in the last (pairwise) form: near a minimum p_i is almost one-hot and the middle
    form cancels two nearly equal numbers (≈ 1e-3 relative error in float32 at loss 1e-5); the
    pairwise sum has non-negative terms only. Cost O(d²m) once plus O(N d²).

    >>> import torch
    >>> W = torch.eye(2, dtype=torch.float64); phi = torch.ones(1, 2, dtype=torch.float64)
    >>> float(kappa_tr_ce_per_sample(phi, W, torch.zeros(1, 2, dtype=torch.float64)))
    1.0
    """
    p = torch.softmax(logits.reshape(-1, W.shape[0]), dim=-1)  # (N, d)
    row_sq = (W * W).sum(dim=1)  # (d,)  ‖w_c‖²
    # (d, d) squared row distances ‖w_c − w_c'‖²; exact zeros on the diagonal, clamp rounding.
    dist = (row_sq[:, None] + row_sq[None, :] - 2 * (W @ W.T)).clamp_min(0)
    dist = dist * (1 - torch.eye(W.shape[0], dtype=W.dtype, device=W.device))
    return (phi * phi).sum(dim=1) * 0.5 * ((p @ dist) * p).sum(dim=1)
