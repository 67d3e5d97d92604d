"""Stochastic trace and spectral-density estimators for operators given by matvecs.

- Hutchinson: ``tr A ≈ (1/s) Σ_i v_iᵀ A v_i`` with Rademacher ``v_i`` and a **fixed** probe count,
  reported with its standard error (not PyHessian's running-mean stop, METHODS.md §5).
- Hutch++ (Meyer, Musco, Musco, Woodruff 2021): ``tr A = tr(QᵀAQ) + tr((I−QQᵀ)A(I−QQᵀ))`` with
  ``Q = orth(A S)``; the first part is exact, the second estimated by Hutchinson, whose standard
  error is the one reported (conditional on ``Q``).
- Stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019): Gauss nodes and
  weights of the spectral measure seen from random unit probes, and a Gaussian-broadened density.

Randomness comes only from the ``torch.Generator`` passed in (probes drawn on the CPU, then moved).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flatness.lanczos import _tridiag_eigh, lanczos_tridiagonal

MatVec = Callable[[Tensor], Tensor]


def rademacher(n: int, num: int, generator: torch.Generator, device=None, dtype=torch.float64):
    """``num`` Rademacher vectors of length ``n`` as rows of a (num, n) tensor."""
    signs = torch.randint(0, 2, (num, n), generator=generator, dtype=torch.int8)
    return (signs.to(torch.float64) * 2 - 1).to(device=device, dtype=dtype)


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    s = samples.to(torch.float64)
    if s.numel() < 2:
        return float(s.mean()), math.inf
    return float(s.mean()), float(s.std(unbiased=True) / math.sqrt(s.numel()))


def hutchinson_trace(
    matvec: MatVec,
    n: int,
    num_probes: int,
    generator: torch.Generator,
    *,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """Hutchinson estimate of ``tr A`` from exactly ``num_probes`` Rademacher probes.

    Returns ``(estimate, standard error)`` with stderr = sample std (ddof 1) / √num_probes
    (``inf`` for a single probe). A diagonal operator is recovered exactly (vᵢ² = 1):

    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> hutchinson_trace(lambda v: A @ v, 3, 5, torch.Generator().manual_seed(0))
    (6.0, 0.0)
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be ≥ 1, got {num_probes}")
    samples = torch.empty(num_probes, dtype=torch.float64)
    for i, v in enumerate(rademacher(n, num_probes, generator, device, dtype)):
        samples[i] = torch.dot(v, matvec(v).reshape(-1).to(v.dtype))
    return _mean_and_stderr(samples)


def _sketch(matvec: MatVec, n: int, k: int, generator, device, dtype) -> tuple[Tensor, float]:
    """``Q = orth(A S)`` for a Rademacher S with k columns, and ``tr(QᵀAQ)`` (2k matvecs)."""
    S = rademacher(n, k, generator, device, dtype)
    AS = torch.stack([matvec(s).reshape(-1).to(dtype) for s in S], dim=1)  # (n, k)
    Q, _ = torch.linalg.qr(AS)
    low_rank = sum(float(torch.dot(q, matvec(q).reshape(-1).to(dtype))) for q in Q.T)
    return Q, low_rank


def _residual_samples(matvec: MatVec, Q: Tensor, num: int, generator, device, dtype) -> Tensor:
    """Hutchinson samples of ``tr((I−QQᵀ)A(I−QQᵀ))``: ``gᵀAg`` with ``g = (I−QQᵀ)v``."""
    n = Q.shape[0]
    out = torch.empty(num, dtype=torch.float64)
    for i, v in enumerate(rademacher(n, num, generator, device, dtype)):
        g = v - Q @ (Q.T @ v)
        out[i] = torch.dot(g, matvec(g).reshape(-1).to(dtype))
    return out


