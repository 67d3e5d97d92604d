"""Relative flatness κ^φ (Petzka et al., NeurIPS 2021) and its variants (METHODS.md §3).

Model f(x) = g(W φ(x) + b), W ∈ R^{d×m} the weight of the **last** ``nn.Linear`` in
``model.modules()`` order (bias excluded), φ_i ∈ R^m its input features, H the Hessian of the
**mean** loss L w.r.t. W, laid out as ``torch.func.hessian`` returns it: shape (d, m, d, m),
``H[s, t, u, v] = ∂²L / ∂W_{s,t} ∂W_{u,v}`` (METHODS.md §4.2). The measures contract H with W:

- :func:`relative_flatness` κ^φ_Tr = Σ_{s,u} ⟨w_s, w_u⟩ Tr H_{s,u} (rows w_s = W[s, :]),
- :func:`relative_flatness_max` κ_max = Σ_s ‖w_s‖² λ_max(H_{s,s}),
- :func:`relative_flatness_col` κ_col = Σ_{t,v} ⟨w_{:t}, w_{:v}⟩ Σ_s H[s, t, s, v],
- :func:`rho_sigma` ρ_σ = Σ_t w_{:t}ᵀ H_{(:,t),(:,t)} w_{:t}.

For softmax cross-entropy (``loss_fn=None``) each has an O(N·d·m) closed form in the per-sample
logit Hessian A_i = diag(p_i) − p_i p_iᵀ; for any other loss the exact layer Hessian is built with
``torch.func.hessian`` (or, for κ^φ_Tr on large heads, estimated by Hutchinson). All of them need
the model's output to be the output of its last ``nn.Linear`` (f = that layer, g = identity).

``relative_flatness(..., layer=l)`` takes any hidden ``nn.Linear`` instead: φ = its input, W = its
weight, H = ∇²_{W_l} L of the whole network's loss (:func:`_relative_flatness_hidden`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatness.batches import Batches, LossFn, check_finite, eval_mode, loss_reduction, loss_term
from flatness.ggn import _sample_weights, piecewise_linear_offender
from flatness.hutchinson import rademacher
from flatness.hvp import HessianOperator
from flatness.lastlayer import (
    check_head_output,
    features_and_logits,
    head_hessian,
    kappa_tr_ce_per_sample,
    last_linear,
)
from flatness.reparam import weight_layer

#: Largest d·m for which ``method="auto"`` builds the exact (d·m)² layer Hessian (200 MB in
#: float64 at 5000); above it κ^φ_Tr uses Hutchinson (METHODS.md §3.2).
EXACT_MAX_PARAMS = 5000

#: Default number of Hutchinson probes (fixed count, METHODS.md §11: no running-mean stop rule).
DEFAULT_PROBES = 100

_METHODS = ("auto", "closed_form", "exact", "hutchinson")


@dataclass
class _Head:
    """The last linear layer's data: per-batch features φ_b (n_b, m), targets y_b, the model's
    output shape per batch, and the layer's W (d, m) and bias, all detached."""

    W: Tensor
    bias: Tensor | None
    phis: list[Tensor]
    ys: list[Tensor]
    out_shapes: list[torch.Size]
    num_samples: int

    def logits(self, b: int, W: Tensor | None = None) -> Tensor:
        """The model output of batch b with the layer weight replaced by ``W``."""
        W = self.W if W is None else W
        return F.linear(self.phis[b], W, self.bias).reshape(self.out_shapes[b])

    def loss_term(self, b: int, loss_fn: LossFn | None, output: Tensor, check: bool = True):
        """Batch b's contribution to the data loss for the model output ``output``
        (:func:`flatness.batches.loss_term`: weight n_b/N for a mean loss, 1 for a sum loss)."""
        return loss_term(loss_fn, output, self.ys[b], self.num_samples, check=check)

    def data_loss(self, loss_fn: LossFn | None, W: Tensor | None = None) -> Tensor:
        """The data loss with the layer weight replaced by ``W`` (every batch)."""
        return sum(self.loss_term(b, loss_fn, self.logits(b, W)) for b in range(len(self.ys)))


