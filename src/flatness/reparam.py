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

The chain is found in one of two ways. A model whose containers are all plain ``nn.Sequential``
(the nets of :mod:`flatness.models`) is read in ``modules()`` order, as above. Any other model (a
class with its own ``forward``, functional ``F.relu``, nested blocks, an ``nn.ModuleList``
iterated in ``forward``) is traced with ``torch.fx`` and its chain read from the graph: the
Linear/Conv calls must form one unbranched path whose every value between two weight layers
feeds only the next step (shape queries such as ``x.size(0)`` aside), through the allowlisted
modules and the functions of :data:`HOMOGENEOUS_FUNCTIONS` / :data:`HOMOGENEOUS_METHODS`
(``F.relu``, ``torch.relu``, ``Tensor.relu``, ``F.leaky_relu``, ``F.prelu``, functional max-/avg-
pooling and dropout, ``torch.flatten``, ``Tensor.view/reshape/flatten``). Refused with a
``ValueError`` naming the graph node and its module path or function: any other op between weight
layers (Tanh, GELU, ELU, softmax, a functional normalisation, ...); **every op that merges the
chain with another value, residual additions included** (this version refuses them all, even
where both branches would be rescaled alike); a branch (a value between weight layers used twice);
a weight layer called twice, or whose parameters are read or shared elsewhere (tied weights); a
weight layer registered but not called; layers registered in another order than ``forward`` calls
them (the indices would be ambiguous); and a model that fx cannot trace (data-dependent control
flow such as ``if x.sum() > 0:``), which gets the tracer's reason, not a guess. Neuron-wise
rescaling also needs to know which inputs of the next layer each unit feeds: through elementwise
maps, spatial pooling of a conv's output and a flatten from dim 1 (``torch.flatten(x, 1)``,
``nn.Flatten()``, ``x.view(x.size(0), -1)``: each channel owns its block of flattened features),
not through other reshapes, which are refused for it (layer-wise and Dinh α still apply).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

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
    """The linear and convolutional layers of ``model`` in ``modules()`` order.

    The rescalings index their layers (``layer=``, one factor each) in this order; on every model
    they accept it is also the order ``forward`` calls them (a traced model whose registration
    order differs is refused)."""
    return [m for m in model.modules() if isinstance(m, WeightLayer)]


def weight_layer(model: nn.Module, layer: int) -> tuple[int, str, nn.Module]:
    """Weight layer ``layer`` of :func:`weight_layers` (negative counts from the end) as
    ``(index ≥ 0, module path, module)``; the per-layer options of the measures (``layer=``)
    resolve their index here.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> weight_layer(net, -1)[:2]
    (1, '2')
    """
    try:
        if isinstance(layer, bool):
            raise TypeError
        index = operator.index(layer)
    except TypeError:
        raise ValueError(
            f"layer must be an integer index into weight_layers(model), got {layer!r}"
        ) from None
    layers = weight_layers(model)
    if not -len(layers) <= index < len(layers):
        raise ValueError(
            f"layer {index} is out of range: the model has {len(layers)} weight layers"
        )
    module = layers[index]
    name = next(n for n, m in model.named_modules() if m is module)
    return index % len(layers), name, module


class _Chain(NamedTuple):
    """The rescaled weight layers in execution order, and per gap k (layer k → k+1) why a
    neuron-wise rescaling of layer k cannot tell which inputs of layer k+1 its units feed
    (``None``: the channel/unit ↔ column-block map of :func:`_outgoing_view` holds)."""

    layers: list[nn.Module]
    unit_issues: list[str | None]


def _chain(model: nn.Module) -> _Chain:
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, _NORMS)]
    if norms:
        raise ValueError(
            f"model has normalisation layers ({', '.join(sorted(set(norms)))}), which break the ReLU "
            "rescaling symmetry; fold BatchNorm first (flatness.reparam.fold_batchnorm)"
        )
    # Plain nn.Sequential containers run their children in modules() order; any other container
    # (a class with its own forward, a ModuleList, a Sequential subclass overriding forward) may
    # branch or apply functional ops, so its chain is read from its torch.fx graph.
    plain = all(
        type(m).forward is nn.Sequential.forward
        for m in model.modules()
        if next(m.children(), None) is not None
    )
    if not plain:
        return _traced_chain(model)
    layers = _sequential_chain(model)
    return _Chain(layers, [None] * (len(layers) - 1))


