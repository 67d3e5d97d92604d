"""Per-layer profiles: the layer-restricted measures on every weight layer, as one table.

The measures with a ``layer=`` option (an index into :func:`flatness.reparam.weight_layers`,
negative from the end) restrict themselves to one weight layer l:

- :func:`~flatness.measures.hessian_max_eigenvalue`, :func:`~flatness.measures.hessian_trace`:
  λ_max and Tr of the diagonal block H_ll = ∇²_{W_l} L (the whole network's mean loss, W_l the
  layer's weight, bias excluded);
- :func:`~flatness.measures.quotient_sharpness`: ‖W_l‖_F² λ_max(H_ll), the per-tensor metric on
  that block;
- :func:`~flatness.measures.relative_flatness`: κ^φ_Tr with φ = the input of layer l and W = W_l
  (``nn.Linear`` layers only).

:func:`layer_profile` runs them all and returns a ``pandas.DataFrame`` (it returns a table, not a
float, so it is not in ``MEASURES``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from flatness.measures.curvature import hessian_max_eigenvalue, hessian_trace, quotient_sharpness
from flatness.measures.relative import relative_flatness
from flatness.reparam import weight_layer, weight_layers

#: name → function of the measures that take ``layer=``; the default columns of a profile.
LAYER_MEASURES: dict[str, Callable] = {
    f.__name__: f
    for f in (hessian_max_eigenvalue, hessian_trace, quotient_sharpness, relative_flatness)
}

#: The columns of :func:`layer_profile`, in order.
PROFILE_COLUMNS = ("measure", "layer", "layer_name", "n_params", "value", "note")


def _not_applicable(fn: Callable, module: nn.Module) -> str | None:
    """Why ``fn`` has no value on ``module`` (a row with value NaN), or ``None``."""
    if fn is relative_flatness and not isinstance(module, nn.Linear):
        return f"relative flatness needs an nn.Linear layer, not {type(module).__name__}"
    return None


def layer_profile(
    model: nn.Module,
    data,
    measures: Sequence[str | Callable] = tuple(LAYER_MEASURES),
    layers: Iterable[int] | None = None,
    **options,
):
    """Every measure of ``measures`` on every weight layer of ``layers``, one row per pair.

    ``measures``: names from :data:`LAYER_MEASURES` or functions taking ``layer=``; ``layers``:
    indices into :func:`flatness.reparam.weight_layers` (negative from the end), default all of
    them. ``options`` go to each measure whose signature takes them (``loss_fn``, ``seed``,
    ``tol``, ``method``, ...); one that no chosen measure takes is a ``ValueError``, and so are
    ``layer``, ``params`` and ``return_stderr`` (a profile holds plain values).

    Returns a ``pandas.DataFrame`` with :data:`PROFILE_COLUMNS`: ``measure`` (the function
    name), ``layer`` (the index ≥ 0), ``layer_name`` (the module path in ``named_modules()``),
    ``n_params`` (the entries of the layer's weight, the dimension of H_ll), ``value`` (a
    float) and ``note``: empty, or why ``value`` is NaN (relative flatness of a convolution).
    Rows in ``measures`` order, then layer order. Each measure runs in ``eval()`` mode on
    ``data`` as it does alone, so a row equals the call ``fn(model, data, layer=l, **options)``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> table = layer_profile(net.double(), (X.double(), y), measures=["hessian_trace"])
    >>> table[["measure", "layer", "layer_name", "n_params"]].values.tolist()
    [['hessian_trace', 0, '0', 12], ['hessian_trace', 1, '2', 8]]
    """
    import pandas as pd

    fns: list[Callable] = []
    for m in measures:
        fn = LAYER_MEASURES.get(m) if isinstance(m, str) else m
        if fn is None:
            raise ValueError(f"unknown per-layer measure {m!r}; one of {sorted(LAYER_MEASURES)}")
        if "layer" not in inspect.signature(fn).parameters:
            raise ValueError(f"{getattr(fn, '__name__', fn)} takes no layer= option")
        fns.append(fn)
    for key in ("layer", "params", "return_stderr"):
        if key in options:
            raise ValueError(f"option {key!r} is set by layer_profile or not allowed in a profile")
    accepted = [set(inspect.signature(fn).parameters) for fn in fns]
    unused = [k for k in options if not any(k in a for a in accepted)]
    if unused:
        raise ValueError(f"no chosen measure takes the option(s) {unused}")
    n_layers = len(weight_layers(model))
    if n_layers == 0:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer")
    chosen = [weight_layer(model, i) for i in (range(n_layers) if layers is None else layers)]
    rows = []
    for fn, names in zip(fns, accepted, strict=True):
        kwargs = {k: v for k, v in options.items() if k in names}
        for idx, name, module in chosen:
            why = _not_applicable(fn, module)
            value = math.nan if why else float(fn(model, data, layer=idx, **kwargs))
            rows.append((fn.__name__, idx, name, module.weight.numel(), value, why or ""))
    return pd.DataFrame(rows, columns=list(PROFILE_COLUMNS))
