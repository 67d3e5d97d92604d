"""Small helpers the figure notebooks share (one copy instead of one per notebook)."""

from __future__ import annotations

import math

import matplotlib.ticker as mticker
import pandas as pd


def positive(values) -> bool:
    """True when a log axis can show every (non-missing) value."""
    v = pd.Series(values).dropna()
    return len(v) > 0 and bool((v > 0).all())


def _plain(value: float, _pos=None) -> str:
    return f"{value:g}"


def log_axis(ax, axis: str = "y") -> None:
    """Log scale with tick labels that stay readable, whatever the axis spans.

    Spanning less than about a decade, matplotlib's log axis has at most one major tick and labels
    every minor one in scientific notation ("3×10⁰4×10⁰" overprinted in a small panel). Below
    one decade the axis gets at most four plainly labelled ticks (2, 4, 6); where fewer than two
    powers of ten fall inside the range (0.2 to 9 shows only "10⁰"), ticks at 1, 2 and 5 × 10^k
    (0.2, 0.5, 1, 2, 5); over wider spans the decades are labelled and the minor ticks are not.
    """
    getattr(ax, f"set_{axis}scale")("log")
    lo, hi = getattr(ax, f"get_{axis}lim")()
    target = getattr(ax, f"{axis}axis")
    target.set_minor_formatter(mticker.NullFormatter())
    if lo <= 0:
        return
    decades = math.log10(hi / lo)
    powers = math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1  # 10^k inside the range
    if decades < 1:
        target.set_major_locator(mticker.MaxNLocator(nbins=3, steps=[1, 2, 2.5, 5, 10]))
    elif powers < 2:
        target.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        return
    target.set_major_formatter(mticker.FuncFormatter(_plain))


def measures_by_batch(runs: pd.DataFrame, long: pd.DataFrame, out: str, dpi: int = 110):
    """Each measure on every trained model, by regulariser (x) and batch size (colour), one
    point per run, with the run's measurement interval (``ci_low``–``ci_high`` of its original
    model in the long table, joined by run id) as a vertical bar where error bars were taken.

    Seeds of one setting sit side by side rather than jittered, so each bar stays on its point.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    measures = list(dict.fromkeys(long["measure"]))
    orig = long[long["variant"] == "original"].set_index(["run_id", "measure"])
    has_ci = "ci_low" in orig.columns and orig["ci_low"].notna().any()
    ok = runs[runs["status"] == "ok"]
    regs = list(dict.fromkeys(ok["regularizer"]))
    batches = sorted(ok["batch_size"].unique())
    colours = dict(zip(batches, sns.color_palette("viridis", len(batches)), strict=True))
    ncol = min(3, max(len(measures), 1))
    nrow = max(1, math.ceil(len(measures) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.7 * nrow), squeeze=False)
    width = 0.8 / max(len(batches), 1)
    for ax, measure in zip(axes.flat, measures, strict=False):
        values = []
        for (i, reg), (j, bs) in ((a, b) for a in enumerate(regs) for b in enumerate(batches)):
            group = ok[(ok["regularizer"] == reg) & (ok["batch_size"] == bs)].sort_values("seed")
            k = len(group)
            for s, run_id in enumerate(group["run_id"]):
                x = i - 0.4 + width * (j + (s + 1) / (k + 1))
                y = group.set_index("run_id").loc[run_id, measure]
                values.append(y)
                err = None
                if has_ci and (run_id, measure) in orig.index:
                    lo, hi = orig.loc[(run_id, measure), ["ci_low", "ci_high"]]
                    if np.isfinite(lo) and np.isfinite(hi):
                        err = [[y - lo], [hi - y]]
                label = f"batch {bs}" if (i, s) == (0, 0) else None
                ax.errorbar(x, y, yerr=err, fmt="o", ms=4, color=colours[bs], capsize=2,
                            label=label)  # fmt: skip
        ax.set_xticks(range(len(regs)), regs)
        ax.set_title(measure)
        if positive(values):
            log_axis(ax, "y")
    for ax in list(axes.flat)[len(measures) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    note = "\nbars: 95% measurement interval (data folds and measure seeds)" if has_ci else ""
    fig.suptitle(f"Each measure on the trained models, by batch size and regulariser{note}")
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=max(len(labels), 1), frameon=False)  # fmt: skip
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    return fig