def hutchpp_trace(
    matvec: MatVec,
    n: int,
    num_matvecs: int,
    generator: torch.Generator,
    *,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """Hutch++ estimate of ``tr A`` with exactly ``num_matvecs`` (≥ 3) matvecs.

    Split as in Meyer et al. (Algorithm 1): sketch size ``k = num_matvecs // 3`` (2k matvecs for
    the exact low-rank part), the remaining ``num_matvecs − 2k`` for residual Hutchinson probes.
    Returns ``(estimate, stderr)``, the stderr from the residual part (0 when Q spans R^n).
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs at least 3 matvecs, got {num_matvecs}")
    k = min(num_matvecs // 3, n)
    Q, low_rank = _sketch(matvec, n, k, generator, device, dtype)
    if k == n:  # Q spans everything: the low-rank part is the exact trace
        return low_rank, 0.0
    est, se = _mean_and_stderr(
        _residual_samples(matvec, Q, num_matvecs - 2 * k, generator, device, dtype)
    )
    return low_rank + est, se


@dataclass(frozen=True)
class TraceEstimate:
    value: float
    stderr: float
    num_matvecs: int


def adaptive_hutchpp_trace(
    matvec: MatVec,
    n: int,
    generator: torch.Generator,
    *,
    rel_stderr: float = 0.02,
    sketch_size: int = 10,
    probes_per_round: int = 10,
    max_matvecs: int = 200,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> TraceEstimate:
    """Hutch++ with one sketch, then residual probes in rounds until stderr ≤ rel·|estimate|.

    The first round costs ``2·sketch_size + probes_per_round`` matvecs; each later round adds
    ``probes_per_round``; it stops at the target or when the next round would pass ``max_matvecs``.
    """
    k = min(sketch_size, n)
    Q, low_rank = _sketch(matvec, n, k, generator, device, dtype)
    if k == n:
        return TraceEstimate(low_rank, 0.0, 2 * k)
    samples = _residual_samples(matvec, Q, probes_per_round, generator, device, dtype)
    while True:
        est, se = _mean_and_stderr(samples)
        used = 2 * k + samples.numel()
        if se <= rel_stderr * abs(low_rank + est) or used + probes_per_round > max_matvecs:
            return TraceEstimate(low_rank + est, se, used)
        more = _residual_samples(matvec, Q, probes_per_round, generator, device, dtype)
        samples = torch.cat([samples, more])


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ output: per-probe Gauss nodes and weights (rows; padded entries have weight 0) and a
    density on ``grid`` normalised to integrate to ≈ 1 (the spectral measure divided by n)."""

    nodes: Tensor  # (num_probes, num_steps) float64
    weights: Tensor  # (num_probes, num_steps) float64, each row sums to 1
    grid: Tensor
    density: Tensor
    n: int

    def trace_of(self, f: Callable[[Tensor], Tensor]) -> float:
        """Estimate of ``tr f(A) = n · mean_probes Σ_j τ_j f(θ_j)``."""
        return float(self.n * (self.weights * f(self.nodes)).sum(dim=1).mean())


def slq_spectral_density(
    matvec: MatVec,
    n: int,
    num_probes: int,
    num_steps: int,
    generator: torch.Generator,
    *,
    grid: Tensor | None = None,
    num_grid: int = 1000,
    sigma: float | None = None,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density of a symmetric operator.

    For each unit probe ``v = r/√n`` (r Rademacher), ``num_steps`` Lanczos steps give
    ``T = S diag(θ) Sᵀ``; nodes θ_j and weights τ_j = S[0, j]² make a Gauss quadrature with
    ``vᵀ f(A) v ≈ Σ_j τ_j f(θ_j)``, exact for polynomials of degree ≤ 2·steps − 1. The density is
    ``mean_probes Σ_j τ_j 𝒩(t; θ_j, σ²)``; σ defaults to 1% of the node range.
    """
    if num_probes < 1 or num_steps < 1:
        raise ValueError("num_probes and num_steps must be ≥ 1")
    m = min(num_steps, n)
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    for i, r in enumerate(rademacher(n, num_probes, generator, device, dtype)):
        alpha, beta, _, steps = lanczos_tridiagonal(matvec, r / math.sqrt(n), m)
        theta, S = _tridiag_eigh(alpha, beta)
        nodes[i, :steps] = theta
        weights[i, :steps] = S[0] ** 2
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_grid, dtype=torch.float64)
    grid = grid.to(torch.float64)
    gauss = torch.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2)
    gauss = gauss / (sigma * math.sqrt(2 * math.pi))
    density = (gauss * weights[None]).sum(dim=2).mean(dim=1)
    return SpectralDensity(nodes, weights, grid, density, n)
