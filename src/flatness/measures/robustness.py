"""Feature robustness (Petzka, Adilova, Kamp and Sminchisescu 2020; METHODS.md §3.6)."""

from __future__ import annotations

import math

import torch
from torch import nn

from flatness.batches import LossFn, check_finite, eval_mode, loss_reduction
from flatness.measures.relative import _collect_head

#: Default number of Monte Carlo draws of A (each an antithetic pair ±A: 2 head evaluations).
DEFAULT_SAMPLES = 100


def feature_robustness(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    delta: float = 0.1,
    num_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    return_stderr: bool = False,
):
    """Expected increase of the mean loss when the last layer's features are perturbed by δAφ.

    .. math::
        \\mathcal{E}_δ = \\mathbb{E}_A\\Big[\\frac1N \\sum_i ℓ\\big(W(φ_i + δAφ_i) + b, y_i\\big)\\Big]
        − L(W), \\qquad A_{kt} \\overset{iid}{\\sim} \\mathcal{N}(0, 1/m)

    (Petzka et al. 2020, "Feature robustness"; the precursor of relative flatness). One matrix A
    per draw perturbs every sample's features φ_i ∈ R^m of the last ``nn.Linear`` W (d×m); with
    Var A_{kt} = 1/m, E‖δAφ‖² = δ²‖φ‖², so δ is the relative size of the perturbation. L is the
    **mean** loss (default cross-entropy; a sum-reduced ``loss_fn`` gives the sum over samples).

    **Relation to κ^φ_Tr** (:func:`~flatness.measures.relative_flatness`). W(φ + δAφ) = (W + δWA)φ,
    so perturbing the features is perturbing W by δWA. Expanding in δ,
    L(W + δWA) − L(W) = δ⟨∇L, WA⟩ + (δ²/2)⟨WA, H[WA]⟩ + O(δ³); the odd terms have zero mean
    (A and −A are equally likely) and E⟨WA, H[WA]⟩ = (1/m) Σ_{k,t} ⟨W e_k e_tᵀ, H[W e_k e_tᵀ]⟩
    = (1/m) Σ_{s,s'} ⟨w_s, w_{s'}⟩ Tr H_{s,s'}, hence

    .. math::
        \\mathcal{E}_δ = \\frac{δ^2}{2m} κ^φ_{Tr}(W) + O(δ^4).

    Monte Carlo: ``num_samples`` draws, in sequence on the CPU in float64 and then cast to the
    model's dtype and device, A_k = ``torch.randn(m, m, generator=torch.Generator().manual_seed(
    seed), dtype=torch.float64) / √m``; each contributes the antithetic pair average
    [L(W + δWA_k) + L(W − δWA_k)]/2 − L(W), which removes the first-order term exactly (same
    expectation, far smaller variance away from a minimum; ≥ 0 for losses convex in the logits).
    ``return_stderr=True`` returns ``(value, standard error over the draws)``.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2).double()
    >>> X = torch.randn(8, 2, dtype=torch.float64); y = torch.randint(0, 2, (8,))
    >>> feature_robustness(net, (X, y), delta=0.0)
    0.0
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite non-negative number, got {delta}")
    loss_reduction(loss_fn)  # reject reduction="none" before any work
    with eval_mode(model), torch.no_grad():
        head = _collect_head(model, data)
        W = head.W
        m = W.shape[1]
        base = head.data_loss(loss_fn, W)
        # Draws on the CPU in float64, then cast: the same seed gives the same A in every dtype
        # and on every device (CPU and CUDA generators, float32 and float64 randn, differ).
        g = torch.Generator().manual_seed(int(seed))
        draws = []
        for _ in range(num_samples):
            A = torch.randn(m, m, generator=g, dtype=torch.float64) / math.sqrt(m)
            A = A.to(device=W.device, dtype=W.dtype)
            dW = delta * (W @ A)  # perturbing φ by δAφ == perturbing W by δWA
            pair = head.data_loss(loss_fn, W + dW) + head.data_loss(loss_fn, W - dW)
            draws.append(pair / 2 - base)
        draws = torch.stack(draws)
        value, stderr = draws.mean(), draws.std() / math.sqrt(num_samples)
    check_finite(value, "feature robustness")
    return (float(value), float(stderr)) if return_stderr else float(value)
