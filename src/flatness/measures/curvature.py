"""Hessian-based sharpness measures: λ_max, trace, quotient-manifold and adaptive sharpness.

All use the Hessian H = ∇²L of the *mean* loss over every sample of ``data`` (METHODS.md §2, §5),
computed by :class:`flatness.hvp.HessianOperator` in ``eval()`` mode, in the model's dtype and
device; the model's parameters are never changed.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatness.batches import (
    DEFAULT_CHUNK,
    Batches,
    batch_weight,
    eval_mode,
    loss_reduction,
    loss_term,
    mean_loss,
)
from flatness.ggn import ggn_trace, piecewise_linear_offender
from flatness.hutchinson import adaptive_hutchpp_trace, hutchpp_trace
from flatness.hvp import DEFAULT_GRAPH_BUDGET, HessianOperator
from flatness.lanczos import DEFAULT_METHOD, METHODS, top_eigenvalues
from flatness.reparam import weight_layer

#: Parameter counts up to which ``hessian_trace`` is exact (n HVPs with basis vectors).
EXACT_TRACE_MAX_PARAMS = 2000
#: ``hessian_trace`` methods: "auto" picks the first exact one that applies, else Hutch++.
TRACE_METHODS = ("auto", "ggn_exact", "dense", "hutchpp")
#: ``adaptive_sharpness(kind="worst_case")`` aggregations; the first is the default.
WORST_CASE_AGGREGATES = ("mean_loss", "per_batch")
#: Batch size of ``aggregate="per_batch"`` (Andriushchenko et al. 2023: 1024 points in batches of 128).
PER_BATCH_SIZE = 128


def _operator(model, data, loss_fn, params, chunk_size, graph_budget_bytes) -> HessianOperator:
    return HessianOperator(
        model,
        data,
        params=params,
        loss_fn=loss_fn,
        chunk_size=chunk_size,
        graph_budget_bytes=graph_budget_bytes,
    )


def _layer_weight(model: nn.Module, layer: int | None) -> list[Tensor] | None:
    """``[W_l]``, the weight of weight layer ``layer`` of :func:`flatness.reparam.weight_layers`
    (negative counts from the end); ``None`` (all parameters) when ``layer`` is ``None``."""
    return None if layer is None else [weight_layer(model, layer)[2].weight]


def _lambda_max(op: HessianOperator, scale: Tensor | None, tol, seed, method) -> float:
    """λ_max of H, or of the symmetric ``diag(s) H diag(s)`` for a scale vector ``s``."""
    if scale is None:
        mv = op.matvec
    else:

        def mv(v: Tensor) -> Tensor:
            return scale * op.matvec(scale * v)

    with op:
        res = top_eigenvalues(
            mv,
            op.num_params,
            1,
            method=method,
            tol=tol,
            seed=seed,
            device=op.device,
            dtype=op.dtype,
        )
    top = float(res.eigenvalues[0])
    if not res.converged:
        if math.isnan(top):
            raise ValueError(
                f"{method} did not converge in {res.num_matvecs} matvecs and has no estimate of "
                "the top eigenvalue; raise tol or use the other method"
            )
        other = "eigsh" if method == "lanczos" else "lanczos"
        warnings.warn(
            f"{method} did not reach tol={tol} in {res.num_matvecs} matvecs; the top eigenvalue "
            f"may be inaccurate (raise tol or use method={other!r})",
            RuntimeWarning,
            stacklevel=3,
        )
    return top


def _check_solver(method: str, tol: float) -> None:
    """The eigensolver options, checked before any operator or matvec is built."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")