def _chain_layers(model: nn.Module) -> list[nn.Module]:
    return _chain(model).layers


def _sequential_chain(model: nn.Module) -> list[nn.Module]:
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
    if len(ids) != len(layers):  # one instance at two places: one rescaling applied twice
        names = [n for n, m in leaves if isinstance(m, WeightLayer)]
        raise ValueError(
            f"the chain runs {len(ids)} weight layers ({', '.join(map(repr, names))}) but only "
            f"{len(layers)} distinct ones: a layer used twice (shared weights) would be rescaled "
            "once for every use"
        )
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


# ---------------------------------------------------------------------------------------------
# Chains read from the torch.fx graph (models with their own forward)

# How an allowed op treats units: elementwise (σ(λz) = λσ(z) per element), spatial pooling (per
# channel of a conv's output of the same dimensionality), a flatten from dim 1 keeping dim 0
# (channel c → a contiguous block of features), any other reshape (only a uniform scale is known
# to pass through it).
_ELEMENTWISE, _POOL, _FLATTEN, _RESHAPE = "elementwise", "pool", "flatten", "reshape"


def _functions(kind: str, *names: str, dims: int = 0) -> dict[Callable, tuple[str, int]]:
    found = {}
    for name in names:
        mod, _, attr = name.rpartition(".")
        f = getattr({"F": F, "torch": torch}[mod], attr, None)
        if f is not None:  # versions differ (F.dropout1d is recent)
            found[f] = (kind, dims)
    return found


#: ``call_function`` targets allowed between weight layers in a traced model: their kind, and
#: the spatial dimensionality of a pooling.
HOMOGENEOUS_FUNCTIONS: dict[Callable, tuple[str, int]] = {
    **_functions(
        _ELEMENTWISE,
        *("F.relu", "F.relu_", "torch.relu", "torch.relu_", "F.leaky_relu", "F.leaky_relu_"),
        *("F.prelu", "torch.prelu", "F.dropout", "F.dropout1d", "F.dropout2d", "F.dropout3d"),
        "torch.dropout",
    ),
    **{
        f: v
        for d in (1, 2, 3)
        for f, v in _functions(
            _POOL,
            *(f"F.max_pool{d}d", f"torch.max_pool{d}d", f"F.avg_pool{d}d", f"torch.avg_pool{d}d"),
            *(f"F.adaptive_max_pool{d}d", f"F.adaptive_avg_pool{d}d"),
            dims=d,
        ).items()
    },
    torch.flatten: (_FLATTEN, 0),
    torch.reshape: (_RESHAPE, 0),
}
#: ``call_method`` names (``Tensor.relu`` ...) allowed between weight layers in a traced model.
HOMOGENEOUS_METHODS: dict[str, str] = {
    "relu": _ELEMENTWISE,
    "relu_": _ELEMENTWISE,
    "contiguous": _ELEMENTWISE,
    "flatten": _FLATTEN,
    "view": _RESHAPE,
    "reshape": _RESHAPE,
}
_ALLOWED_FX = (
    "ReLU, LeakyReLU, PReLU as modules, F.relu, torch.relu, Tensor.relu, F.leaky_relu or F.prelu; "
    "max/avg pooling; flatten, view, reshape; identity; dropout"
)
_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _allowed_base(m: nn.Module) -> type | None:
    """The allowlisted type whose own forward ``m`` runs, else None."""
    base = next((b for b in (*WeightLayer, *HOMOGENEOUS) if isinstance(m, b)), None)
    return base if base is not None and type(m).forward is base.forward else None


class _Tracer(fx.Tracer):
    # Allowlisted modules (and subclasses that keep their forward, e.g. a Linear with a custom
    # init) are graph leaves; everything else, torch.nn modules aside, is traced into.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _allowed_base(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _function_name(target) -> str:
    name = getattr(target, "__name__", None)
    for prefix, namespace in (("torch.nn.functional", F), ("torch", torch), ("operator", operator)):
        if name and getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    try:
        return fx.node._get_qualified_name(target)
    except Exception:  # noqa: BLE001 - only for naming
        return repr(target)