@torch.no_grad()
def _collect_head(model: nn.Module, data) -> _Head:
    """Run the model once over ``data`` and keep the last linear layer's inputs and W."""
    layer = last_linear(model)
    batches = Batches.for_model(data, model)
    W = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    phis, ys, shapes = [], [], []
    for X, y in batches:
        phi, logits = features_and_logits(model, X, layer)
        check_finite(logits.sum(), "model output")
        check_head_output(phi, W, bias, logits)
        if phi.shape[0] != X.shape[0]:
            raise ValueError(
                f"the last nn.Linear sees {phi.shape[0]} feature rows for {X.shape[0]} samples; "
                "relative flatness needs one feature vector per sample"
            )
        phis.append(phi.detach())
        ys.append(y)
        shapes.append(logits.shape)
    return _Head(W, bias, phis, ys, shapes, batches.num_samples)


def _feature_scale(head: _Head) -> Tensor:
    """Per-unit scale s_j of the canonicalisation: the population std of φ_j over all samples;
    for a constant unit its |value| (the RMS); 0 for a unit that is 0 on every sample."""
    return _unit_scale(head.phis)


def _unit_scale(phis: list[Tensor]) -> Tensor:
    """:func:`_feature_scale` of per-batch features (n_b, m)."""
    phi = torch.cat(phis)
    std = phi.std(dim=0, correction=0)
    rms = phi.square().mean(dim=0).sqrt()
    return torch.where(std > 0, std, rms)


def _normalized(head: _Head) -> _Head:
    """Std-normalisation (METHODS.md §3.4): φ̃_j = φ_j / s_j and W̃[:, j] = s_j W[:, j].

    The pair gives the same logits on the data, so every κ computed on it is the κ of the
    canonical reparameterisation, without editing the model. Units with s_j = 0 (zero on every
    sample) get W̃[:, j] = 0 and φ̃_j = 0: their column never reaches the logits on these data,
    yet it enters ⟨w_s, w_s'⟩, so keeping it (as the reference code does) lets a rescaling of
    that dead unit, or Dinh's α on its layer, change the "invariant" κ without bound."""
    scale = _feature_scale(head)
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return _Head(
        head.W * scale,
        head.bias,
        [phi * inv for phi in head.phis],
        head.ys,
        head.out_shapes,
        head.num_samples,
    )


def _ce_probs(head: _Head, b: int) -> tuple[Tensor, Tensor]:
    """Softmax p (n_b, d) and 1 − p computed as Σ_{c'≠c} p_c', which keeps its relative accuracy
    when p is almost one-hot (1 − p_y by subtraction loses it: ≈1e-3 in float32 at loss 1e-5)."""
    p = torch.softmax(head.logits(b).reshape(-1, head.W.shape[0]), dim=-1)
    d = p.shape[1]
    others = p @ (1 - torch.eye(d, dtype=p.dtype, device=p.device))
    return p, others


def _layer_hessian(head: _Head, loss_fn: LossFn | None) -> Tensor:
    """Exact Hessian of the data loss w.r.t. W, shape (d, m, d, m)
    (:func:`flatness.lastlayer.head_hessian` per batch, summed)."""
    H = torch.zeros(head.W.shape + head.W.shape, dtype=head.W.dtype, device=head.W.device)
    for b in range(len(head.phis)):

        def batch_loss(out: Tensor, b: int = b) -> Tensor:
            return head.loss_term(b, loss_fn, out, check=False)  # no value branches in func

        H += head_hessian(batch_loss, head.phis[b], head.W, head.bias, head.out_shapes[b])
    check_finite(H.sum(), "layer Hessian")
    return H


def _quad_form(head: _Head, loss_fn: LossFn | None, U: Tensor) -> Tensor:
    """⟨U, H[U]⟩ for a direction U in W-space: the second derivative of t ↦ L(W + tU) at 0.

    Logits are linear in W, so it is dzᵀ ∇²_z ℓ dz with dz = φ Uᵀ (one double-backward product on
    the logits; no Hessian is formed). Reverse-over-reverse, because ``torch.func.jvp`` over
    ``grad`` fails on ``mse_loss`` ("ZeroTensors are immutable", torch 2.14)."""
    total = torch.zeros((), dtype=head.W.dtype, device=head.W.device)
    for b in range(len(head.phis)):
        with torch.enable_grad():
            z = head.logits(b).detach().requires_grad_(True)
            dz = F.linear(head.phis[b], U).reshape(z.shape)
            (gz,) = torch.autograd.grad(head.loss_term(b, loss_fn, z), z, create_graph=True)
            (hz,) = torch.autograd.grad((gz * dz).sum(), z, allow_unused=True)
        if hz is not None:  # None: the loss is linear in the logits, no curvature
            total = total + (hz * dz).sum()
    return total