def hessian_max_eigenvalue(
    model: nn.Module,
    data,
    *,
    loss_fn=None,
    params=None,
    layer: int | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = DEFAULT_METHOD,
    chunk_size: int | None = DEFAULT_CHUNK,
    graph_budget_bytes: int = DEFAULT_GRAPH_BUDGET,
) -> float:
    """Largest *algebraic* eigenvalue of H = ∇²L (mean loss), all parameters by default.

    ``layer`` (an index into :func:`flatness.reparam.weight_layers`, negative from the end):
    λ_max(H_ll) of the diagonal block of that layer's *weight* W_l (bias excluded), the loss
    still that of the whole network; ``params`` (a list of parameter tensors) picks any other
    subset. Not both. Under Dinh's α on layers (l, l+1) the exact transform H' = Λ⁻¹HΛ⁻¹ gives
    λ_max(H'_ll) = α² λ_max(H_ll) and λ_max(H'_{l+1,l+1}) = α⁻² λ_max(H_{l+1,l+1}).

    Lanczos (``method="lanczos"``) or ARPACK (``"eigsh"``), relative tolerance ``tol``. Not
    reparameterisation-invariant (METHODS.md §5: ×9.3 layer-wise, ×3.3 neuron-wise on the
    fixture). PyHessian's power iteration returns the largest-*magnitude* one instead.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> mse = lambda out, y: ((out.squeeze(-1) - y) ** 2).mean()
    >>> round(hessian_max_eigenvalue(lin, (X, torch.zeros(2, dtype=torch.float64)), loss_fn=mse), 10)
    4.0
    """
    if layer is not None and params is not None:
        raise ValueError("give params= or layer=, not both")
    if layer is not None:
        params = _layer_weight(model, layer)
    op = _operator(model, data, loss_fn, params, chunk_size, graph_budget_bytes)
    return _lambda_max(op, None, tol, seed, method)


