"""Norm-based baselines of Jiang et al. (ICLR 2020, "Fantastic generalization measures").

Pure functions of the weights: ``data`` is accepted (the measure contract) and unused, except that
:func:`path_norm` reads the shape of one input from it. "The weights" are the ``weight`` tensors of
the ``nn.Linear``/``nn.Conv*d`` layers (:func:`flatness.reparam.weight_layers`): biases only where
an option says so, normalisation layers' affine γ, β never. The Dziugaite et al. port of Jiang's
measures (nitarshan/robust-generalization-measures, ``measures.py``) uses the same set [code]; it
also folds BatchNorm into the convs first, which these functions do not (on a BN net the scale of a
pre-BN weight is free, so its norms mean little there).

Under the rescalings of :mod:`flatness.reparam`: :func:`path_norm` is invariant to layer-wise and
neuron-wise ones, :func:`spectral_norm_product` to layer-wise ones (Dinh's T_α included) only, and
:func:`weight_norm` and :func:`distance_from_init` to none.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flatness.batches import Batches, check_finite, eval_mode, model_device_dtype
from flatness.reparam import _NORMS, HOMOGENEOUS, WeightLayer, weight_layers


def _weights(model: nn.Module) -> list[Tensor]:
    layers = weight_layers(model)
    if not layers:
        raise ValueError("model has no Linear/Conv layer, so it has no weights to take norms of")
    return [m.weight.detach() for m in layers]


def weight_norm(model: nn.Module, data=None, *, include_bias: bool = False) -> float:
    """Σ_l ‖W_l‖_F² over the Linear/Conv weights (the port's ``PARAM_NORM``, Jiang's Frobenius).

    Biases are **not** counted by default (Petzka et al.'s ‖fc‖_F², the port's weight set);
    ``include_bias=True`` adds Σ_l ‖b_l‖². BatchNorm's γ, β never count. Not invariant: the
    layer-wise rescaling W_l → a_l W_l gives Σ a_l²‖W_l‖², Dinh's T_α on layers (k, k+1) gives
    ‖W_k‖²/α² + α²‖W_{k+1}‖² + the rest.
    """
    with torch.no_grad():
        tensors = _weights(model)
        if include_bias:
            tensors += [m.bias.detach() for m in weight_layers(model) if m.bias is not None]
        total = sum((t * t).sum() for t in tensors)
    check_finite(total, "weight norm")
    return float(total)


def distance_from_init(
    model: nn.Module, data=None, *, init_model: nn.Module | None = None
) -> float:
    """‖θ − θ₀‖₂ over the Linear/Conv weights (Jiang's distance from initialisation; the port's
    ``L2_DIST``, not squared), θ₀ the same weights of ``init_model`` (moved to the model's device
    and dtype). Biases and BatchNorm parameters are excluded, as in :func:`weight_norm`.

    The workflow passes the run's own initialisation (:func:`flatness.train.initial_model`),
    unrescaled on every copy: a rescaled copy moves θ but not θ₀, so the measure is not invariant
    to any rescaling (a layer-wise copy gives (Σ_l ‖a_l W_l − W⁰_l‖²)^½).
    """
    if init_model is None:
        raise ValueError(
            "distance_from_init needs init_model (the run's initial weights); the measure stage "
            "rebuilds it from the run's metrics.json provenance"
        )
    with torch.no_grad():
        W, W0 = _weights(model), _weights(init_model)
        if [w.shape for w in W] != [w.shape for w in W0]:
            raise ValueError(
                f"init_model's weight shapes {[tuple(w.shape) for w in W0]} differ from the "
                f"model's {[tuple(w.shape) for w in W]}: not the same architecture"
            )
        total = sum(((w - w0.to(w)) ** 2).sum() for w, w0 in zip(W, W0, strict=True))
        value = total.sqrt()
    check_finite(value, "distance from initialisation")
    return float(value)


def spectral_norm_product(model: nn.Module, data=None) -> float:
    """∏_l ‖W_l‖₂ over the Linear/Conv weights, biases not involved.

    A conv weight (out, in, k, k) is taken as the (out, in·k·k) matrix, as the port does, not as
    the convolution operator (whose norm depends on the input size, Sedghi et al. 2019). The
    port's ``LOG_PROD_OF_SPEC`` is log ∏‖W_l‖₂², i.e. 2·log of this value [code]; the product
    itself is returned because the analysis takes copy/original ratios and log-scale axes, which
    a log (possibly ≤ 0) would break. Each ‖W_l‖₂ (``torch.linalg.matrix_norm(ord=2)``) is taken
    in the model's dtype, the product in float64, so a deep float32 net does not overflow at
    3.4e38; a product outside float64's range raises ``ValueError``.
    Invariant to layer-wise rescaling (∏ a_l = 1), not to neuron-wise rescaling.
    """
    with torch.no_grad():
        norms = [
            torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2) for w in _weights(model)
        ]
    for n in norms:
        check_finite(n, "spectral norm of a weight")
    sigmas = [float(n) for n in norms]
    value = math.prod(sigmas)
    if min(sigmas) > 0 and not 0.0 < value < math.inf:  # a zero layer gives a true 0
        logs = sum(math.log(s) for s in sigmas)
        raise ValueError(f"the spectral norm product is outside float64's range (log = {logs})")
    return value


def _check_path_net(model: nn.Module) -> None:
    norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _NORMS)})
    if norms:
        raise ValueError(
            f"path_norm: the model has normalisation layers ({', '.join(norms)}); squaring the "
            "parameters and forwarding ones does not sum paths through them (their running "
            "statistics are not weights). Fold BatchNorm first (flatness.reparam.fold_batchnorm)"
        )
    custom = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if next(m.children(), None) is not None and not isinstance(m, nn.Sequential)
        }
    )
    if custom:
        raise ValueError(
            f"path_norm: the model has containers with their own forward ({', '.join(custom)}), "
            "whose operations cannot be checked; it needs an nn.Sequential chain"
        )
    for name, m in model.named_modules():
        if next(m.children(), None) is not None or isinstance(m, WeightLayer):
            continue
        base = next((b for b in HOMOGENEOUS if isinstance(m, b)), None)
        if base is None or type(m).forward is not base.forward:
            raise ValueError(
                f"path_norm: module {name!r} ({type(m).__name__}) is not one of the positively "
                "homogeneous maps (ReLU, pooling, flatten, dropout, ...) a path sum passes through"
            )


def path_norm(model: nn.Module, data) -> float:
    """Neyshabur et al.'s path-ℓ2 norm, (f_{θ²}(1))^½ as Jiang et al. define it.

    Square every weight **and bias** of the Linear/Conv layers, forward one all-ones input of the
    data's sample shape in ``eval()`` mode, sum the outputs, take the square root (the port's
    ``PATH_NORM`` is the sum before the root). On ReLU chains this is the sum over all input→output
    paths (bias units as inputs fixed at 1) of the product of squared weights, since every
    pre-activation of the squared net is ≥ 0; a max-pool takes the largest unit instead of summing
    paths (Jiang's definition, kept). Invariant to layer-wise and neuron-wise rescaling.
    Refuses (``ValueError``) normalisation layers, containers with their own forward and
    non-homogeneous modules (Tanh, ...): through them f_{θ²}(1) is no path sum.
    """
    _check_path_net(model)
    X, _ = next(iter(Batches(data)))  # only the sample shape; no copy to the device
    device, dtype = model_device_dtype(model)
    ones = torch.ones((1, *X.shape[1:]), dtype=dtype, device=device)
    squared = {}
    for name, m in model.named_modules():
        if isinstance(m, WeightLayer):
            for p in ("weight", "bias"):
                if getattr(m, p) is not None:
                    squared[f"{name}.{p}" if name else p] = getattr(m, p).detach() ** 2
    with eval_mode(model), torch.no_grad():
        total = torch.func.functional_call(model, squared, (ones,)).sum()
    check_finite(total, "path norm")
    return float(total.sqrt())
