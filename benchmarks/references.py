"""The reference algorithms, re-implemented from their descriptions (METHODS.md), as their authors ran
them. Written for this benchmark; no code of the reference repositories is reused.

Every function takes a model and one ``(X, y)`` batch and uses the mean cross-entropy loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(us, vs) -> Tensor:
    return sum((u * v).sum() for u, v in zip(us, vs, strict=True))


class CachedHVP:
    """HVPs on one batch with the gradient graph built once (``create_graph``) and kept
    (``retain_graph``): the cheapest exact HVP when the batch fits in memory."""

    def __init__(self, model: nn.Module, X: Tensor, y: Tensor) -> None:
        self.params = _params(model)
        loss = cross_entropy(model(X), y)
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.calls = 0

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        self.calls += 1
        return list(torch.autograd.grad(self.grads, self.params, grad_outputs=v, retain_graph=True))


def rangamani_power_iteration(
    model: nn.Module, X: Tensor, y: Tensor, tol: float = 1e-6, max_iter: int = 1000, seed: int = 0
) -> tuple[float, int]:
    """Rangamani et al.: power iteration on G⁻¹H in the quotient metric (METHODS.md §2.5).

    g(u, v) = Σ_T ⟨u_T, v_T⟩/‖θ_T‖², so G⁻¹Hv multiplies each block of Hv by ‖θ_T‖². Gaussian
    start, g-normalised iterates, stop when ‖v_{t+1} − v_t‖/‖v_t‖ < tol, then the Rayleigh quotient
    vᵀHv / g(v, v). Returns ``(λ, number of HVPs)``; λ is the largest-magnitude eigenvalue."""
    hvp = CachedHVP(model, X, y)
    sq = [p.detach().pow(2).sum() for p in hvp.params]
    gen = torch.Generator(device=X.device).manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in hvp.params]

    def g_normalised(u):
        norm = torch.sqrt(sum((a * a).sum() / s for a, s in zip(u, sq, strict=True)))
        return [a / norm for a in u]

    v = g_normalised(v)
    for _ in range(max_iter):
        w = g_normalised([s * h for s, h in zip(sq, hvp(v), strict=True)])
        change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(w, v, strict=True)))
        size = torch.sqrt(sum((b * b).sum() for b in v))
        v = w
        if float(change / size) < tol:
            break
    g_vv = sum((a * a).sum() / s for a, s in zip(v, sq, strict=True))
    return float(_dot(v, hvp(v)) / g_vv), hvp.calls


def petzka_exact_kappa(model: nn.Module, X: Tensor, y: Tensor, layer: nn.Linear) -> float:
    """Petzka et al.: the exact Hessian of the mean loss w.r.t. the last weight W (d×m), one
    double-backward pass per entry of W (d·m passes), then κ = Σ_{s,s'} ⟨w_s, w_s'⟩ Tr H_{s,s'}."""
    W = layer.weight
    d, m = W.shape
    grad_W = torch.autograd.grad(cross_entropy(model(X), y), W, create_graph=True)[0]
    H = torch.empty(d, m, d, m, dtype=W.dtype, device=W.device)
    for s in range(d):
        for t in range(m):
            H[s, t] = torch.autograd.grad(grad_W[s, t], W, retain_graph=True)[0]
    block_trace = torch.einsum("stut->su", H)  # Tr H_{s,s'} = Σ_t H[s,t,s',t]
    Wd = W.detach()
    return float((Wd @ Wd.T * block_trace).sum())


def fam_authors_step(model: nn.Module, opt, X: Tensor, y: Tensor, lam: float = 0.1) -> float:
    """One FAM training step as released (METHODS.md §4.1): the minibatch Hessian of the last
    weight by ``torch.autograd.functional.hessian(..., create_graph=True)``, copied into a leaf
    (curvature detached), R = Σ_{i,j} ⟨w_i, w_j⟩ Tr H_ij / m, loss + λR, backward, step."""
    layer = [mod for mod in model.modules() if isinstance(mod, nn.Linear)][-1]
    W = layer.weight
    d, m = W.shape
    opt.zero_grad(set_to_none=True)
    logits, feats = _logits_and_features(model, X, layer)
    loss = cross_entropy(logits, y)

    def loss_of_W(w):
        return cross_entropy(feats.detach() @ w.T + layer.bias.detach(), y)

    # vectorize=True: the released scripts select the vmapped autograd Hessian (METHODS.md §4.2)
    H = torch.autograd.functional.hessian(loss_of_W, W, create_graph=True, vectorize=True)
    C = torch.einsum("stut->su", H).detach().clone()  # a new leaf: no gradient through it
    reg = (W @ W.T * C).sum() / m
    (loss + lam * reg).backward()
    opt.step()
    return float(loss.detach())


def _logits_and_features(model: nn.Module, X: Tensor, layer: nn.Linear):
    captured = []
    handle = layer.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    try:
        logits = model(X)
    finally:
        handle.remove()
    return logits, captured[0].reshape(X.shape[0], -1)


def exact_trace_piecewise_linear(model: nn.Module, X: Tensor, y: Tensor, chunk: int = 256) -> float:
    """Exact Tr ∇²L of the mean cross-entropy for a piecewise-linear net: now the library's
    :func:`flatness.ggn.ggn_trace` (diag H = diag GGN), kept under this name for
    ``check_references``, which checks it against dense float64 Hessians. The benchmark judges it
    against an independent HVP-based Hutchinson reference (``bench_curvature``)."""
    from flatness.ggn import ggn_trace

    return ggn_trace(model, (X, y), chunk_size=chunk)