def _resolve_method(method: str, loss_fn: LossFn | None, dm: int, allow_hutchinson: bool) -> str:
    loss_reduction(loss_fn)  # a sum loss is fine (N × the mean-loss κ); reduction="none" is not
    if method not in _METHODS or (method == "hutchinson" and not allow_hutchinson):
        allowed = _METHODS if allow_hutchinson else _METHODS[:3]
        raise ValueError(f"method must be one of {allowed}, got {method!r}")
    if method == "closed_form" and loss_fn is not None:
        raise ValueError(
            "method='closed_form' is the softmax cross-entropy formula; it needs loss_fn=None"
        )
    if method != "auto":
        return method
    if loss_fn is None:
        return "closed_form"
    return "exact" if dm <= EXACT_MAX_PARAMS or not allow_hutchinson else "hutchinson"


def _finish(value: Tensor, what: str) -> float:
    check_finite(value, what)
    return float(value)


def relative_flatness(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    layer: int | None = None,
    normalize_features: bool = False,
    divide_by_m: bool = False,
    method: str = "auto",
    num_probes: int = DEFAULT_PROBES,
    seed: int = 0,
    return_stderr: bool = False,
):
    """Relative flatness κ^φ_Tr of the last ``nn.Linear`` (Petzka et al., NeurIPS 2021, Def. 3).

    .. math::
        κ^φ_{Tr}(W) = \\sum_{s,s'=1}^{d} ⟨w_s, w_{s'}⟩ \\operatorname{Tr} H_{s,s'},
        \\qquad H_{s,s'}[t,t'] = \\frac{∂^2 L}{∂W_{s,t}\\,∂W_{s',t'}}

    over the rows w_s of W (d×m), L the **mean** loss over all samples (a sum loss gives N×),
    bias not included, **no 1/m** (``divide_by_m=True`` adds it, the FAM/synthetic convention).
    Equivalently κ = E_Z⟨WZ, H[WZ]⟩ for any random m×m Z with E[Z_{kt} Z_{k't'}] = δδ.

    Routes (``method``): ``"closed_form"`` for softmax cross-entropy, the default when
    ``loss_fn is None``: κ = (1/N) Σ_i ‖φ_i‖² (Σ_c ‖w_c‖² p_ic − ‖Wᵀp_i‖²)
    (:func:`flatness.lastlayer.kappa_tr_ce_per_sample`); ``"exact"``: ``torch.func.hessian`` of the
    loss w.r.t. W contracted as ``einsum('su,stut->', W Wᵀ, H)``, the default for another
    ``loss_fn`` when d·m ≤ :data:`EXACT_MAX_PARAMS`; ``"hutchinson"``: the mean of ⟨WZ, H[WZ]⟩
    over ``num_probes`` Rademacher Z drawn from ``seed`` (the default above that size).

    ``normalize_features=True``: std-normalisation (METHODS.md §3.4): each feature unit is
    divided by its population std over ``data`` and W's column multiplied by it (a constant
    unit by its |value|; a unit that is 0 on every sample gets a zero column), which makes κ
    invariant to neuron-wise rescaling of the feature layer.
    ``return_stderr=True`` returns ``(κ, stderr)``; the stderr is 0 except for Hutchinson.

    ``layer`` (an index into :func:`flatness.reparam.weight_layers`, negative from the end;
    default: the last ``nn.Linear``, the routes above): the feature layer φ_l = the input of
    that weight layer, which must be an ``nn.Linear`` reading one feature vector per sample, and
    W = W_l, H = ∇²_{W_l} L of the whole network's loss (Petzka et al. define κ for any layer).
    The closed form above holds only for the last layer; a hidden layer goes through
    :func:`_relative_flatness_hidden` (its own ``"closed_form"`` for cross-entropy on a
    piecewise-linear net, else Hessian-vector products). An index naming the last ``nn.Linear``
    gives exactly the default. κ_l is invariant under every rescaling that leaves W_l alone or
    scales it as a whole (layer-wise, Dinh α) and under neuron-wise rescaling of layer l's own
    units (its rows); neuron-wise rescaling of the units of φ_l (W_l's columns) changes it
    unless ``normalize_features=True``.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2, bias=False).double()
    >>> _ = torch.nn.init.eye_(net.weight)
    >>> X = torch.tensor([[1.0, 1.0]], dtype=torch.float64); y = torch.tensor([0])
    >>> relative_flatness(net, (X, y))  # ‖φ‖² · tr(W Wᵀ A) with p = (½, ½): 2 · ½
    1.0
    """
    if layer is not None:
        module = weight_layer(model, layer)[2]
        if module is not last_linear(model):
            value, stderr = _relative_flatness_hidden(
                model, data, module, loss_fn, normalize_features, method, num_probes, seed
            )
            m = module.weight.shape[1]
            scale = 1.0 / m if divide_by_m else 1.0
            return (value * scale, stderr * scale) if return_stderr else value * scale
    with eval_mode(model):
        head = _collect_head(model, data)
        if normalize_features:
            head = _normalized(head)
        d, m = head.W.shape
        route = _resolve_method(method, loss_fn, d * m, allow_hutchinson=True)
        stderr = torch.zeros((), dtype=head.W.dtype)
        with torch.no_grad():
            if route == "closed_form":
                kappa = (
                    sum(
                        kappa_tr_ce_per_sample(head.phis[b], head.W, head.logits(b)).sum()
                        for b in range(len(head.phis))
                    )
                    / head.num_samples
                )
            elif route == "exact":
                H = _layer_hessian(head, loss_fn)
                kappa = torch.einsum("su,stut->", head.W @ head.W.T, H)
            else:
                if num_probes < 2:
                    raise ValueError(f"num_probes must be at least 2, got {num_probes}")
                # Probes drawn on the CPU: the same seed gives the same probes on every device.
                g = torch.Generator().manual_seed(int(seed))
                samples = []
                for _ in range(num_probes):
                    Z = rademacher(m, m, g, device=head.W.device, dtype=head.W.dtype)  # (m, m)
                    samples.append(_quad_form(head, loss_fn, head.W @ Z))
                samples = torch.stack(samples)
                kappa, stderr = samples.mean(), samples.std() / num_probes**0.5
    scale = 1.0 / m if divide_by_m else 1.0
    value = _finish(kappa * scale, "relative flatness")
    return (value, float(stderr) * scale) if return_stderr else value


