"""Loss along lines and planes in parameter space, for plots (Keskar et al. 2017; Li et al. 2018).

- :func:`interpolate_loss`: Keskar's 1-D parametric plot, the loss at (1 − α)θ_a + αθ_b.
- :func:`random_direction`: a Gaussian direction, filter-normalised as in Li et al. (NeurIPS 2018).
- :func:`loss_slice_1d`, :func:`loss_surface_2d`: the loss at θ + αd₁ (+ βd₂).
- :func:`evaluate_at`: the mean loss and accuracy of a model evaluated at other parameters, the
  one primitive the slices (and the PAC-Bayes and Keskar measures) are built on.

Every function is pure: the model is evaluated through ``torch.func.functional_call`` with the
displaced parameters, in ``eval()`` (the caller's mode restored), in its dtype and on its device,
and its own parameters are never written. Loss = mean over all samples (``loss_fn`` per batch,
weighted by batch size), default cross-entropy. Tables come back in long format (pandas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatness.batches import Batches, LossFn, check_finite, default_loss, eval_mode, loss_term

Direction = Mapping[str, Tensor] | Sequence[Tensor]


def _as_batches(data, model: nn.Module) -> Batches:
    return data if isinstance(data, Batches) else Batches.for_model(data, model)


@torch.no_grad()
def evaluate_at(
    model: nn.Module,
    data,
    params: Mapping[str, Tensor] | None = None,
    *,
    loss_fn: LossFn | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` run with ``params`` in place of its own parameters.

    ``params`` maps ``named_parameters()`` (and optionally buffer) names to tensors; names not
    given keep the model's values; ``None`` evaluates the model as it is. Accuracy is the share of
    samples whose argmax logit equals the integer label; it is NaN when the labels are not
    class indices (e.g. a regression target).

    >>> import torch
    >>> net = nn.Linear(2, 2, bias=False)
    >>> X, y = torch.eye(2), torch.tensor([0, 0])
    >>> evaluate_at(net, (X, y), {"weight": torch.eye(2)})[1]
    0.5
    """
    batches = _as_batches(data, model)
    loss_fn = loss_fn or default_loss
    params = dict(params or {})
    total = torch.zeros((), dtype=torch.float64)
    correct, classify = 0, True
    with eval_mode(model):
        for X, y in batches:
            out = functional_call(model, params, (X,)) if params else model(X)
            total += float(loss_term(loss_fn, out, y, batches.num_samples, check=False))
            if classify and out.dim() == 2 and not y.is_floating_point() and y.dim() == 1:
                correct += int((out.argmax(dim=1) == y).sum())
            else:
                classify = False
    check_finite(total, "loss")
    return float(total), (correct / batches.num_samples if classify else float("nan"))


def _named(model: nn.Module, buffers: bool = False) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if buffers:
        named.update((k, b) for k, b in model.named_buffers() if b.is_floating_point())
    return {k: v.detach() for k, v in named.items()}


def _direction_dict(model: nn.Module, direction: Direction, what: str) -> dict[str, Tensor]:
    params = _named(model)
    if isinstance(direction, Mapping):
        d = dict(direction)
        if set(d) != set(params):
            missing, extra = sorted(set(params) - set(d)), sorted(set(d) - set(params))
            raise ValueError(
                f"{what} must name every parameter of the model; missing {missing}, unknown {extra}"
            )
    else:
        d_list = list(direction)
        if len(d_list) != len(params):
            raise ValueError(
                f"{what} has {len(d_list)} tensors but the model has {len(params)} parameters"
            )
        d = dict(zip(params, d_list, strict=True))
    for k, p in params.items():
        if d[k].shape != p.shape:
            raise ValueError(
                f"{what}[{k!r}] has shape {tuple(d[k].shape)}, parameter {tuple(p.shape)}"
            )
        d[k] = d[k].to(device=p.device, dtype=p.dtype)
    return d


