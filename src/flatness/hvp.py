"""Hessian-vector products of the mean loss of a model, as a reusable linear operator.

.. math::
    H = \\nabla^2_\\theta L(\\theta), \\qquad L = \\frac{1}{N}\\sum_b n_b \\, \\ell_b

over all samples of ``data`` (batches weighted by size, METHODS.md §9; a sum-reduced ``loss_fn``
gives the sum over all samples instead, see :func:`flatness.batches.loss_term`), over all
parameters or a chosen subset. Two modes give the same numbers:

- **kept graph**: when the double-backward graph of all the data fits ``graph_budget_bytes``,
  the gradient is built once with ``create_graph=True`` and each HVP is one backward through it
  (``retain_graph=True``), ≈1.4–1.8× a gradient.
- **recompute**: otherwise each HVP redoes forward + double backward chunk by chunk, so memory
  stays at one chunk's graph, ≈2.2–3.2× a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flatness.batches import (
    DEFAULT_CHUNK,
    Batches,
    LossFn,
    default_loss,
    eval_mode,
    loss_reduction,
    loss_term,
)

#: Largest estimated size of the whole-data double-backward graph that the operator keeps alive.
DEFAULT_GRAPH_BUDGET = 1 << 30


class _grad_enabled:
    """Turn ``requires_grad`` on for the chosen tensors (and grad mode on); restore both after.

    A frozen model (``requires_grad=False``) can still be measured; the flags come back as found.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = params

    def __enter__(self) -> None:
        self._flags = [p.requires_grad for p in self.params]
        self._grad = torch.enable_grad()
        self._grad.__enter__()
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc) -> None:
        for p, f in zip(self.params, self._flags, strict=True):
            p.requires_grad_(f)
        self._grad.__exit__(*exc)