def _describe(model: nn.Module, node: fx.Node) -> str:
    """'module 'blocks.1.act' (Tanh), graph node 'blocks_1_act'' or 'torch.tanh (graph node
    'tanh', in 'blocks.1' (Block))': the op, its node, and where it sits."""
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        return f"module {node.target!r} ({type(m).__name__}), graph node {node.name!r}"
    if node.op in ("placeholder", "output"):
        which = f"input {node.target!r}" if node.op == "placeholder" else "return value"
        return f"the {which} of {type(model).__name__}.forward"
    if node.op == "call_function":
        what = _function_name(node.target)
    elif node.op == "call_method":
        what = f"Tensor.{node.target}"
    else:
        what = f"{node.op} {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, owner = list(stack.items())[-1]
        cls = owner[-1] if isinstance(owner, tuple) else owner
        where = f"in {path!r} ({getattr(cls, '__name__', cls)})"
    else:
        where = f"in {type(model).__name__}.forward"
    return f"{what} (graph node {node.name!r}, {where})"


def _reads_metadata(user: fx.Node, value: fx.Node) -> bool:
    """``value.size(...)``, ``value.dim()``, ``value.shape``: reads that a scale cannot change."""
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_method":
        return user.target in ("size", "dim")
    return (
        user.op == "call_function"
        and user.target is getattr
        and user.args[1:2] in (("shape",), ("ndim",), ("dtype",), ("device",))
    )


def _is_shape(n) -> bool:
    """A non-tensor argument computed from shapes only (``x.size(0)``, ``x.shape[0] * 2``)."""
    if not isinstance(n, fx.Node):
        return True
    if n.op == "call_method" and n.target in ("size", "dim"):
        return True
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] in ("shape", "ndim")
    if n.op == "call_function" and n.target in (
        operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub
    ):  # fmt: skip
        return all(_is_shape(a) for a in n.all_input_nodes)
    return False


def _is_dim0(n, segment: set[fx.Node]) -> bool:
    """``t.size(0)`` / ``t.shape[0]`` / ``t.size()[0]`` of a tensor on this stretch of the chain or
    of an input: the batch size."""

    def source_ok(t) -> bool:
        return isinstance(t, fx.Node) and (t in segment or t.op == "placeholder")

    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_method" and n.target == "size":
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return dim == 0 and source_ok(n.args[0])
    if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
        s = n.args[0]
        if not isinstance(s, fx.Node) or not s.args:
            return False
        whole = (s.op == "call_method" and s.target == "size" and len(s.args) == 1) or (
            s.op == "call_function" and s.target is getattr and s.args[1] == "shape"
        )
        return whole and not s.kwargs and source_ok(s.args[0])
    return False


def _flattens_from_1(node: fx.Node, segment: set[fx.Node]) -> bool:
    """A flatten of every dim from 1 on, dim 0 kept: ``torch.flatten(x, 1)``, ``x.flatten(1)``,
    ``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``."""
    args, kwargs = node.args, node.kwargs
    if node.target is torch.flatten or node.target == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_function":  # torch.reshape(x, shape)
        sizes = args[1] if len(args) > 1 else kwargs.get("shape", ())
    else:
        sizes = args[1:] if len(args) > 1 else kwargs.get("shape", kwargs.get("size", ()))
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
    return len(sizes) == 2 and sizes[1] == -1 and _is_dim0(sizes[0], segment)


