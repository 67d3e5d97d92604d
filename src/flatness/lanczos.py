"""Top algebraic eigenvalues of a symmetric operator given only by matrix-vector products.

Two interchangeable paths (``method=``):

- ``"lanczos"``: a lean Lanczos with full reorthogonalisation, vectors kept in torch on the
  operator's device, the small tridiagonal ``T`` solved in float64. A Ritz value θ_i is accepted
  when its residual ``β_m |s_{m,i}|`` (which bounds the distance to an eigenvalue) is
  ``≤ tol·|θ_i|``, the ARPACK criterion. Kept after a comparison on the MLP/LeNet5 Hessians and
  random matrices: stopping on the change of the Ritz value (PyHessian's rule), on ρ²/gap, or
  on both saves at most 1–2 steps at tol 1e-3 on the network Hessians (convergence there is
  superlinear: the error falls ~1e-3 → 1e-6 in about one step) but stops on plateaus where θ
  still sits on λ_2 (MLP: error 4e-2 at tol 1e-2; random matrices: 2–15× past tol).
- ``"eigsh"``: scipy's ARPACK ``eigsh(k, which='LA')`` on a ``LinearOperator`` (float64 numpy;
  each matvec crosses torch ↔ numpy, which costs time on large operators).

Both start from the same seeded Gaussian vector. ``lanczos_tridiagonal`` is the shared kernel
that stochastic Lanczos quadrature (``flatness.hutchinson``) also uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]

#: Default solver of :func:`top_eigenvalues` (see benchmarks/ for the comparison).
DEFAULT_METHOD = "lanczos"
METHODS = ("lanczos", "eigsh")


class LanczosResult(NamedTuple):
    # float64, descending, on the CPU; NaN where eigsh stopped before that eigenvalue converged
    eigenvalues: Tensor
    num_matvecs: int
    converged: bool


def _start_vector(n: int, seed: int, device, dtype) -> Tensor:
    # Drawn on the CPU so that a seed gives the same start on every device.
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def lanczos_tridiagonal(
    matvec: MatVec, v0: Tensor, num_steps: int, *, stop: Callable | None = None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Run up to ``num_steps`` Lanczos steps from ``v0`` with full reorthogonalisation.

    Returns ``(alpha, beta, Q, steps)``: ``T = tridiag(beta[:-1], alpha, beta[:-1])`` (float64,
    CPU) with ``A Q = Q T + beta[-1] q_{m+1} e_mᵀ``, and ``Q`` (m × n, in ``v0``'s dtype/device).
    On breakdown (an invariant subspace) the run stops early. ``stop(alpha, beta)`` is called
    after each step and ends the run when it returns True.

    >>> A = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    >>> a, b, Q, m = lanczos_tridiagonal(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 3)
    >>> T = torch.diag(a) + torch.diag(b[:-1], 1) + torch.diag(b[:-1], -1)
    >>> [round(x, 12) for x in torch.linalg.eigvalsh(T).tolist()]
    [1.0, 2.0, 3.0]
    """
    n = v0.numel()
    num_steps = min(int(num_steps), n)
    # Grown by doubling: most runs stop long before num_steps, and n can be millions.
    Q = torch.zeros(min(num_steps, 32), n, dtype=v0.dtype, device=v0.device)
    nrm = torch.linalg.vector_norm(v0)
    if not nrm > 0:
        raise ValueError("Lanczos start vector is zero")
    q = v0 / nrm
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # running estimate of ‖A‖ for the breakdown test
    for j in range(num_steps):
        if j == Q.shape[0]:
            Q = torch.cat([Q, torch.zeros_like(Q[: min(Q.shape[0], num_steps - j)])])
        Q[j] = q
        w = matvec(q).reshape(-1).to(dtype=v0.dtype)
        if not torch.isfinite(w).all():
            raise ValueError("the operator returned a non-finite vector")
        a = torch.dot(q, w)
        w = w - a * q - (betas[-1] * Q[j - 1] if j > 0 else 0.0)
        # Full reorthogonalisation, twice ("twice is enough"): keeps Ritz values free of ghosts.
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(torch.linalg.vector_norm(w))
        alphas.append(float(a))
        betas.append(b)
        scale = max(scale, abs(float(a)) + b + (betas[-2] if j > 0 else 0.0))
        steps = j + 1
        if b <= 1e-12 * max(scale, 1e-300):  # invariant subspace: T's eigenvalues are exact
            betas[-1] = 0.0
            break
        if stop is not None and stop(alphas, betas):
            break
        q = w / b
    alpha = torch.tensor(alphas, dtype=torch.float64)
    beta = torch.tensor(betas, dtype=torch.float64)
    return alpha, beta, Q[:steps], steps


