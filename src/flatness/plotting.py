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