def _layer_inputs(model: nn.Module, batches: Batches, module: nn.Module) -> list[Tensor]:
    """The input φ of ``module`` per batch, (n_b, m), without a graph."""
    phis = []
    with torch.no_grad():
        for X, _ in batches:
            phis.append(_run_capturing(model, X, module)[0])
    return phis


def _run_capturing(model: nn.Module, X: Tensor, module: nn.Module):
    """``(φ, u, output)``: one forward pass with ``module``'s output replaced by a leaf ``u`` that
    requires grad (so ∂output/∂u exists even for a frozen model), φ its input (n, m)."""
    captured: list[tuple[Tensor, Tensor]] = []

    def swap(mod, inp, out):
        u = out.detach().requires_grad_(torch.is_grad_enabled())
        captured.append((inp[0].detach(), u))
        return u.clone()  # an in-place activation after the layer must not write into the leaf

    handle = module.register_forward_hook(swap)
    try:
        out = model(X)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"weight layer {type(module).__name__} was called {len(captured)} times in one forward "
            "pass; relative flatness needs it applied exactly once"
        )
    phi, u = captured[0]
    if phi.dim() != 2 or phi.shape[0] != X.shape[0]:
        raise ValueError(
            f"the layer's input has shape {tuple(phi.shape)} for {X.shape[0]} samples; relative "
            "flatness of a layer needs one feature vector per sample (a 2-D input)"
        )
    check_finite(out.detach().sum(), "model output")
    return phi, u, out