def _tridiag_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    T = torch.diag(alpha)
    if alpha.numel() > 1:
        off = beta[: alpha.numel() - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(T)


def lanczos_top_eigenvalues(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    tol: float = 1e-4,
    seed: int = 0,
    max_iter: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> LanczosResult:
    """The ``k`` largest algebraic eigenvalues of a symmetric operator, descending.

    Converged when every one of the top ``k`` Ritz values has residual ``≤ tol·max(|θ|, ε^{2/3}‖T‖)``.
    ``max_iter`` (default ``min(n, 300)``) caps the steps, and the memory (``max_iter`` vectors).

    >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    >>> r = lanczos_top_eigenvalues(lambda v: A @ v, 50, k=2, tol=1e-10)
    >>> [round(x, 8) for x in r.eigenvalues.tolist()], r.converged
    ([50.0, 49.0], True)
    """
    _check_k(k, n)
    max_iter = min(n, 300) if max_iter is None else min(int(max_iter), n)
    eps23 = float(np.finfo(np.float64).eps) ** (2 / 3)
    state = {"ok": False}

    def converged(alphas, betas) -> bool:
        m = len(alphas)
        if m < k:
            return False
        theta, S = _tridiag_eigh(
            torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)
        )
        top = torch.arange(m - 1, m - 1 - k, -1)
        resid = abs(betas[-1]) * S[-1, top].abs()
        floor = eps23 * float(theta.abs().max())
        state["ok"] = bool((resid <= tol * torch.clamp(theta[top].abs(), min=floor)).all())
        return state["ok"]

    v0 = _start_vector(n, seed, device, dtype)
    alpha, beta, _, steps = lanczos_tridiagonal(matvec, v0, max_iter, stop=converged)
    theta, _ = _tridiag_eigh(alpha, beta)
    breakdown = steps < max_iter and beta[-1] == 0.0
    if steps < k:
        raise ValueError(
            f"the Krylov space from the start vector has dimension {steps} < k = {k}; "
            "use another seed or a smaller k"
        )
    ok = state["ok"] or breakdown or steps == n
    return LanczosResult(theta.flip(0)[:k].clone(), steps, ok)


def eigsh_top_eigenvalues(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    tol: float = 1e-4,
    seed: int = 0,
    max_iter: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> LanczosResult:
    """Same as :func:`lanczos_top_eigenvalues` through scipy ``eigsh(k, which='LA')`` (ARPACK).

    When ARPACK stops at ``max_iter`` without convergence (``ArpackNoConvergence``), the
    eigenvalues that did converge are returned (descending) with ``converged=False``, and the
    slots of those that did not are NaN; the caller decides whether to warn or fail.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    _check_k(k, n)
    count = {"n": 0}

    def mv(x: np.ndarray) -> np.ndarray:
        count["n"] += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).ravel())
        out = matvec(v.to(device=device, dtype=dtype))
        return out.detach().reshape(-1).to("cpu", torch.float64).numpy()

    op = LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)
    v0 = _start_vector(n, seed, "cpu", torch.float64).numpy()
    if k >= n:  # ARPACK needs k < n; a tiny operator is cheaper densely anyway
        dense = np.stack([mv(e) for e in np.eye(n)], axis=1)
        vals = np.linalg.eigvalsh((dense + dense.T) / 2)[::-1][:k].copy()
        return LanczosResult(torch.from_numpy(vals), count["n"], True)
    try:
        vals = eigsh(
            op, k=k, which="LA", tol=tol, v0=v0, maxiter=max_iter, return_eigenvectors=False
        )
        converged = True
    except ArpackNoConvergence as err:  # keep what did converge, flag the rest (NaN)
        vals, converged = np.asarray(err.eigenvalues, dtype=np.float64).real, False
    vals = np.sort(np.asarray(vals, dtype=np.float64))[::-1][:k]
    vals = np.concatenate([vals, np.full(k - vals.size, np.nan)])
    return LanczosResult(torch.from_numpy(vals), count["n"], converged)


def top_eigenvalues(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    method: str = DEFAULT_METHOD,
    tol: float = 1e-4,
    seed: int = 0,
    max_iter: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> LanczosResult:
    """The ``k`` largest algebraic eigenvalues by ``method`` ∈ {"lanczos", "eigsh"}."""
    if method == "lanczos":
        fn = lanczos_top_eigenvalues
    elif method == "eigsh":
        fn = eigsh_top_eigenvalues
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    return fn(matvec, n, k, tol=tol, seed=seed, max_iter=max_iter, device=device, dtype=dtype)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the operator size {n}, got {k}")
