"""Function-preserving reparameterisations of ReLU networks (METHODS.md §1, §6).

Every map here is linear, θ' = Λθ with Λ positive diagonal, so L'(θ') = L(Λ⁻¹θ') and
H' = Λ⁻¹HΛ⁻¹ at every θ. They apply to feed-forward chains of ``nn.Linear``/``nn.Conv2d`` layers
joined by positively homogeneous maps, σ(az) = aσ(z) for a > 0: an allowlist
(:data:`HOMOGENEOUS`: ReLU, leaky ReLU and PReLU, max- and average-pooling, flatten, identity,
dropout, which is linear given its mask). Anything else between the first and the last weight
layer (Tanh, GELU, Sigmoid, Softplus, ELU, ReLU6, Hardtanh, an unknown module) is refused with
its name (so is a subclass of an allowed type with its own ``forward``), since rescaling across
it would silently change the function; what follows the last weight layer (a softmax) is
untouched by every map here. No normalisation layer (fold BatchNorm first with
:func:`fold_batchnorm`). Each function returns a new model and leaves its argument untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

WeightLayer = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


#: Modules that commute with a positive per-unit scale (σ(az) = aσ(z), a > 0), so they may sit
#: between rescaled weight layers. Leaky ReLU and PReLU, max(0, z) + s·min(0, z), are homogeneous
#: for any slope s (negative, learned, per channel: the scale is positive, so signs are kept);
#: pooling over space and flatten/unflatten act per unit or linearly; dropout multiplies by a mask
#: (1/(1-p) or 0) that does not depend on the input's scale. Everything else is refused.
HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The linear and convolutional layers of ``model`` in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, WeightLayer)]


def _chain_layers(model: nn.Module) -> list[nn.Module]:
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, _NORMS)]
    if norms:
        raise ValueError(
            f"model has normalisation layers ({', '.join(sorted(set(norms)))}), which break the ReLU "
            "rescaling symmetry; fold BatchNorm first (flatness.reparam.fold_batchnorm)"
        )
    # A container with its own forward (a ResNet block) may add skip connections, which these
    # maps do not preserve; BN folding removes the BN error but not the branch, so refuse here.
    custom = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if next(m.children(), None) is not None and not isinstance(m, nn.Sequential)
        }
    )
    if custom:
        raise ValueError(
            f"model has containers with their own forward ({', '.join(custom)}), which may "
            "branch (skip connections); the rescalings preserve the function only on "
            "nn.Sequential chains"
        )
    layers = weight_layers(model)
    if len(layers) < 2:
        raise ValueError(f"a rescaling needs at least 2 weight layers, the model has {len(layers)}")
    # In a Sequential chain, modules() order is execution order: check what lies between the
    # first and the last weight layer (before and after them, any map is left unchanged).
    # remove_duplicate=False: a module instance reused in the chain runs at every place it sits.
    leaves = [
        (n, m)
        for n, m in model.named_modules(remove_duplicate=False)
        if next(m.children(), None) is None
    ]
    ids = [i for i, (_, m) in enumerate(leaves) if isinstance(m, WeightLayer)]
    for name, m in leaves[ids[0] + 1 : ids[-1]]:
        base = next((b for b in (*WeightLayer, *HOMOGENEOUS) if isinstance(m, b)), None)
        if base is None:
            raise ValueError(
                f"module {name!r} ({type(m).__name__}) sits between rescaled weight layers but is "
                "not positively homogeneous (σ(az) ≠ aσ(z)); rescaling across it would change the "
                "function (allowed: ReLU, LeakyReLU, PReLU, pooling, flatten, identity, dropout)"
            )
        if type(m).forward is not base.forward:  # the allowlist vouches for base's forward only
            raise ValueError(
                f"module {name!r} ({type(m).__name__}) sits between rescaled weight layers and "
                f"subclasses {base.__name__} with its own forward, which need not be positively "
                "homogeneous (σ(az) = aσ(z)); rescaling across it could change the function"
            )
    return layers


@torch.no_grad()
def layerwise_rescale(model: nn.Module, factors: Sequence[float]) -> nn.Module:
    """W_l → a_l W_l, b_l → (∏_{k≤l} a_k) b_l, with ∏ a_l = 1 (one factor per weight layer).

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(net(x), layerwise_rescale(net, [4.0, 0.25])(x)))
    True
    """
    layers = _chain_layers(model)
    if len(factors) != len(layers):
        raise ValueError(f"need one factor per weight layer ({len(layers)}), got {len(factors)}")
    if any(a <= 0 for a in factors):
        raise ValueError(f"rescaling factors must be positive, got {list(factors)}")
    prod = float(torch.tensor([float(a) for a in factors], dtype=torch.float64).prod())
    if abs(prod - 1.0) > 1e-9:
        raise ValueError(
            f"layer-wise factors must multiply to 1 to preserve the function, got {prod}"
        )
    return _scale_layers(model, [float(a) for a in factors])


def random_layerwise_factors(
    n_layers: int, spread: float, generator: torch.Generator
) -> list[float]:
    """Random positive factors with ∏ = 1: log a_l uniform in [−log spread, log spread], centred."""
    logs = (torch.rand(n_layers, generator=generator, dtype=torch.float64) * 2 - 1) * torch.log(
        torch.tensor(float(spread), dtype=torch.float64)
    )
    logs = logs - logs.mean()
    return [float(v) for v in torch.exp(logs)]


def _outgoing_view(next_layer: nn.Module, n_units: int) -> torch.Tensor:
    """The next layer's weight viewed as (out, n_units, k): column block k per unit (k > 1 when a
    conv feeds a linear layer through a flatten)."""
    W = next_layer.weight
    in_dim = W.shape[1]
    if in_dim % n_units:
        raise ValueError(
            f"cannot match {n_units} units to the {in_dim} inputs of {type(next_layer).__name__}"
        )
    return W.view(W.shape[0], n_units, in_dim // n_units, *W.shape[2:])


@torch.no_grad()
def neuronwise_rescale(
    model: nn.Module, layer: int, scales: torch.Tensor | Sequence[float]
) -> nn.Module:
    """Hidden unit j of weight layer ``layer``: incoming row W_l[j] and b_l[j] × λ_j, outgoing
    column(s) W_{l+1}[:, j] ÷ λ_j. ``layer`` indexes :func:`weight_layers` (negative allowed, not
    the last one).

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(net(x), neuronwise_rescale(net, 0, [1.0, 2.0, 3.0, 0.5])(x)))
    True
    """
    new = copy.deepcopy(model)
    layers = _chain_layers(new)
    idx = layer % len(layers)
    if idx == len(layers) - 1:
        raise ValueError(
            "neuron-wise rescaling needs a hidden layer; the last layer has no successor"
        )
    cur, nxt = layers[idx], layers[idx + 1]
    lam = torch.as_tensor(scales, dtype=cur.weight.dtype, device=cur.weight.device).flatten()
    n_units = cur.weight.shape[0]
    if lam.numel() != n_units:
        raise ValueError(f"layer {layer} has {n_units} units, got {lam.numel()} scales")
    if (lam <= 0).any():
        raise ValueError("neuron-wise scales must be positive")
    shape_in = (n_units,) + (1,) * (cur.weight.dim() - 1)
    cur.weight.mul_(lam.view(shape_in))
    if cur.bias is not None:
        cur.bias.mul_(lam)
    out = _outgoing_view(nxt, n_units)
    out.div_(lam.view((1, n_units) + (1,) * (out.dim() - 2)))
    return new


@torch.no_grad()
def dinh_alpha_rescale(model: nn.Module, alpha: float, layer: int = -2) -> nn.Module:
    """Dinh et al. (2017) T_α: weight layer ``layer`` (W, b) ÷ α, the next layer's W × α.

    The Hessian block of ``layer``'s weight grows by α², so the Euclidean λ_max grows like α²
    while the function (and every invariant measure) stays put (METHODS.md §6).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    n = len(_chain_layers(model))
    idx = layer % n
    if idx == n - 1:
        raise ValueError("the α-scale needs a successor layer; pick layer < the last one")
    factors = [1.0] * n
    factors[idx], factors[idx + 1] = 1.0 / alpha, float(alpha)
    return _scale_layers(model, factors)