def _resolve_hidden_method(
    method: str, loss_fn: LossFn | None, model: nn.Module, hvps: int, num_probes: int
) -> str:
    """The route for a hidden layer: ``"closed_form"`` (CE, piecewise-linear net), ``"exact"``
    (``hvps`` Hessian-vector products) or ``"hutchinson"``; ``"auto"`` takes the closed form when
    it applies, else the exact route when it needs no more products than ``num_probes``."""
    loss_reduction(loss_fn)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    why = "loss_fn is not None" if loss_fn is not None else piecewise_linear_offender(model)
    if method == "closed_form" and why is not None:
        raise ValueError(
            "method='closed_form' on a hidden layer needs the softmax cross-entropy "
            f"(loss_fn=None) and a piecewise-linear network: {why}"
        )
    if method != "auto":
        return method
    if why is None:
        return "closed_form"
    return "exact" if hvps <= num_probes else "hutchinson"


def _relative_flatness_hidden(
    model: nn.Module,
    data,
    module: nn.Module,
    loss_fn: LossFn | None,
    normalize_features: bool,
    method: str,
    num_probes: int,
    seed: int,
) -> tuple[float, float]:
    """κ^φ_Tr of a hidden ``nn.Linear`` W = W_l (d×m) reading φ_l, with H = ∇²_{W_l} L.

    .. math::
        κ_l = \\sum_{s,s'} ⟨w_s, w_{s'}⟩ \\operatorname{Tr} H_{s,s'}
            = \\sum_{k,t} ⟨U_{kt}, H U_{kt}⟩,\\quad U_{kt} = L_{:k} e_t^⊤,\\ L L^⊤ = W W^⊤

    Routes: ``"closed_form"`` (softmax CE on a piecewise-linear net, where the logits are
    piecewise linear in W_l, so H_ll is exactly its Gauss–Newton block
    (1/N) Σ_i J_iᵀ A_i J_i with J_i = B_i ⊗ φ_iᵀ, B_i = ∂z_i/∂u_i, u = W_l φ + b):
    κ_l = Σ_i w_i ‖φ_i‖² Σ_c p_ic ‖W_lᵀ B_iᵀ(e_c − p_i)‖², one backward pass per class from the
    logits to u; ``"exact"``: m·min(d, m) HVPs with the U_kt above (L = Rᵀ from a thin QR of Wᵀ);
    ``"hutchinson"``: the mean of ⟨WZ, H[WZ]⟩ over ``num_probes`` Rademacher m×m Z. The HVPs are
    those of :class:`flatness.hvp.HessianOperator` restricted to W_l, through the whole network.
    With ``normalize_features`` the same on the std-normalised pair (φ/s, W·s), i.e. H's columns
    scaled by 1/s. Returns ``(κ, stderr)``, the stderr 0 except for Hutchinson.
    """
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"relative flatness of a layer needs an nn.Linear (W reading a feature vector), "
            f"got {type(module).__name__}"
        )
    with eval_mode(model):
        batches = Batches.for_model(data, model)
        W = module.weight.detach()
        d, m = W.shape
        s = inv = None
        if normalize_features:
            s = _unit_scale(_layer_inputs(model, batches, module))
            inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        Ws = W if s is None else W * s  # W̃ = W S; φ̃ = φ S⁻¹
        k = min(d, m)
        route = _resolve_hidden_method(method, loss_fn, model, k * m, num_probes)
        stderr = torch.zeros((), dtype=W.dtype)
        if route == "closed_form":
            kappa = torch.zeros((), dtype=W.dtype, device=W.device)
            for X, y in batches:
                with torch.enable_grad():
                    phi, u, logits = _run_capturing(model, X, module)
                    w = _sample_weights(logits, y, batches.num_samples)
                    p = torch.softmax(logits.detach(), dim=1)
                    root = (w[:, None] * p).clamp_min(0).sqrt()  # √(w_i p_ic)
                    phi_sq = (phi * phi).sum(1) if inv is None else (phi * inv).square().sum(1)
                    for c in range(logits.shape[1]):
                        cot = -root[:, c : c + 1] * p  # √(w_i p_ic)(e_c − p_i)
                        cot[:, c] += root[:, c]
                        (delta,) = torch.autograd.grad(
                            logits, u, grad_outputs=cot, retain_graph=True, allow_unused=True
                        )
                        if delta is not None:  # (n, d): √(w_i p_ic) B_iᵀ(e_c − p_i)
                            kappa = kappa + (phi_sq * (delta @ Ws).square().sum(1)).sum()
                del logits, u
        else:
            col = torch.ones(m, dtype=W.dtype, device=W.device) if inv is None else inv
            op = HessianOperator(model, batches, params=[module.weight], loss_fn=loss_fn)

            def quad(V: Tensor) -> Tensor:  # ⟨V, H̃V⟩ = ⟨V S⁻¹, H[V S⁻¹]⟩
                v = (V * col).reshape(-1)
                return v @ op.matvec(v)

            with op:
                if route == "exact":
                    R = torch.linalg.qr(Ws.T, mode="reduced").R  # Ws = Rᵀ Qᵀ: W̃W̃ᵀ = Rᵀ R
                    L = R.T  # (d, k)
                    kappa = torch.zeros((), dtype=W.dtype, device=W.device)
                    for j in range(k):
                        for t in range(m):
                            V = torch.zeros_like(W)
                            V[:, t] = L[:, j]
                            kappa = kappa + quad(V)
                elif route == "hutchinson":
                    if num_probes < 2:
                        raise ValueError(f"num_probes must be at least 2, got {num_probes}")
                    g = torch.Generator().manual_seed(int(seed))
                    samples = torch.stack(
                        [quad(Ws @ rademacher(m, m, g, device=W.device, dtype=W.dtype))
                         for _ in range(num_probes)]
                    )  # fmt: skip
                    kappa, stderr = samples.mean(), samples.std() / num_probes**0.5
    return _finish(kappa, "relative flatness"), float(stderr)