def hessian_trace(
    model: nn.Module,
    data,
    *,
    loss_fn=None,
    layer: int | None = None,
    rel_stderr: float = 0.02,
    num_probes: int | None = None,
    seed: int = 0,
    return_stderr: bool = False,
    max_probes: int = 200,
    exact_max_params: int = EXACT_TRACE_MAX_PARAMS,
    chunk_size: int | None = DEFAULT_CHUNK,
    graph_budget_bytes: int = DEFAULT_GRAPH_BUDGET,
    method: str = "auto",
):
    """Tr H = Tr ∇²L (mean loss), all parameters; with ``layer`` (an index into
    :func:`flatness.reparam.weight_layers`, negative from the end) Tr H_ll of the diagonal
    block of that layer's weight W_l (bias excluded). ``exact_max_params`` and the Hutch++
    dimension then count W_l's entries; ``"ggn_exact"`` is exact for any diagonal block.

    ``method`` (one of :data:`TRACE_METHODS`):

    - ``"ggn_exact"``: for the default softmax cross-entropy (``loss_fn=None``) on a network that is
      piecewise linear from input to logits (whitelisted modules only, :mod:`flatness.ggn`),
      diag H = diag GGN, so Tr H = (1/N) Σ_i Σ_c p_ic ‖∇_θ(z_ic − p_iᵀz_i)‖² exactly: one backward
      pass per class and chunk, stderr 0.0. A ``ValueError`` names the offending module (or the
      ``loss_fn``) when the model does not qualify.
    - ``"dense"``: n HVPs with basis vectors, exact (stderr 0.0).
    - ``"hutchpp"``: Hutch++ with Rademacher probes: with ``num_probes``, exactly that many HVPs
      (Meyer et al.'s split, no pilot); without, a two-stage procedure
      (:func:`flatness.hutchinson.adaptive_hutchpp_trace`): a pilot Hutch++ round (sketch 10,
      10 residual probes) estimates the variance, which fixes the probe count for a standard
      error of ``rel_stderr``·|trace|; the value and stderr come only from a fresh main stage of
      that many HVPs (at most ``max_probes``; a ``RuntimeWarning`` says when the cap binds), the
      pilot's 30 HVPs are discarded. A fixed count, not a stop on the running stderr, which would
      bias the stderr low (METHODS.md §5, §11).
    - ``"auto"`` (default): with ``num_probes`` given, ``"hutchpp"`` with that budget; otherwise
      ``"ggn_exact"`` when the model qualifies, else ``"dense"`` when n ≤ ``exact_max_params``,
      else ``"hutchpp"``.

    Not invariant (METHODS.md §5: ×6.2 layer-wise, ×1.5 neuron-wise on the fixture).

    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> mse = lambda out, y: ((out.squeeze(-1) - y) ** 2).mean()
    >>> hessian_trace(lin, (X, torch.zeros(2, dtype=torch.float64)), loss_fn=mse)  # tr 2XᵀX/N
    5.0
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    if num_probes is not None and method in ("ggn_exact", "dense"):
        raise ValueError(f"num_probes applies to method='hutchpp' (or 'auto'), not {method!r}")
    if num_probes is not None and int(num_probes) < 3:
        raise ValueError(f"num_probes must be ≥ 3 (Hutch++), got {num_probes}")
    if num_probes is None and not rel_stderr > 0:
        raise ValueError(f"rel_stderr must be positive, got {rel_stderr}")
    loss_reduction(loss_fn)  # reject reduction="none" before any work
    if method == "auto" and num_probes is None and loss_fn is None:
        if piecewise_linear_offender(model) is None:
            method = "ggn_exact"
    if method == "ggn_exact":
        if loss_fn is not None:
            raise ValueError(
                "method='ggn_exact' needs the default softmax cross-entropy (loss_fn=None)"
            )
        if layer is None:
            value = ggn_trace(model, data, chunk_size=chunk_size)
        else:
            value = ggn_trace(
                model, data, chunk_size=chunk_size, layer=weight_layer(model, layer)[2]
            )
        return (value, 0.0) if return_stderr else value
    op = _operator(
        model, data, loss_fn, _layer_weight(model, layer), chunk_size, graph_budget_bytes
    )
    n = op.num_params
    if method == "auto":
        method = "dense" if num_probes is None and n <= exact_max_params else "hutchpp"
    with op:
        if method == "dense":
            eye = torch.eye(n, dtype=op.dtype, device=op.device)
            value = sum(float(op.matvec(e)[i]) for i, e in enumerate(eye))
            stderr = 0.0
        else:
            gen = torch.Generator().manual_seed(int(seed))
            kw = {"device": op.device, "dtype": op.dtype}
            if num_probes is not None:
                value, stderr = hutchpp_trace(op.matvec, n, int(num_probes), gen, **kw)
            else:
                est = adaptive_hutchpp_trace(
                    op.matvec, n, gen, rel_stderr=rel_stderr, max_matvecs=max_probes, **kw
                )
                value, stderr = est.value, est.stderr
    return (value, stderr) if return_stderr else value


def _tensor_norm_scale(params: list[Tensor]) -> Tensor:
    """D as a flat vector: ‖T‖_F repeated over the entries of each tensor T."""
    return torch.cat([torch.full((p.numel(),), float(torch.linalg.vector_norm(p.detach())),
                                 dtype=p.dtype, device=p.device) for p in params])  # fmt: skip


def quotient_sharpness(
    model: nn.Module,
    data,
    *,
    loss_fn=None,
    layer: int | None = None,
    normalized: bool = False,
    epsilon: float | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = DEFAULT_METHOD,
    chunk_size: int | None = DEFAULT_CHUNK,
    graph_budget_bytes: int = DEFAULT_GRAPH_BUDGET,
) -> float:
    """Quotient-manifold sharpness of Rangamani et al. (arXiv 1902.02434): raw λ_max(D H D).

    .. math::
        λ_R = λ_{max}(D H D), \\quad D = \\operatorname{blockdiag}(‖T‖_F I)

    over every parameter tensor T, biases included (METHODS.md §2); equal to the top eigenvalue
    of G⁻¹H with the metric G = blockdiag(‖T‖_F⁻² I). Largest *algebraic* eigenvalue (the reference
    code reports the largest magnitude). Invariant under any per-tensor positive rescaling at any θ;
    *not* under neuron-wise rescaling (a documented limitation). ``normalized=True`` returns
    λ_R/(2(1 + L)) with L the mean loss on ``data``, times ε² when ``epsilon`` is given.

    ``layer`` (an index into :func:`flatness.reparam.weight_layers`, negative from the end):
    the same on the diagonal block of that layer's weight W_l alone (bias excluded), i.e.
    ‖W_l‖_F² λ_max(H_ll); invariant under every rescaling that scales W_l as a whole
    (layer-wise, Dinh α), not under neuron-wise rescaling of W_l's rows or columns.
    """
    if epsilon is not None:
        if not normalized:
            raise ValueError("epsilon only applies with normalized=True")
        if not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
            raise ValueError(f"epsilon must be a finite positive number, got {epsilon}")
    _check_solver(method, tol)
    op = _operator(
        model, data, loss_fn, _layer_weight(model, layer), chunk_size, graph_budget_bytes
    )
    D = _tensor_norm_scale(op.params)
    lam = _lambda_max(op, D, tol, seed, method)
    if not normalized:
        return lam
    # The loss needs no graph: a plain no-grad pass (op.loss() would rebuild the double-backward
    # graph that `with op:` has just freed).
    with eval_mode(model), torch.no_grad():
        loss = float(mean_loss(model, op.batches, op.loss_fn))
    value = lam / (2.0 * (1.0 + loss))
    return value * float(epsilon) ** 2 if epsilon is not None else value


def adaptive_sharpness(
    model: nn.Module,
    data,
    *,
    loss_fn=None,
    kind: str = "quadratic",
    rho: float | None = None,
    p: float = 2,
    eta: float = 0.0,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = DEFAULT_METHOD,
    num_iter: int = 20,
    aggregate: str = "mean_loss",
    batch_size: int | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    graph_budget_bytes: int = DEFAULT_GRAPH_BUDGET,
) -> float:
    """Adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023), METHODS.md §5.

    ``kind="quadratic"`` (default): λ_max(C H C), C = diag(|w| + η) over every parameter tensor;
    with ``rho`` given, the quadratic model ½ρ²λ_max(C H C) of the ℓ2 worst case. With η = 0 it
    is invariant to any positive diagonal rescaling (layer- and neuron-wise).

    ``kind="worst_case"``:

    .. math::
        \\max_{‖δ ⊘ (|w|+η)‖_p ≤ ρ} L(w + δ) − L(w)

    by APGD-style projected gradient ascent: ``num_iter`` steps (ℓ∞: sign steps; ℓ2: normalised
    steps), momentum 0.75, step size halved at the APGD checkpoints when progress stalls, from a
    random start inside the ball (``seed``). ``p`` ∈ {2, inf}; ``rho`` defaults to 0.5 (ℓ2) and
    0.002 (ℓ∞). Each maximum is max(best found, 0) (δ = 0 is feasible). ``aggregate`` says
    which loss is maximised (METHODS.md §5):

    - ``"mean_loss"`` (default): one δ for all of ``data``, the maximum of the mean loss over
      every sample (the data loss of the other measures).
    - ``"per_batch"`` (Andriushchenko et al. 2023): all samples, in data order, are cut into
      consecutive batches of ``batch_size`` (default 128; the last may be smaller), whatever
      the data form; the same APGD (same ``seed``) runs on each batch's own loss with its own
      δ, and the batch maxima are averaged weighted by n_b/N (summed for a sum-reduced
      ``loss_fn``). The exact per-batch value is ≥ the mean-loss one, since the max of an
      average ≤ the average of the maxima (equal with one batch); it is a different, larger
      quantity, and costs the same number of passes over the data.

    ``aggregate`` and ``batch_size`` apply only to ``kind="worst_case"``; ``batch_size`` only to
    ``"per_batch"``. ``chunk_size`` still splits a batch for memory.
    """
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    if rho is not None and not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    loss_reduction(loss_fn)  # reject reduction="none" before any work
    if aggregate not in WORST_CASE_AGGREGATES:
        raise ValueError(f"aggregate must be one of {WORST_CASE_AGGREGATES}, got {aggregate!r}")
    if kind != "worst_case" and aggregate != "mean_loss":
        raise ValueError(f"aggregate applies to kind='worst_case', not kind={kind!r}")
    if batch_size is not None:
        if aggregate != "per_batch":
            raise ValueError("batch_size applies to aggregate='per_batch'")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if kind == "quadratic":
        op = _operator(model, data, loss_fn, None, chunk_size, graph_budget_bytes)
        C = torch.cat([p_.detach().abs().reshape(-1) + eta for p_ in op.params])
        lam = _lambda_max(op, C, tol, seed, method)
        return lam if rho is None else 0.5 * rho**2 * lam
    if kind == "worst_case":
        if p not in (2, math.inf, float("inf"), "inf"):
            raise ValueError(f"p must be 2 or inf, got {p!r}")
        p_inf = p != 2
        rho = (0.002 if p_inf else 0.5) if rho is None else float(rho)
        args = (loss_fn, rho, p_inf, eta, num_iter, seed)
        if aggregate == "mean_loss":
            return _worst_case(model, Batches.for_model(data, model, chunk_size), *args)
        return _worst_case_per_batch(
            model, data, PER_BATCH_SIZE if batch_size is None else int(batch_size), chunk_size, args
        )
    raise ValueError(f"kind must be 'quadratic' or 'worst_case', got {kind!r}")


def _apgd_checkpoints(num_iter: int) -> set[int]:
    """Iterations at which APGD (Croce & Hein 2020) may halve its step size."""
    ps = [0.0, 0.22]
    while ps[-1] < 1:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06))
    return {math.ceil(q * num_iter) for q in ps[1:] if q < 1}


def _worst_case_per_batch(model, data, batch_size: int, chunk_size, args) -> float:
    """Andriushchenko's aggregation: :func:`_worst_case` on each batch of ``batch_size``
    consecutive samples (its own δ), the maxima weighted by :func:`flatness.batches.batch_weight`."""
    parts = Batches(data, chunk_size=None)  # validated; a pair stays one batch (no copy)
    pair = parts.concatenated() if len(parts) > 1 else next(iter(parts))
    per = Batches(pair, chunk_size=batch_size)
    loss_fn, N = args[0], per.num_samples
    return sum(
        batch_weight(loss_fn, Xb.shape[0], N)
        * _worst_case(model, Batches.for_model((Xb, yb), model, chunk_size), *args)
        for Xb, yb in per
    )


def _worst_case(model, batches: Batches, loss_fn, rho, p_inf, eta, num_iter, seed) -> float:
    """max over the adaptive ball of the data loss on ``batches`` minus its value at w."""
    names = [n for n, _ in model.named_parameters()]
    base = [t.detach() for _, t in model.named_parameters()]
    scale = [t.abs() + eta for t in base]
    N = batches.num_samples

    def loss_and_grad(gamma: list[Tensor], need_grad: bool) -> tuple[float, list[Tensor] | None]:
        # δ = C ⊙ γ, so ‖δ ⊘ C‖_p ≤ ρ is the plain ball ‖γ‖_p ≤ ρ; ∇_γ = C ⊙ ∇_δ.
        total, grads = 0.0, None
        gam = [g.detach().requires_grad_(need_grad) for g in gamma]
        for X, y in batches:
            with torch.set_grad_enabled(need_grad):
                ps = {n: b + c * g for n, b, c, g in zip(names, base, scale, gam, strict=True)}
                out = functional_call(model, ps, (X,))
                loss = loss_term(loss_fn, out, y, N, what="perturbed loss")
            total += float(loss.detach())
            if need_grad:
                g = torch.autograd.grad(loss, gam, allow_unused=True, materialize_grads=True)
                grads = list(g) if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
        return total, grads

    def norm(xs: list[Tensor]) -> Tensor:
        flat = torch.cat([x.reshape(-1) for x in xs])
        return flat.abs().max() if p_inf else torch.linalg.vector_norm(flat)

    def project(xs: list[Tensor]) -> list[Tensor]:
        if p_inf:
            return [x.clamp(-rho, rho) for x in xs]
        nrm = float(norm(xs))
        return xs if nrm <= rho else [x * (rho / nrm) for x in xs]

    def ascent_dir(gs: list[Tensor]) -> list[Tensor]:
        if p_inf:
            return [g.sign() for g in gs]
        nrm = float(norm(gs))
        return [g / nrm for g in gs] if nrm > 0 else [torch.zeros_like(g) for g in gs]

    gen = torch.Generator().manual_seed(int(seed))

    def rand_like(t: Tensor) -> Tensor:
        return torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)

    with eval_mode(model), torch.no_grad():
        L0 = float(mean_loss(model, batches, loss_fn))
    with eval_mode(model):
        if p_inf:
            x = [(2 * rand_like(t) - 1) * rho for t in base]
        else:  # uniform direction, radius ρ·U^{1/n}: uniform in the ℓ2 ball
            x = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in base]
            n = sum(t.numel() for t in base)
            r = rho * float(torch.rand(1, generator=gen, dtype=torch.float64)) ** (1 / n)
            x = [t * (r / float(norm(x))) for t in x]
        f, g = loss_and_grad(x, True)
        best_f, best_x, best_g = f, x, g
        step = 2 * rho
        checkpoints = _apgd_checkpoints(num_iter)
        last_ck, successes, best_at_last_ck, reduced_last = 0, 0, best_f, False
        x_prev = x
        for it in range(num_iter):
            z = project([a + step * d for a, d in zip(x, ascent_dir(g), strict=True)])
            alpha = 1.0 if it == 0 else 0.75
            x_new = project(
                [
                    xi + alpha * (zi - xi) + (1 - alpha) * (xi - xp)
                    for xi, zi, xp in zip(x, z, x_prev, strict=True)
                ]  # fmt: skip
            )
            f_new, g_new = loss_and_grad(x_new, True)
            if f_new > f:
                successes += 1
            x_prev, x, f, g = x, x_new, f_new, g_new
            if f > best_f:
                best_f, best_x, best_g = f, x, g
            if it + 1 in checkpoints:
                stalled = successes < 0.75 * (it + 1 - last_ck)
                no_gain = not reduced_last and best_f == best_at_last_ck
                reduced_last = stalled or no_gain
                if reduced_last:  # halve the step and restart from the best point
                    step /= 2
                    x, g, f, x_prev = best_x, best_g, best_f, best_x
                last_ck, successes, best_at_last_ck = it + 1, 0, best_f
    return max(best_f - L0, 0.0)