@torch.no_grad()
def _scale_layers(model: nn.Module, factors: Sequence[float]) -> nn.Module:
    # Like layerwise_rescale, but without re-checking ∏ = 1 (α·1/α is not exactly 1 in floating point).
    new = copy.deepcopy(model)
    cumulative = 1.0
    for lay, a in zip(_chain_layers(new), factors, strict=True):
        cumulative *= a
        lay.weight.mul_(a)
        if lay.bias is not None:
            lay.bias.mul_(cumulative)
    return new


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the Linear/Conv layer before it; BN → ``nn.Identity``.

    .. math::
        s = γ / \\sqrt{\\mathrm{var} + ε},\\quad W' = \\operatorname{diag}(s)\\,W,
        \\quad b' = s ⊙ (b − μ) + β

    so W'x + b' equals BN(Wx + b) with BN's running statistics (its ``eval()`` function; in train
    mode BN uses batch statistics, which no fixed layer reproduces). "Before it" means the leaf
    module just before the BN in ``model.modules()`` order, which must be a Linear/Conv layer with
    as many outputs as the BN has features: that is how ``nn.Sequential`` nets and torchvision's
    ResNet/VGG register them (conv, then its BN). A module in between (conv-ReLU-BN) is refused;
    an activation applied functionally in ``forward`` cannot be seen, so pre-activation designs
    are not supported. Layers without a bias get one. Returns a new model, in the argument's mode.

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    >>> net = net.double().eval()
    >>> net[1].running_mean.fill_(0.5); net[1].running_var.fill_(2.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> folded = fold_batchnorm(net)
    >>> type(folded[1]).__name__, bool(torch.allclose(net(x), folded(x)))
    ('Identity', True)
    """
    new = copy.deepcopy(model)
    previous: tuple[str, nn.Module] | None = None  # the last leaf module seen, in modules() order
    folds: list[tuple[str, nn.Module, nn.Module]] = []
    for name, m in new.named_modules():
        if next(m.children(), None) is not None:
            continue  # containers do not sit between a layer and its BN
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if previous is None or not isinstance(previous[1], WeightLayer):
                after = f"follows {previous[0]!r}" if previous else "comes first"
                raise ValueError(
                    f"BatchNorm {name!r} {after}, not a Linear/Conv layer; only a BN applied "
                    "directly to a layer's output can be folded into it"
                )
            if not m.track_running_stats or m.running_mean is None:
                raise ValueError(
                    f"BatchNorm {name!r} keeps no running statistics, so its eval() output depends "
                    "on the batch and cannot be folded into a fixed layer"
                )
            layer = previous[1]
            if layer.weight.shape[0] != m.num_features:
                raise ValueError(
                    f"BatchNorm {name!r} has {m.num_features} features but the layer before it "
                    f"({previous[0]!r}) has {layer.weight.shape[0]} outputs; cannot fold"
                )
            folds.append((name, m, layer))
        previous = (name, m)
    for name, bn, layer in folds:
        W = layer.weight
        scale = torch.rsqrt(bn.running_var.to(W.dtype) + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.to(W.dtype)
        bias = layer.bias if layer.bias is not None else W.new_zeros(W.shape[0])
        new_bias = (bias - bn.running_mean.to(W.dtype)) * scale
        if bn.affine:
            new_bias = new_bias + bn.bias.to(W.dtype)
        W.mul_(scale.view((-1,) + (1,) * (W.dim() - 1)))
        if layer.bias is not None:
            layer.bias.copy_(new_bias)
        else:
            layer.bias = nn.Parameter(new_bias.clone(), requires_grad=W.requires_grad)
        _set_submodule(new, name, nn.Identity())
    return new