def relative_flatness_max(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    normalize_features: bool = False,
    method: str = "auto",
) -> float:
    """κ_max = Σ_s ‖w_s‖² λ_max(H_{s,s}): rows, diagonal blocks only (Petzka et al. 2021 code).

    .. math::
        κ_{max} = \\sum_{s=1}^{d} ‖w_s‖^2 \\, λ_{max}(H_{s,s}),
        \\qquad H_{s,s} = \\frac1N Φ^⊤ \\operatorname{diag}(p_{·s}(1 − p_{·s})) Φ \\ \\text{(CE)}

    Mean loss, no 1/m, bias not included; one m×m eigenproblem per output. Not invariant to
    neuron-wise rescaling of the feature units; ``normalize_features=True`` applies the
    std-normalisation of :func:`relative_flatness`. ``method`` as there, without Hutchinson.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2, bias=False).double()
    >>> _ = torch.nn.init.eye_(net.weight)
    >>> X = torch.tensor([[1.0, 1.0]], dtype=torch.float64); y = torch.tensor([0])
    >>> relative_flatness_max(net, (X, y))  # 2 rows · ‖w‖² = 1 · λ_max(¼ φφᵀ) = ½
    1.0
    """
    with eval_mode(model), torch.no_grad():
        head = _collect_head(model, data)
        if normalize_features:
            head = _normalized(head)
        d, m = head.W.shape
        route = _resolve_method(method, loss_fn, d * m, allow_hutchinson=False)
        if route == "closed_form":
            blocks = torch.zeros(d, m, m, dtype=head.W.dtype, device=head.W.device)
            for b, phi in enumerate(head.phis):
                p, one_minus_p = _ce_probs(head, b)
                blocks += torch.einsum("is,it,iv->stv", p * one_minus_p, phi, phi)
            blocks /= head.num_samples
        else:
            H = _layer_hessian(head, loss_fn)
            blocks = torch.einsum("stsv->stv", H)
        top = torch.linalg.eigvalsh(blocks)[:, -1]  # (d,) largest eigenvalue per output
        return _finish(((head.W * head.W).sum(dim=1) * top).sum(), "κ_max")


