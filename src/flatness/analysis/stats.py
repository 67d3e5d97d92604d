"""Study statistics: Kendall τ, granulated Ψ, large- vs small-batch effects, invariance ratios.

Every function takes and returns pandas DataFrames (or plain lists); nothing reads files or the
``snakemake`` object. The correlation protocol follows Jiang et al. (ICLR 2020), METHODS.md §8:
Kendall τ-b (``scipy.stats.kendalltau``) of each measure against the generalisation gap over all
runs, and the granulated ψ_i: for each hyperparameter axis i, τ within every group of runs that
agree on all other axes, averaged over groups; Ψ = mean_i ψ_i. Every headline statistic carries a
percentile-bootstrap interval over runs (:func:`bootstrap_ci`) besides its p-value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from flatness.measure_signatures import HIGHER_IS_FLATTER
from flatness.suite import AXES, ORIGINAL

GAPS = ("gap_loss", "gap_acc")
#: Outcomes compared between the largest and the smallest batch besides the measures.
BATCH_OUTCOMES = ("test_acc", "train_acc", "gap_acc", "gap_loss")


def sharpness_sign(function: str) -> int:
    """+1 when larger values of the measure mean sharper, −1 when they mean flatter."""
    return -1 if function in HIGHER_IS_FLATTER else 1


# --------------------------------------------------------------------------------------------
# Bootstrap intervals
#
# Written here rather than with scipy.stats.bootstrap: (1) the statistics below are vectorised
# over replicates (all B resamples in one array operation, ~100× faster than scipy's per-replicate
# Kendall τ), and (2) scipy returns a NaN interval as soon as one replicate is undefined (a
# resample of a dozen runs whose measure is constant), where we drop those replicates and report
# NaN only when fewer than half remain.


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall τ-b along the last axis, vectorised over leading axes (NaN where undefined).

    τ_b = Σ_{i<j} sgn(Δx)sgn(Δy) / √(Σ_{i<j} |sgn Δx| · Σ_{i<j} |sgn Δy|), equal to
    ``scipy.stats.kendalltau`` (variant 'b').

    >>> float(kendall_tau_b(np.array([1., 2, 3, 4]), np.array([1., 3, 2, 4])).round(4))
    0.6667
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = x.shape[-1]
    iu = np.triu_indices(n, k=1)
    sx = np.sign(x[..., :, None] - x[..., None, :])[..., iu[0], iu[1]]
    sy = np.sign(y[..., :, None] - y[..., None, :])[..., iu[0], iu[1]]
    denom = np.sqrt(np.abs(sx).sum(-1) * np.abs(sy).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (sx * sy).sum(-1) / np.where(denom > 0, denom, 1), np.nan)


def cliffs_delta_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cliff's δ = P(A > B) − P(A < B) along the last axes, vectorised over the leading ones."""
    return np.sign(a[..., :, None] - b[..., None, :]).mean(axis=(-2, -1))


