"""PAC-Bayes σ (Jiang et al., ICLR 2020, "Fantastic generalization measures"): the largest Gaussian
weight noise the accuracy tolerates, isotropic and magnitude-aware, and the bound built on it.

σ is a **standard deviation** throughout: θ + σz with z ~ N(0, I). The Dziugaite et al. port
passes σ² to ``torch.normal`` as the std (METHODS.md §5, σ-vs-variance pitfall); not copied here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatness.batches import Batches, LossFn, eval_mode

#: ε of the magnitude-aware noise, std_i = sqrt(σ'²θ_i² + ε²) (Jiang et al. 2020).
MAGNITUDE_EPS = 1e-3
#: Noise draws up to this size (all S draws together) are kept across the bisection's σs.
NOISE_CACHE_BYTES = 256 * 2**20


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Batches, params: dict[str, Tensor] | None) -> float:
    """Share of samples whose argmax logit is the label; a sample with non-finite logits is
    counted wrong (large noise can overflow a deep float32 net)."""
    correct = 0
    for X, y in batches:
        out = functional_call(model, params, (X,)) if params else model(X)
        if out.dim() != 2 or y.dim() != 1 or y.is_floating_point():
            raise ValueError(
                "PAC-Bayes σ measures an accuracy drop: the model must output (N, classes) logits "
                f"and y hold class indices; got output {tuple(out.shape)}, y {tuple(y.shape)}"
            )
        ok = (out.argmax(dim=1) == y) & torch.isfinite(out).all(dim=1)
        correct += int(ok.sum())
    return correct / batches.num_samples


class _NoisyAccuracy:
    """Accuracies at θ + s ⊙ z_k for k < num_samples, z_k ~ N(0, I) redrawn from fixed per-draw
    seeds, so every σ the bisection tries sees the same z_k (common random numbers: the drop is
    a deterministic function of σ for a given seed, and the bisection cannot be fooled by
    resampling noise). z_k is drawn on the CPU in float64 and then cast and moved, so a seed gives
    the same draws, and the same σ, on any device and in any dtype.

    The draws are kept between σs while they fit in :data:`NOISE_CACHE_BYTES`: drawing them took
    ≈ 40% of the measure on the MLP (15 bisection steps × S draws of 670k float64 normals); a
    larger model redraws them, the same values, at each σ."""

    def __init__(self, model: nn.Module, batches: Batches, num_samples: int, seed: int) -> None:
        self.model, self.batches = model, batches
        self.theta = {k: p.detach() for k, p in model.named_parameters()}
        if not self.theta:
            raise ValueError(f"{type(model).__name__} has no parameters to perturb")
        g = torch.Generator().manual_seed(int(seed))
        self.draw_seeds = torch.randint(0, 2**62, (int(num_samples),), generator=g).tolist()
        size = sum(t.numel() * t.element_size() for t in self.theta.values())
        self._kept: dict[int, dict[str, Tensor]] | None = (
            {} if size * len(self.draw_seeds) <= NOISE_CACHE_BYTES else None
        )

    def _noise(self, k: int) -> dict[str, Tensor]:
        if self._kept is not None and k in self._kept:
            return self._kept[k]
        g = torch.Generator().manual_seed(self.draw_seeds[k])
        z = {
            name: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)
            for name, t in self.theta.items()
        }
        if self._kept is not None:
            self._kept[k] = z
        return z

    def per_draw(self, std: Callable[[Tensor], Tensor]) -> np.ndarray:
        """Accuracy for each draw; ``std(θ_T)`` gives the elementwise noise std of tensor T."""
        accs = []
        for k in range(len(self.draw_seeds)):
            z = self._noise(k)
            params = {name: t + std(t) * z[name] for name, t in self.theta.items()}
            accs.append(_accuracy(self.model, self.batches, params))
        return np.asarray(accs)


def _bisect_sigma(
    model: nn.Module,
    data,
    std_of: Callable[[float], Callable[[Tensor], Tensor]],
    *,
    target_drop: float,
    tol: float,
    num_samples: int,
    sigma_max: float,
    depth: int,
    seed: int,
    return_stderr: bool,
) -> float | tuple[float, float]:
    if not 0 < target_drop < 1 or tol <= 0 or sigma_max <= 0 or depth < 1 or num_samples < 1:
        raise ValueError(
            "need 0 < target_drop < 1, tol > 0, sigma_max > 0, depth ≥ 1 and num_samples ≥ 1; got "
            f"{target_drop=}, {tol=}, {sigma_max=}, {depth=}, {num_samples=}"
        )
    batches = Batches.for_model(data, model)
    with eval_mode(model):
        noisy = _NoisyAccuracy(model, batches, num_samples, seed)
        acc0 = _accuracy(model, batches, None)

        def drops(sigma: float) -> np.ndarray:
            return acc0 - noisy.per_draw(std_of(sigma))

        lo, hi = 0.0, float(sigma_max)
        accepted = False
        for _ in range(int(depth)):
            sigma = (lo + hi) / 2
            bracket = (lo, hi)  # σ is its midpoint; the root of the mean drop lies inside
            d = drops(sigma)
            if abs(d.mean() - target_drop) < tol:
                accepted = True
                break
            if d.mean() > target_drop:
                hi = sigma
            else:
                lo = sigma
        if not return_stderr:
            return sigma
        return sigma, _stderr(sigma, d, drops, bracket, accepted, tol)


def _stderr(
    sigma: float,
    d: np.ndarray,
    drops: Callable[[float], np.ndarray],
    bracket: tuple[float, float],
    accepted: bool,
    tol: float,
) -> float:
    """Standard error of the returned σ: Monte Carlo noise ⊕ bisection resolution (see
    :func:`pacbayes_sigma`). ``d`` are the per-draw drops at σ, ``bracket`` the bisection interval
    whose midpoint σ is, ``accepted`` whether σ stopped the bisection inside the ±tol band."""
    # Local slope of the mean drop, central difference on the same draws at σ(1 ± h).
    h = 0.1
    slope = (drops(sigma * (1 + h)).mean() - drops(sigma * (1 - h)).mean()) / (2 * h * sigma)
    if slope <= 0 or len(d) < 2:
        return float("inf")
    # (1) Monte Carlo: standard error of the mean drop at σ, mapped to σ by the slope.
    monte_carlo = d.std(ddof=1) / math.sqrt(len(d)) / slope
    # (2) Resolution: every root within ±tol/slope of σ (and inside the bracket) would have
    # returned this σ; a uniform offset over a band of width w has sd w/√12.
    lo, hi = bracket
    if accepted:
        lo, hi = max(lo, sigma - tol / slope), min(hi, sigma + tol / slope)
    resolution = (hi - lo) / math.sqrt(12)
    return float(math.hypot(monte_carlo, resolution))


def pacbayes_sigma(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    target_drop: float = 0.1,
    tol: float = 0.01,
    num_samples: int = 10,
    sigma_max: float = 2.0,
    depth: int = 15,
    seed: int = 0,
    return_stderr: bool = False,
) -> float | tuple[float, float]:
    """Largest noise std σ with acc(θ) − E_z acc(θ + σz) ≈ ``target_drop``, z ~ N(0, I).

    .. math::
        σ^* : \\; \\mathrm{acc}(θ) − \\frac{1}{S}\\sum_{k=1}^{S} \\mathrm{acc}(θ + σ^* z_k)
        = Δ \\; (± \\mathrm{tol})

    Jiang et al. (ICLR 2020), PAC-Bayes "sharpness" σ; flatness is 1/σ², see
    :func:`pacbayes_bound`. Bisection on [0, ``sigma_max``]: at most ``depth`` halvings, stopping
    early once the mean drop is within ``tol`` of ``target_drop``; S = ``num_samples`` draws from
    ``seed``, reused at every σ. σ is the noise **standard deviation**, on every parameter
    (biases included). Accuracy = argmax of the logits vs the integer labels of ``data`` (all
    samples; the training set in Jiang et al.), model in ``eval()``. If even ``sigma_max`` does not
    reach the drop, the result approaches ``sigma_max``. ``loss_fn`` is accepted for a uniform
    measure signature and unused: the criterion is accuracy.

    Not reparameterisation-invariant (isotropic noise; METHODS.md §5). ``return_stderr=True``
    returns ``(σ, stderr)``. Write D̂(σ) for the mean drop over the S draws, D its expectation, D'
    its slope at σ (central difference over σ(1 ± 0.1) on the same draws: two extra evaluations)
    and r̂, r the roots D̂(r̂) = Δ, D(r) = Δ. The error σ − r has two parts:

    * Monte Carlo, r̂ − r ≈ −(D̂ − D)/D' (delta method): sd s/(√S·D'), s the per-draw sd of the
      drop at σ;
    * resolution, σ − r̂: the bisection returns the first dyadic midpoint with |D̂(σ) − Δ| < tol,
      so any root within ±tol/D' of σ, and inside the bracket [lo, hi] whose midpoint σ is, would
      have given this σ (without an early stop: the whole bracket). The grid does not know where
      r̂ falls, so the offset is taken uniform over that band of width w: sd w/√12.

    The offset depends on r̂ only through its place on the grid, so the two are ≈ independent:
    stderr = sqrt(s²/(S·D'²) + w²/12); ∞ if D' ≤ 0. Measured on the test net (S = 50,
    150 seeds): sd of σ over seeds / median stderr = 0.97; the Monte Carlo term alone gave 1.35.
    Cost ≈ (number of bisection steps) × S forward passes over ``data``.
    """
    return _bisect_sigma(
        model,
        data,
        lambda sigma: lambda t: torch.full_like(t, sigma),
        target_drop=target_drop,
        tol=tol,
        num_samples=num_samples,
        sigma_max=sigma_max,
        depth=depth,
        seed=seed,
        return_stderr=return_stderr,
    )


def pacbayes_magnitude_sigma(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    target_drop: float = 0.1,
    tol: float = 0.01,
    num_samples: int = 10,
    sigma_max: float = 2.0,
    depth: int = 15,
    eps: float = MAGNITUDE_EPS,
    seed: int = 0,
    return_stderr: bool = False,
) -> float | tuple[float, float]:
    """Magnitude-aware PAC-Bayes σ': noise std sqrt(σ'²θ_i² + ε²) per parameter (Jiang et al. 2020).

    .. math:: θ_i + \\sqrt{σ'^2 θ_i^2 + ε^2}\\; z_i, \\quad z ~ N(0, I), \\; ε = 10^{-3}

    The same bisection as :func:`pacbayes_sigma`, over σ'; flatness is 1/σ'². With ε = 0 the
    noise is σ'|θ| ⊙ z, which commutes with every positive diagonal rescaling θ → Λθ, so σ' is
    then invariant to layer-wise and neuron-wise rescaling for a fixed seed; ε > 0 breaks this
    only where ε is not ≪ σ'|θ_i| (tiny weights), hence "≈ invariant" (METHODS.md §5).
    """
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")

    def std_of(sigma: float) -> Callable[[Tensor], Tensor]:
        return lambda t: torch.sqrt((sigma * t) ** 2 + eps**2)

    return _bisect_sigma(
        model,
        data,
        std_of,
        target_drop=target_drop,
        tol=tol,
        num_samples=num_samples,
        sigma_max=sigma_max,
        depth=depth,
        seed=seed,
        return_stderr=return_stderr,
    )


def pacbayes_bound(
    weights: nn.Module | Tensor,
    sigma: float,
    num_samples: int,
    *,
    init: nn.Module | Tensor | None = None,
) -> float:
    """The PAC-Bayes bound term of Jiang et al. (2020) for a noise std σ on N training samples.

    .. math:: \\frac{‖w − w_0‖_2^2}{4σ^2} + \\log\\frac{N}{σ} + 10

    ``weights`` is a model (all parameters) or a flat tensor; ``init`` (same kind) gives w₀, the
    initialisation (``pacbayes.init`` in Jiang et al.); without it w₀ = 0. Not a measure in
    ``MEASURES``: it combines a σ from :func:`pacbayes_sigma` with the weight norm.

    >>> import torch
    >>> pacbayes_bound(torch.ones(4), sigma=1.0, num_samples=1)
    11.0
    """
    if sigma <= 0 or num_samples < 1:
        raise ValueError(f"need sigma > 0 and num_samples ≥ 1, got {sigma=}, {num_samples=}")

    def flat(w: nn.Module | Tensor) -> Tensor:
        if isinstance(w, nn.Module):
            return torch.cat([p.detach().reshape(-1) for p in w.parameters()]).double()
        return w.detach().reshape(-1).double()

    w = flat(weights)
    if init is not None:
        w0 = flat(init).to(w.device)
        if w0.shape != w.shape:
            raise ValueError(f"init has {w0.numel()} parameters, weights {w.numel()}")
        w = w - w0
    return float(w @ w) / (4 * sigma**2) + math.log(num_samples / sigma) + 10
