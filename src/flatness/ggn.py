"""Exact Hessian trace of the mean softmax cross-entropy for piecewise-linear networks.

For a network whose input-to-logit map is made only of affine layers (``Linear``, ``Conv1d/2d/3d``,
``BatchNorm`` in ``eval()``) and parameter-free piecewise-linear maps (ReLU, LeakyReLU, max/avg
pooling, ``Flatten``, dropout in ``eval()``, ``Identity``) chained by (nested) ``nn.Sequential``,
every logit is, on each linear region, a polynomial in which each scalar parameter has degree ≤ 1.
So ∂²z_c/∂θ_k² = 0 (also in autograd, where ReLU'' = 0), and the Hessian H of the loss and the
generalised Gauss–Newton matrix G = (1/N) Σ_i J_iᵀ A_i J_i have the same *diagonal* (H ≠ G off the
diagonal: z is bilinear in the weights of two layers). With A_i = diag(p_i) − p_i p_iᵀ =
Σ_c p_ic (e_c − p_i)(e_c − p_i)ᵀ for softmax cross-entropy:

.. math::
    \\operatorname{Tr} H = \\operatorname{Tr} G
        = \\frac{1}{N} \\sum_i \\sum_c p_{ic} \\,\\bigl\\|\\nabla_\\theta (z_{ic} - p_i^\\top z_i)\\bigr\\|^2
    \\qquad (p_i \\text{ held fixed}).

Each class c costs one backward pass per chunk (to every parametric layer's output); each sample's
squared gradient norm is then formed layer by layer from the layer's input and output gradient
(Linear: ‖δ_i a_iᵀ‖²; Conv: δ_i against the unfolded input patches; BatchNorm: δ_i·x̂_i), without
materialising per-sample gradients of the whole net. No probes: the value is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from flatness.batches import DEFAULT_CHUNK, Batches, batch_weight, eval_mode, loss_term

#: Parameter-free modules that are piecewise linear in their input (dropout: identity in eval()).
PIECEWISE_LINEAR_MAPS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
#: Affine layers (their output is linear in each of their parameters and affine in their input).
AFFINE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
_CONTAINERS = (nn.Sequential,)
_WHITELIST = PIECEWISE_LINEAR_MAPS + AFFINE_LAYERS + _CONTAINERS

#: Largest number of elements of unfolded conv patches materialised at once (per sub-chunk).
_PATCH_BUDGET = 1 << 24


class NotPiecewiseLinear(ValueError):
    """The model (or its output) does not qualify for the exact GGN trace identity."""


def piecewise_linear_offender(model: nn.Module) -> str | None:
    """``None`` when ``model`` qualifies for :func:`ggn_trace`, else why not (naming the module).

    Only the whitelisted module types qualify, as themselves or as subclasses that keep the
    base class's ``forward``; a module used twice (shared parameters), a forward hook, a
    parametrisation, ``MaxPool(return_indices=True)`` or a BatchNorm without running statistics
    (batch statistics couple the samples even in ``eval()``) disqualify it.

    >>> piecewise_linear_offender(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    >>> piecewise_linear_offender(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    'module 1 (Tanh) is not piecewise linear'
    """
    seen_modules: set[int] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        where = f"module {name or '<root>'} ({type(m).__name__})"
        if id(m) in seen_modules:
            return f"{where} is used more than once (shared parameters)"
        seen_modules.add(id(m))
        base = next((b for b in _WHITELIST if isinstance(m, b)), None)
        if base is None or type(m).forward is not base.forward:
            return f"{where} is not piecewise linear"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{where} has a forward hook"
        if parametrize.is_parametrized(m):
            return f"{where} is parametrized"
        if getattr(m, "return_indices", False):
            return f"{where} returns indices"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            not m.track_running_stats or m.running_mean is None or m.running_var is None
        ):
            return f"{where} has no running statistics (batch statistics even in eval())"
    seen_params: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen_params:
            return f"parameter {name} is shared"
        seen_params.add(id(p))
    return None


def _parametric_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def ggn_trace(
    model: nn.Module,
    data,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
    layer: nn.Module | None = None,
) -> float:
    """Exact Tr ∇²L of the mean cross-entropy (``loss_fn=None``) for a piecewise-linear net.

    ``data`` as for every measure; batches are weighted as in
    :func:`flatness.batches.loss_term` (the mean over all samples), integer labels follow
    ``cross_entropy``'s ``ignore_index=-100``, class-probability targets are allowed. All
    parameters of the model (``parameters()``), in ``eval()`` (mode restored), in the model's
    dtype and device; accumulated in float64. Raises :class:`NotPiecewiseLinear` (a ValueError)
    when :func:`piecewise_linear_offender` names a module or the output is not 2-D logits.

    ``layer`` (a ``Linear``/``Conv`` module of ``model``): only the weight of that layer, bias
    excluded, i.e. Tr H_ll of its diagonal block (diag H = diag G holds entry by entry, so any
    diagonal block's trace is exact); one backward pass per class to that layer's output.

    >>> lin = nn.Linear(1, 2, bias=False).double()
    >>> _ = nn.init.zeros_(lin.weight)  # p = (½, ½): A = [[¼, −¼], [−¼, ¼]], Tr G = mean x² · ½
    >>> ggn_trace(lin, (torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.tensor([0, 1])))
    1.25
    """
    why = piecewise_linear_offender(model)
    if why is not None:
        raise NotPiecewiseLinear(
            f"the exact GGN trace needs a piecewise-linear network of whitelisted modules: {why}"
        )
    batches = Batches.for_model(data, model, chunk_size=chunk_size)
    layers = _parametric_layers(model)
    if layer is not None:
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not any(
            m is layer for m in layers
        ):
            raise ValueError("layer must be a Linear or Conv layer of the model")
        layers = [layer]
    params = list(model.parameters())
    if not params:
        raise ValueError("no parameters to differentiate: the model has none")
    N = batches.num_samples
    captured: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def keep(mod, inp, out):
        captured[mod] = (inp[0], out)
        return out.clone()  # what flows on: an in-place activation must not rewrite `out`

    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    flags = [p.requires_grad for p in params]
    hooks = []
    bias = layer is None  # one layer: its weight only
    try:
        with eval_mode(model), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            hooks = [m.register_forward_hook(keep) for m in layers]
            for X, y in batches:
                captured.clear()
                logits = model(X)
                w = _sample_weights(logits, y, N)  # (n,) incl. the batch weight; checks finiteness
                outs = [captured[m][1] for m in layers]
                p_ = torch.softmax(logits.detach(), dim=1)
                root = (w[:, None] * p_).clamp_min(0).sqrt()  # √(w_i p_ic)
                for c in range(logits.shape[1]):
                    cot = -root[:, c : c + 1] * p_  # √(w_i p_ic)(e_c − p_i)
                    cot[:, c] += root[:, c]
                    deltas = torch.autograd.grad(
                        logits, outs, grad_outputs=cot, retain_graph=True, allow_unused=True
                    )
                    for mod, delta in zip(layers, deltas, strict=True):
                        if delta is not None:
                            a = captured[mod][0].detach()
                            sq = _per_sample_sq_norms(mod, a, delta, bias=bias)
                            total += sq.sum(dtype=torch.float64)
                del logits, outs, deltas
                captured.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    value = float(total)
    if not math.isfinite(value):
        raise ValueError(f"the GGN trace is not finite ({value})")
    return value


def _sample_weights(logits: Tensor, y: Tensor, num_samples: int) -> Tensor:
    """Each sample's weight in the data loss (cross-entropy Hessian w.r.t. its logits = w_i A_i)."""
    if logits.dim() != 2:
        raise NotPiecewiseLinear(
            f"the exact GGN trace needs 2-D logits (samples × classes), got shape "
            f"{tuple(logits.shape)}"
        )
    loss_term(None, logits.detach(), y, num_samples, what="loss")  # same checks as every measure
    n = logits.shape[0]
    bw = batch_weight(None, n, num_samples)
    if y.is_floating_point():  # class probabilities: Hessian (Σ_c y_ic)(diag p − ppᵀ), batch mean
        return y.detach().to(torch.float64).sum(1).to(logits.dtype) * (bw / n)
    valid = (y != -100).to(logits.dtype)  # cross_entropy's default ignore_index
    return valid * (bw / float(valid.sum()))


def _per_sample_sq_norms(layer: nn.Module, a: Tensor, delta: Tensor, bias: bool = True) -> Tensor:
    """‖∂u_i/∂θ_layer‖² per sample from the layer input ``a`` and output gradient ``delta``
    (``bias=False``: the weight's entries only)."""
    n = a.shape[0]
    if isinstance(layer, nn.Linear):
        a3, d3 = a.reshape(n, -1, a.shape[-1]), delta.reshape(n, -1, delta.shape[-1])
        if a3.shape[1] == 1:  # one position per sample: the outer product factorises
            sq = (d3**2).sum((1, 2)) * (a3**2).sum((1, 2))
        else:
            sq = (d3.transpose(1, 2) @ a3).pow(2).sum((1, 2))
        if bias and layer.bias is not None:
            sq = sq + d3.sum(1).pow(2).sum(1)
        return sq
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        xhat = nn.functional.batch_norm(
            a, layer.running_mean, layer.running_var, None, None, False, 0.0, layer.eps
        )
        # Per-channel sums over positions (flattened; one position for an (n, C) input).
        sq = torch.zeros(n, dtype=a.dtype, device=a.device)
        if layer.weight is not None:
            sq = sq + (delta * xhat).reshape(n, a.shape[1], -1).sum(2).pow(2).sum(1)
        if layer.bias is not None:
            sq = sq + delta.reshape(n, a.shape[1], -1).sum(2).pow(2).sum(1)
        return sq
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return _conv_sq_norms(layer, a, delta, bias)
    if isinstance(layer, nn.Conv3d):
        return _generic_sq_norms(layer, a, delta, bias)
    raise NotPiecewiseLinear(f"no per-sample gradient norm for {type(layer).__name__}")


def _conv_sq_norms(layer: nn.Conv1d | nn.Conv2d, a: Tensor, delta: Tensor, bias: bool) -> Tensor:
    """Conv1d/2d: per-sample weight gradient δ_i · patches_iᵀ, per group, in sub-chunks."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        a = nn.functional.pad(a, pad, mode=mode)
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, nn.Conv1d):  # as a 2-D conv of height 1
        a, delta = a.unsqueeze(2), delta.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    n, g = a.shape[0], layer.groups
    d = delta.flatten(2)  # (n, C_out, L)
    cin_k = a.shape[1] * math.prod(kernel)
    sub = max(1, _PATCH_BUDGET // max(1, cin_k * d.shape[2]))
    out = []
    for s in range(0, n, sub):
        patches = nn.functional.unfold(a[s : s + sub], kernel, dilation, 0, stride)
        ds = d[s : s + sub]
        sq = torch.zeros(ds.shape[0], dtype=a.dtype, device=a.device)
        for pj, dj in zip(patches.chunk(g, dim=1), ds.chunk(g, dim=1), strict=True):
            sq = sq + (dj @ pj.transpose(1, 2)).pow(2).sum((1, 2))
        out.append(sq)
    sq = torch.cat(out)
    if bias and layer.bias is not None:
        sq = sq + d.sum(2).pow(2).sum(1)
    return sq


def _generic_sq_norms(layer: nn.Module, a: Tensor, delta: Tensor, bias: bool) -> Tensor:
    """Conv3d (no 3-D unfold): per-sample weight gradients by ``torch.func``, in sub-chunks."""
    from torch.func import grad, vmap

    weight = layer.weight.detach()

    def inner(w, ai, di):  # _conv_forward: the conv itself, without the module's hooks
        return (layer._conv_forward(ai[None], w, None) * di[None]).sum()

    per_sample = vmap(grad(inner), in_dims=(None, 0, 0))
    n, d = a.shape[0], delta.detach()
    sub = max(1, _PATCH_BUDGET // max(1, weight.numel()))
    sq = torch.cat(
        [per_sample(weight, a[s : s + sub], d[s : s + sub]).flatten(1).pow(2).sum(1)
         for s in range(0, n, sub)]
    )  # fmt: skip
    if bias and layer.bias is not None:
        sq = sq + d.flatten(2).sum(2).pow(2).sum(1)
    return sq