class HessianOperator:
    """H of the mean loss of ``model`` on ``data`` as a matrix-free, symmetric linear operator.

    ``params`` (default: every parameter of the model, in ``parameters()`` order) fixes the order
    of the flat vectors. The model runs in ``eval()`` (the caller's mode restored after each use),
    in its own dtype and device, and its parameters are never changed. The operator reflects the
    parameters at the time of each call: a kept graph is rebuilt if a parameter was modified.
    ``graph_budget_bytes=0`` forces the recompute mode.

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> mse = lambda out, y: ((out.squeeze(-1) - y) ** 2).mean()
    >>> op = HessianOperator(lin, (X, torch.zeros(2, dtype=torch.float64)), loss_fn=mse)
    >>> op.matvec(torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist()  # H = 2XᵀX/N
    [1.0, 4.0]
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        *,
        params: Sequence[Tensor] | None = None,
        loss_fn: LossFn | None = None,
        chunk_size: int | None = DEFAULT_CHUNK,
        graph_budget_bytes: int = DEFAULT_GRAPH_BUDGET,
    ) -> None:
        self.model = model
        loss_reduction(loss_fn)  # reject reduction="none" before any work
        self.loss_fn = loss_fn or default_loss
        self.batches = Batches.for_model(data, model, chunk_size=chunk_size)
        self.params = list(model.parameters()) if params is None else list(params)
        if not self.params:
            raise ValueError("no parameters to differentiate: the model has none or params=[]")
        for p in self.params:
            if not (isinstance(p, Tensor) and p.is_floating_point() and p.is_leaf):
                raise ValueError("params must be floating-point leaf tensors (model parameters)")
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        #: Number of parameters n; the operator is n × n.
        self.num_params = sum(self.numels)
        self.graph_budget_bytes = graph_budget_bytes
        self.num_matvecs = 0
        self._keep: bool | None = None
        self._graph: list[Tensor] | None = None  # gradient with its graph (kept mode)
        self._versions: list[int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    # -- mode selection ---------------------------------------------------------------------

    @property
    def keeps_graph(self) -> bool:
        """Whether the whole-data gradient graph is kept (decided on first use)."""
        if self._keep is None:
            self._keep = self.graph_budget_bytes > 0 and (
                self._estimate_graph_bytes() <= self.graph_budget_bytes
            )
        return self._keep

    def _estimate_graph_bytes(self) -> float:
        """Bytes saved for the double backward of the first chunk, scaled to all samples."""
        param_storages = {p.untyped_storage().data_ptr() for p in self.params}
        seen: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in param_storages:
                seen[s.data_ptr()] = s.nbytes()
            return t

        X, y = next(iter(self.batches))
        with eval_mode(self.model), _grad_enabled(self.params):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_term(self.loss_fn, self.model(X), y, self.batches.num_samples)
                torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return sum(seen.values()) * self.batches.num_samples / X.shape[0]

    # -- building blocks --------------------------------------------------------------------

    def _chunk_losses(self):
        """Each chunk's contribution to the data loss (:func:`flatness.batches.loss_term`)."""
        for X, y in self.batches:
            yield loss_term(self.loss_fn, self.model(X), y, self.batches.num_samples)

    def _chunk_terms(self, create_graph: bool = True):
        """Yield ``(loss term, its gradient)`` per chunk, with the graph when ``create_graph``."""
        for loss in self._chunk_losses():
            grads = torch.autograd.grad(
                loss,
                self.params,
                create_graph=create_graph,
                allow_unused=True,
                materialize_grads=True,
            )
            yield loss, grads
            del loss, grads  # drop this chunk's graph before the next forward

    def _hvp_of(self, grads: Sequence[Tensor], vs: Sequence[Tensor], retain: bool) -> list[Tensor]:
        terms = [(g * v).sum() for g, v in zip(grads, vs, strict=True) if g.requires_grad]
        if not terms:  # the gradient does not depend on the parameters: H = 0
            return [torch.zeros_like(p) for p in self.params]
        return list(
            torch.autograd.grad(
                torch.stack(terms).sum(),
                self.params,
                retain_graph=retain,
                allow_unused=True,
                materialize_grads=True,
            )
        )

    def _build_graph(self) -> None:
        total_loss, total = None, None
        for loss, grads in self._chunk_terms():
            total_loss = loss if total_loss is None else total_loss + loss
            total = (
                list(grads) if total is None else [a + b for a, b in zip(total, grads, strict=True)]
            )
        self._graph = total
        self._loss = float(total_loss.detach())
        self._versions = [p._version for p in self.params]

    def _kept_graph(self) -> list[Tensor]:
        if self._graph is None or self._versions != [p._version for p in self.params]:
            self._graph = None  # free the stale graph before building the new one
            self._build_graph()
        return self._graph

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector (the operator's ordering)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Split a flat vector into per-parameter views shaped like ``params``."""
        v = torch.as_tensor(v).to(device=self.device, dtype=self.dtype).reshape(-1)
        if v.numel() != self.num_params:
            raise ValueError(
                f"vector has {v.numel()} entries, the operator is {self.num_params}-dim"
            )
        return [c.view(s) for c, s in zip(v.split(self.numels), self.shapes, strict=True)]

    # -- public operations ------------------------------------------------------------------

    def matvec(self, v: Tensor) -> Tensor:
        """H·v for a flat vector ``v``; returns a flat vector in the model's dtype and device."""
        vs = self.unflatten(v)
        self.num_matvecs += 1
        with eval_mode(self.model), _grad_enabled(self.params):
            if self.keeps_graph:
                hv = self._hvp_of(self._kept_graph(), vs, retain=True)
            else:
                hv = None
                for _, grads in self._chunk_terms():
                    part = self._hvp_of(grads, vs, retain=False)
                    hv = part if hv is None else [a + b for a, b in zip(hv, part, strict=True)]
        return self.flatten(hv).detach()

    __matmul__ = matvec

    def gradient(self) -> Tensor:
        """∇L as a flat vector (mean loss over all samples)."""
        return self._gradient_and_loss()[0]

    def loss(self) -> float:
        """The mean loss L over all samples."""
        return self._gradient_and_loss()[1]

    def _gradient_and_loss(self) -> tuple[Tensor, float]:
        with eval_mode(self.model), _grad_enabled(self.params):
            if self.keeps_graph:
                graph = self._kept_graph()
                return self.flatten(graph).detach(), self._loss
            total, total_loss = None, 0.0
            for loss, g in self._chunk_terms(create_graph=False):
                total = list(g) if total is None else [a + b for a, b in zip(total, g, strict=True)]
                total_loss += float(loss.detach())
        return self.flatten(total).detach(), total_loss

    def as_linear_operator(self):
        """A scipy ``LinearOperator`` (float64 numpy in and out) applying H.

        Each call crosses numpy ↔ torch (and host ↔ device); ARPACK adds its own per-matvec cost.
        """
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            out = self.matvec(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).ravel()))
            return out.detach().to("cpu", torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)

    def close(self) -> None:
        """Free the kept graph."""
        self._graph = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
