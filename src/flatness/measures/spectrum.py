"""The Hessian's spectral density by stochastic Lanczos quadrature (SLQ), as a measure output.

:func:`hessian_spectrum` runs :func:`flatness.hutchinson.slq_spectral_density` on the same
operator as :func:`~flatness.measures.hessian_max_eigenvalue` and
:func:`~flatness.measures.hessian_trace`: H = ∇²L of the *mean* loss over every sample of
``data`` (:class:`flatness.hvp.HessianOperator`), in ``eval()`` mode (the caller's mode restored),
in the model's dtype and on its device, all parameters or, with ``layer=``, the diagonal block of
one weight layer's weight. It returns a :class:`~flatness.hutchinson.SpectralDensity`, not a
float, so it is not in ``MEASURES``; :func:`spectrum_table` and :func:`spectrum_nodes` turn it
into tidy tables, :func:`top_node` reads SLQ's estimate of λ_max.

What SLQ gives (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019): per unit Rademacher probe
``v = r/√n``, ``m`` Lanczos steps give Gauss nodes θ_j and weights τ_j with
``vᵀ f(H) v ≈ Σ_j τ_j f(θ_j)``, exact for polynomials of degree ≤ 2m − 1, so
``sd.trace_of(f)`` is a Hutchinson estimate of tr f(H) (unbiased for such polynomials). With
``m ≥ n`` each probe's run ends on an invariant subspace and its nodes are eigenvalues of H.
The extreme nodes converge first: a few tens of steps give λ_max closely, the bulk only as a
smoothed density (σ = 1% of the node range unless given).

Not reparameterisation-invariant: under Dinh's α the block of the scaled layer's weight
becomes α²H_ll, and the spectrum moves with it (tests/test_spectrum.py).
"""

from __future__ import annotations

import torch
from torch import nn

from flatness.batches import DEFAULT_CHUNK
from flatness.hutchinson import SpectralDensity, slq_spectral_density
from flatness.hvp import DEFAULT_GRAPH_BUDGET
from flatness.measures.curvature import _layer_weight, _operator

#: Columns of :func:`spectrum_table` and :func:`spectrum_nodes`.
SPECTRUM_COLUMNS = ("eigenvalue", "density")
NODE_COLUMNS = ("probe", "node", "weight")


def hessian_spectrum(
    model: nn.Module,
    data,
    *,
    num_probes: int = 4,
    num_steps: int = 40,
    seed: int = 0,
    layer: int | None = None,
    loss_fn=None,
    num_grid: int = 400,
    sigma: float | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    graph_budget_bytes: int = DEFAULT_GRAPH_BUDGET,
) -> SpectralDensity:
    """Spectral density of H = ∇²L (mean loss) by SLQ: ``num_probes`` Rademacher probes (drawn
    from ``torch.Generator().manual_seed(seed)`` on the CPU, so a seed gives the same probes on
    every device), ``num_steps`` Lanczos steps each (at most n), the density on ``num_grid``
    points spanning the nodes ± 5σ, Gaussian broadening ``sigma`` (default 1% of the node range).

    ``layer`` (an index into :func:`flatness.reparam.weight_layers`, negative from the end): the
    spectrum of the diagonal block H_ll of that layer's weight W_l (bias excluded), the loss still
    that of the whole network; ``sd.n`` is then W_l's entry count.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> mse = lambda out, y: ((out.squeeze(-1) - y) ** 2).mean()
    >>> sd = hessian_spectrum(lin, (X, torch.zeros(2, dtype=torch.float64)), loss_fn=mse)
    >>> sorted(round(float(x), 10) for x in spectrum_nodes(sd)["node"].unique())  # H = diag(1, 4)
    [1.0, 4.0]
    """
    if int(num_probes) < 1 or int(num_steps) < 1:
        raise ValueError(f"num_probes and num_steps must be ≥ 1, got {num_probes}, {num_steps}")
    if int(num_grid) < 2:
        raise ValueError(f"num_grid must be ≥ 2, got {num_grid}")
    if sigma is not None and not float(sigma) > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    op = _operator(
        model, data, loss_fn, _layer_weight(model, layer), chunk_size, graph_budget_bytes
    )
    gen = torch.Generator().manual_seed(int(seed))
    with op:
        return slq_spectral_density(
            op.matvec,
            op.num_params,
            int(num_probes),
            int(num_steps),
            gen,
            num_grid=int(num_grid),
            sigma=None if sigma is None else float(sigma),
            device=op.device,
            dtype=op.dtype,
        )


def spectrum_table(sd: SpectralDensity):
    """The smoothed density as a ``pandas.DataFrame`` with columns ``eigenvalue`` (the grid) and
    ``density`` (integrates to ≈ 1 over the grid)."""
    import pandas as pd

    return pd.DataFrame(
        {
            "eigenvalue": sd.grid.detach().cpu().to(torch.float64).numpy(),
            "density": sd.density.detach().cpu().to(torch.float64).numpy(),
        },
        columns=list(SPECTRUM_COLUMNS),
    )


def spectrum_nodes(sd: SpectralDensity):
    """The Gauss quadrature as a ``pandas.DataFrame`` with columns ``probe`` (0-based),
    ``node`` (θ_j) and ``weight`` (τ_j; each probe's weights sum to 1). The padded entries of a
    probe whose Lanczos run stopped early (weight 0) are dropped; nodes ascend within a probe."""
    import pandas as pd

    weights = sd.weights.detach().cpu().to(torch.float64)
    nodes = sd.nodes.detach().cpu().to(torch.float64)
    probe, idx = torch.nonzero(weights > 0, as_tuple=True)
    return pd.DataFrame(
        {
            "probe": probe.numpy().astype(int),
            "node": nodes[probe, idx].numpy(),
            "weight": weights[probe, idx].numpy(),
        },
        columns=list(NODE_COLUMNS),
    )


def top_node(sd: SpectralDensity) -> float:
    """The largest Gauss node over all probes: SLQ's estimate of λ_max (a lower bound, since
    every Ritz value lies in [λ_min, λ_max]; the extreme nodes converge first)."""
    used = sd.weights > 0
    return float(sd.nodes[used].max())