def _classify(
    model: nn.Module, node: fx.Node, value: fx.Node, gap: str, segment: set[fx.Node]
) -> tuple[str, int]:
    """(kind, pooling dims) of an op applied to the chain ``value``, a flatten or reshape
    classified as :data:`_FLATTEN` only where it provably flattens from dim 1 (batched inputs
    assumed); refuses anything else."""
    kind: tuple[str, int] | None = None
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        base = _allowed_base(m)
        if base is not None and base not in WeightLayer:
            name = base.__name__
            if "Pool" in name:
                kind = (_POOL, int(name[-2]))
            elif base is nn.Flatten:
                flat = m.start_dim == 1 and m.end_dim == -1
                kind = (_FLATTEN if flat else _RESHAPE, 0)
            elif base is nn.Unflatten:
                kind = (_RESHAPE, 0)
            else:
                kind = (_ELEMENTWISE, 0)
    elif node.op == "call_function":
        try:
            kind = HOMOGENEOUS_FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            kind = None
    elif node.op == "call_method" and node.target in HOMOGENEOUS_METHODS:
        kind = (HOMOGENEOUS_METHODS[node.target], 0)
    if node.op != "call_module" and kind is not None and kind[0] in (_FLATTEN, _RESHAPE):
        kind = (_FLATTEN if _flattens_from_1(node, segment) else _RESHAPE, 0)
    what = _describe(model, node)
    # Other tensor inputs cannot depend on the chain (every value on it has one user), so an
    # allowlisted op may take them (F.prelu's slopes); any other op taking one merges paths.
    others = [
        n
        for n in node.all_input_nodes
        if n is not value and n.op != "get_attr" and not _is_shape(n)
    ]
    if kind is None and others:
        raise ValueError(
            f"{what} sits between rescaled weight layers {gap} and combines the chain with "
            f"{', '.join(_describe(model, n) for n in others)}: a merge such as a residual "
            "addition x + f(x) (rescaling would scale one input and not the other), which this "
            "version refuses between weight layers, even where both branches would be rescaled "
            "alike"
        )
    if kind is None:
        raise ValueError(
            f"{what} sits between rescaled weight layers {gap} but is not positively homogeneous "
            "(σ(az) ≠ aσ(z)) or not known to be; rescaling across it would change the function "
            f"(allowed: {_ALLOWED_FX})"
        )
    if not node.args or node.args[0] is not value:
        raise ValueError(
            f"{what} sits between rescaled weight layers {gap} but takes the chain's value other "
            "than as its first argument, so it cannot be checked"
        )
    return kind


def _gap(
    model: nn.Module, start: fx.Node, stop: fx.Node, layers: dict[fx.Node, nn.Module]
) -> str | None:
    """Walk the path from weight layer ``start`` to ``stop``; refuse what breaks the symmetry and
    return why neuron-wise rescaling of ``start`` cannot map units (None if it can)."""
    first = layers[start]
    gap = f"{start.target!r} and {stop.target!r}"
    dims = next((d for c, d in _CONV_DIMS.items() if isinstance(first, c)), 0)
    state = "channels" if dims else "features"  # where start's units live: dim 1 / the last dim
    issue: str | None = None
    segment, value = {start}, start
    while True:
        users = [u for u in value.users if not _reads_metadata(u, value)]
        if len(users) != 1:
            if not users:
                raise ValueError(
                    f"the output of {_describe(model, value)} is not used, so weight layer "
                    f"{start.target!r} does not feed {stop.target!r}; the rescalings need the "
                    "weight layers to form one chain"
                )
            raise ValueError(
                f"the output of {_describe(model, value)} between rescaled weight layers {gap} "
                f"is used by {len(users)} nodes ({'; '.join(_describe(model, u) for u in users)}): "
                "the chain branches (e.g. a skip connection), and a rescaling would scale one "
                "branch's copy of it but not the other's"
            )
        node = users[0]
        if node is stop:
            if node.args != (value,) or node.kwargs:
                raise ValueError(f"weight layer {stop.target!r} is called with extra arguments")
            break
        if node.op == "output":
            raise ValueError(
                f"forward returns the output of {_describe(model, value)}, which lies between "
                f"rescaled weight layers {gap} and is rescaled with them"
            )
        if node in layers:
            raise ValueError(
                f"the path from weight layer {start.target!r} leads to weight layer "
                f"{node.target!r}, not to {stop.target!r} (the next one forward calls): the "
                "weight layers do not form one chain"
            )
        kind, pool_dims = _classify(model, node, value, gap, segment)
        if issue is None:
            what = _describe(model, node)
            if kind == _POOL and (state != "channels" or pool_dims != dims):
                issue = f"{what} pools across units (not over the spatial dims of a conv's output)"
            elif kind == _FLATTEN:
                if state == "features":  # on a Linear's (N, T, F) output it interleaves units
                    issue = f"{what} flattens the output of Linear {start.target!r}"
                else:
                    state = "blocks"  # channel c → a contiguous block of flattened features
            elif kind == _RESHAPE:
                issue = (
                    f"{what} reshapes the units in a way the rescalings do not follow (they "
                    "follow a conv's channels through a flatten from dim 1: torch.flatten(x, 1), "
                    "nn.Flatten(), x.view(x.size(0), -1))"
                )
        segment.add(node)
        value = node
    nxt = layers[stop]
    if issue is None and isinstance(nxt, nn.Linear) and state == "channels":
        issue = f"Linear {stop.target!r} takes a conv's output without a flatten (it mixes space)"
    if issue is None and not isinstance(nxt, nn.Linear) and state != "channels":
        issue = f"conv {stop.target!r} takes {state} of {start.target!r}, not its channels"
    return issue