def relative_flatness_col(
    model: nn.Module, data, *, loss_fn: LossFn | None = None, method: str = "auto"
) -> float:
    """Column relative flatness κ_col (METHODS.md §3.3), invariant to neuron-wise rescaling.

    .. math::
        κ_{col} = \\sum_{t,t'=1}^{m} ⟨w_{:t}, w_{:t'}⟩ \\sum_{s=1}^{d} H_{(s,t),(s,t')}
        \\;\\overset{CE}{=}\\; \\frac1N \\sum_i (1 − ‖p_i‖^2)\\, ‖W φ_i‖^2

    over the columns w_{:t} = W[:, t], mean loss, no 1/m, bias not included. The CE form depends
    on the data only through the logits, hence its invariance to any rescaling of the features.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2, bias=False).double()
    >>> _ = torch.nn.init.eye_(net.weight)
    >>> X = torch.tensor([[1.0, 1.0]], dtype=torch.float64); y = torch.tensor([0])
    >>> relative_flatness_col(net, (X, y))  # (1 − ½) · ‖(1, 1)‖²
    1.0
    """
    with eval_mode(model), torch.no_grad():
        head = _collect_head(model, data)
        route = _resolve_method(method, loss_fn, head.W.numel(), allow_hutchinson=False)
        if route == "closed_form":
            total = torch.zeros((), dtype=head.W.dtype, device=head.W.device)
            for b, phi in enumerate(head.phis):
                p, one_minus_p = _ce_probs(head, b)
                z = phi @ head.W.T  # (n_b, d)  W φ_i, bias excluded
                trace_a = (p * one_minus_p).sum(1)  # tr A_i = 1 − ‖p_i‖²
                total = total + (trace_a * (z * z).sum(1)).sum()
            kappa = total / head.num_samples
        else:
            H = _layer_hessian(head, loss_fn)
            kappa = torch.einsum("tv,stsv->", head.W.T @ head.W, H)
        return _finish(kappa, "κ_col")


def rho_sigma(
    model: nn.Module, data, *, loss_fn: LossFn | None = None, method: str = "auto"
) -> float:
    """ρ_σ, the column precursor of relative flatness (Petzka et al. 2020 code; METHODS.md §3.3).

    .. math::
        ρ_σ = \\sum_{t=1}^{m} w_{:t}^⊤ H_{tt}\\, w_{:t}, \\quad H_{tt}[s,u] = H[s,t,u,t]
        \\;\\overset{CE}{=}\\; \\frac1N \\sum_i \\sum_t φ_{it}^2
        \\big(\\sum_s p_{is} W_{st}^2 − (p_i^⊤ W)_t^2\\big)

    Mean loss, no 1/m, bias not included; invariant to neuron-wise rescaling (φ_t² W_{st}² is).

    >>> import torch
    >>> net = torch.nn.Linear(2, 2, bias=False).double()
    >>> _ = torch.nn.init.eye_(net.weight)
    >>> X = torch.tensor([[1.0, 1.0]], dtype=torch.float64); y = torch.tensor([0])
    >>> rho_sigma(net, (X, y))  # 2 columns · (½ − ¼)
    0.5
    """
    with eval_mode(model), torch.no_grad():
        head = _collect_head(model, data)
        W = head.W
        route = _resolve_method(method, loss_fn, W.numel(), allow_hutchinson=False)
        if route == "closed_form":
            total = torch.zeros((), dtype=W.dtype, device=W.device)
            for b, phi in enumerate(head.phis):
                p, _ = _ce_probs(head, b)
                # w_{:t}ᵀ A_i w_{:t} = Σ_c p_ic (W_ct − (Wᵀp_i)_t)², a variance: written as a sum
                # of squares, not E[W²] − E[W]², which cancels when p_i is almost one-hot.
                centred = W[None] - (p @ W)[:, None, :]  # (n_b, d, m)
                col_var = torch.einsum("ic,ict->it", p, centred * centred)  # (n_b, m)
                total = total + (phi * phi * col_var).sum()
            rho = total / head.num_samples
        else:
            H = _layer_hessian(head, loss_fn)
            rho = torch.einsum("st,stut,ut->", W, H, W)
        return _finish(rho, "ρ_σ")
