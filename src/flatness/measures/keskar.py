"""Keskar et al. (ICLR 2017) ε-sharpness, metric 2.1: the largest loss rise in a box around θ."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatness.batches import Batches, LossFn, default_loss, eval_mode, loss_term


class _FlatLoss:
    """L(θ + δ) and ∇L for a flat displacement δ, via ``functional_call``: the model's own
    parameters are never written, so an interrupted optimiser cannot leave them changed."""

    def __init__(self, model: nn.Module, batches: Batches, loss_fn: LossFn) -> None:
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        named = [(k, p.detach()) for k, p in model.named_parameters()]
        if not named:
            raise ValueError(f"{type(model).__name__} has no parameters to perturb")
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.cat([p.reshape(-1) for _, p in named])

    def _params(self, flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, self.sizes)
        return {k: t.view(s) for k, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def __call__(self, delta: Tensor, grad: bool = True) -> tuple[float, Tensor | None]:
        x = (self.theta + delta).detach().requires_grad_(grad)
        total = 0.0
        n = self.batches.num_samples
        with torch.enable_grad() if grad else torch.no_grad():
            for X, y in self.batches:
                # Per-batch backward keeps one batch's graph alive, not the whole data's.
                out = functional_call(self.model, self._params(x), (X,))
                term = loss_term(self.loss_fn, out, y, n)
                if grad:
                    term.backward()
                total += float(term.detach())
        return total, (x.grad if grad else None)


try:  # scipy ≥ 1.15 (the C port of L-BFGS-B): the routine that scipy.optimize.minimize drives
    from scipy.optimize._lbfgsb import setulb as _setulb
except ImportError:  # pragma: no cover - older or re-organised scipy: minimize() below
    _setulb = None
try:  # a dependency of scikit-learn, hence installed with the package
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - then setulb runs on the BLAS threads it finds
    ThreadpoolController = None
_SETULB_SIGNATURE = (
    "setulb(m,x,l,u,nbd,f,g,factr,pgtol,wa,iwa,task,lsave,isave,dsave,maxls,ln_task)"
)


def _setulb_usable() -> bool:
    return _setulb is not None and (_setulb.__doc__ or "").startswith(_SETULB_SIGNATURE)


#: BLAS threading layers whose thread count is the library's own: an OpenMP-threaded OpenBLAS or
#: BLIS sets the process's OpenMP thread count, which torch reads too, so it is left alone.
_OWN_THREAD_LAYERS = ["pthreads", "intel", "tbb", "sequential", "disabled"]


def _one_blas_thread() -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory that runs the BLAS libraries loaded now (scipy's OpenBLAS among them) on
    one thread; a null context without threadpoolctl. Entered around each ``setulb`` call only,
    so a BLAS that torch shares is back at its own thread count for the loss evaluations."""
    if ThreadpoolController is None:  # pragma: no cover
        return contextlib.nullcontext
    blas = ThreadpoolController().select(user_api="blas", threading_layer=_OWN_THREAD_LAYERS)
    return (lambda: blas.limit(limits=1)) if blas.lib_controllers else contextlib.nullcontext