def _traced_chain(model: nn.Module) -> _Chain:
    before = set(vars(model))
    try:  # the tracer stows constant tensors on the model; take them off again below
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any failure to trace is the reason reported
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}). "
            "A model with its own forward is rescaled along the chain read from its fx graph, so "
            "one fx cannot trace (Python control flow on tensor values such as `if x.sum() > 0:`, "
            "iterating over a tensor, non-torch code on tensors) is refused rather than guessed "
            "at; make forward traceable or write the net as an nn.Sequential chain"
        ) from err
    finally:
        for attr in set(vars(model)) - before:
            delattr(model, attr)
    nodes = list(graph.nodes)
    layers = {
        n: model.get_submodule(n.target)
        for n in nodes
        if n.op == "call_module" and isinstance(model.get_submodule(n.target), WeightLayer)
    }
    calls = list(layers)
    by_module: dict[int, list[fx.Node]] = {}
    for n in calls:
        by_module.setdefault(id(layers[n]), []).append(n)
    for uses in by_module.values():
        if len(uses) > 1:
            raise ValueError(
                f"weight layer {uses[0].target!r} ({type(layers[uses[0]]).__name__}) is called "
                f"{len(uses)} times in forward (graph nodes "
                f"{', '.join(repr(n.name) for n in uses)}): shared weights, which a rescaling would "
                "scale once for every use"
            )
    registered = [(n, m) for n, m in model.named_modules() if isinstance(m, WeightLayer)]
    missing = [n for n, m in registered if id(m) not in by_module]
    if missing:
        raise ValueError(
            f"weight layer(s) {', '.join(map(repr, missing))} are registered but not called as "
            f"modules in {type(model).__name__}.forward (a subclass with its own forward is traced "
            "into); the rescalings index weight_layers(model) and need each of them in the chain"
        )
    if len(calls) < 2:
        raise ValueError(f"a rescaling needs at least 2 weight layers, the model has {len(calls)}")
    if [id(layers[n]) for n in calls] != [id(m) for _, m in registered]:
        raise ValueError(
            f"forward calls the weight layers in the order {[n.target for n in calls]} but the "
            f"model registers them in the order {[n for n, _ in registered]} (weight_layers, "
            "whose indices the rescalings take); register them in the order forward calls them"
        )
    # Parameters of the chain read elsewhere (tied weights, F.linear(x, self.fc.weight)) would be
    # rescaled there too.
    params = {id(p): n.target for n in calls for p in layers[n].parameters()}
    for m in model.modules():
        if any(m is lay for lay in layers.values()):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in params:
                raise ValueError(
                    f"the parameter of weight layer {params[id(p)]!r} is shared with "
                    f"{type(m).__name__}.{pname} (tied weights), which a rescaling would change too"
                )
    for n in nodes:
        if n.op == "get_attr":
            obj = model
            for part in n.target.split("."):
                obj = getattr(obj, part, None)
            if id(obj) in params:
                raise ValueError(
                    f"forward reads {n.target!r} of weight layer {params[id(obj)]!r} directly "
                    f"({_describe(model, next(iter(n.users), n))}): tied or reused weights, which "
                    "a rescaling would change there too"
                )
    issues = [_gap(model, a, b, layers) for a, b in zip(calls, calls[1:], strict=False)]
    return _Chain([layers[n] for n in calls], issues)


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
    the last one). A conv's channel j feeds the next conv's input channel j, or, through a flatten
    from dim 1, the j-th contiguous block of the next Linear's inputs.

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(net(x), neuronwise_rescale(net, 0, [1.0, 2.0, 3.0, 0.5])(x)))
    True
    """
    new = copy.deepcopy(model)
    chain = _chain(new)
    layers = chain.layers
    idx = layer % len(layers)
    if idx == len(layers) - 1:
        raise ValueError(
            "neuron-wise rescaling needs a hidden layer; the last layer has no successor"
        )
    if chain.unit_issues[idx] is not None:
        raise ValueError(
            f"neuron-wise rescaling of weight layer {idx} needs to know which inputs of the next "
            f"one each of its units feeds, but {chain.unit_issues[idx]}; layer-wise and Dinh α "
            "rescaling still apply"
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