def mean_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mean(A) − mean(B) along the last axis."""
    return a.mean(-1) - b.mean(-1)


def bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    a: Sequence[float],
    b: Sequence[float],
    paired: bool,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(a, b)`` over ``n_resamples`` resamples.

    ``paired``: (a_i, b_i) are one unit (a run's measure and its gap) resampled together; else A
    and B are independent groups, each resampled within itself. ``statistic`` takes arrays with a
    leading replicate axis. Undefined replicates are dropped; (NaN, NaN) when fewer than half of
    them are defined or a sample is empty. Reproducible: ``seed`` fixes the resamples.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0 or n_resamples <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    # chunks keep the pairwise (B, n, n) sign arrays of τ and δ within ~32 MB
    chunk = max(1, int(4e6 // max(a.size * b.size, 1)))
    values = []
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        ia = rng.integers(0, a.size, (k, a.size))
        ib = ia if paired else rng.integers(0, b.size, (k, b.size))
        values.append(statistic(a[ia], b[ib]))
    vals = np.concatenate(values)
    vals = vals[np.isfinite(vals)]
    if vals.size < n_resamples / 2:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(vals, [tail, 100 - tail])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# Correlations


def _tau(x: Iterable[float], y: Iterable[float]) -> tuple[float, float, int]:
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(ok.sum())
    if n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, n
    res = stats.kendalltau(x, y)  # τ-b
    return float(res.statistic), float(res.pvalue), n


def kendall_table(
    runs: pd.DataFrame,
    measures: Sequence[str],
    gaps: Sequence[str] = GAPS,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Kendall τ-b of every measure against every gap column over all runs: p-value, n and a
    paired percentile-bootstrap 95% interval over runs (``ci_low``, ``ci_high``)."""
    columns = ["measure", "gap", "tau", "ci_low", "ci_high", "p_value", "n"]
    rows = []
    for m in measures:
        for g in gaps:
            x, y = runs[m].to_numpy(dtype=float), runs[g].to_numpy(dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            tau, p, n = _tau(x, y)
            lo, hi = (
                bootstrap_ci(kendall_tau_b, x[ok], y[ok], True, n_resamples, seed=seed)
                if math.isfinite(tau)
                else (math.nan, math.nan)
            )
            rows.append(
                {"measure": m, "gap": g, "tau": tau, "ci_low": lo, "ci_high": hi, "p_value": p,
                 "n": n}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


#: Axes over which granulated Kendall averages: hyperparameters only. Seeds are repetitions, so
#: they stay inside each group (METHODS.md §8) instead of becoming an "axis" of their own.
HYPERPARAMETER_AXES = tuple(a for a in AXES if a != "seed")


def varying_axes(runs: pd.DataFrame, axes: Sequence[str] = HYPERPARAMETER_AXES) -> list[str]:
    """The hyperparameter axes that take at least two values among the runs."""
    return [a for a in axes if a in runs and runs[a].nunique(dropna=False) >= 2]


def granulated_kendall(
    runs: pd.DataFrame,
    measures: Sequence[str],
    gaps: Sequence[str] = GAPS,
    axes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Jiang et al.'s granulated Kendall: ψ_i per varying axis i and Ψ = mean_i ψ_i.

    For axis i, runs are grouped by the values of every *other* varying axis; τ between measure
    and gap is computed within each group in which axis i takes ≥ 2 values (groups where τ is
    undefined, e.g. a constant measure, are skipped) and ψ_i is the mean over groups. Rows have
    ``axis = "Psi"`` for the mean. Empty when fewer than two axes vary (Ψ would equal τ).
    """
    axes = varying_axes(runs) if axes is None else list(axes)
    columns = ["measure", "gap", "axis", "psi", "groups"]
    if len(axes) < 2:
        return pd.DataFrame(columns=columns)
    rows = []
    for m in measures:
        for g in gaps:
            psis = []
            for axis in axes:
                others = [a for a in axes if a != axis]
                taus = []
                for _, group in runs.groupby(others, dropna=False):
                    if group[axis].nunique() < 2:
                        continue
                    tau, _, _ = _tau(group[m], group[g])
                    if math.isfinite(tau):
                        taus.append(tau)
                psi = float(np.mean(taus)) if taus else math.nan
                psis.append(psi)
                rows.append({"measure": m, "gap": g, "axis": axis, "psi": psi, "groups": len(taus)})
            finite = [p for p in psis if math.isfinite(p)]
            rows.append(
                {
                    "measure": m,
                    "gap": g,
                    "axis": "Psi",
                    "psi": float(np.mean(finite)) if finite else math.nan,
                    "groups": len(finite),
                }
            )
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------
# Large vs small batch


def cliffs_delta(a: Sequence[float], b: Sequence[float]) -> float:
    """P(A > B) − P(A < B) over all pairs (Cliff 1993); in [−1, 1].

    >>> cliffs_delta([3, 4], [1, 2])
    1.0
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0:
        return math.nan
    return float(cliffs_delta_batch(a, b))


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """(mean A − mean B) / pooled sd, with the small-sample correction J = 1 − 3/(4(n_a+n_b) − 9)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return math.nan
    return float((a.mean() - b.mean()) / pooled * (1 - 3 / (4 * (na + nb) - 9)))


def batch_comparison(
    runs: pd.DataFrame,
    measures: Sequence[str],
    functions: Mapping[str, str] | None = None,
    outcomes: Sequence[str] = BATCH_OUTCOMES,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Largest vs smallest batch size, per outcome and per measure, over runs that trained ``ok``.

    Columns: group sizes, medians and means, the difference of means (large − small) with a
    two-sample percentile-bootstrap 95% interval, Cliff's δ (large vs small) with its interval,
    Hedges g, the two-sided Mann–Whitney U and its p-value. δ and g are signed on the raw scale;
    for measures (``kind = "measure"``) ``large_sharper`` turns δ into the sharpness direction
    (for PAC-Bayes σ a larger value means flatter); it is empty for outcomes. ``functions`` maps a
    measure label to its function name (labels equal names by default).
    """
    columns = [
        "kind",
        "measure",
        "small_batch",
        "large_batch",
        "n_small",
        "n_large",
        "median_small",
        "median_large",
        "mean_small",
        "mean_large",
        "diff_mean",
        "diff_ci_low",
        "diff_ci_high",
        "cliffs_delta",
        "delta_ci_low",
        "delta_ci_high",
        "hedges_g",
        "mannwhitney_u",
        "p_value",
        "large_sharper",
    ]
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    sizes = sorted(ok["batch_size"].dropna().unique())
    if len(sizes) < 2:
        return pd.DataFrame(columns=columns)
    small_bs, large_bs = sizes[0], sizes[-1]
    rows = []
    items = [("outcome", c) for c in outcomes if c in ok] + [("measure", m) for m in measures]
    for kind, m in items:
        s = ok.loc[ok["batch_size"] == small_bs, m].astype(float).dropna().to_numpy()
        large = ok.loc[ok["batch_size"] == large_bs, m].astype(float).dropna().to_numpy()
        if s.size and large.size:
            res = stats.mannwhitneyu(large, s, alternative="two-sided")
            u, p = float(res.statistic), float(res.pvalue)
        else:
            u = p = math.nan
        delta = cliffs_delta(large, s)
        boot = dict(paired=False, n_resamples=n_resamples, seed=seed)
        diff_ci = bootstrap_ci(mean_difference, large, s, **boot)
        delta_ci = bootstrap_ci(cliffs_delta_batch, large, s, **boot)
        sharper = None
        if kind == "measure" and math.isfinite(delta):
            sharper = bool(sharpness_sign((functions or {}).get(m, m)) * delta > 0)
        rows.append(
            {
                "kind": kind,
                "measure": m,
                "small_batch": int(small_bs),
                "large_batch": int(large_bs),
                "n_small": int(s.size),
                "n_large": int(large.size),
                "median_small": float(np.median(s)) if s.size else math.nan,
                "median_large": float(np.median(large)) if large.size else math.nan,
                "mean_small": float(s.mean()) if s.size else math.nan,
                "mean_large": float(large.mean()) if large.size else math.nan,
                "diff_mean": float(large.mean() - s.mean()) if s.size and large.size else math.nan,
                "diff_ci_low": diff_ci[0],
                "diff_ci_high": diff_ci[1],
                "cliffs_delta": delta,
                "delta_ci_low": delta_ci[0],
                "delta_ci_high": delta_ci[1],
                "hedges_g": hedges_g(large, s),
                "mannwhitney_u": u,
                "p_value": p,
                "large_sharper": sharper,
            }
        )
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------
# Invariance under function-preserving reparameterisations


def invariance_table(long: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """Ratio of each measure on each reparameterised copy to its value on the original model.

    Per measure × variant over runs: median, min and max ratio; ``invariant`` when every ratio is
    within 1 ± ``tolerance``; for Dinh α copies ``alpha_exponent`` = log(median ratio)/log α
    (≈ 0 for invariant measures, ≈ 2 for the Euclidean Hessian's λ_max, METHODS.md §6). Rows
    with no finite ratio (the copy did not apply) keep ``n = 0`` and the note.
    """
    columns = [
        "measure",
        "function",
        "variant",
        "factor",
        "n",
        "median_ratio",
        "min_ratio",
        "max_ratio",
        "alpha_exponent",
        "invariant",
        "note",
    ]
    orig = long[long["variant"] == ORIGINAL].set_index(["run_id", "measure"])["value"]
    copies = long[long["variant"] != ORIGINAL].copy()
    if copies.empty:
        return pd.DataFrame(columns=columns)
    base = orig.reindex(pd.MultiIndex.from_frame(copies[["run_id", "measure"]])).to_numpy()
    copies["ratio"] = copies["value"].to_numpy(dtype=float) / base
    rows = []
    for (measure, variant), grp in copies.groupby(["measure", "variant"], sort=False):
        r = grp["ratio"].replace([np.inf, -np.inf], np.nan).dropna()
        factor = float(grp["factor"].iloc[0])
        med = float(r.median()) if len(r) else math.nan
        exponent = (
            math.log(med) / math.log(factor)
            if variant.startswith("dinh") and factor != 1 and med > 0
            else math.nan
        )
        notes = sorted({str(n) for n in grp["note"].dropna() if str(n)})
        rows.append(
            {
                "measure": measure,
                "function": grp["function"].iloc[0],
                "variant": variant,
                "factor": factor,
                "n": int(len(r)),
                "median_ratio": med,
                "min_ratio": float(r.min()) if len(r) else math.nan,
                "max_ratio": float(r.max()) if len(r) else math.nan,
                "alpha_exponent": exponent,
                "invariant": bool(len(r) and ((r - 1).abs() <= tolerance).all()),
                "note": notes[0] if notes else "",
            }
        )
    return pd.DataFrame(rows, columns=columns)