def _lbfgsb_box(
    fun_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    bound: np.ndarray,
    maxiter: int,
) -> tuple[int, int]:
    """Minimise ``fun_and_grad`` over the box |x_i| ≤ bound_i with scipy's L-BFGS-B, as
    ``scipy.optimize.minimize(fun_and_grad, x0, jac=True, method="L-BFGS-B",
    bounds=Bounds(-bound, bound), options={"maxiter": maxiter})`` does: the same routine
    (``_lbfgsb.setulb``), inputs, defaults (maxcor 10, ftol 2.22e-9, gtol 1e-5, maxfun 15000,
    maxls 20) and evaluation caching, hence the same iterates and evaluation points.

    ``minimize`` turns a ``Bounds`` object into n Python (lo, hi) tuples and back, then fills its
    bound-type codes in a Python loop over the n variables: ≈ 5× the cost of the ≈ 11 loss and
    gradient evaluations for a 670k-parameter MLP. Here the bound arrays are built by numpy in
    one step, and the n-vectors setulb reads are allocated once.

    **One BLAS thread inside setulb.** setulb's n-long dot products go through scipy's OpenBLAS,
    which splits them over its threads from n = 10⁴ on; afterwards its idle workers spin for
    ≈ 0.1 s (OpenBLAS's thread timeout, 2²⁸ cycles), i.e. through most of the next loss and
    gradient evaluation, taking a core from torch. Measured on a busy 2-core machine: the
    evaluations ran ≈ 20% slower inside the optimiser than alone (one torch thread), and setulb
    took 1.8× (670k-parameter MLP) to 8× (62k-parameter LeNet5) as long as on one thread. So each
    setulb call runs with the BLAS on one thread (threadpoolctl) and the evaluations with the
    threads restored. The partial sums of a threaded dot product depend
    on the thread count (rounding in the last bits), so the iterates are those of ``minimize``
    with one BLAS thread (bit for bit; tests/test_keskar.py), and no longer depend on the
    machine's core count; against ``minimize`` with threaded BLAS they agree to rounding (the
    measure's value to ≤ 1e-10 on the benchmark fixtures). Below n = 10⁴ OpenBLAS does not thread
    dot products and the two are the same. Returns ``(iterations, evaluations)`` (scipy's
    ``nit``, ``nfev``).

    ``fun_and_grad`` gets a buffer that is overwritten after it returns (copy it to keep it)."""
    m, maxfun, maxls = 10, 15000, 20
    factr = 2.2204460492503131e-09 / np.finfo(float).eps
    pgtol = 1e-5
    n = x0.size
    low = np.ascontiguousarray(-bound, dtype=np.float64)
    upp = np.ascontiguousarray(bound, dtype=np.float64)
    if (low > upp).any():
        raise ValueError("L-BFGS-B: a lower bound is greater than an upper bound")
    x = np.clip(np.asarray(x0, dtype=np.float64), low, upp)
    # scipy's bound codes, vectorised: 0 free, 1 lower only, 2 both, 3 upper only (an infinite
    # side is passed as 0).
    has_lo, has_up = ~np.isinf(low), ~np.isinf(upp)
    nbd = np.where(has_lo, np.where(has_up, 2, 1), np.where(has_up, 3, 0)).astype(np.int32)
    low, upp = np.where(has_lo, low, 0.0), np.where(has_up, upp, 0.0)

    # scipy's ScalarFunction evaluates at x0 when built, then again only where x has changed.
    last_x = x.copy()  # setulb overwrites x in place; the function gets this stable copy
    last_f, last_g = fun_and_grad(last_x)
    nfev = 1
    # setulb may write into g (it restores the previous gradient when a line search fails);
    # scipy hands it a fresh copy of the cached gradient each call, here one buffer is refilled
    # from the cache. f is read by value (setulb's writes to it never reach Python).
    f, g = 0.0, np.zeros(n)  # what scipy passes to the first call
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task = np.zeros(2, dtype=np.int32)
    ln_task = np.zeros(2, dtype=np.int32)
    lsave = np.zeros(4, dtype=np.int32)
    isave = np.zeros(44, dtype=np.int32)
    dsave = np.zeros(29, dtype=np.float64)
    one_thread = _one_blas_thread()
    nit = 0
    while True:
        with one_thread():
            _setulb(m, x, low, upp, nbd, f, g, factr, pgtol, wa, iwa, task, lsave, isave, dsave,
                    maxls, ln_task)  # fmt: skip
        if task[0] == 3:  # f and g wanted at x
            if not np.array_equal(x, last_x):
                np.copyto(last_x, x)
                last_f, last_g = fun_and_grad(last_x)
                nfev += 1
            f = last_f
            np.copyto(g, last_g)
        elif task[0] == 1:  # a new iterate
            nit += 1
            if nit >= maxiter:
                task[0], task[1] = 5, 504
            elif nfev > maxfun:
                task[0], task[1] = 5, 502
            np.copyto(g, last_g)
        else:
            return nit, nfev


