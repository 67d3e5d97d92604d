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
    """Exact Tr ∇²L for a net built from ``nn.Linear``/``nn.Conv2d`` layers and piecewise-linear
    activations and pooling (ReLU, max-pool), mean cross-entropy, no normalisation layers.

    Each logit is, locally, a polynomial in which every scalar parameter has degree ≤ 1, so
    ∂²z/∂θ_k² = 0 and diag H = diag GGN: Tr H = (1/N) Σ_i Tr(A_i J_i J_iᵀ) with A_i = diag(p_i) −
    p_i p_iᵀ = B_i B_iᵀ, B_i = diag(√p_i) − p_i √p_iᵀ. So Tr H = (1/N) Σ_i Σ_c ‖∇_θ u_ic‖² with
    u_ic = B_i[:, c]ᵀ z_i: d backward passes, each sample's gradient norm taken layer by layer
    (Linear: ‖δ_i‖²(‖a_i‖² + 1); Conv2d: δ_i times the unfolded input patches). No probes."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for layer in layers:
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            raise ValueError("grouped or non-zero-padded convolutions are not supported")
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, (inp[0], out)))
        for m in layers
    ]
    try:
        for start in range(0, X.shape[0], chunk):
            logits = model(X[start : start + chunk])
            p = torch.softmax(logits.detach(), dim=-1)
            B = torch.diag_embed(p.sqrt()) - p.unsqueeze(2) * p.sqrt().unsqueeze(1)  # (n, d, d)
            outs = [seen[m][1] for m in layers]
            for c in range(logits.shape[1]):
                u = (logits * B[:, :, c]).sum()
                deltas = torch.autograd.grad(u, outs, retain_graph=True)
                for layer, delta in zip(layers, deltas, strict=True):
                    total += _per_sample_sq_grad_norm(layer, seen[layer][0].detach(), delta)
    finally:
        for h in hooks:
            h.remove()
    return float(total / X.shape[0])


def _per_sample_sq_grad_norm(layer: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
    """Σ_i ‖∂u_i/∂(weight, bias)‖² of one layer, from its inputs a and output gradients δ."""
    n = a.shape[0]
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        a, delta = a.reshape(n, -1, a.shape[-1]), delta.reshape(n, -1, delta.shape[-1])
        if a.shape[1] == 1:  # one position per sample: the outer product factorises
            sq = (delta**2).sum((1, 2)) * (a**2).sum((1, 2))
        else:
            sq = (delta.transpose(1, 2) @ a).pow(2).sum((1, 2))
        bias_sq = delta.sum(1).pow(2).sum(1) if bias else 0.0
    else:
        patches = nn.functional.unfold(
            a, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )  # (n, C_in·k·k, L)
        d = delta.flatten(2)  # (n, C_out, L)
        sq = (d @ patches.transpose(1, 2)).pow(2).sum((1, 2))
        bias_sq = d.sum(2).pow(2).sum(1) if bias else 0.0
    return (sq + bias_sq).sum(dtype=torch.float64)
