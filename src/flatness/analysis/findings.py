"""Sentences and the report's front page, generated from the study tables whichever way they came out.

Every claim states its statistic, the percentile-bootstrap 95% interval, the p-value and the
number of runs it rests on. Nothing here computes a statistic: the numbers come from the tables of
:mod:`flatness.analysis.stats`, so a sentence can always be traced to a table row.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence

import pandas as pd

from flatness.analysis.stats import sharpness_sign

#: How outcomes are named in sentences.
OUTCOME_NAMES = {
    "test_acc": "test accuracy",
    "train_acc": "training accuracy",
    "gap_acc": "accuracy gap (train − test)",
    "gap_loss": "loss gap (test − train)",
}


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3g}"


def _ci(lo: float, hi: float) -> str:
    return f"95% CI [{_fmt(lo)}, {_fmt(hi)}]"


def invariant_measures(invariance: pd.DataFrame) -> list[str]:
    """Measures whose every copy/original ratio stayed within tolerance on every copy measured."""
    if invariance.empty:
        return []
    inv = invariance[invariance["n"] > 0].groupby("measure", sort=False)
    return [m for m, g in inv if g["invariant"].all()]


def _outcome_sentence(row: pd.Series) -> str:
    name = OUTCOME_NAMES.get(row["measure"], row["measure"])
    return (
        f"{name[0].upper() + name[1:]}: batch {row['large_batch']} {_fmt(row['mean_large'])} vs "
        f"batch {row['small_batch']} {_fmt(row['mean_small'])} (mean over runs; difference "
        f"{_fmt(row['diff_mean'])}, {_ci(row['diff_ci_low'], row['diff_ci_high'])}; Cliff's δ "
        f"{_fmt(row['cliffs_delta'])}, Mann–Whitney p = {_fmt(row['p_value'])}; n = "
        f"{row['n_large']} vs {row['n_small']} runs)."
    )


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

        def mean(frame: pd.DataFrame, col: str) -> str:
            return _fmt(frame[col].mean()) if col in frame else "n/a"

        out.append(
            f"Batch {sizes[0]} trained for {mean(s, 'epochs')} epochs ({mean(s, 'steps')} "
            f"steps) on average, batch {sizes[-1]} for {mean(lg, 'epochs')} epochs "
            f"({mean(lg, 'steps')} steps)."
        )
    outcomes = batch[batch["kind"] == "outcome"] if not batch.empty else batch
    out += [_outcome_sentence(row) for _, row in outcomes.iterrows()]
    if not invariance.empty:
        inv = invariance[invariance["n"] > 0].groupby("measure", sort=False)
        stayed = invariant_measures(invariance)
        if stayed:
            tested = inv.get_group(stayed[0])
            pairs = zip(tested["variant"], tested["n"], strict=True)
            copies = ", ".join(f"{v} (n = {n})" for v, n in pairs)
            out.append(
                f"Invariant (every copy/original ratio within 1 ± {tolerance:g}) on every copy "
                f"measured — {copies}: {', '.join(stayed)}."
            )
        for m, g in inv:
            if m in stayed:
                continue
            worst = g.loc[(g["median_ratio"] - 1).abs().idxmax()]
            text = (
                f"{m} is not invariant: on the {worst['variant']} copies (n = {worst['n']}) its "
                f"median ratio to the original was {_fmt(worst['median_ratio'])} (range "
                f"{_fmt(worst['min_ratio'])}–{_fmt(worst['max_ratio'])})"
            )
            if math.isfinite(worst["alpha_exponent"]):
                text += f", ≈ α^{_fmt(worst['alpha_exponent'])}"
            out.append(text + ".")
        na = invariance[invariance["n"] == 0]
        if not na.empty:
            out.append(
                "Not applicable (no finite ratio): "
                + ", ".join(sorted(set(na["measure"] + " / " + na["variant"])))
                + "."
            )
    measures = batch[batch["kind"] == "measure"] if not batch.empty else batch
    for _, row in measures.iterrows():
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
            f"than batch {row['small_batch']}: Cliff's δ = {_fmt(row['cliffs_delta'])} "
            f"({_ci(row['delta_ci_low'], row['delta_ci_high'])}), median "
            f"{_fmt(row['median_large'])} vs {_fmt(row['median_small'])}, Hedges g = "
            f"{_fmt(row['hedges_g'])}, Mann–Whitney p = {_fmt(row['p_value'])} ({sig} at "
            f"{significance:g}), n = {row['n_large']} vs {row['n_small']} runs."
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
            f"{row['measure']} vs {row['gap']}: τ = {_fmt(row['tau'])} "
            f"({_ci(row['ci_low'], row['ci_high'])}, p = {_fmt(row['p_value'])}, {sig}, "
            f"n = {row['n']} runs); {direction}"
        )
    psi = granulated[granulated["axis"] == "Psi"] if not granulated.empty else granulated
    for _, row in psi.iterrows():
        flat_measure = sharpness_sign(functions.get(row["measure"], row["measure"])) < 0
        out.append(
            f"Granulated Kendall Ψ of {row['measure']} vs {row['gap']}: {_fmt(row['psi'])} "
            f"(mean over {row['groups']} axes; descriptive, no interval"
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


# --------------------------------------------------------------------------------------------
# The report's front page


def _rst_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append("   * - " + str(row[0]))
        lines += [f"     - {c}" for c in row[1:]]
    return "\n".join(lines) + "\n"


def front_page_rst(
    intro: str,
    runs: pd.DataFrame,
    batch: pd.DataFrame,
    kendall: pd.DataFrame,
    invariance: pd.DataFrame,
    figure_png: bytes | None = None,
    gap: str = "gap_acc",
    paper_rst: str | None = None,
) -> str:
    """The report's first page: ``intro`` (reStructuredText), then the headline numbers.

    Large- vs small-batch difference (mean, bootstrap 95% interval, Mann–Whitney p) in test
    accuracy and in each measure that stayed invariant on every reparameterised copy; Kendall τ of
    each invariant measure against ``gap`` with its interval; then the invariance figure, inlined
    as a data URI so the page needs no other file. ``paper_rst``, for a study that reproduces a
    paper, goes right after the introduction.
    """
    ok = runs[runs["status"] == "ok"]
    parts = [intro.rstrip() + "\n"]
    if paper_rst:  # the reproduced paper's verdicts (flatness.analysis.papers.PaperResult.rst)
        parts.append("\n" + paper_rst)
    parts.append("\nHeadline\n--------\n")
    invariant = invariant_measures(invariance)
    parts.append(
        f"\n{len(runs)} runs ({len(ok)} trained without diverging). Measures invariant on every "
        f"function-preserving copy: {', '.join(invariant) or 'none'}.\n\n"
    )
    if not batch.empty:
        b = batch.set_index("measure")
        large, small = int(batch["large_batch"].iloc[0]), int(batch["small_batch"].iloc[0])
        rows = []
        for name in ["test_acc", "gap_acc", *invariant]:
            if name not in b.index:
                continue
            r = b.loc[name]
            rows.append(
                [
                    OUTCOME_NAMES.get(name, f"``{name}``"),
                    _fmt(r["mean_small"]),
                    _fmt(r["mean_large"]),
                    f"{_fmt(r['diff_mean'])} [{_fmt(r['diff_ci_low'])}, {_fmt(r['diff_ci_high'])}]",
                    f"{_fmt(r['cliffs_delta'])} [{_fmt(r['delta_ci_low'])}, "
                    f"{_fmt(r['delta_ci_high'])}]",
                    _fmt(r["p_value"]),
                    f"{r['n_large']} vs {r['n_small']}",
                ]
            )
        parts.append(f"**Batch {large} vs batch {small}** (runs that trained ok):\n\n")
        parts.append(
            _rst_table(
                [
                    "quantity",
                    f"mean, batch {small}",
                    f"mean, batch {large}",
                    "difference (95% CI)",
                    "Cliff's δ (95% CI)",
                    "Mann–Whitney p",
                    "n",
                ],
                rows,
            )
        )
    k = kendall[(kendall["gap"] == gap) & kendall["measure"].isin(invariant)]
    if not k.empty:
        parts.append(f"\n**Kendall τ of each invariant measure vs {gap}**:\n\n")
        parts.append(
            _rst_table(
                ["measure", "τ", "95% CI", "p", "n"],
                [
                    [f"``{r['measure']}``", _fmt(r["tau"]),
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", _fmt(r["p_value"]),
                     str(r["n"])]
                    for _, r in k.iterrows()
                ],  # fmt: skip
            )
        )
    if figure_png:
        # docutils refuses lines over 10,000 characters; a URL parser drops the newlines.
        data = base64.encodebytes(figure_png).decode("ascii").replace("\n", "\n   ")
        parts.append(
            "\n**Each measure on the Dinh α copies, relative to the original** (flat lines: "
            "invariant):\n\n.. raw:: html\n\n"
            '   <img alt="measure vs Dinh alpha" style="max-width:100%" src="data:image/png;base64,\n'
            f'   {data.rstrip()}"/>\n'
        )
    parts.append(
        "\nThe **Findings** category states every comparison with its interval and p-value.\n"
    )
    return "".join(parts)
