"""Keskar et al. (ICLR 2017) ε-sharpness, metric 2.1: the largest loss rise in a box around θ."""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatness.batches import Batches, LossFn, default_loss, eval_mode, loss_term


class _FlatLoss:
    """L(θ + δ) and ∇L for a flat displacement δ, via ``functional_call``: the model's own
    parameters are never written, so an interrupted optimiser cannot leave them changed."""

    def __init__(self, model: nn.Module, batches: Batches, loss_fn: LossFn) -> None:
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        named = [(k, p.detach()) for k, p in model.named_parameters()]
        if not named:
            raise ValueError(f"{type(model).__name__} has no parameters to perturb")
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.cat([p.reshape(-1) for _, p in named])

    def _params(self, flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, self.sizes)
        return {k: t.view(s) for k, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def __call__(self, delta: Tensor, grad: bool = True) -> tuple[float, Tensor | None]:
        x = (self.theta + delta).detach().requires_grad_(grad)
        total = 0.0
        n = self.batches.num_samples
        with torch.enable_grad() if grad else torch.no_grad():
            for X, y in self.batches:
                # Per-batch backward keeps one batch's graph alive, not the whole data's.
                out = functional_call(self.model, self._params(x), (X,))
                term = loss_term(self.loss_fn, out, y, n)
                if grad:
                    term.backward()
                total += float(term.detach())
        return total, (x.grad if grad else None)


def keskar_sharpness(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    epsilon: float = 1e-3,
    subspace_dim: int | None = None,
    maxiter: int = 10,
    seed: int = 0,
    start: str = "random",
    return_stderr: bool = False,
) -> float | tuple[float, float]:
    """Keskar ε-sharpness (Keskar et al., ICLR 2017, metric 2.1), in percent of 1 + L(θ).

    .. math::
        φ_{x,f}(ε, A) = 100 · \\frac{\\max_{y ∈ C_ε} L(θ + Ay) − L(θ)}{1 + L(θ)},
        \\quad C_ε = \\{y : |y_i| ≤ ε(|(A^+θ)_i| + 1)\\}

    with L the mean loss over all samples of ``data`` (default cross-entropy), θ every parameter.
    ``subspace_dim=None`` takes A = I (the full space); an integer p draws a random n×p matrix A
    with i.i.d. N(0, 1) entries from ``seed`` (memory n·p; A⁺θ by the normal equations, exact for
    a full-rank Gaussian A). The inner maximisation is scipy's L-BFGS-B on −L with its gradient
    (``jac=True``) and ``maxiter`` iterations, as the paper's README prescribes (Keskar: 10), with
    scipy's default stopping tolerances otherwise.

    ``start="random"`` (default) starts from a uniform random point of C_ε drawn from ``seed``;
    ``start="zero"`` starts at y = 0, where the gradient of a minimum is ≈ 0, so L-BFGS-B's first
    step gains almost nothing, its stopping rule fires and the value is ≈ 0 (the pitfall of
    METHODS.md §5; kept only to show it). The max is
    taken over every point evaluated, y = 0 included, so the value is ≥ 0.

    Cost: ≈ 10–25 loss + gradient evaluations (``maxiter=10``) plus scipy's per-call Python loop
    over the n bounds (≈ 1 min per 10M parameters on one slow core); a subspace keeps it at p.

    Not reparameterisation-invariant: the +1 makes C_ε only partly scale-aware (METHODS.md §5).
    Deterministic for a given ``seed``. ``return_stderr=True`` returns ``(value, nan)``: one
    optimisation run has no Monte Carlo standard error.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if start not in ("random", "zero"):
        raise ValueError(f"start must be 'random' or 'zero', got {start!r}")
    if subspace_dim is not None and subspace_dim < 1:
        raise ValueError(f"subspace_dim must be a positive integer or None, got {subspace_dim}")
    batches = Batches.for_model(data, model)
    flat = _FlatLoss(model, batches, loss_fn or default_loss)
    theta = flat.theta
    gen = torch.Generator().manual_seed(int(seed))

    A = None
    if subspace_dim is None:
        coords = theta.double().cpu()
    else:
        # Drawn on the CPU in float64 so the matrix is the same for every dtype and device.
        A64 = torch.randn(theta.numel(), int(subspace_dim), generator=gen, dtype=torch.float64)
        # Normal equations: AᵀA is p×p and well conditioned for Gaussian A with n ≫ p.
        coords = torch.linalg.solve(A64.T @ A64, A64.T @ theta.double().cpu())
        A = A64.to(device=theta.device, dtype=theta.dtype)
    bound = (epsilon * (coords.abs() + 1)).numpy()
    if start == "random":
        y0 = (torch.rand(bound.shape, generator=gen, dtype=torch.float64) * 2 - 1).numpy() * bound
    else:
        y0 = np.zeros_like(bound)

    evaluated: list[float] = []

    def negated(y: np.ndarray) -> tuple[float, np.ndarray]:
        y_t = torch.from_numpy(np.ascontiguousarray(y)).to(device=theta.device, dtype=theta.dtype)
        loss, g = flat(y_t if A is None else A @ y_t)
        evaluated.append(loss)
        g = g if A is None else A.T @ g
        return -loss, -g.detach().double().cpu().numpy()

    with eval_mode(model):
        loss0, _ = flat(torch.zeros_like(theta), grad=False)
        scipy.optimize.minimize(
            negated,
            y0,
            jac=True,
            method="L-BFGS-B",
            # A Bounds object: scipy converts (lo, hi) pairs element by element in Python, and
            # still loops over the bounds once per call (≈ 1 min for ResNet-18's 11M on a slow
            # CPU core; a fixed cost per call, not per iteration).
            bounds=scipy.optimize.Bounds(-bound, bound),
            options={"maxiter": int(maxiter)},
        )
    best = max([loss0, *evaluated])
    value = 100.0 * (best - loss0) / (1.0 + loss0)
    return (value, float("nan")) if return_stderr else value
