"""Study tables and statistics: runs.csv, Kendall τ, granulated Ψ, batch-size tests, invariance.

Every function takes and returns pandas DataFrames (or plain dicts/lists); nothing reads files or
the ``snakemake`` object. The correlation protocol follows Jiang et al. (ICLR 2020), METHODS.md §8:
Kendall τ-b (``scipy.stats.kendalltau``) of each measure against the generalisation gap over all
runs, and the granulated ψ_i: for each hyperparameter axis i, τ within every group of runs that
agree on all other axes, averaged over groups; Ψ = mean_i ψ_i.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from flatness.measures import HIGHER_IS_FLATTER
from flatness.suite import AXES, ORIGINAL

#: Outcome columns of runs.csv (DESIGN.md contract 2), taken from each run's metrics.json.
OUTCOMES = (
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "gap_loss",
    "gap_acc",
    "epochs",
    "steps",
    "wall_time_s",
    "status",
    "stopped_by",
)
GAPS = ("gap_loss", "gap_acc")


def sharpness_sign(function: str) -> int:
    """+1 when larger values of the measure mean sharper, −1 when they mean flatter."""
    return -1 if function in HIGHER_IS_FLATTER else 1


# --------------------------------------------------------------------------------------------
# Aggregation


def runs_table(
    runs: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Mapping[str, Any]],
    long: pd.DataFrame,
) -> pd.DataFrame:
    """One row per run: the grid axes, the outcomes, one column per measure (original model).

    ``runs``: dicts with ``run_id`` and the grid axes; ``metrics``: run id → metrics.json;
    ``long``: the long measure table. Measure columns follow the order of first appearance.
    """
    rows = []
    for r in runs:
        m = metrics[r["run_id"]]
        rows.append({**dict(r), **{k: m.get(k, math.nan) for k in OUTCOMES}})
    table = pd.DataFrame(rows, columns=["run_id", *AXES, *OUTCOMES])
    original = long[long["variant"] == ORIGINAL]
    labels = list(dict.fromkeys(long["measure"]))
    wide = original.pivot_table(index="run_id", columns="measure", values="value", dropna=False)
    wide = wide.reindex(index=table["run_id"], columns=labels)
    for label in labels:
        table[label] = wide[label].to_numpy(dtype=float)
    return table


def history_table(
    runs: Sequence[Mapping[str, Any]], metrics: Mapping[str, Mapping[str, Any]]
) -> pd.DataFrame:
    """Training curves in long form: run id, grid axes, then one row per history record.

    ``history`` in metrics.json may be a list of per-epoch dicts or a dict of equal-length lists.
    A history key that clashes with a grid axis (the trainer's per-epoch ``lr``, the scaled and
    scheduled rate) is renamed ``epoch_<key>``.
    """
    frames = []
    for r in runs:
        hist = metrics[r["run_id"]].get("history") or []
        frame = pd.DataFrame(hist)
        if frame.empty:
            continue
        frame = frame.rename(
            columns={k: f"epoch_{k}" for k in frame.columns if k in ("run_id", *AXES)}
        )
        if "epoch" not in frame:
            frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
        for key in reversed(["run_id", *AXES]):
            frame.insert(0, key, r[key])
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run_id", *AXES, "epoch"])
    return pd.concat(frames, ignore_index=True)


def seed_summary(runs: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds of the outcomes and measures, per setting of the other axes.

    One row per (dataset, model, optimizer, regularizer, batch_size, lr); columns ``<col>_mean``
    and ``<col>_std`` (sample std, NaN for one seed) and ``seeds`` (runs that did not diverge).
    """
    keys = [a for a in AXES if a != "seed"]
    values = ["train_loss", "test_loss", "train_acc", "test_acc", "gap_loss", "gap_acc", "epochs"]
    values += [m for m in measures if m not in values]
    ok = runs[runs["status"] == "ok"]
    grouped = ok.groupby(keys, sort=True, dropna=False)[values]
    mean, std = grouped.mean().add_suffix("_mean"), grouped.std(ddof=1).add_suffix("_std")
    out = pd.concat([mean, std], axis=1)
    out = out[[f"{v}_{s}" for v in values for s in ("mean", "std")]]
    out.insert(0, "seeds", grouped.size())
    return out.reset_index()


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
    runs: pd.DataFrame, measures: Sequence[str], gaps: Sequence[str] = GAPS
) -> pd.DataFrame:
    """Kendall τ-b of every measure against every gap column, over all runs, with p-values."""
    rows = []
    for m in measures:
        for g in gaps:
            tau, p, n = _tau(runs[m], runs[g])
            rows.append({"measure": m, "gap": g, "tau": tau, "p_value": p, "n": n})
    return pd.DataFrame(rows, columns=["measure", "gap", "tau", "p_value", "n"])


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
    diff = a[:, None] - b[None, :]
    return float((np.sign(diff)).mean())


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
    runs: pd.DataFrame, measures: Sequence[str], functions: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Largest vs smallest batch size, per measure: medians, Cliff's δ, Hedges g, Mann–Whitney U.

    δ and g are signed as (large − small) on the measure's raw scale; ``large_sharper`` turns
    that into the sharpness direction (for PAC-Bayes σ a larger value means flatter).
    ``functions`` maps a measure label to its function name (labels equal names by default).
    """
    columns = [
        "measure",
        "small_batch",
        "large_batch",
        "n_small",
        "n_large",
        "median_small",
        "median_large",
        "cliffs_delta",
        "hedges_g",
        "mannwhitney_u",
        "p_value",
        "large_sharper",
    ]
    sizes = sorted(runs["batch_size"].dropna().unique())
    if len(sizes) < 2:
        return pd.DataFrame(columns=columns)
    small_bs, large_bs = sizes[0], sizes[-1]
    rows = []
    for m in measures:
        s = runs.loc[runs["batch_size"] == small_bs, m].astype(float).dropna().to_numpy()
        large = runs.loc[runs["batch_size"] == large_bs, m].astype(float).dropna().to_numpy()
        if s.size and large.size:
            res = stats.mannwhitneyu(large, s, alternative="two-sided")
            u, p = float(res.statistic), float(res.pvalue)
        else:
            u = p = math.nan
        delta = cliffs_delta(large, s)
        sign = sharpness_sign((functions or {}).get(m, m))
        rows.append(
            {
                "measure": m,
                "small_batch": int(small_bs),
                "large_batch": int(large_bs),
                "n_small": int(s.size),
                "n_large": int(large.size),
                "median_small": float(np.median(s)) if s.size else math.nan,
                "median_large": float(np.median(large)) if large.size else math.nan,
                "cliffs_delta": delta,
                "hedges_g": hedges_g(large, s),
                "mannwhitney_u": u,
                "p_value": p,
                "large_sharper": bool(sign * delta > 0) if math.isfinite(delta) else None,
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


# --------------------------------------------------------------------------------------------
# Findings: sentences generated from the tables


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3g}"


def findings(
    runs: pd.DataFrame,
    kendall: pd.DataFrame,
    granulated: pd.DataFrame,
    batch: pd.DataFrame,
    invariance: pd.DataFrame,
    functions: Mapping[str, str] | None = None,
    significance: float = 0.05,
    tolerance: float = 0.01,
) -> list[str]:
    """Markdown bullet sentences that state what the tables say, whichever way it came out."""
    functions = dict(functions or {})
    out = []
    ok = runs[runs["status"] == "ok"]
    out.append(
        f"{len(runs)} runs, {len(ok)} trained without diverging"
        + (
            f" ({len(runs) - len(ok)} diverged or failed and were not measured)."
            if len(ok) < len(runs)
            else "."
        )
    )
    sizes = sorted(ok["batch_size"].unique())
    if len(sizes) >= 2:
        s, lg = ok[ok["batch_size"] == sizes[0]], ok[ok["batch_size"] == sizes[-1]]
        out.append(
            f"Batch {sizes[0]} reached a mean test accuracy of {_fmt(s['test_acc'].mean())} "
            f"(loss gap {_fmt(s['gap_loss'].mean())}) in {_fmt(s['epochs'].mean())} epochs; batch "
            f"{sizes[-1]} reached {_fmt(lg['test_acc'].mean())} (loss gap "
            f"{_fmt(lg['gap_loss'].mean())}) in {_fmt(lg['epochs'].mean())} epochs."
        )
    if not invariance.empty:
        inv = invariance[invariance["n"] > 0].groupby("measure", sort=False)
        stayed = [m for m, g in inv if g["invariant"].all()]
        moved = {m: g for m, g in inv if not g["invariant"].all()}
        if stayed:
            tested = inv.get_group(stayed[0])
            pairs = zip(tested["variant"], tested["n"], strict=True)
            copies = ", ".join(f"{v} (n = {n})" for v, n in pairs)
            out.append(
                f"Invariant (every copy/original ratio within 1 ± {tolerance:g}) on every copy "
                f"measured — {copies}: {', '.join(stayed)}."
            )
        for m, g in moved.items():
            worst = g.loc[(g["median_ratio"] - 1).abs().idxmax()]
            text = (
                f"{m} is not invariant: on the {worst['variant']} copies its median ratio to the "
                f"original was {_fmt(worst['median_ratio'])}"
            )
            if math.isfinite(worst["alpha_exponent"]):
                text += f" (≈ α^{_fmt(worst['alpha_exponent'])})"
            out.append(text + ".")
        na = invariance[invariance["n"] == 0]
        if not na.empty:
            out.append(
                "Not applicable (no finite ratio): "
                + ", ".join(sorted(set(na["measure"] + " / " + na["variant"])))
                + "."
            )
    for _, row in batch.iterrows():
        if row["large_sharper"] is None or not math.isfinite(row["cliffs_delta"]):
            out.append(
                f"{row['measure']}: the batch-size comparison is undefined (missing values)."
            )
            continue
        verdict = "sharper" if row["large_sharper"] else "flatter"
        if row["cliffs_delta"] == 0:
            verdict = "neither sharper nor flatter"
        sig = "significant" if row["p_value"] < significance else "not significant"
        out.append(
            f"Under {row['measure']}, batch {row['large_batch']} solutions came out {verdict} "
            f"than batch {row['small_batch']} (Cliff's δ = {_fmt(row['cliffs_delta'])}, Hedges g = "
            f"{_fmt(row['hedges_g'])}, Mann–Whitney p = {_fmt(row['p_value'])}: {sig} at "
            f"{significance:g}, n = {row['n_large']} vs {row['n_small']})."
        )
    for _, row in kendall.iterrows():
        if not math.isfinite(row["tau"]):
            out.append(
                f"Kendall τ of {row['measure']} vs {row['gap']} is undefined (constant or missing)."
            )
            continue
        sign = sharpness_sign(functions.get(row["measure"], row["measure"]))
        sig = "significant" if row["p_value"] < significance else "not significant"
        if row["tau"] == 0:
            direction = "no rank association between sharpness and the gap."
        elif sign * row["tau"] > 0:
            direction = "sharper went with a larger gap, as 'flat minima generalise' predicts."
        else:
            direction = "sharper went with a smaller gap, against 'flat minima generalise'."
        out.append(
            f"{row['measure']} vs {row['gap']}: τ = {_fmt(row['tau'])} (p = {_fmt(row['p_value'])}, "
            f"{sig}, n = {row['n']}); {direction}"
        )
    psi = granulated[granulated["axis"] == "Psi"] if not granulated.empty else granulated
    for _, row in psi.iterrows():
        flat_measure = sharpness_sign(functions.get(row["measure"], row["measure"])) < 0
        out.append(
            f"Granulated Kendall Ψ of {row['measure']} vs {row['gap']}: {_fmt(row['psi'])} "
            f"(mean over {row['groups']} axes"
            + (
                "; larger means flatter, so a negative Ψ agrees with 'flat minima generalise')."
                if flat_measure
                else ")."
            )
        )
    return out


def findings_markdown(sentences: Sequence[str], title: str = "Findings") -> str:
    """The sentences as a Markdown bullet list under a heading."""
    return f"# {title}\n\n" + "\n".join(f"- {s}" for s in sentences) + "\n"


def markdown_tables(tables: Mapping[str, pd.DataFrame]) -> str:
    """Several tables as Markdown sections (``floatfmt .4g``)."""
    parts = []
    for title, df in tables.items():
        body = df.to_markdown(index=False, floatfmt=".4g") if not df.empty else "(empty)"
        parts.append(f"## {title}\n\n{body}\n")
    return "\n".join(parts)
