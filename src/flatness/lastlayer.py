"""The last linear layer W of a classifier, its input features φ, and the CE closed form of κ^φ_Tr.

Relative flatness (``flatness.measures``) and the FAM regulariser (``flatness.regularizers``) both
need the features feeding the last ``nn.Linear`` and the softmax cross-entropy closed form of
METHODS.md §3.2; this module is the one place both live.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


def kappa_tr_ce_per_sample(phi: Tensor, W: Tensor, logits: Tensor) -> Tensor:
    """Per-sample terms of κ^φ_Tr for softmax cross-entropy (METHODS.md §3.2).

    .. math::
        κ_i = ‖φ_i‖² \\Big(\\sum_c ‖w_c‖² p_{ic} − ‖W^⊤ p_i‖²\\Big) = ‖φ_i‖² \\operatorname{tr}(W W^⊤ A_i),
        \\quad A_i = \\operatorname{diag}(p_i) − p_i p_i^⊤

    so that κ^φ_Tr = mean_i κ_i for the mean CE loss. Differentiable in φ, W and the logits.

    >>> import torch
    >>> W = torch.eye(2, dtype=torch.float64); phi = torch.ones(1, 2, dtype=torch.float64)
    >>> float(kappa_tr_ce_per_sample(phi, W, torch.zeros(1, 2, dtype=torch.float64)))
    1.0
    """
    p = torch.softmax(logits.reshape(-1, W.shape[0]), dim=-1)  # (N, d)
    row_sq = (W * W).sum(dim=1)  # (d,)  ‖w_c‖²
    Wt_p = p @ W  # (N, m)  Wᵀ p_i
    return (phi * phi).sum(dim=1) * (p @ row_sq - (Wt_p * Wt_p).sum(dim=1))