def keskar_sharpness(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    epsilon: float = 1e-3,
    subspace_dim: int | None = None,
    maxiter: int = 10,
    seed: int = 0,
    start: str = "random",
    return_stderr: bool = False,
) -> float | tuple[float, float]:
    """Keskar ε-sharpness (Keskar et al., ICLR 2017, metric 2.1), in percent of 1 + L(θ).

    .. math::
        φ_{x,f}(ε, A) = 100 · \\frac{\\max_{y ∈ C_ε} L(θ + Ay) − L(θ)}{1 + L(θ)},
        \\quad C_ε = \\{y : |y_i| ≤ ε(|(A^+θ)_i| + 1)\\}

    with L the mean loss over all samples of ``data`` (default cross-entropy), θ every parameter.
    ``subspace_dim=None`` takes A = I (the full space); an integer p draws a random n×p matrix A
    with i.i.d. N(0, 1) entries from ``seed`` (memory n·p; A⁺θ by the normal equations, exact for
    a full-rank Gaussian A). The inner maximisation is scipy's L-BFGS-B on −L with its gradient
    (``jac=True``) and ``maxiter`` iterations, as the paper's README prescribes (Keskar: 10), with
    scipy's default stopping tolerances otherwise.

    ``start="random"`` (default) starts from a uniform random point of C_ε drawn from ``seed``;
    ``start="zero"`` starts at y = 0, where the gradient of a minimum is ≈ 0, so L-BFGS-B's first
    step gains almost nothing, its stopping rule fires and the value is ≈ 0 (the pitfall of
    METHODS.md §5; kept only to show it). The max is
    taken over every point evaluated, y = 0 included, so the value is ≥ 0.

    Cost: ≈ 10–25 loss + gradient evaluations (``maxiter=10``) plus L-BFGS-B's own O(m·n) work
    per step (m = 10: a few passes over its 2·m·n float64 correction pairs, memory-bound; ≈ 45 ms
    a step, 0.45 s a call, for n = 670k on one core; the same in ``scipy.optimize.minimize``).
    scipy's routine is driven directly (``_lbfgsb_box``) with its bounds as numpy arrays, so no
    Python loop over the n parameters remains, and on one BLAS thread, so no idle BLAS worker
    competes with the evaluations. A subspace adds drawing A (n·p Gaussians in float64), A^TA
    (O(n·p²)) once, and two products with A per evaluation.

    Not reparameterisation-invariant: the +1 makes C_ε only partly scale-aware (METHODS.md §5).
    Deterministic for a given ``seed``. ``return_stderr=True`` returns ``(value, nan)``: one
    optimisation run has no Monte Carlo standard error.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if start not in ("random", "zero"):
        raise ValueError(f"start must be 'random' or 'zero', got {start!r}")
    if subspace_dim is not None and subspace_dim < 1:
        raise ValueError(f"subspace_dim must be a positive integer or None, got {subspace_dim}")
    batches = Batches.for_model(data, model)
    flat = _FlatLoss(model, batches, loss_fn or default_loss)
    theta = flat.theta
    gen = torch.Generator().manual_seed(int(seed))

    A = None
    if subspace_dim is None:
        coords = theta.double().cpu()
    else:
        # Drawn on the CPU in float64 so the matrix is the same for every dtype and device.
        A64 = torch.randn(theta.numel(), int(subspace_dim), generator=gen, dtype=torch.float64)
        # Normal equations: AᵀA is p×p and well conditioned for Gaussian A with n ≫ p.
        coords = torch.linalg.solve(A64.T @ A64, A64.T @ theta.double().cpu())
        A = A64.to(device=theta.device, dtype=theta.dtype)
        del A64  # a float32 model keeps only its own copy (n·p entries)
    bound = (epsilon * (coords.abs() + 1)).numpy()
    if start == "random":
        y0 = (torch.rand(bound.shape, generator=gen, dtype=torch.float64) * 2 - 1).numpy() * bound
    else:
        y0 = np.zeros_like(bound)

    evaluated: list[float] = []
    # One flat float64 vector for scipy; on a float64 CPU model torch.from_numpy shares it, θ + δ
    # is the only new n-vector and the gradient is negated in place (it is this call's own
    # tensor); otherwise one cast/copy each way per evaluation.
    to_model = {"device": theta.device, "dtype": theta.dtype}

    def negated(y: np.ndarray) -> tuple[float, np.ndarray]:
        y_t = torch.from_numpy(y).to(**to_model)
        loss, g = flat(y_t if A is None else A @ y_t)
        evaluated.append(loss)
        g = g if A is None else A.T @ g
        return -loss, g.detach().to(device="cpu", dtype=torch.float64).neg_().numpy()

    with eval_mode(model):
        loss0, _ = flat(torch.zeros_like(theta), grad=False)
        if _setulb_usable():
            _lbfgsb_box(negated, y0, bound, int(maxiter))
        else:  # the same optimisation through scipy's public interface
            scipy.optimize.minimize(
                negated,
                y0,
                jac=True,
                method="L-BFGS-B",
                bounds=scipy.optimize.Bounds(-bound, bound),
                options={"maxiter": int(maxiter)},
            )
    best = max([loss0, *evaluated])
    value = 100.0 * (best - loss0) / (1.0 + loss0)
    return (value, float("nan")) if return_stderr else value