def _rows(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame.from_records(records)


def interpolate_loss(
    model_a: nn.Module,
    model_b: nn.Module,
    data,
    alphas: Sequence[float],
    *,
    loss_fn: LossFn | None = None,
) -> pd.DataFrame:
    """Keskar et al. (ICLR 2017) 1-D parametric plot: loss and accuracy at (1 − α)θ_a + αθ_b.

    .. math:: θ(α) = (1 − α)\\,θ_a + α\\,θ_b

    written this way (not θ_a + α(θ_b − θ_a)) so that α = 0 and α = 1 reproduce θ_a and θ_b
    exactly. Floating buffers (BatchNorm running statistics) are interpolated the same way; the
    models must share their architecture. Keskar used α ∈ [−1, 2] at 25 points with θ_a the
    small-batch and θ_b the large-batch minimum. Returns a DataFrame ``alpha, loss, accuracy``.

    >>> import torch
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> data = (torch.randn(8, 2), torch.randint(0, 2, (8,)))
    >>> list(interpolate_loss(a, b, data, [0.0, 0.5, 1.0]).columns)
    ['alpha', 'loss', 'accuracy']
    """
    batches = _as_batches(data, model_a)
    ta, tb = _named(model_a, buffers=True), _named(model_b, buffers=True)
    if set(ta) != set(tb) or any(ta[k].shape != tb[k].shape for k in ta):
        raise ValueError("model_a and model_b must have the same parameter names and shapes")
    tb = {k: v.to(device=ta[k].device, dtype=ta[k].dtype) for k, v in tb.items()}
    records = []
    for alpha in alphas:
        a = float(alpha)
        point = {k: (1 - a) * ta[k] + a * tb[k] for k in ta}
        loss, acc = evaluate_at(model_a, batches, point, loss_fn=loss_fn)
        records.append({"alpha": a, "loss": loss, "accuracy": acc})
    return _rows(records)


@torch.no_grad()
def random_direction(
    model: nn.Module,
    generator: torch.Generator,
    filter_normalized: bool = True,
    *,
    one_dim: str = "zero",
) -> dict[str, Tensor]:
    """A Gaussian direction in parameter space; filter-normalised as in Li et al. (NeurIPS 2018).

    .. math:: d_{T,f} ← \\frac{d_{T,f}}{‖d_{T,f}‖}\\,‖θ_{T,f}‖

    for every filter f (slice along dim 0: a conv output channel, a row of a linear weight) of
    every parameter T with ≥ 2 dimensions. ``one_dim`` sets 1-D parameters (biases, BN scales):
    ``"zero"`` (Li et al.'s ``ignore='biasbn'``, the default) or ``"weight"`` (d = θ, their
    other mode). Draws come from ``generator`` in the model's dtype, then move to its device.
    Returns a dict in ``named_parameters()`` order.

    >>> import torch
    >>> net = nn.Linear(3, 2)
    >>> d = random_direction(net, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(d["weight"].norm(dim=1), net.weight.norm(dim=1)))
    True
    >>> float(d["bias"].abs().sum())
    0.0
    """
    if one_dim not in ("zero", "weight"):
        raise ValueError(f"one_dim must be 'zero' or 'weight', got {one_dim!r}")
    out = {}
    for name, p in _named(model).items():
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p) if one_dim == "zero" else p.clone()
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device)
        d = d.to(p.device)
        if filter_normalized:
            view = (-1,) + (1,) * (p.dim() - 1)
            d_norm = d.flatten(1).norm(dim=1).view(view)
            d = d / d_norm * p.flatten(1).norm(dim=1).view(view)
        out[name] = d
    return out


def loss_slice_1d(
    model: nn.Module,
    data,
    direction: Direction,
    alphas: Sequence[float],
    *,
    loss_fn: LossFn | None = None,
) -> pd.DataFrame:
    """Loss and accuracy along a line, θ + αd (Li et al. 2018, Fig. 1 style).

    ``direction`` is a dict keyed by parameter name (as :func:`random_direction` returns) or a
    list in ``parameters()`` order. Returns a DataFrame ``alpha, loss, accuracy``.
    """
    batches = _as_batches(data, model)
    theta, d = _named(model), _direction_dict(model, direction, "direction")
    records = []
    for alpha in alphas:
        point = {k: theta[k] + float(alpha) * d[k] for k in theta}
        loss, acc = evaluate_at(model, batches, point, loss_fn=loss_fn)
        records.append({"alpha": float(alpha), "loss": loss, "accuracy": acc})
    return _rows(records)


def loss_surface_2d(
    model: nn.Module,
    data,
    d1: Direction,
    d2: Direction,
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    loss_fn: LossFn | None = None,
) -> pd.DataFrame:
    """Loss and accuracy on a plane, θ + αd₁ + βd₂ (Li et al. 2018 contour plots).

    Returns a long DataFrame ``alpha, beta, loss, accuracy`` with ``len(alphas)·len(betas)`` rows,
    α-major; ``df.pivot(index="alpha", columns="beta", values="loss")`` is the grid.
    """
    batches = _as_batches(data, model)
    theta = _named(model)
    u, v = _direction_dict(model, d1, "d1"), _direction_dict(model, d2, "d2")
    records = []
    for alpha in alphas:
        for beta in betas:
            a, b = float(alpha), float(beta)
            point = {k: theta[k] + a * u[k] + b * v[k] for k in theta}
            loss, acc = evaluate_at(model, batches, point, loss_fn=loss_fn)
            records.append({"alpha": a, "beta": b, "loss": loss, "accuracy": acc})
    return _rows(records)
